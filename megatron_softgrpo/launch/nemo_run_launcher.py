"""`softgrpo train` through NeMo-Run (the optional `launch` extra: `pip install -e ".[launch]"`).

The same job as slurm/softgrpo.sbatch, for users who launch through NeMo-Run:

- `SlurmExecutor`: one task per GPU on every node (`--ntasks-per-node` = GPUs per node; CPU jobs:
  `gpus_per_node=0` and the task count), CPUs per task, account, partition, time, pyxis container
  image and mounts, and `--signal=USR1@<lead>` so the trainer checkpoints before the time limit (the
  lead must exceed one RL step plus a checkpoint save; see slurm/softgrpo.sbatch). NeMo-Run submits with
  `--requeue`, and its batch script requeues a job that exits non-zero (up to `requeues` times); the
  trainer's preemption exit (75) is one, and the requeued job resumes from the run directory's
  checkpoints.
- `LocalExecutor`: this machine, `torchrun` when there are several tasks.

Before submitting, `main` validates the recipe as `softgrpo check` does, for the job's nodes x
tasks (a bad recipe would otherwise fail in the job and be requeued), and prints a rejected
submission as one line with sbatch's error.

Each task runs `PYTHON -m megatron_softgrpo train RECIPE [overrides]`; the tasks find their rank,
world and master from Slurm's (or torchrun's) variables, as with the sbatch template. The run's
logs and checkpoints go to a fixed run directory (default runs/<name>/<timestamp>/) that a
requeued job reuses; NeMo-Run's own files (generated batch script, job logs) go to its
experiment directory under $NEMORUN_HOME (default ~/.nemo_run).
Submission is through a `LocalTunnel`: run this where `sbatch` works (a login node); for an
`SSHTunnel`, build the executor with `slurm_executor` and replace its `tunnel`.

    python slurm/nemo_run_launcher.py slurm RECIPE [overrides] --nodes 2 --gpus-per-node 8 \\
        --account ACCOUNT --partition PARTITION --time 04:00:00 [--container-image IMAGE]
    python slurm/nemo_run_launcher.py slurm RECIPE [overrides] --gpus-per-node 0 --tasks-per-node 2 \\
        --cpus-per-task 1 --time 00:30:00 --signal-lead-s 60      # a CPU job
    python slurm/nemo_run_launcher.py local RECIPE [overrides] --tasks-per-node 2
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_softgrpo.config.loader import load_checked_recipe
from megatron_softgrpo.errors import UserError

if TYPE_CHECKING:
    import nemo_run as run

# The sbatch template's defaults (#SBATCH --signal, --cpus-per-task in slurm/softgrpo.sbatch).
SIGNAL_LEAD_S = 1800  # meant to exceed one GPU RL step (rollout + update) plus a checkpoint save
CPUS_PER_TASK = (
    8  # a task and its env.num_workers math-verify grading processes (8 in the GPU recipes)
)


@dataclass(frozen=True)
class TrainJob:
    """What every task runs: `python -m megatron_softgrpo train RECIPE [overrides]`."""

    recipe: str
    overrides: tuple[str, ...] = ()
    run_dir: str = (
        ""  # logs and checkpoints, unless the overrides name them; "" -> runs/<name>/<timestamp>
    )
    python: str = (
        "python"  # the interpreter with megatron_softgrpo, on the compute nodes / in the container
    )


@dataclass(frozen=True)
class SlurmResources:
    nodes: int = 1
    gpus_per_node: int = 8  # 0: a CPU job (gloo)
    tasks_per_node: int | None = None  # None: one per GPU
    cpus_per_task: int = CPUS_PER_TASK
    account: str | None = None
    partition: str | None = None
    time: str = "04:00:00"
    container_image: str | None = None  # pyxis/enroot image; None: no container flags
    container_mounts: tuple[str, ...] = ()
    requeues: int = 3  # NeMo-Run requeues a job that exits non-zero this many times
    signal_lead_s: int = (
        SIGNAL_LEAD_S  # SIGUSR1 this long before the time limit: checkpoint and exit 75
    )

    def __post_init__(self):
        if self.tasks < 1:
            raise UserError("a CPU job (gpus_per_node=0) needs tasks_per_node >= 1")
        limit_s = slurm_time_s(self.time)
        if limit_s is not None and self.signal_lead_s >= limit_s:
            raise UserError(
                f"--signal-lead-s {self.signal_lead_s} must be shorter than --time {self.time} ({limit_s} s): "
                "the job would be told to checkpoint and exit as soon as it starts"
            )

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or self.gpus_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks


def slurm_time_s(spec: str) -> int | None:
    """Seconds of a Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS); None: unlimited."""
    if spec.upper() in ("UNLIMITED", "INFINITE"):
        return None
    days, dash, clock = spec.rpartition("-")
    fields = clock.split(":")
    if (
        not re.fullmatch(r"\d*", days)
        or (dash and not days)
        or len(fields) > 3
        or not all(f.isdigit() for f in fields)
    ):
        raise UserError(
            f"--time {spec!r}: expected MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
        )
    values = [int(f) for f in fields]
    if dash:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (values + [0, 0])[:3]
    elif len(values) == 3:
        hours, minutes, seconds = values
    else:  # MM[:SS]
        hours, (minutes, seconds) = 0, (values + [0])[:2]
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def _import_nemo_run():
    try:
        import nemo_run
    except ImportError:
        raise UserError('NeMo-Run is not installed: pip install -e ".[launch]"') from None
    return nemo_run


def train_command(job: TrainJob, name: str) -> list[str]:
    """The task's argument list after the interpreter: -m megatron_softgrpo train RECIPE overrides."""
    recipe = (
        os.path.abspath(job.recipe) if os.path.exists(job.recipe) else job.recipe
    )  # tasks start elsewhere
    run_dir = os.path.abspath(
        job.run_dir or os.path.join("runs", name, time.strftime("%Y%m%d-%H%M%S"))
    )
    given = {item.partition("=")[0] for item in job.overrides}
    defaults = {
        "logger.log_dir": run_dir,
        "checkpointing.checkpoint_dir": os.path.join(run_dir, "checkpoints"),
    }
    extra = [f"{key}={value}" for key, value in defaults.items() if key not in given]
    return ["train", recipe, *job.overrides, *extra]


