"""A side-by-side study: algorithms trained with one recipe and the same seeds, the base model and
every final checkpoint evaluated under each decoding, one report with the spread over seeds.

Everything runs through `softgrpo train` and `softgrpo eval` (locally one after another, or as
Slurm jobs through slurm/softgrpo.sbatch); this module only plans those commands and reads what
they wrote. Layout under OUT:

    study.json                   the study's settings; a rerun with other settings is refused
    train/<algorithm>/seed<S>/   a training run's log_dir (metrics.jsonl, checkpoints/, ...)
    eval/<model>/<decoding>/     an evaluation's log_dir (eval/summary.json); model: base or <algorithm>-seed<S>
    logs/<job>.log               each local job's output
    report.md, report.json, pass_at_k.png, training.png

Every job is skipped when its output is complete, and `softgrpo train` / `softgrpo eval` resume a
job that was interrupted, so rerunning the same command continues the study.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_softgrpo.errors import UserError
from megatron_softgrpo.eval.report import read_summary, summary_path
from megatron_softgrpo.train.metrics_log import read_metrics

DECODING_NAMES = {"discrete": "hard", "gumbel": "soft"}  # the report's words for the samplers


@dataclass(frozen=True)
class StudySpec:
    recipe: str
    algorithms: tuple[str, ...] = ("grpo", "softgrpo")
    seeds: tuple[int, ...] = (1, 2, 3)
    decodings: tuple[str, ...] = ("discrete", "gumbel")  # softgrpo.sampler of each evaluation
    overrides: tuple[str, ...] = ()  # dotted.key=value for every train and eval job

    def check(self) -> None:
        for name, values in (
            ("--algorithms", self.algorithms),
            ("--seeds", self.seeds),
            ("--decodings", self.decodings),
        ):
            if len(set(values)) != len(values) or not values:
                raise UserError(f"study: {name} must be distinct and non-empty, got {list(values)}")


@dataclass(frozen=True)
class Job:
    name: str  # unique, also the Slurm job name and the log file's
    command: str  # train | eval
    args: tuple[str, ...]  # after `softgrpo <command> RECIPE`
    log_dir: Path
    after: tuple[str, ...] = ()  # jobs whose output this one reads
    benchmarks: tuple[str, ...] = ()  # an evaluation's; its summary gains each as it finishes

    def done(self) -> bool:
        if self.command == "train":
            return (self.log_dir / "final_validation.json").is_file()
        if summary_path(self.log_dir) is None:
            return False
        return set(self.benchmarks) <= set(read_summary(self.log_dir).benchmarks)


def train_dir(out: Path, algorithm: str, seed: int) -> Path:
    return out / "train" / algorithm / f"seed{seed}"


def plan_jobs(spec: StudySpec, out: Path, benchmarks: Sequence[str]) -> list[Job]:
    """The training jobs, then every (model, decoding) evaluation of `benchmarks`; base once."""
    jobs = []
    models: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [("base", (), ())]
    for algorithm in spec.algorithms:
        for seed in spec.seeds:
            run = train_dir(out, algorithm, seed)
            name = f"{algorithm}-seed{seed}"
            jobs.append(
                Job(
                    f"train-{name}",
                    "train",
                    (
                        f"softgrpo.algorithm={algorithm}",
                        f"grpo.seed={seed}",
                        f"logger.log_dir={run}",
                        f"checkpointing.checkpoint_dir={run / 'checkpoints'}",
                        *spec.overrides,
                    ),
                    run,
                )
            )
            models.append((name, (f"checkpoint={run / 'checkpoints'}",), (f"train-{name}",)))
    for model, checkpoint, after in models:
        for decoding in spec.decodings:
            log_dir = out / "eval" / model / decoding
            jobs.append(
                Job(
                    f"eval-{model}-{decoding}",
                    "eval",
                    (
                        *checkpoint,
                        f"softgrpo.sampler={decoding}",
                        f"logger.log_dir={log_dir}",
                        *spec.overrides,
                    ),
                    log_dir,
                    after,
                    tuple(benchmarks),
                )
            )
    return jobs


def check_manifest(spec: StudySpec, out: Path) -> None:
    """Write study.json, or refuse a rerun whose settings differ from the first run's."""
    path = out / "study.json"
    asked = asdict(spec) | {"recipe": str(Path(spec.recipe).resolve())}
    asked = json.loads(json.dumps(asked))  # tuples as lists, as read back
    if path.is_file():
        stored = json.loads(path.read_text())
        for key, value in asked.items():
            if stored.get(key) != value:
                raise UserError(
                    f"{path}: this study ran with {key}={json.dumps(stored.get(key))}, now "
                    f"{json.dumps(value)}; use another --out, or the same settings to continue it"
                )
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asked, indent=1) + "\n")


# ---------------------------------------------------------------- running


