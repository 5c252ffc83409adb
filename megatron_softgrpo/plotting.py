"""What every PNG the CLI writes shares: the output path check and a save that fails in one line."""

from __future__ import annotations

from pathlib import Path

from megatron_softgrpo.errors import UserError


def png_path(out: str | Path) -> Path:
    """`--out`, checked before anything is drawn: the plots are PNG files."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: expected a .png file name")
    return out


def save_png(fig, out: Path) -> None:
    """Write `fig` to `out` (creating its directory); a path that cannot be written is a UserError."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110, bbox_inches="tight")
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write it ({exc.strerror or exc})") from None
