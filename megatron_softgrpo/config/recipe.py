"""A loaded recipe: the typed config, the merged dict it was read from, and where each key was set,
so that an error can name the file (or "command line") that set the bad value."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_softgrpo.config.schema import RecipeCfg
from megatron_softgrpo.errors import ConfigError


@dataclass
class LoadedRecipe:
    cfg: RecipeCfg
    path: Path
    raw: dict  # merged plain dict (what was validated), for logging and checkpoint metadata
    provenance: dict[str, str] = field(
        default_factory=dict
    )  # dotted leaf key -> file or "command line"

    def source_of(self, dotted_key: str) -> str:
        """The file (or "command line") that set `dotted_key`, else its nearest set parent, else what
        set a key under it (a mapping built from overrides), else the recipe."""
        key = dotted_key
        while key:
            if key in self.provenance:
                return self.provenance[key]
            key = key.rpartition(".")[0]
        below = sorted(
            {src for k, src in self.provenance.items() if k.startswith(dotted_key + ".")}
        )
        return below[0] if len(below) == 1 else str(self.path)

    def error(self, dotted_key: str, message: str) -> ConfigError:
        value = lookup(self.raw, dotted_key)
        if value is not MISSING:
            shown = f"{dotted_key}={_show(value)}"
        else:  # not set anywhere: name the schema default the check saw
            default = _attribute(self.cfg, dotted_key)
            shown = (
                dotted_key if default is MISSING else f"{dotted_key}={_show(default)} (the default)"
            )
        return ConfigError(f"{self.source_of(dotted_key)}: {shown}: {message}")


MISSING = object()


def lookup(d: dict, dotted: str) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return MISSING
        cur = cur[part]
    return cur


def _attribute(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part, MISSING)
        if obj is MISSING:
            break
    return obj


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)
