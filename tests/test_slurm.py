"""slurm/softgrpo.sbatch + slurm/launch.sh and the NeMo-Run launcher, checked twice:

- with fake `srun`/`scontrol`/`sbatch` on PATH that record their arguments and environment: the
  flags, environment, run directories, requeue and signal forwarding for 1, 2 and 8 nodes, with and
  without a container; the NeMo-Run launcher's batch script, its recipe check and its errors;
- on a real single-node Slurm cluster started by this test session (tests/local_slurm.py): the
  README's CPU sbatch command, with a tiny 2-task recipe (TP=2), completes under `sbatch --wait`; a
  job sent SIGTERM checkpoints, is requeued and resumes to completion; NeMo-Run submits the same job.
  They skip without Slurm or nemo-run, and fail instead where SOFTGRPO_REQUIRE_SLURM=1 (CI).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import write_recipe
from local_slurm import (
    REQUIRE_SLURM,
    current_user,
    import_nemo_run,
    require_binaries,
    slurm_conf,
    start_local_slurm,
)
from tiny_models import make_hf_model

from megatron_softgrpo.distributed import detect_launch_env, slurm_master_port
from megatron_softgrpo.errors import UserError
from megatron_softgrpo.launch.nemo_run_launcher import (
    CPUS_PER_TASK,
    SIGNAL_LEAD_S,
    TrainJob,
    slurm_time_s,
    train_command,
)
from megatron_softgrpo.train.preemption import REQUEUE_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "slurm" / "softgrpo.sbatch"
README = ROOT / "README.md"
README_CPU_RECIPE = "recipes/softgrpo-smollm2-135m-cpu.yaml"
GPU_RECIPE = ROOT / "recipes" / "softgrpo-llama3.1-70b-instruct-8n8g.yaml"  # 8 nodes x 8 GPUs
CPU_RECIPE = ROOT / "recipes" / "softgrpo-smollm2-135m-cpu.yaml"
NEMO_RUN_LAUNCHER = ROOT / "slurm" / "nemo_run_launcher.py"
IMAGE = "nvcr.io/nvidia/pytorch:25.01-py3"
MOUNTS = "/data:/data,/scratch:/scratch"
JOB_ID = "4242"
STALE_TORCHRUN_ENV = {"RANK": "3", "WORLD_SIZE": "9", "LOCAL_RANK": "1"}

FAKE_COMMAND = """\
#!{python}
# A fake Slurm command: records its arguments and environment as one JSON line in $FAKE_SLURM_LOG.
import json, os, signal, sys, time

name, args = os.path.basename(sys.argv[0]), sys.argv[1:]


def record(**extra):
    with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
        f.write(json.dumps({{"cmd": name, "argv": args, "env": dict(os.environ), **extra}}) + "\\n")


if name == "scontrol":
    record()
    if args[:2] == ["show", "hostnames"]:
        print("\\n".join(os.environ["FAKE_HOSTNAMES"].split()))
elif name == "sbatch":  # FAKE_SBATCH_ERROR: reject the job with this message, as sbatch does
    record(script=open(args[-1]).read())
    if "FAKE_SBATCH_ERROR" in os.environ:
        sys.exit("sbatch: error: " + os.environ["FAKE_SBATCH_ERROR"])
    print("{job_id}")
else:  # srun: FAKE_SRUN=exit:<code>, or preempt: wait for a signal and exit as the trainer does
    mode = os.environ.get("FAKE_SRUN", "exit:0")
    if mode.startswith("exit:"):
        record()
        sys.exit(int(mode[5:]))
    got = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda n, f: got.append(signal.Signals(n).name))
    record()
    deadline = time.monotonic() + 60
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    record(signals=got)
    sys.exit({requeue} if got else 1)
