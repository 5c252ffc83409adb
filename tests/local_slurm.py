"""A private single-node Slurm cluster for tests: munged + slurmctld + slurmd from Debian's
`munge` and `slurm-wlm` packages (scripts/slurm_ci_setup.sh installs them), started as child
processes with their own key, sockets, ports, state and spool under one directory.

The configuration lists this host on loopback with at least 2 CPUs (2 CPU tasks fit even on a
smaller machine), tracks processes without cgroups (proctrack/linuxproc, task/none), and makes
requeues quick: a requeued job may start again cred_expire + 1 s after the requeue (Slurm's
default is 121 s) and the scheduler looks every 2 s. MinJobAge=10 keeps a finished job visible to
`scontrol show job` for 10 s and makes `sbatch --wait` poll every 8 s (not 32 s). The daemons run
as the current user (SlurmUser, SlurmdUser): root, or a user without privileges whose jobs are its own.

Tests that need the cluster or NeMo-Run skip when they are missing, except where
SOFTGRPO_REQUIRE_SLURM=1 (CI, .ci/run): there they fail, so a green run has run them.
"""

from __future__ import annotations

import importlib
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

REQUIRE_SLURM = "SOFTGRPO_REQUIRE_SLURM"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
SBIN = ("/usr/sbin", "/sbin")
FINISHED_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


def find_binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS + CLIENTS if find_binary(name) is None]


def require_binaries() -> None:
    """Return when every daemon and client is installed, else skip_unless_required."""
    missing = missing_binaries()
    if missing:
        skip_unless_required(
            f"Slurm/munge binaries absent ({', '.join(missing)}): run scripts/slurm_ci_setup.sh"
        )


def skip_unless_required(reason: str) -> NoReturn:
    """Skip the test, or fail it where SOFTGRPO_REQUIRE_SLURM=1 (CI must not pass without running it)."""
    if os.environ.get(REQUIRE_SLURM) == "1":
        pytest.fail(f"{reason} ({REQUIRE_SLURM}=1)", pytrace=False)
    pytest.skip(reason)


def import_nemo_run() -> ModuleType:
    """`nemo_run`, or skip_unless_required when it is not installed."""
    try:
        return importlib.import_module("nemo_run")
    except ImportError as e:
        skip_unless_required(f'nemo-run is not importable ({e}): pip install -e ".[launch]"')


def current_user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, host: str, cpus: int, munge_socket: Path, user: str) -> str:
    # FirstJobId: jobs derive their master port from the job id, so concurrent test clusters differ
    return f"""\
ClusterName=softgrpo-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
SlurmUser={user}
SlurmdUser={user}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=10
FirstJobId={random.randint(1000, 19000)}
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class LocalSlurm:
    root: Path
    env: dict[str, str]  # for clients and, through sbatch's --export=ALL, for the jobs
    socket_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env)
        return subprocess.run(
            list(cmd), capture_output=True, text=True, check=check, timeout=60, **kwargs
        )

    def job_fields(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict: JobState, ExitCode, Restarts, ..."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_finished(self, job_id: str, timeout_s: float) -> dict[str, str]:
        deadline, fields = time.monotonic() + timeout_s, {}
        while time.monotonic() < deadline:
            fields = self.job_fields(job_id)
            if fields.get("JobState") in FINISHED_STATES:
                return fields
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {fields.get('JobState')} after {timeout_s} s")

    def logs(self) -> str:
        parts = []
        for log in sorted((self.root / "log").glob("*")):
            parts.append(
                f"--- {log.name}\n"
                + "".join(log.read_text(errors="replace").splitlines(True)[-30:])
            )
        return "\n".join(parts)

    def stop(self) -> None:
        jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if jobs:
            self.run("scancel", *jobs, check=False)
        for proc in reversed(self.procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def start_local_slurm(root: Path) -> LocalSlurm:
    """Write the configuration, start the daemons and wait until the node is idle."""
    root = root.resolve()
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    # munged wants every directory above its socket searchable by all (pytest's are 0700); short path too
    socket_dir = Path(tempfile.mkdtemp(prefix="softgrpo-munge-"))
    socket_dir.chmod(0o755)
    munge_socket = socket_dir / "munge.socket"
    (root / "plugstack.conf").write_text("")  # not the system's SPANK plugins (pyxis, ...)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(
        slurm_conf(root, host, max(2, os.cpu_count() or 1), munge_socket, current_user())
    )

    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
    }
    env["SLURM_CONF"] = str(conf)
    cluster = LocalSlurm(root, env, socket_dir)

    def daemon(name: str, *args: str) -> None:
        with open(root / "log" / f"{name}.out", "w") as out:
            cluster.procs.append(
                subprocess.Popen(
                    [find_binary(name), *args], stdout=out, stderr=subprocess.STDOUT, env=env
                )
            )

    try:
        daemon(
            "munged",
            "--foreground",
            f"--socket={munge_socket}",
            f"--key-file={key}",
            f"--log-file={root}/log/munged.log",
            f"--pid-file={root}/munge/munged.pid",
            f"--seed-file={root}/munge/munged.seed",
        )
        _wait_for(lambda: munge_socket.exists(), 30, "munged socket", cluster)
        daemon("slurmctld", "-D", "-c", "-f", str(conf))
        _wait_for(
            lambda: cluster.run("scontrol", "ping", check=False).stdout.count("UP") > 0,
            60,
            "slurmctld",
            cluster,
        )
        daemon("slurmd", "-D", "-N", host, "-f", str(conf))
        _wait_for(
            lambda: cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle",
            60,
            "idle node",
            cluster,
        )
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for(ready, timeout_s: float, what: str, cluster: LocalSlurm) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        dead = [p.args[0] for p in cluster.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead} exited while waiting for {what}\n{cluster.logs()}")
        time.sleep(0.5)
    raise TimeoutError(f"local Slurm: no {what} after {timeout_s} s\n{cluster.logs()}")
