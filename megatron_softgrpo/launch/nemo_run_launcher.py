"""`softgrpo train` through NeMo-Run (the optional `launch` extra: `pip install -e ".[launch]"`).

The same job as slurm/softgrpo.sbatch, for users who launch through NeMo-Run:

- `SlurmExecutor`: one task per GPU on every node (`--ntasks-per-node` = GPUs per node; CPU jobs:
  `gpus_per_node=0` and the task count), account, partition, time, pyxis container image and mounts,
  and `--signal=USR1@<lead>` so the trainer checkpoints before the time limit. NeMo-Run submits with
  `--requeue`, and its batch script requeues a job that exits non-zero (up to `requeues` times); the
  trainer's preemption exit (75) is one, and the requeued job resumes from the run directory's
  checkpoints.
- `LocalExecutor`: this machine, `torchrun` when there are several tasks.

Each task runs `PYTHON -m megatron_softgrpo train RECIPE [overrides]`; the tasks find their rank,
world and master from Slurm's (or torchrun's) variables, as with the sbatch template. The run's
logs and checkpoints go to a fixed run directory (default runs/<name>/<timestamp>/) that a
requeued job reuses; NeMo-Run's own files (generated batch script, job logs) go to its
experiment directory under $NEMORUN_HOME (default ~/.nemo_run).
Submission is through a `LocalTunnel`: run this where `sbatch` works (a login node); for an
`SSHTunnel`, build the executor with `slurm_executor` and replace its `tunnel`.

    python slurm/nemo_run_launcher.py slurm RECIPE [overrides] --nodes 2 --gpus-per-node 8 \\
        --account ACCOUNT --partition PARTITION --time 04:00:00 [--container-image IMAGE]
    python slurm/nemo_run_launcher.py local RECIPE [overrides] --tasks-per-node 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_softgrpo.errors import UserError

if TYPE_CHECKING:
    import nemo_run as run


@dataclass(frozen=True)
class TrainJob:
    """What every task runs: `python -m megatron_softgrpo train RECIPE [overrides]`."""

    recipe: str
    overrides: tuple[str, ...] = ()
    run_dir: str = ""  # logs and checkpoints, unless the overrides name them; "" -> runs/<name>/<timestamp>
    python: str = "python"  # the interpreter with megatron_softgrpo, on the compute nodes / in the container


@dataclass(frozen=True)
class SlurmResources:
    nodes: int = 1
    gpus_per_node: int = 8  # 0: a CPU job (gloo)
    tasks_per_node: int | None = None  # None: one per GPU
    account: str | None = None
    partition: str | None = None
    time: str = "04:00:00"
    container_image: str | None = None  # pyxis/enroot image; None: no container flags
    container_mounts: tuple[str, ...] = ()
    requeues: int = 3  # NeMo-Run requeues a job that exits non-zero this many times
    signal_lead_s: int = 300  # SIGUSR1 this long before the time limit: checkpoint and exit 75


def _import_nemo_run():
    try:
        import nemo_run
    except ImportError:
        raise UserError('NeMo-Run is not installed: pip install -e ".[launch]"') from None
    return nemo_run


def train_command(job: TrainJob, name: str) -> list[str]:
    """The task's argument list after the interpreter: -m megatron_softgrpo train RECIPE overrides."""
    recipe = os.path.abspath(job.recipe) if os.path.exists(job.recipe) else job.recipe  # tasks start elsewhere
    run_dir = os.path.abspath(job.run_dir or os.path.join("runs", name, time.strftime("%Y%m%d-%H%M%S")))
    given = {item.partition("=")[0] for item in job.overrides}
    defaults = {"logger.log_dir": run_dir, "checkpointing.checkpoint_dir": os.path.join(run_dir, "checkpoints")}
    extra = [f"{key}={value}" for key, value in defaults.items() if key not in given]
    return ["train", recipe, *job.overrides, *extra]


def train_script(job: TrainJob, name: str = "softgrpo") -> run.Script:
    run = _import_nemo_run()
    return run.Script(path="megatron_softgrpo", m=True, entrypoint=job.python, args=train_command(job, name),
                      env={"PYTHONUNBUFFERED": "1"})


def slurm_executor(res: SlurmResources) -> run.SlurmExecutor:
    run = _import_nemo_run()
    tasks = res.tasks_per_node or res.gpus_per_node
    if tasks < 1:
        raise UserError("a CPU job (gpus_per_node=0) needs tasks_per_node >= 1")
    return run.SlurmExecutor(
        account=res.account,
        partition=res.partition,
        job_name_prefix="softgrpo.",  # NeMo-Run would derive it from the account, which may be unset
        nodes=res.nodes,
        ntasks_per_node=tasks,
        gpus_per_node=res.gpus_per_node or None,
        time=res.time,
        container_image=res.container_image,
        container_mounts=list(res.container_mounts),
        signal=f"USR1@{res.signal_lead_s}",
        retries=res.requeues,
        packager=run.Packager(),  # the tasks import the installed package; nothing to copy
        tunnel=run.LocalTunnel(job_dir=""),  # "": NeMo-Run's experiment directory itself, nothing to copy
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nemo_run_launcher", description="softgrpo train through NeMo-Run")
    p.add_argument("executor", choices=["slurm", "local"])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, as for softgrpo train")
    p.add_argument("--name", default="softgrpo", help="experiment and job name")
    p.add_argument("--run-dir", default="", help="logs and checkpoints (default runs/<name>/<timestamp>)")
    p.add_argument("--python", default="python", help="slurm: interpreter with megatron_softgrpo on the nodes / in the "
                   "container (local: python and torchrun from PATH)")
    p.add_argument("--detach", action="store_true", help="slurm: return once submitted")
    s = p.add_argument_group("slurm")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=8, help="0: CPU job (gloo)")
    s.add_argument("--tasks-per-node", type=int, default=None, help="default: one per GPU (slurm), 1 (local)")
    s.add_argument("--account")
    s.add_argument("--partition")
    s.add_argument("--time", default="04:00:00")
    s.add_argument("--container-image")
    s.add_argument("--container-mounts", nargs="+", default=[], metavar="SRC:DST")
    s.add_argument("--requeues", type=int, default=3)
    s.add_argument("--signal-lead-s", type=int, default=300)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_intermixed_args(argv)
    # torchrun (local, several tasks) starts `python` itself: the one on PATH
    job = TrainJob(ns.recipe, tuple(ns.overrides), ns.run_dir, ns.python if ns.executor == "slurm" else "python")
    try:
        if ns.executor == "slurm":
            executor = slurm_executor(SlurmResources(
                nodes=ns.nodes, gpus_per_node=ns.gpus_per_node, tasks_per_node=ns.tasks_per_node,
                account=ns.account, partition=ns.partition, time=ns.time,
                container_image=ns.container_image, container_mounts=tuple(ns.container_mounts),
                requeues=ns.requeues, signal_lead_s=ns.signal_lead_s))
        else:
            executor = local_executor(ns.tasks_per_node or 1)
        submission = submit(job, executor, ns.name, detach=ns.detach)
    except UserError as e:
        print(f"nemo_run_launcher: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"{submission.handle} {submission.state}")
    return 0 if ns.detach or submission.state == "SUCCEEDED" else 1