def run_local(
    spec: StudySpec, jobs: Sequence[Job], out: Path, python: str = sys.executable
) -> None:
    """Each unfinished job in order, its output in logs/<job>.log; a failed job stops the study."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if not j.done()]
    print(
        f"[study] {len(jobs) - len(todo)} of {len(jobs)} jobs done; {len(todo)} to run", flush=True
    )
    start = time.monotonic()
    for index, job in enumerate(todo):
        argv = [python, "-m", "megatron_softgrpo", job.command, spec.recipe, *job.args]
        log = logs / f"{job.name}.log"
        print(f"[study] ({index + 1}/{len(todo)}) {job.name}: log {log}", flush=True)
        with log.open("a") as f:
            f.write(f"# {' '.join(argv)}\n")
            f.flush()
            rc = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT)
        if rc != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-5:])
            raise UserError(f"study: {job.name} failed (exit {rc}); the end of {log}:\n{tail}")
        elapsed = time.monotonic() - start
        left = elapsed / (index + 1) * (len(todo) - index - 1)
        print(
            f"[study] {job.name} done; {elapsed / 60:.1f} min so far, ~{left / 60:.0f} min left",
            flush=True,
        )


def sbatch_argv(
    spec: StudySpec, job: Job, ids: dict[str, str], sbatch_args: Sequence[str] = ()
) -> list[str]:
    """The `sbatch` of one job; it waits (afterok) for those of its inputs submitted now (`ids`)."""
    argv = ["sbatch", "--parsable", f"--job-name={job.name}", *sbatch_args]
    waits = [ids[a] for a in job.after if a in ids]  # a finished job has no id: nothing to wait for
    if waits:
        argv.append("--dependency=" + ",".join(f"afterok:{i}" for i in waits))
    return argv + [
        f"--export=ALL,SOFTGRPO_COMMAND={job.command}",
        "slurm/softgrpo.sbatch",
        spec.recipe,
        *job.args,
    ]


def submit_slurm(spec: StudySpec, jobs: Sequence[Job], sbatch_args: Sequence[str] = ()) -> None:
    """Submit every unfinished job through slurm/softgrpo.sbatch (run from the project root)."""
    ids: dict[str, str] = {}
    for job in jobs:
        if job.done():
            continue
        done = subprocess.run(
            sbatch_argv(spec, job, ids, sbatch_args), capture_output=True, text=True
        )
        if done.returncode != 0:
            raise UserError(f"study: sbatch refused {job.name}: {done.stderr.strip()}")
        ids[job.name] = done.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
        print(f"[study] submitted {job.name}: job {ids[job.name]}", flush=True)
    print(
        "[study] when the jobs have finished, rerun with --report-only for the report", flush=True
    )


# ---------------------------------------------------------------- the report


@dataclass
class Row:
    """One (training, decoding): its metric values over seeds (base: one)."""

    training: str  # base or an algorithm
    decoding: str
    values: dict[str, list[float]] = field(default_factory=dict)  # metric -> per seed


def collect(spec: StudySpec, out: Path) -> list[Row]:
    rows = []
    trainings = [("base", [out / "eval" / "base"])] + [
        (a, [out / "eval" / f"{a}-seed{s}" for s in spec.seeds]) for a in spec.algorithms
    ]
    for training, model_dirs in trainings:
        for decoding in spec.decodings:
            row = Row(training, decoding)
            for model_dir in model_dirs:
                if summary_path(model_dir / decoding) is None:
                    continue
                m = read_summary(model_dir / decoding).average
                for key, value in _flat_metrics(m).items():
                    row.values.setdefault(key, []).append(value)
            if row.values:
                rows.append(row)
    return rows


def _flat_metrics(m) -> dict[str, float]:
    flat = {"pass@1": m.mean_at_n}
    flat |= {f"pass@{k}": v for k, v in m.pass_at_k.items() if k > 1}
    flat |= {f"maj@{k}": v for k, v in m.maj_at_k.items()}
    return flat | {"length": m.mean_length}


def mean_spread(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation over seeds (None for one value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else None


def training_summary(spec: StudySpec, out: Path) -> dict[str, dict]:
    """Per algorithm: held-out accuracy at each validation step and seconds per RL step, over seeds."""
    result = {}
    for algorithm in spec.algorithms:
        curves, step_times = {}, []
        for seed in spec.seeds:
            run = train_dir(out, algorithm, seed)
            if not (run / "metrics.jsonl").is_file():
                continue
            for r in read_metrics(run):
                if r.get("val_at_start/accuracy") is not None:
                    curves.setdefault(0, []).append(r["val_at_start/accuracy"])
                if r.get("val/accuracy") is not None:
                    curves.setdefault(r["step"], []).append(r["val/accuracy"])
                if r.get("time/step") is not None and r["step"] > 1:  # step 1 pays warm-up
                    step_times.append(r["time/step"])
        if curves:
            result[algorithm] = {
                "val_accuracy": {str(s): curves[s] for s in sorted(curves)},
                "seconds_per_step": statistics.median(step_times) if step_times else None,
            }
    return result


def _cell(values: Sequence[float]) -> str:
    mean, spread = mean_spread(values)
    return f"{100 * mean:.1f}" + (f" ± {100 * spread:.1f}" if spread is not None else "")


def markdown_report(spec: StudySpec, rows: Sequence[Row], training: dict[str, dict]) -> str:
    keys = [k for k in rows[0].values if k != "length"] if rows else []
    head = "| training | decoding | seeds | " + " | ".join(keys) + " | length |"
    lines = [
        f"Recipe `{spec.recipe}`, overrides `{' '.join(spec.overrides) or '-'}`. Percent, mean ± "
        "sample standard deviation over training seeds (base: one model, no spread); pass@k "
        "unbiased over the n samples per problem; length in tokens.",
        "",
        head,
        "|" + "---|" * (len(keys) + 4),
    ]
    for row in rows:
        seeds = len(next(iter(row.values.values())))
        cells = [_cell(row.values[k]) for k in keys]
        length = statistics.fmean(row.values["length"])
        lines.append(
            f"| {row.training} | {DECODING_NAMES.get(row.decoding, row.decoding)} | {seeds} | "
            + " | ".join(cells)
            + f" | {length:.1f} |"
        )
    if training:
        lines += [
            "",
            "| algorithm | held-out accuracy by step | seconds per RL step (median) |",
            "|---|---|---|",
        ]
        for algorithm, t in training.items():
            curve = ", ".join(f"{s}: {_cell(v)}" for s, v in t["val_accuracy"].items())
            seconds = t["seconds_per_step"]
            lines.append(f"| {algorithm} | {curve} | {f'{seconds:.1f}' if seconds else '-'} |")
    return "\n".join(lines) + "\n"


def write_report(spec: StudySpec, out: Path) -> Path:
    rows = collect(spec, out)
    if not rows:
        raise UserError(
            f"{out}: no finished evaluation to report (eval/<model>/<decoding>/eval/summary.json)"
        )
    training = training_summary(spec, out)
    (out / "report.json").write_text(
        json.dumps({"rows": [asdict(r) for r in rows], "training": training}, indent=1) + "\n"
    )
    (out / "report.md").write_text(markdown_report(spec, rows, training))
    plot_pass_at_k_bands(rows, out / "pass_at_k.png")
    if training:
        plot_training(spec, out, training, out / "training.png")
    return out / "report.md"


def plot_pass_at_k_bands(rows: Sequence[Row], out: Path) -> None:
    """pass@k against log2 k per (training, decoding): the seed mean, a band of ± one deviation."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
    for row in rows:
        ks = sorted(int(k.split("@")[1]) for k in row.values if k.startswith("pass@"))
        stats = [_percent(mean_spread(row.values[f"pass@{k}"])) for k in ks]
        style = "-" if row.decoding == "gumbel" else "--"
        label = f"{row.training}, {DECODING_NAMES.get(row.decoding, row.decoding)}"
        (line,) = ax.plot(ks, [m for m, _ in stats], style, marker="o", markersize=3, label=label)
        _band(ax, ks, stats, line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, out)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (the first points average what there is)."""
    return [statistics.fmean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def plot_training(spec: StudySpec, out: Path, training: dict[str, dict], png: Path) -> None:
    """Held-out accuracy at the validation steps, and the training reward's moving average (4 steps), seed bands."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    for algorithm, t in training.items():
        steps = [int(s) for s in t["val_accuracy"]]
        stats = [mean_spread(v) for v in t["val_accuracy"].values()]
        (line,) = left.plot(steps, [m for m, _ in stats], marker="o", markersize=3, label=algorithm)
        _band(left, steps, stats, line.get_color())
        curves = [
            moving_average([r["reward/mean"] for r in read_metrics(run)], 4)
            for run in (train_dir(out, algorithm, s) for s in spec.seeds)
            if (run / "metrics.jsonl").is_file()
        ]
        length = min(len(c) for c in curves)
        stats = [mean_spread([c[i] for c in curves]) for i in range(length)]
        (line,) = right.plot(range(1, length + 1), [m for m, _ in stats], label=algorithm)
        _band(right, list(range(1, length + 1)), stats, line.get_color())
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
    from megatron_softgrpo.plotting import save_png

    try:
        save_png(fig, png)
    finally:
        plt.close(fig)


def _percent(stat: tuple[float, float | None]) -> tuple[float, float | None]:
    mean, spread = stat
    return 100 * mean, None if spread is None else 100 * spread


def _band(ax, xs, stats, color) -> None:
    """A band of one standard deviation around the seed mean (none for a single model)."""
    if all(s is not None for _, s in stats):
        ax.fill_between(
            xs, [m - s for m, s in stats], [m + s for m, s in stats], color=color, alpha=0.15
        )