def train_script(job: TrainJob, name: str = "softgrpo") -> run.Script:
    run = _import_nemo_run()
    return run.Script(
        path="megatron_softgrpo",
        m=True,
        entrypoint=job.python,
        args=train_command(job, name),
        env={"PYTHONUNBUFFERED": "1"},
    )


def slurm_executor(res: SlurmResources) -> run.SlurmExecutor:
    run = _import_nemo_run()
    return run.SlurmExecutor(
        account=res.account,
        partition=res.partition,
        job_name_prefix="softgrpo.",  # NeMo-Run would derive it from the account, which may be unset
        nodes=res.nodes,
        ntasks_per_node=res.tasks,
        cpus_per_task=res.cpus_per_task,
        srun_args=[
            f"--cpus-per-task={res.cpus_per_task}"
        ],  # srun of Slurm >= 22.05 does not inherit it
        gpus_per_node=res.gpus_per_node or None,
        time=res.time,
        container_image=res.container_image,
        container_mounts=list(res.container_mounts),
        signal=f"USR1@{res.signal_lead_s}",
        retries=res.requeues,
        packager=run.Packager(),  # the tasks import the installed package; nothing to copy
        tunnel=run.LocalTunnel(
            job_dir=""
        ),  # "": NeMo-Run's experiment directory itself, nothing to copy
    )


def local_executor(tasks: int = 1) -> run.LocalExecutor:
    run = _import_nemo_run()
    return run.LocalExecutor(ntasks_per_node=tasks, launcher="torchrun" if tasks > 1 else None)


@dataclass(frozen=True)
class Submission:
    handle: str  # NeMo-Run's job handle; for Slurm it ends with the job id
    state: str  # torchx AppState name: SUCCEEDED, FAILED, ... (SUBMITTED/RUNNING/UNKNOWN when detached)


