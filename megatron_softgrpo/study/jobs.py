"""The jobs of a study and how they run: `softgrpo train` and `softgrpo eval` commands, locally one
after another or as Slurm jobs through slurm/softgrpo.sbatch. Layout under OUT:

    study.json                   the study's settings; a rerun may add arms, seeds or decodings, not change them
    train/<algorithm>/seed<S>/   a training run's log_dir (metrics.jsonl, checkpoints/, ...)
    eval/<model>/<decoding>/     an evaluation's log_dir (eval/summary.json and eval/<benchmark>/samples.jsonl);
                                 model: base or <algorithm>-seed<S>; decoding: a name of StudySpec.decodings
    logs/<job>.log               each local job's output
    report.md, report.json, pass_at_k.png, training.png

Every job is skipped when its output is complete, and `softgrpo train` / `softgrpo eval` resume a
job that was interrupted, so rerunning the same command continues the study.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_softgrpo.errors import UserError
from megatron_softgrpo.eval.report import read_summary, summary_path
from megatron_softgrpo.study.spec import StudySpec
from megatron_softgrpo.train.metrics_log import FINAL_VALIDATION


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
            return (self.log_dir / FINAL_VALIDATION).is_file()
        if summary_path(self.log_dir) is None:
            return False
        return set(self.benchmarks) <= set(read_summary(self.log_dir).benchmarks)


CODE_LINE = "# code: "  # a job log's line naming the code the job ran


def code_version(cwd: Path | None = None) -> str:
    """The package a job started here imports (`python -m` takes the working directory's first)
    and its git commit, '+' when the tree has uncommitted changes."""
    cwd = Path.cwd() if cwd is None else cwd
    if (cwd / "megatron_softgrpo" / "__init__.py").is_file():
        root = cwd
    else:
        import megatron_softgrpo

        root = Path(megatron_softgrpo.__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "no git commit"
    dirty = "+" if git("status", "--porcelain", "--untracked-files=no") else ""
    return f"{root} at {commit}{dirty}"


def job_code(log: Path) -> str | None:
    """The code a job's last run logged (None: a log from before the driver logged it)."""
    if not log.is_file():
        return None
    lines = [x for x in log.read_text().splitlines() if x.startswith(CODE_LINE)]
    return lines[-1][len(CODE_LINE) :] if lines else None


def train_dir(out: Path, algorithm: str, seed: int) -> Path:
    return out / "train" / algorithm / f"seed{seed}"


def eval_dir(out: Path, model: str, decoding: str) -> Path:
    return out / "eval" / model / decoding


def plan_jobs(spec: StudySpec, out: Path, benchmarks: Sequence[str]) -> list[Job]:
    """The base model's evaluations, then each training job followed by its checkpoint's."""
    evaluations = spec.evaluations()
    jobs = [
        _eval_job(spec, out, "base", d, (), (), benchmarks) for m, d in evaluations if m == "base"
    ]
    for algorithm in spec.algorithms:
        for seed in spec.seeds:
            run, model = train_dir(out, algorithm, seed), f"{algorithm}-seed{seed}"
            args = (f"grpo.seed={seed}", f"logger.log_dir={run}")
            args += (f"checkpointing.checkpoint_dir={run / 'checkpoints'}",)
            jobs.append(
                Job(f"train-{model}", "train", (*args, *spec.train_overrides(algorithm)), run)
            )
            checkpoint = (f"checkpoint={run / 'checkpoints'}",)
            jobs += [
                _eval_job(spec, out, model, d, checkpoint, (f"train-{model}",), benchmarks)
                for m, d in evaluations
                if m == model
            ]
    return jobs


def _eval_job(spec, out, model, decoding, checkpoint, after, benchmarks) -> Job:
    log_dir = eval_dir(out, model, decoding)
    args = (*checkpoint, f"logger.log_dir={log_dir}", *spec.eval_overrides(decoding))
    return Job(f"eval-{model}-{decoding}", "eval", args, log_dir, after, tuple(benchmarks))


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
    code = code_version()
    print(f"[study] code: {code}", flush=True)
    for index, job in enumerate(todo):
        argv = [python, "-m", "megatron_softgrpo", job.command, spec.recipe, *job.args]
        log = logs / f"{job.name}.log"
        print(f"[study] ({index + 1}/{len(todo)}) {job.name}: log {log}", flush=True)
        with log.open("a") as f:
            f.write(f"# {' '.join(argv)}\n{CODE_LINE}{code}\n")
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
