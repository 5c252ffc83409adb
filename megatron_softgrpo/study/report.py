"""A study's report: every decoding it ran with, each (training, decoding) row with its change from
the base model, the differences between algorithms, and the training curves.

Numbers come from the evaluations' per-problem samples (`eval/<benchmark>/samples.jsonl`), so that
each estimate has a standard error counting both training seeds and problems (`study/stats.py`).
Files: report.md, report.json, pass_at_k.png, training.png.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_softgrpo.errors import UserError
from megatron_softgrpo.eval.metrics import problem_scores
from megatron_softgrpo.eval.report import read_summary, summary_path
from megatron_softgrpo.eval.samples import SampleFile, sample_table
from megatron_softgrpo.plotting import save_png
from megatron_softgrpo.study.jobs import eval_dir, job_code, train_dir
from megatron_softgrpo.study.spec import StudySpec
from megatron_softgrpo.study.stats import Estimate, Scores, estimate
from megatron_softgrpo.train.metrics_log import read_metrics
from megatron_softgrpo.train.plots import held_out_points, read_final_validation

SPEC_COLUMNS = ("sampler", "temperature", "top_k", "top_p", "min_p", "mixture_size", "gumbel_tau")


@dataclass
class Evaluated:
    """One evaluation's per-problem scores by metric, and its mean response length."""

    scores: dict[str, Scores]  # metric -> benchmark -> per problem
    length: float


@dataclass
class Row:
    """One (training, decoding): its estimates over seeds and problems."""

    training: str  # base or an algorithm
    decoding: str
    seeds: int
    problems: int
    values: dict[str, Estimate]
    per_seed: dict[str, list[float]]
    change_from_base: dict[str, Estimate] = field(default_factory=dict)
    length: float = 0.0


@dataclass
class Difference:
    a: str
    b: str
    decoding: str
    values: dict[str, Estimate]


def read_evaluation(directory: Path) -> Evaluated:
    """The per-problem scores of a finished evaluation (every benchmark of its summary)."""
    summary = read_summary(directory)
    scores: dict[str, Scores] = {}
    for bench, m in summary.benchmarks.items():
        records = SampleFile(directory / "eval" / bench).records(m.problems)
        table = sample_table(records)
        if len(table) != m.problems:
            raise UserError(
                f"{directory}: {bench} has samples of {len(table)} of its {m.problems} problems"
            )
        ks = sorted(m.pass_at_k)
        for problem in table:
            for key, value in problem_scores(problem, ks, vote=bool(m.maj_at_k)).items():
                scores.setdefault(key, {}).setdefault(bench, []).append(value)
    return Evaluated(scores, summary.average.mean_length)


def collect(spec: StudySpec, out: Path) -> tuple[list[Row], list[Difference]]:
    done = {
        (model, name): read_evaluation(eval_dir(out, model, name))
        for model, name in spec.evaluations()
        if summary_path(eval_dir(out, model, name)) is not None
    }
    rows, differences = [], []
    for name in spec.decodings:
        arms: dict[str, list[Evaluated]] = {}
        for (model, decoding), evaluated in done.items():
            if decoding == name:
                arms.setdefault(model.split("-seed")[0], []).append(evaluated)
        keys = _metric_keys(arms)
        scores = {t: [{k: e.scores[k] for k in keys} for e in es] for t, es in arms.items()}
        for training, evaluated in arms.items():
            row = Row(
                training,
                name,
                len(evaluated),
                sum(len(v) for v in evaluated[0].scores["pass@1"].values()),
                {k: estimate([s[k] for s in scores[training]]) for k in keys},
                {
                    k: [
                        statistics.fmean(statistics.fmean(v) for v in s[k].values())
                        for s in scores[training]
                    ]
                    for k in keys
                },
                length=statistics.fmean(e.length for e in evaluated),
            )
            if "base" in scores and training != "base":
                row.change_from_base = {
                    k: estimate([s[k] for s in scores[training]], [s[k] for s in scores["base"]])
                    for k in keys
                }
            rows.append(row)
        algorithms = [a for a in spec.algorithms if a in scores]
        for i, a in enumerate(algorithms):
            for b in algorithms[i + 1 :]:
                values = {
                    k: estimate([s[k] for s in scores[a]], [s[k] for s in scores[b]]) for k in keys
                }
                differences.append(Difference(a, b, name, values))
    return rows, differences