def submit(job: TrainJob, executor, name: str = "softgrpo", detach: bool = False) -> Submission:
    """Launch through a NeMo-Run experiment and wait for it (NeMo-Run polls Slurm with `sacct`, so
    the cluster needs accounting), or with detach=True (Slurm only) return once it is submitted."""
    run = _import_nemo_run()
    with run.Experiment(name, executor=executor) as exp:
        exp.add(train_script(job, name), name=name, tail_logs=not detach)
        exp.run(detach=detach)
    # leaving the block waits for the job unless detached
    launched = exp.jobs[0]
    return Submission(launched.handle, launched.state.name)


def check_recipe(job: TrainJob, world_size: int) -> None:
    """Refuse (UserError) a recipe that `softgrpo train` would refuse in a job of `world_size` processes:
    the same checks, for the job's world size instead of this process's."""
    load_checked_recipe(job.recipe, list(job.overrides), world_size, training=True)


def submission_error(error: Exception) -> str:
    """One line for a failed submission; for a command that failed (sbatch), its exit code and stderr."""
    from invoke.exceptions import (
        UnexpectedExit,  # what NeMo-Run's tunnels raise for a failed command
    )

    if isinstance(error, UnexpectedExit):
        result = error.result
        return f"`{result.command}` exited {result.exited}: " + (
            " ".join(result.stderr.split()) or "(no stderr)"
        )
    return " ".join(f"{type(error).__name__}: {error}".split())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nemo_run_launcher", description="softgrpo train through NeMo-Run"
    )
    p.add_argument("executor", choices=["slurm", "local"])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, as for softgrpo train")
    p.add_argument("--name", default="softgrpo", help="experiment and job name")
    p.add_argument(
        "--run-dir", default="", help="logs and checkpoints (default runs/<name>/<timestamp>)"
    )
    p.add_argument(
        "--python",
        default="python",
        help="slurm: interpreter with megatron_softgrpo on the nodes / in the "
        "container (local: python and torchrun from PATH)",
    )
    p.add_argument("--detach", action="store_true", help="slurm: return once submitted")
    s = p.add_argument_group("slurm")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=8, help="0: CPU job (gloo)")
    s.add_argument(
        "--tasks-per-node", type=int, default=None, help="default: one per GPU (slurm), 1 (local)"
    )
    s.add_argument(
        "--cpus-per-task",
        type=int,
        default=CPUS_PER_TASK,
        help="for the task and its env.num_workers grading processes (CPU job on a small node: 1)",
    )
    s.add_argument("--account")
    s.add_argument("--partition")
    s.add_argument("--time", default="04:00:00")
    s.add_argument("--container-image")
    s.add_argument("--container-mounts", nargs="+", default=[], metavar="SRC:DST")
    s.add_argument("--requeues", type=int, default=3)
    s.add_argument(
        "--signal-lead-s",
        type=int,
        default=SIGNAL_LEAD_S,
        help="SIGUSR1 this long before --time: must exceed one RL step plus a checkpoint save",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_intermixed_args(argv)
    # torchrun (local, several tasks) starts `python` itself: the one on PATH
    job = TrainJob(
        ns.recipe,
        tuple(ns.overrides),
        ns.run_dir,
        ns.python if ns.executor == "slurm" else "python",
    )
    try:
        if ns.executor == "slurm":
            res = SlurmResources(
                nodes=ns.nodes,
                gpus_per_node=ns.gpus_per_node,
                tasks_per_node=ns.tasks_per_node,
                cpus_per_task=ns.cpus_per_task,
                account=ns.account,
                partition=ns.partition,
                time=ns.time,
                container_image=ns.container_image,
                container_mounts=tuple(ns.container_mounts),
                requeues=ns.requeues,
                signal_lead_s=ns.signal_lead_s,
            )
            check_recipe(job, res.world_size)
            executor = slurm_executor(res)
        else:
            tasks = ns.tasks_per_node or 1
            check_recipe(job, tasks)
            executor = local_executor(tasks)
        submission = submit(job, executor, ns.name, detach=ns.detach)
    except UserError as e:
        print(f"nemo_run_launcher: error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # NeMo-Run's failures (a rejected sbatch, ...) arrive as long tracebacks
        print(f"nemo_run_launcher: submission failed: {submission_error(e)}", file=sys.stderr)
        return 1
    print(f"{submission.handle} {submission.state}")
    return 0 if ns.detach or submission.state == "SUCCEEDED" else 1