"""


class FakeSlurm:
    def __init__(self, tmp_path: Path):
        self.bin, self.log = tmp_path / "fake-bin", tmp_path / "fake-slurm.jsonl"
        self.bin.mkdir()
        for name in ("srun", "scontrol", "sbatch"):
            path = self.bin / name
            path.write_text(
                FAKE_COMMAND.format(python=sys.executable, job_id=JOB_ID, requeue=REQUEUE_EXIT_CODE)
            )
            path.chmod(0o755)
        base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env = {
            **base,
            "PATH": f"{self.bin}{os.pathsep}{base['PATH']}",
            "FAKE_SLURM_LOG": str(self.log),
        }

    def calls(self, cmd: str) -> list[dict]:
        if not self.log.exists():
            return []
        return [c for c in map(json.loads, self.log.read_text().splitlines()) if c["cmd"] == cmd]


@pytest.fixture
def fake_slurm(tmp_path):
    return FakeSlurm(tmp_path)


def job_env(
    fake: FakeSlurm,
    submit_dir: Path,
    nodes: int = 1,
    gpus: str = "8",
    ntasks: str = "8",
    cpus: str | None = "8",
    **extra,
) -> dict:
    """The environment Slurm gives the batch script of job JOB_ID on `nodes` nodes gpu01, gpu02, ...
    (SLURM_CPUS_PER_TASK only when the job asked for --cpus-per-task)."""
    hosts = [f"gpu{i:02d}" for i in range(1, nodes + 1)]
    return {
        **fake.env,
        **STALE_TORCHRUN_ENV,
        "FAKE_HOSTNAMES": " ".join(hosts),
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NAME": "softgrpo",
        "SLURM_SUBMIT_DIR": str(submit_dir),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_JOB_NODELIST": f"gpu[01-{nodes:02d}]" if nodes > 1 else "gpu01",
        "SLURM_GPUS_PER_NODE": gpus,
        "SLURM_NTASKS_PER_NODE": ntasks,
        **({"SLURM_CPUS_PER_TASK": cpus} if cpus else {}),
        "SOFTGRPO_HOME": str(ROOT),
        "SOFTGRPO_PYTHON": "/opt/venv/bin/python",
        **extra,
    }


def run_batch(env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the template as Slurm runs a batch script: bash, in the submit directory, with the job's env."""
    return subprocess.run(
        ["bash", str(TEMPLATE), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def run_dir(submit_dir: Path) -> Path:
    return submit_dir / "runs" / "softgrpo" / JOB_ID


# ---------------------------------------------------------------- the template with fake Slurm commands


def sbatch_header() -> dict[str, str]:
    flags = {}
    for line in TEMPLATE.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line.split()[1].partition("=")
            flags[key] = value
    return flags


def test_template_header_requests_one_task_per_gpu_requeue_and_a_preemption_signal():
    flags = sbatch_header()
    assert flags["--gpus-per-node"] == flags["--ntasks-per-node"] == "8"
    assert flags["--nodes"] == "1" and "--time" in flags
    assert (
        "--requeue" in flags and flags["--open-mode"] == "append"
    )  # a requeued job appends to its output
    # CPUs for each task's math-verify grading processes; the NeMo-Run launcher asks for as many
    assert flags["--cpus-per-task"] == str(CPUS_PER_TASK) == "8"
    # SIGUSR1 to the job steps (the trainer's tasks), early enough to finish a GPU RL step and save
    # (the trainer saves only between RL steps), and well inside the default time limit
    signal_spec = re.fullmatch(r"USR1@(\d+)", flags["--signal"])
    assert signal_spec and int(signal_spec.group(1)) == SIGNAL_LEAD_S == 1800
    assert SIGNAL_LEAD_S < slurm_time_s(flags["--time"]) / 2
    header = TEMPLATE.read_text()
    for knob in (
        "--nodes",
        "--gpus-per-node",
        "--account",
        "--partition",
        "--time",
        "RECIPE",
        "overrides",
        "SOFTGRPO_CONTAINER_IMAGE",
        "SOFTGRPO_CONTAINER_MOUNTS",
        "--gpus-per-node=0",
        "--cpus-per-task=C",
        "--signal=USR1@SECONDS",
    ):
        assert knob in header, knob
    # what the lead must exceed is stated beside the knob
    assert re.search(
        r"lead must exceed the longest RL step .* plus one checkpoint save",
        " ".join(line.lstrip("# ") for line in header.splitlines()),
        re.DOTALL,
    )


@pytest.mark.parametrize("container", [None, "image", "image+mounts"])
@pytest.mark.parametrize("nodes", [1, 2, 8])
def test_batch_script_sruns_one_task_per_gpu_with_master_and_run_dirs(
    fake_slurm, tmp_path, nodes, container
):
    extra = {}
    if container:
        extra["SOFTGRPO_CONTAINER_IMAGE"] = IMAGE
    if container == "image+mounts":
        extra["SOFTGRPO_CONTAINER_MOUNTS"] = MOUNTS
    done = run_batch(
        job_env(fake_slurm, tmp_path, nodes, **extra),
        tmp_path,
        "recipes/r.yaml",
        "grpo.max_num_steps=5",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (srun,) = fake_slurm.calls("srun")
    run = run_dir(tmp_path)
    expected_container = []
    if container:
        expected_container = [f"--container-image={IMAGE}", f"--container-workdir={tmp_path}"]
    if container == "image+mounts":
        expected_container.append(f"--container-mounts={MOUNTS}")
    assert srun["argv"] == [
        f"--nodes={nodes}",
        "--ntasks-per-node=8",
        "--cpus-per-task=8",
        *expected_container,
        "/opt/venv/bin/python",
        "-m",
        "megatron_softgrpo",
        "train",
        "recipes/r.yaml",
        "grpo.max_num_steps=5",
        f"logger.log_dir={run}",
        f"checkpointing.checkpoint_dir={run}/checkpoints",
    ]
    env = srun["env"]
    assert env["MASTER_ADDR"] == "gpu01" and env["MASTER_PORT"] == str(slurm_master_port(JOB_ID))
    assert not set(STALE_TORCHRUN_ENV) & set(env)  # would make the trainer take a torchrun launch
    # what the trainer's last task makes of it
    world = 8 * nodes
    task_env = {
        **env,
        "SLURM_PROCID": str(world - 1),
        "SLURM_NTASKS": str(world),
        "SLURM_LOCALID": "7",
    }
    launch = detect_launch_env(task_env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == (
        "slurm",
        world - 1,
        world,
        7,
    )
    assert (launch.master_addr, launch.master_port) == ("gpu01", slurm_master_port(JOB_ID))
    # Slurm's own output file points at the run directory, which holds everything else
    assert f"output in {run}/slurm.out" in done.stdout
    log = (run / "slurm.out").read_text()
    assert f"{nodes} node(s) x 8 task(s), master gpu01:{slurm_master_port(JOB_ID)}" in log
    assert not fake_slurm.calls("scontrol")[1:]  # only `show hostnames`: no requeue


@pytest.mark.parametrize(
    ("gpus", "ntasks", "tasks_knob", "expected"),
    [
        ("0", "2", None, 2),  # CPU job: sbatch --gpus-per-node=0 --ntasks-per-node=2
        ("4", "8", None, 4),  # --gpus-per-node=4 under the header's 8 tasks: still one task per GPU
        ("a100:4", "8", None, 4),  # a typed GPU request
        ("8", "8", "3", 3),
    ],  # SOFTGRPO_TASKS_PER_NODE decides
)
def test_tasks_per_node_follow_the_gpus_or_the_cpu_task_count(
    fake_slurm, tmp_path, gpus, ntasks, tasks_knob, expected
):
    extra = {"SOFTGRPO_TASKS_PER_NODE": tasks_knob} if tasks_knob else {}
    done = run_batch(
        job_env(fake_slurm, tmp_path, 2, gpus=gpus, ntasks=ntasks, **extra), tmp_path, "r.yaml"
    )
    assert done.returncode == 0, done.stderr
    assert fake_slurm.calls("srun")[0]["argv"][:2] == ["--nodes=2", f"--ntasks-per-node={expected}"]


@pytest.mark.parametrize("cpus", [None, "1", "16"])
def test_srun_gets_the_jobs_cpus_per_task(fake_slurm, tmp_path, cpus):
    """srun of Slurm >= 22.05 does not inherit sbatch's --cpus-per-task: the launcher passes it on."""
    done = run_batch(job_env(fake_slurm, tmp_path, cpus=cpus), tmp_path, "r.yaml")
    assert done.returncode == 0, done.stderr
    argv = fake_slurm.calls("srun")[0]["argv"]
    assert [a for a in argv if a.startswith("--cpus-per-task")] == (
        [f"--cpus-per-task={cpus}"] if cpus else []
    )


def test_run_directories_given_as_overrides_are_kept(fake_slurm, tmp_path):
    done = run_batch(job_env(fake_slurm, tmp_path), tmp_path, "r.yaml", "logger.log_dir=/elsewhere")
    assert done.returncode == 0, done.stderr
    argv = fake_slurm.calls("srun")[0]["argv"]
    assert [a for a in argv if a.startswith("logger.log_dir=")] == ["logger.log_dir=/elsewhere"]
    assert f"checkpointing.checkpoint_dir={run_dir(tmp_path)}/checkpoints" in argv


@pytest.mark.parametrize("exit_code", [0, 1, REQUEUE_EXIT_CODE])
def test_only_the_preemption_exit_code_requeues_the_job(fake_slurm, tmp_path, exit_code):
    done = run_batch(
        job_env(fake_slurm, tmp_path, FAKE_SRUN=f"exit:{exit_code}"), tmp_path, "r.yaml"
    )
    assert done.returncode == exit_code
    requeues = [c["argv"] for c in fake_slurm.calls("scontrol") if c["argv"][0] == "requeue"]
    assert requeues == ([["requeue", JOB_ID]] if exit_code == REQUEUE_EXIT_CODE else [])


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_to_the_batch_shell_reaches_the_tasks_as_sigusr1(fake_slurm, tmp_path, sig):
    """`sbatch --signal=B:USR1@...`, `scancel --batch --signal=...` and Slurm preemption signal the
    batch shell; srun would answer SIGTERM by killing the tasks, so the launcher sends SIGUSR1."""
    env = job_env(fake_slurm, tmp_path, FAKE_SRUN="preempt")
    proc = subprocess.Popen(
        ["bash", str(TEMPLATE), "r.yaml"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not fake_slurm.calls("srun") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake_slurm.calls("srun"), "srun never started"
    proc.send_signal(sig)  # the template execs the launcher: same process
    proc.communicate(timeout=60)
    assert proc.returncode == REQUEUE_EXIT_CODE, (run_dir(tmp_path) / "slurm.out").read_text()
    assert fake_slurm.calls("srun")[-1]["signals"] == ["SIGUSR1"]
    assert ["requeue", JOB_ID] in [c["argv"] for c in fake_slurm.calls("scontrol")]


def test_launcher_refuses_to_run_without_a_recipe_or_outside_a_job(fake_slurm, tmp_path):
    no_recipe = run_batch(job_env(fake_slurm, tmp_path), tmp_path)
    assert no_recipe.returncode == 2 and "usage: sbatch" in no_recipe.stderr
    env = {k: v for k, v in job_env(fake_slurm, tmp_path).items() if k != "SLURM_JOB_ID"}
    outside = run_batch(env, tmp_path, "r.yaml")
    assert outside.returncode == 2 and "inside a Slurm job" in outside.stderr
    assert not fake_slurm.calls("srun")


# ---------------------------------------------------------------- NeMo-Run launcher, fake Slurm


def test_train_command_uses_an_absolute_recipe_and_fixed_run_dirs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("r.yaml").write_text("{}")
    cmd = train_command(TrainJob("r.yaml", ("a.b=1",), run_dir="out"), "softgrpo")
    assert cmd == [
        "train",
        str(tmp_path / "r.yaml"),
        "a.b=1",
        f"logger.log_dir={tmp_path / 'out'}",
        f"checkpointing.checkpoint_dir={tmp_path / 'out' / 'checkpoints'}",
    ]
    given = train_command(
        TrainJob("missing.yaml", ("logger.log_dir=/x", "checkpointing.checkpoint_dir=/y")), "n"
    )
    assert given == [
        "train",
        "missing.yaml",
        "logger.log_dir=/x",
        "checkpointing.checkpoint_dir=/y",
    ]
    default = train_command(TrainJob("r.yaml"), "n")
    assert re.fullmatch(rf"logger\.log_dir={tmp_path}/runs/n/\d{{8}}-\d{{6}}", default[2])


def nemo_run_cli(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(NEMO_RUN_LAUNCHER), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.parametrize("layout", ["8 nodes x 8 GPUs, container", "1 node x 2 CPU tasks"])
def test_nemo_run_slurm_executor_batch_script(fake_slurm, tmp_path, layout):
    import_nemo_run()
    gpu = layout.startswith("8")
    recipe = GPU_RECIPE if gpu else CPU_RECIPE
    args = [
        "slurm",
        str(recipe),
        "grpo.max_num_steps=5",
        "--python",
        "/opt/venv/bin/python",
        "--run-dir",
        "out",
        "--detach",
    ]
    if gpu:  # the defaults of --cpus-per-task and --signal-lead-s
        args += [
            "--nodes",
            "8",
            "--gpus-per-node",
            "8",
            "--account",
            "acct",
            "--partition",
            "batch",
            "--time",
            "08:00:00",
            "--container-image",
            IMAGE,
            "--container-mounts",
            *MOUNTS.split(","),
        ]
    else:
        args += [
            "--gpus-per-node",
            "0",
            "--tasks-per-node",
            "2",
            "--cpus-per-task",
            "1",
            "--time",
            "00:30:00",
            "--signal-lead-s",
            "60",
        ]
    done = nemo_run_cli(
        *args, env={**fake_slurm.env, "NEMORUN_HOME": str(tmp_path / "nemo")}, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].split()[0].endswith(f"/{JOB_ID}")
    (sbatch,) = fake_slurm.calls("sbatch")
    assert "--requeue" in sbatch["argv"]
    script = sbatch["script"]
    flags = set(re.findall(r"^#SBATCH (\S+)", script, re.MULTILINE))
    cpus, lead = (CPUS_PER_TASK, SIGNAL_LEAD_S) if gpu else (1, 60)
    expected = {
        f"--nodes={8 if gpu else 1}",
        f"--ntasks-per-node={8 if gpu else 2}",
        f"--cpus-per-task={cpus}",
        f"--signal=USR1@{lead}",
        f"--time={'08:00:00' if gpu else '00:30:00'}",
    }
    if gpu:
        expected |= {"--gpus-per-node=8", "--account=acct", "--partition=batch"}
    assert expected <= flags, flags
    assert gpu == any(f.startswith("--gpus-per-node") for f in flags)
    assert "export TORCHX_MAX_RETRIES=3" in script  # NeMo-Run's batch script requeues a failed job
    (srun_line,) = [
        line
        for line in script.splitlines()
        if line.startswith("srun ") and "megatron_softgrpo" in line
    ]
    srun = shlex.split(srun_line)
    assert (
        f"--cpus-per-task={cpus}" in srun
    )  # srun of Slurm >= 22.05 does not inherit it from the job
    if gpu:
        assert srun[srun.index("--container-image") + 1] == IMAGE
        assert srun[srun.index("--container-mounts") + 1].startswith(
            MOUNTS + ","
        )  # + NeMo-Run's job dir
    else:
        assert not [a for a in srun if a.startswith("--container")]
    out = tmp_path / "out"
    assert srun[srun.index("/opt/venv/bin/python") :] == [
        "/opt/venv/bin/python",
        "-m",
        "megatron_softgrpo",
        "train",
        str(recipe),
        "grpo.max_num_steps=5",
        f"logger.log_dir={out}",
        f"checkpointing.checkpoint_dir={out / 'checkpoints'}",
    ]


CPU_JOB_ARGS = (
    "--gpus-per-node",
    "0",
    "--tasks-per-node",
    "2",
    "--cpus-per-task",
    "1",
    "--time",
    "00:30:00",
    "--signal-lead-s",
    "60",
    "--detach",
)


@pytest.mark.parametrize(
    ("recipe_and_flags", "message"),
    [
        ((str(CPU_RECIPE.with_name("missing.yaml")),), "missing.yaml: recipe file not found"),
        ((str(CPU_RECIPE), "grpo.num_prompts_per_step=x"), "grpo.num_prompts_per_step"),
        # 3 data-parallel ranks cannot split the recipe's 4 prompts per step
        (
            (str(CPU_RECIPE), "--tasks-per-node", "3"),
            "grpo.num_prompts_per_step=4: must be divisible by the 3 data-parallel ranks",
        ),
        # PP=2 cannot divide a world of 3 processes
        (
            (
                str(CPU_RECIPE),
                "policy.megatron_cfg.pipeline_model_parallel_size=2",
                "--tasks-per-node",
                "3",
            ),
            "TP*PP=2 must divide the number of processes (3)",
        ),
        (
            (str(CPU_RECIPE), "--signal-lead-s", "1800"),
            "--signal-lead-s 1800 must be shorter than --time 00:30:00 (1800 s)",
        ),
        (
            (str(CPU_RECIPE), "--tasks-per-node", "0"),
            "a CPU job (gpus_per_node=0) needs tasks_per_node >= 1",
        ),
    ],
)
def test_nemo_run_launcher_refuses_a_bad_job_in_one_line_before_submitting(
    fake_slurm, tmp_path, recipe_and_flags, message
):
    """A job that `softgrpo train` would refuse fails here, before sbatch: NeMo-Run would requeue it."""
    import_nemo_run()
    done = nemo_run_cli(
        "slurm",
        *CPU_JOB_ARGS,
        *recipe_and_flags,
        env={**fake_slurm.env, "NEMORUN_HOME": str(tmp_path / "nemo")},
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("nemo_run_launcher: error: ") and message in line, line
    assert not fake_slurm.calls("sbatch")


def test_nemo_run_launcher_reports_a_rejected_submission_in_one_line(fake_slurm, tmp_path):
    import_nemo_run()
    rejection = (
        "Batch job submission failed: Invalid account or account/partition combination specified"
    )
    env = {**fake_slurm.env, "NEMORUN_HOME": str(tmp_path / "nemo"), "FAKE_SBATCH_ERROR": rejection}
    done = nemo_run_cli(
        "slurm", str(CPU_RECIPE), *CPU_JOB_ARGS, "--account", "nope", env=env, cwd=tmp_path
    )
    assert done.returncode == 1
    assert len(fake_slurm.calls("sbatch")) == 1
    (line,) = done.stderr.splitlines()
    assert re.fullmatch(
        rf"nemo_run_launcher: submission failed: `sbatch .*` exited 1: sbatch: error: {rejection}",
        line,
    ), line


@pytest.mark.parametrize(
    ("spec", "seconds"),
    [
        ("30", 30 * 60),
        ("30:15", 30 * 60 + 15),
        ("04:00:00", 4 * 3600),
        ("1-2", 26 * 3600),
        ("1-02:30", 26 * 3600 + 30 * 60),
        ("2-00:00:05", 48 * 3600 + 5),
        ("UNLIMITED", None),
        ("infinite", None),
    ],
)
def test_slurm_time_limits_in_seconds(spec, seconds):
    assert slurm_time_s(spec) == seconds


@pytest.mark.parametrize("spec", ["", "4h", "1:2:3:4", "-1", "a-01:00", "01:xx"])
def test_a_malformed_slurm_time_limit_is_a_user_error(spec):
    with pytest.raises(UserError, match="expected MM, MM:SS, HH:MM:SS"):
        slurm_time_s(spec)


# ---------------------------------------------------------------- CI runs the Slurm tests


def test_missing_slurm_or_nemo_run_skips_here_and_fails_where_required(monkeypatch):
    monkeypatch.setattr(
        "local_slurm.find_binary", lambda name: None if name == "slurmd" else f"/usr/bin/{name}"
    )
    monkeypatch.setitem(sys.modules, "nemo_run", None)  # `import nemo_run` raises ImportError
    monkeypatch.delenv(REQUIRE_SLURM, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"binaries absent \(slurmd\)"):
        require_binaries()
    with pytest.raises(pytest.skip.Exception, match="nemo-run is not importable"):
        import_nemo_run()
    monkeypatch.setenv(REQUIRE_SLURM, "1")
    with pytest.raises(
        pytest.fail.Exception, match=rf"binaries absent \(slurmd\).*{REQUIRE_SLURM}=1"
    ):
        require_binaries()
    with pytest.raises(
        pytest.fail.Exception, match=rf"nemo-run is not importable.*{REQUIRE_SLURM}=1"
    ):
        import_nemo_run()


def test_ci_runs_the_readmes_test_command_on_a_clone_without_shared_data():
    ci, readme = (ROOT / ".ci" / "run").read_text(), README.read_text()
    command = "bash scripts/install.sh test && .venv/bin/python -m pytest -q"
    assert command in readme and command in ci
    assert ci.index('git clone --quiet "$src" "$work/') < ci.index(command) and 'cd "$work/' in ci


def test_ci_requires_the_slurm_tests():
    ci = (ROOT / ".ci" / "run").read_text()
    install = ci.index("scripts/install.sh")  # which then fails where it cannot install Slurm
    assert re.search(rf"^export {REQUIRE_SLURM}=1$", ci[:install], re.MULTILINE), ci


@pytest.mark.parametrize("required", [False, True])
def test_slurm_setup_without_apt_or_root_fails_only_where_required(tmp_path, required):
    """No sbatch on PATH, no apt-get, no sudo, not root: nothing can be installed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "id").write_text("#!/bin/sh\necho 1000\n")
    (bin_dir / "id").chmod(0o755)
    env = {"PATH": str(bin_dir), **({REQUIRE_SLURM: "1"} if required else {})}
    done = subprocess.run(
        ["/bin/bash", str(ROOT / "scripts" / "slurm_ci_setup.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == (1 if required else 0), done.stderr
    assert ("error: SOFTGRPO_REQUIRE_SLURM=1" if required else "will be skipped") in done.stderr


def test_local_cluster_daemons_run_as_the_given_user(tmp_path):
    conf = slurm_conf(tmp_path, "node1", 2, tmp_path / "munge.socket", "ci-runner")
    assert re.findall(r"^Slurm(?:d?)User=(.*)$", conf, re.MULTILINE) == ["ci-runner", "ci-runner"]


# ---------------------------------------------------------------- the README's CPU sbatch command


def readme_cpu_sbatch() -> list[str]:
    """The README's CPU job: `sbatch FLAGS slurm/softgrpo.sbatch recipes/softgrpo-smollm2-135m-cpu.yaml`."""
    found = re.search(
        rf"^\s*(sbatch .*slurm/softgrpo\.sbatch {re.escape(README_CPU_RECIPE)}.*)$",
        README.read_text(),
        re.MULTILINE,
    )
    assert found, f"README.md: no `sbatch ... slurm/softgrpo.sbatch {README_CPU_RECIPE}` command"
    return shlex.split(found.group(1))


def readme_cpu_sbatch_flags() -> list[str]:
    args = readme_cpu_sbatch()
    return args[1 : args.index("slurm/softgrpo.sbatch")]


def readme_cpu_job(recipe: Path) -> list[str]:
    """The README's CPU command with `recipe` for its recipe, waiting for the job and printing its id."""
    args = readme_cpu_sbatch()
    args = [
        str(TEMPLATE)
        if a == "slurm/softgrpo.sbatch"
        else str(recipe)
        if a == README_CPU_RECIPE
        else a
        for a in args
    ]
    return [args[0], "--parsable", "--wait", *args[1:]]


def test_readme_cpu_sbatch_command_is_a_two_task_cpu_job_that_fits_two_cores():
    """The flags the real-cluster tests submit with, checked here in a second."""
    flags = {
        **sbatch_header(),
        **dict(flag.partition("=")[::2] for flag in readme_cpu_sbatch_flags()),
    }
    assert flags["--gpus-per-node"] == "0" and flags["--ntasks-per-node"] == "2"
    assert int(flags["--ntasks-per-node"]) * int(flags["--cpus-per-task"]) <= 2, (
        flags
    )  # the CI machine: 2 cores
    assert readme_cpu_sbatch()[-1] == README_CPU_RECIPE  # no overrides: the recipe is the job


# ---------------------------------------------------------------- a real local Slurm cluster


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory):
    require_binaries()
    cluster = start_local_slurm(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_hf_model("llama", path, vocab_size=49152)  # 4 heads, 2 KV heads: TP=2 divides them
    return path


def tiny_tp2_recipe(tmp_path: Path, model: Path, tokenizer: Path, **sections) -> Path:
    """A 2-task CPU recipe of the tiny model at TP=2, for the README's CPU command."""
    policy = {"megatron_cfg": {"optimizer": {"lr": 1e-4}, "tensor_model_parallel_size": 2}}
    return write_recipe(tmp_path, model, tokenizer, policy=policy, **sections)


def cluster_env(cluster, **extra) -> dict:
    """What a user's shell exports to the job: the project's Python and root."""
    env = {
        k: v
        for k, v in cluster.env.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    return {**env, "SOFTGRPO_HOME": str(ROOT), "SOFTGRPO_PYTHON": sys.executable, **extra}


def steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.multiproc
def test_the_readme_cpu_sbatch_command_runs_a_two_task_job_to_completion(
    local_slurm, tmp_path, tiny_model, smollm2_hf_dir
):
    """The README's CPU command as documented, with the tiny TP=2 recipe for its recipe."""
    config = local_slurm.run("scontrol", "show", "config").stdout
    assert (
        re.findall(r"^Slurmd?User\s*=\s*(\S+)\(", config, re.MULTILINE) == [current_user()] * 2
    ), config
    recipe = tiny_tp2_recipe(tmp_path, tiny_model, smollm2_hf_dir, grpo={"max_num_steps": 3})
    done = subprocess.run(
        readme_cpu_job(recipe),
        env=cluster_env(local_slurm),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    job_id = done.stdout.split()[0] if done.stdout.strip() else "?"
    run = tmp_path / "runs" / "softgrpo" / job_id
    log = (
        (run / "slurm.out").read_text()
        if (run / "slurm.out").exists()
        else done.stderr + local_slurm.logs()
    )
    assert done.returncode == 0, log
    assert "[softgrpo] 2 ranks: TP=2 PP=1 DP=1" in log
    assert steps(run) == [1, 2, 3]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000003"


@pytest.mark.slow
@pytest.mark.multiproc
def test_sigterm_checkpoints_requeues_and_the_job_resumes_to_completion(
    local_slurm, tmp_path, tiny_model, smollm2_hf_dir
):
    """`scancel --signal=TERM JOB` signals the job's steps (the tasks), not the batch shell or srun;
    with --full it would also reach srun, which answers SIGTERM by killing the tasks."""
    max_steps = 8
    recipe = tiny_tp2_recipe(
        tmp_path,
        tiny_model,
        smollm2_hf_dir,
        grpo={"max_num_steps": max_steps},
        checkpointing={"save_period": 100},
    )
    sbatch = subprocess.Popen(
        readme_cpu_job(recipe),
        env=cluster_env(local_slurm),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    job_id = sbatch.stdout.readline().strip()
    run = tmp_path / "runs" / "softgrpo" / job_id
    log = run / "slurm.out"
    deadline = time.monotonic() + 600
    while not (log.exists() and re.search(r"^step 1/", log.read_text(), re.MULTILINE)):
        assert time.monotonic() < deadline and sbatch.poll() is None, (
            log.read_text() if log.exists() else ""
        ) + local_slurm.logs()
        time.sleep(0.5)
    local_slurm.run("scancel", "--signal=TERM", job_id)
    _, err = sbatch.communicate(timeout=900)
    text = log.read_text()
    assert sbatch.returncode == 0, text + err
    stopped = re.search(r"stopped by signal at step (\d+); exit 75", text)
    assert stopped, text
    step = int(stopped.group(1))
    assert 1 <= step < max_steps
    assert "received signal SIGTERM" in text and f"requeueing job {job_id}" in text
    assert f"job {job_id} restart 1:" in text
    assert f"resumed from {run / 'checkpoints' / f'step_{step:07d}'} (step {step})" in text
    assert steps(run) == list(range(1, max_steps + 1))  # no step lost or repeated


@pytest.mark.slow
@pytest.mark.multiproc
def test_nemo_run_submits_the_cpu_job_to_local_slurm(
    local_slurm, tmp_path, tiny_model, smollm2_hf_dir
):
    import_nemo_run()
    recipe = tiny_tp2_recipe(tmp_path, tiny_model, smollm2_hf_dir, grpo={"max_num_steps": 3})
    env = {**cluster_env(local_slurm), "NEMORUN_HOME": str(tmp_path / "nemo")}
    # detached: NeMo-Run follows a job with `sacct`, which needs accounting this cluster does not run
    done = nemo_run_cli(
        "slurm",
        str(recipe),
        *CPU_JOB_ARGS,
        "--python",
        sys.executable,
        "--run-dir",
        "run",
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = done.stdout.strip().splitlines()[-1].split()[0].rsplit("/", 1)[-1]
    fields = local_slurm.wait_finished(job_id, timeout_s=900)
    logs = "".join(p.read_text() for p in (tmp_path / "nemo").rglob("*.out"))
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), logs
    assert "[softgrpo] 2 ranks: TP=2 PP=1 DP=1" in logs
    assert steps(tmp_path / "run") == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.multiproc
def test_nemo_run_local_executor_runs_the_cpu_job_with_torchrun(
    tmp_path, tiny_model, smollm2_hf_dir
):
    import_nemo_run()
    recipe = tiny_tp2_recipe(tmp_path, tiny_model, smollm2_hf_dir, grpo={"max_num_steps": 2})
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # python and torchrun of this venv
    env = {**os.environ, "PATH": path, "NEMORUN_HOME": str(tmp_path / "nemo")}
    done = nemo_run_cli(
        "local", str(recipe), "--tasks-per-node", "2", "--run-dir", "run", env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].endswith(" SUCCEEDED")
    assert "2 ranks: TP=2 PP=1 DP=1" in done.stdout + done.stderr
    assert steps(tmp_path / "run") == [1, 2]
