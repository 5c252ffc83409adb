"""Training curves as PNG: reward, accuracy (training, and held-out where validated), KL and
response length per step, runs overlaid."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_softgrpo.plotting import png_path, save_png
from megatron_softgrpo.train.metrics_log import FINAL_VALIDATION, read_metrics

PANELS = (
    ("reward/mean", "reward"),
    ("accuracy", "accuracy (held-out: dashed, step 0 = before training)"),
    ("kl/mean", "KL to reference"),  # runs without a reference model show the answer rate instead
    ("response_length/mean", "response length (tokens)"),
)
NO_KL_PANEL = ("answer_rate", "answer rate (env.answer_format)")
TRAINING_CURVES = (
    "training_curves.png"  # what training writes into its log_dir; `softgrpo plot DIR`'s default
)


def held_out_points(rows: list[dict], final: dict | None = None) -> list[tuple[int, float]]:
    """Held-out accuracy by step: before training at step 0, each validation's, and the final
    one (`final_validation.json`, which a run without periodic validation only writes there)."""
    points = {}
    for r in rows:
        if r.get("val_at_start/accuracy") is not None:
            points[0] = r["val_at_start/accuracy"]
    points |= {r["step"]: r["val/accuracy"] for r in rows if r.get("val/accuracy") is not None}
    if final is not None:
        points[final["step"]] = final["final"]["accuracy"]
    return sorted(points.items())


def read_final_validation(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / FINAL_VALIDATION
    return json.loads(path.read_text()) if path.is_file() else None


def plot_runs(run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    out = png_path(out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_metrics(d) for d in run_dirs]
    finals = [read_final_validation(d) for d in run_dirs]
    labels = labels or [Path(d).name for d in run_dirs]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    with_kl = any("kl/mean" in r for rows in runs for r in rows)
    panels = [p if p[0] != "kl/mean" or with_kl else NO_KL_PANEL for p in PANELS]
    for ax, (key, title) in zip(axes.flat, panels):
        for rows, final, label in zip(runs, finals, labels):
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                (line,) = ax.plot(*zip(*points), marker="o", markersize=3, label=label)
                held_out = held_out_points(rows, final) if key == "accuracy" else []
                if held_out:
                    ax.plot(*zip(*held_out), "--", marker="s", markersize=3, color=line.get_color())
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, names = axes.flat[0].get_legend_handles_labels()
    if len(runs) > 1 and handles:
        fig.legend(
            handles, names, loc="lower center", ncol=min(4, len(runs)), bbox_to_anchor=(0.5, -0.04)
        )
    try:
        save_png(fig, out)
    finally:
        plt.close(fig)
    return out
