"""Pass@k curves as PNG: k on a log2 axis, one line per evaluation (model / decoding mode),
one panel per benchmark and one for the average."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from megatron_softgrpo.errors import UserError
from megatron_softgrpo.eval.report import EvalSummary, read_summary, summary_path
from megatron_softgrpo.plotting import png_path, save_png

METRIC_TITLES = {
    "pass_at_k": "pass@k (unbiased)",
    "pass_at_k_first": "pass@k (any of the first k)",
    "maj_at_k": "maj@k",
}


def plot_kind(
    dirs: Sequence[str | Path], kind: Literal["auto", "train", "passk"]
) -> Literal["train", "passk"]:
    """What `softgrpo plot` draws for these directories; auto: Pass@k when every one has an eval summary."""
    if kind != "auto":
        return kind
    if all(summary_path(d) is not None for d in dirs):
        return "passk"
    if all((Path(d) / "metrics.jsonl").is_file() for d in dirs):
        return "train"
    neither = next(
        d for d in dirs if summary_path(d) is None and not (Path(d) / "metrics.jsonl").is_file()
    )
    raise UserError(
        f"{neither}: neither a training run (metrics.jsonl) nor an evaluation (eval/summary.json)"
    )


def default_label(directory: str | Path, summary: EvalSummary) -> str:
    path = Path(directory).resolve()
    run = path.parent.name if path.name == "eval" else path.name
    return f"{run} ({summary.decoding})"


def plot_pass_at_k(
    eval_dirs: Sequence[str | Path],
    out: str | Path,
    labels: Sequence[str] | None = None,
    metric: str = "pass_at_k",
) -> Path:
    """Draw `metric` against k for each evaluation directory (a run's log_dir, or its eval/ folder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if metric not in METRIC_TITLES:
        raise UserError(f"metric {metric!r}: expected one of {', '.join(METRIC_TITLES)}")
    out = png_path(out)
    summaries = [read_summary(d) for d in eval_dirs]
    labels = list(labels) if labels else [default_label(d, s) for d, s in zip(eval_dirs, summaries)]
    panels = list(dict.fromkeys(name for s in summaries for name in s.benchmarks)) + ["average"]
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False, constrained_layout=True
    )
    for ax, panel in zip(axes.flat, panels):
        for summary, label in zip(summaries, labels):
            metrics = summary.average if panel == "average" else summary.benchmarks.get(panel)
            curve = sorted(getattr(metrics, metric).items()) if metrics is not None else []
            if curve:
                ks, values = zip(*curve)
                ax.plot(ks, [100 * v for v in values], marker="o", markersize=3, label=label)
        all_ks = sorted(
            {
                k
                for s in summaries
                for m in [*s.benchmarks.values(), s.average]
                for k in getattr(m, metric)
            }
        )
        ax.set_xscale("log", base=2)
        if all_ks:
            ax.set_xticks(all_ks, [str(k) for k in all_ks])
        ax.set_title(panel)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("k")
        ax.set_ylabel(f"{METRIC_TITLES[metric]} (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    legend = {}  # label -> line, from every panel (an evaluation may lack a benchmark)
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(name, handle)
    if legend:
        names, handles = list(legend), list(legend.values())
        fig.legend(handles, names, loc="outside lower center", ncol=min(4, len(names)))
    try:
        save_png(fig, out)
    finally:
        plt.close(fig)
    return out