def _metric_keys(arms: dict[str, list[Evaluated]]) -> list[str]:
    """Every pass@k, and maj@k at the largest k, that all of a decoding's evaluations have."""
    shared = (
        set.intersection(*(set(e.scores) for es in arms.values() for e in es)) if arms else set()
    )
    ks = lambda prefix: sorted(int(k.split("@")[1]) for k in shared if k.startswith(prefix))  # noqa: E731
    return [f"pass@{k}" for k in ks("pass@")] + [f"maj@{k}" for k in ks("maj@")[-1:]]


def training_summary(spec: StudySpec, out: Path) -> dict[str, dict]:
    """Per algorithm: held-out accuracy before training, at each validation and at the end
    (`final_validation.json`), and seconds per RL step, over seeds."""
    result = {}
    for algorithm in spec.algorithms:
        curves, step_times = {}, []
        for seed in spec.seeds:
            run = train_dir(out, algorithm, seed)
            if not (run / "metrics.jsonl").is_file():
                continue
            rows = read_metrics(run)
            for step, accuracy in held_out_points(rows, read_final_validation(run)):
                curves.setdefault(step, []).append(accuracy)
            step_times += [r["time/step"] for r in rows if r["step"] > 1]  # step 1 warms up
        if curves:
            result[algorithm] = {
                "val_accuracy": {str(s): curves[s] for s in sorted(curves)},
                "seconds_per_step": statistics.median(step_times) if step_times else None,
            }
    return result


# ---------------------------------------------------------------- Markdown


def _cell(e: Estimate, signed: bool = False) -> str:
    value = f"{100 * e.value:+.1f}" if signed else f"{100 * e.value:.1f}"
    return value + (f" ± {100 * e.se:.1f}" if e.se is not None else "")


def _spec_cells(spec: dict | None) -> list[str]:
    if spec is None:
        return ["-"] * len(SPEC_COLUMNS)
    return ["-" if spec[k] is None else str(spec[k]) for k in SPEC_COLUMNS]


def decoding_table(spec: StudySpec, arms: dict[str, dict], evals: dict[str, dict]) -> list[str]:
    head = " | ".join(SPEC_COLUMNS)
    lines = [
        f"| job | applies to | {head} | other noise settings | answer phase: {head} |",
        "|---|---|" + "---|" * (2 * len(SPEC_COLUMNS) + 1),
    ]
    entries = [(f"train {a}", a, s) for a, s in arms.items()]
    entries += [
        (f"eval {n}", ", ".join(spec.decodings[n].models or ["all"]), s) for n, s in evals.items()
    ]
    for job, applies, s in entries:
        other = {k: v for k, v in s.items() if k not in (*SPEC_COLUMNS, "answer", "noise_scale")}
        other |= {"noise_scale": s["noise_scale"]} if s["noise_scale"] is not None else {}
        cells = [*_spec_cells(s), ", ".join(f"{k} {v}" for k, v in other.items()) or "-"]
        lines.append(
            f"| {job} | {applies} | " + " | ".join(cells + _spec_cells(s["answer"])) + " |"
        )
    return lines


def markdown_report(
    spec: StudySpec,
    rows: Sequence[Row],
    differences: Sequence[Difference],
    training: dict[str, dict],
    arms: dict[str, dict],
    evals: dict[str, dict],
) -> str:
    lines = []
    mismatches = spec.exploration_mismatches(arms)
    if mismatches:
        lines += [
            "**The training arms explore differently** (run with --allow-mismatched-exploration): "
            + "; ".join(mismatches)
            + ". Differences between the arms mix the algorithm with its sampling.",
            "",
        ]
    lines += [
        f"Recipe `{spec.recipe}`, overrides `{' '.join(spec.overrides) or '-'}`.",
        "",
        "## Decodings",
        "",
        "Every training arm and evaluation decoding as it runs (`-`: does not apply). A soft sampler "
        "thinks with the first settings and answers, after the think-end marker, with the answer "
        "phase's; a discrete one decodes the whole response with the first.",
        "",
        *decoding_table(spec, arms, evals),
        "",
    ]
    keys = list(rows[0].values) if rows else []
    metric_head = " | ".join(keys)
    lines += [
        "## Results",
        "",
        "Percent; ± one standard error counting training seeds and problems (base: one model, so "
        "problems only); pass@k unbiased over the n samples per problem; length in tokens.",
        "",
        f"| training | decoding | seeds | problems | {metric_head} | length |",
        "|---|---|---|---|" + "---|" * (len(keys) + 1),
    ]
    for r in rows:
        cells = " | ".join(_cell(r.values[k]) for k in keys)
        lines.append(
            f"| {r.training} | {r.decoding} | {r.seeds} | {r.problems} | {cells} | {r.length:.1f} |"
        )
    changes = [r for r in rows if r.change_from_base]
    if changes:
        lines += [
            "",
            "## Change from the base model under the same decoding",
            "",
            "Percentage points, paired by problem; ± one standard error (seeds and problems).",
            "",
            f"| training | decoding | {metric_head} |",
            "|---|---|" + "---|" * len(keys),
        ]
        for r in changes:
            cells = " | ".join(_cell(r.change_from_base[k], True) for k in keys)
            lines.append(f"| {r.training} | {r.decoding} | {cells} |")
    if differences:
        lines += [
            "",
            "## Differences between algorithms under the same decoding",
            "",
            "Percentage points, A - B, paired by problem; ± one standard error (both arms' seeds "
            "and the problems).",
            "",
            f"| A - B | decoding | {metric_head} |",
            "|---|---|" + "---|" * len(keys),
        ]
        for d in differences:
            cells = " | ".join(_cell(d.values[k], True) for k in keys if k in d.values)
            lines.append(f"| {d.a} - {d.b} | {d.decoding} | {cells} |")
    if training:
        lines += [
            "",
            "## Training",
            "",
            "| algorithm | held-out accuracy by step (mean ± sd over seeds) | seconds per RL step (median) |",
            "|---|---|---|",
        ]
        for algorithm, t in training.items():
            curve = ", ".join(f"{s}: {_seed_cell(v)}" for s, v in t["val_accuracy"].items())
            seconds = t["seconds_per_step"]
            lines.append(f"| {algorithm} | {curve} | {f'{seconds:.1f}' if seconds else '-'} |")
    return "\n".join(lines) + "\n"


def code_section(code: dict[str, str | None]) -> str:
    """Which code each job ran (its log's `# code:` line), grouped by version."""
    if not code:
        return ""
    versions: dict[str, list[str]] = {}
    for job, version in code.items():
        versions.setdefault(
            version or "not logged (a job run before the driver logged it)", []
        ).append(job)
    lines = [
        "",
        "## Code",
        "",
        "| code (package, commit; + uncommitted changes) | jobs |",
        "|---|---|",
    ]
    lines += [f"| {v} | {', '.join(jobs)} |" for v, jobs in versions.items()]
    return "\n".join(lines) + "\n"


def _seed_cell(values: Sequence[float]) -> str:
    mean, sd = _mean_sd(values)
    return f"{100 * mean:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def write_report(spec: StudySpec, out: Path) -> Path:
    rows, differences = collect(spec, out)
    if not rows:
        raise UserError(
            f"{out}: no finished evaluation to report (eval/<model>/<decoding>/eval/summary.json)"
        )
    training = training_summary(spec, out)
    arms, evals = spec.arm_decodings(), spec.eval_decodings()
    code = {log.stem: job_code(log) for log in sorted((out / "logs").glob("*.log"))}
    report = {
        "allow_mismatched_exploration": spec.allow_mismatched_exploration,
        "exploration_mismatches": spec.exploration_mismatches(arms),
        "arms": {a: {"decoding": s} for a, s in arms.items()},
        "decodings": {n: asdict(spec.decodings[n]) | {"decoding": s} for n, s in evals.items()},
        "rows": [asdict(r) for r in rows],
        "differences": [asdict(d) for d in differences],
        "training": training,
        "code": code,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = markdown_report(spec, rows, differences, training, arms, evals)
    (out / "report.md").write_text(markdown + code_section(code))
    plot_pass_at_k(rows, out / "pass_at_k.png")
    if training:
        plot_training(spec, out, training, out / "training.png")
    return out / "report.md"


# ---------------------------------------------------------------- plots


def plot_pass_at_k(rows: Sequence[Row], out: Path) -> None:
    """pass@k against log2 k with a band of one standard error: one panel per decoding, one colour
    per training (the same in every panel), so a panel compares models under one decoding."""
    plt = _pyplot()
    decodings = list(dict.fromkeys(r.decoding for r in rows))
    trainings = list(dict.fromkeys(r.training for r in rows))
    colours = {t: f"C{i}" for i, t in enumerate(trainings)}
    cols = min(4, len(decodings))
    nrows = -(-len(decodings) // cols)
    fig, axes = plt.subplots(
        nrows,
        cols,
        figsize=(3.2 * cols, 2.8 * nrows + 0.6),
        sharex=True,
        sharey=True,
        squeeze=False,
        constrained_layout=True,
    )
    for ax, decoding in zip(axes.flat, decodings):
        for row in (r for r in rows if r.decoding == decoding):
            ks = sorted(int(k.split("@")[1]) for k in row.values if k.startswith("pass@"))
            stats = [row.values[f"pass@{k}"] for k in ks]
            colour = colours[row.training]
            ax.plot(ks, [100 * e.value for e in stats], color=colour, marker="o", markersize=3)
            _band(ax, ks, [(e.value, e.se) for e in stats], colour)
        ax.set_title(decoding, fontsize=9)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(decodings) :]:
        ax.set_visible(False)
    for ax in axes.flat[max(0, len(decodings) - cols) : len(decodings)]:  # lowest in its column
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xlabel("k")
    for ax in axes[:, 0]:
        ax.set_ylabel("pass@k (%)")
    handles = [plt.Line2D([], [], color=colours[t], marker="o", markersize=3) for t in trainings]
    fig.legend(handles, trainings, loc="outside upper center", ncols=len(trainings), fontsize=8)
    _save(plt, fig, out)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (the first points average what there is)."""
    return [statistics.fmean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def _mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def plot_training(spec: StudySpec, out: Path, training: dict[str, dict], png: Path) -> None:
    """Held-out accuracy at the validation steps, and the training reward's moving average (4 steps), seed bands."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    for algorithm, t in training.items():
        steps = [int(s) for s in t["val_accuracy"]]
        stats = [_mean_sd(v) for v in t["val_accuracy"].values()]
        (line,) = left.plot(steps, [m for m, _ in stats], marker="o", markersize=3, label=algorithm)
        _band(left, steps, stats, line.get_color(), scale=1)
        curves = [
            moving_average([r["reward/mean"] for r in read_metrics(run)], 4)
            for run in (train_dir(out, algorithm, s) for s in spec.seeds)
            if (run / "metrics.jsonl").is_file()
        ]
        length = min(len(c) for c in curves)
        stats = [_mean_sd([c[i] for c in curves]) for i in range(length)]
        (line,) = right.plot(range(1, length + 1), [m for m, _ in stats], label=algorithm)
        _band(right, list(range(1, length + 1)), stats, line.get_color(), scale=1)
    left.set_title("held-out accuracy (one sample per problem)")
    right.set_title("training reward, moving average of 4 steps")
    for ax in (left, right):
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(plt, fig, png)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, png: Path) -> None:
    try:
        save_png(fig, png)
    finally:
        plt.close(fig)


def _band(ax, xs, stats, color, scale: float = 100) -> None:
    """A band of one spread (standard error or deviation) around each mean; none where unknown."""
    if all(s is not None for _, s in stats):
        ax.fill_between(
            xs,
            [scale * (m - s) for m, s in stats],
            [scale * (m + s) for m, s in stats],
            color=color,
            alpha=0.15,
        )
