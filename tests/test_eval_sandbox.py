"""The code sandbox: reference solutions pass, wrong ones fail, and hostile programs fail cleanly without a trace."""

import os
import socket
import tempfile
from pathlib import Path

import pytest

from megatron_softgrpo.data import builtin
from megatron_softgrpo.eval import sandbox
from megatron_softgrpo.eval.benchmarks import BENCHMARKS, grade_responses, load_problems
from megatron_softgrpo.eval.code_grading import HumanEvalTests
from megatron_softgrpo.eval.sandbox import SandboxLimits, isolation, run_python, run_python_many

# Wall-clock limits in these tests are generous where a program must fail (or pass) by itself,
# so that a busy machine cannot turn a failure into a timeout.
PATIENT = SandboxLimits(timeout_s=120.0, cpu_s=30)
OS_LAYERS = pytest.mark.skipif(
    isolation().name == "none",
    reason="no PID/network namespaces here: only the Python guard isolates",
)
# Hostile programs meet: every layer this machine offers; the OS layers without the Python
# guard; the Python guard without namespaces (isolation "none", as on machines without unshare).
LAYERS = [
    pytest.param("all", id="all-layers"),
    pytest.param("os", id="os-layers-only", marks=OS_LAYERS),
    pytest.param("guard", id="python-guard-only"),
]


@pytest.fixture
def guard(request, monkeypatch):
    """Parametrised with LAYERS (indirect); returns SandboxLimits.python_guard."""
    if request.param == "guard":
        no_isolation = next(c for c in sandbox._candidates() if c.name == "none")
        monkeypatch.setattr(sandbox, "isolation", lambda: no_isolation)
    return request.param != "os"


def _sandbox_processes() -> list[int]:
    """Live processes started by the sandbox: their command line names the guard script, or
    (when the sandbox drops privileges) they run as its unprivileged user."""
    run_as = (
        isolation().run_as
    )  # the machine's strongest mode (this name is not the one tests patch)
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                uids = next(
                    line
                    for line in (entry / "status").read_text().splitlines()
                    if line.startswith("Uid:")
                )
            except (OSError, StopIteration):
                continue  # exited meanwhile
            if b"sandbox_guard.py" in cmdline or (
                run_as is not None and int(uids.split()[1]) == run_as
            ):
                pids.append(int(entry.name))
    return pids


@pytest.fixture(autouse=True)
def _no_stray_processes():
    assert _sandbox_processes() == []
    yield
    assert _sandbox_processes() == [], "a sandboxed program left processes behind"


@pytest.fixture(scope="module")
def code_problems():
    return {
        name: load_problems(name, builtin.EVAL_DIR / BENCHMARKS[name].filename)
        for name in ("humaneval", "mbpp")
    }


@pytest.mark.parametrize("name", ["humaneval", "mbpp"])
def test_every_reference_solution_passes(code_problems, name):
    problems = code_problems[name]
    results = run_python_many(
        [p.reference.reference_program() for p in problems], PATIENT, max_parallel=2
    )
    failed = {p.id: r.output[-300:] for p, r in zip(problems, results) if not r.passed}
    assert failed == {}


@pytest.mark.parametrize("name", ["humaneval", "mbpp"])
def test_wrong_solutions_fail(code_problems, name):
    problems = code_problems[name][:8]
    programs = []
    for i, problem in enumerate(problems):
        tests = problem.reference
        if isinstance(tests, HumanEvalTests):
            programs.append(
                tests.program(f"def {tests.entry_point}(*args, **kwargs):\n    return None\n")
            )
        else:  # the next problem's reference solution: the asserted function is missing
            programs.append(
                tests.program(problems[(i + 1) % len(problems)].reference.reference_code)
            )
    results = run_python_many(programs, PATIENT)
    assert [r.status for r in results] == ["failed"] * len(problems)
    assert all("Error" in r.output for r in results)


EARLY_EXITS = {
    "sys.exit": "import sys\nsys.exit(0)\n",
    "os._exit": "import os\nos._exit(0)\n",
    "raise SystemExit": "raise SystemExit\n",
}


@pytest.mark.parametrize("name", ["humaneval", "mbpp"])
def test_early_exit_does_not_pass(code_problems, name):
    """A solution that exits with status 0 before the tests run is graded wrong; the references still pass."""
    problems = code_problems[name][:2]
    exits = [f"```python\n{code}```" for code in EARLY_EXITS.values()]
    responses, expanded = [], []
    for p in problems:
        reference = (
            p.reference.canonical_solution if name == "humaneval" else p.reference.reference_code
        )
        responses += [*exits, f"```python\n{reference}\n```"]
        expanded += [p] * (len(exits) + 1)
    grades = grade_responses(name, expanded, responses, sandbox_limits=PATIENT)
    assert [g.correct for g in grades] == [False, False, False, True] * len(problems)


@pytest.mark.parametrize("variant", list(EARLY_EXITS))
def test_an_early_exit_with_status_zero_fails_in_the_sandbox(variant):
    result = run_python(EARLY_EXITS[variant] + "raise AssertionError('the tests')\n", PATIENT)
    assert result.status == "failed" and "before it ran to its end" in result.output


def test_the_completion_marker_is_not_readable_from_stdin_nor_the_environment():
    result = run_python(
        "import os, sys\nprint(repr(sys.stdin.read()), sorted(os.environ))\n", PATIENT
    )
    assert result.passed, result.output
    assert (
        result.output.strip() == "'' ['HOME', 'LANG', 'PATH', 'TMPDIR']"
    )  # the marker itself is removed


# ---------------------------------------------------------------- hostile programs

INFINITE_LOOP = "while True:\n    pass\n"
FORK_BOMB = """
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.05)
"""
MEMORY_HOG = "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n"
SUBPROCESS = "import subprocess\nsubprocess.run(['sleep', '1000'], check=True)\n"


@pytest.mark.parametrize("guard", LAYERS, indirect=True)
def test_infinite_loop_times_out(guard):
    result = run_python(INFINITE_LOOP, SandboxLimits(timeout_s=1.0, cpu_s=30, python_guard=guard))
    assert result.status == "timeout" and result.returncode is None


@pytest.mark.parametrize("guard", LAYERS, indirect=True)
def test_cpu_limit_stops_a_busy_program_before_the_wall_clock(guard):
    result = run_python(INFINITE_LOOP, SandboxLimits(timeout_s=120.0, cpu_s=1, python_guard=guard))
    assert result.status == "failed" and result.returncode != 0


@pytest.mark.parametrize("guard", LAYERS, indirect=True)
def test_fork_bomb_fails_and_leaves_no_process(guard):
    result = run_python(FORK_BOMB, SandboxLimits(timeout_s=2.0, cpu_s=2, python_guard=guard))
    assert (
        result.status == "timeout"
    )  # it retries forever: the guard or RLIMIT_NPROC refuses each fork
    # the autouse fixture checks that no process of the bomb survived


@pytest.mark.parametrize("guard", LAYERS, indirect=True)
def test_memory_hog_fails_with_memory_error(guard):
    result = run_python(
        MEMORY_HOG, SandboxLimits(timeout_s=120.0, memory_mb=256, python_guard=guard)
    )
    assert result.status == "failed" and "MemoryError" in result.output


def test_python_guard_refuses_subprocesses():
    result = run_python(SUBPROCESS, PATIENT)
    assert result.status == "failed" and "PermissionError" in result.output


@OS_LAYERS
def test_without_the_guard_a_subprocess_dies_with_the_program():
    result = run_python(SUBPROCESS, SandboxLimits(timeout_s=2.0, python_guard=False))
    assert result.status == "timeout"
    # the autouse fixture checks that the `sleep` child (run as the sandbox user) is gone


@pytest.mark.parametrize("guard", LAYERS, indirect=True)
def test_writes_and_deletions_outside_the_sandbox_fail(tmp_path, guard):
    outside = tmp_path / "outside.txt"
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    directory = (
        f"os.open({str(tmp_path)!r}, os.O_RDONLY)"  # the `open` audit event does not carry dir_fd
    )
    for program in (
        f"open({str(outside)!r}, 'w').write('pwned')\n",
        f"import os\nos.remove({str(keep)!r})\n",
        f"import os\nos.rename({str(keep)!r}, 'stolen.txt')\n",
        f"import os\nos.write(os.open('outside.txt', os.O_CREAT | os.O_WRONLY, dir_fd={directory}), b'pwned')\n",
        f"import os\nos.write(os.open('keep.txt', os.O_WRONLY | os.O_TRUNC, dir_fd={directory}), b'pwned')\n",
        f"import os\nos.remove('keep.txt', dir_fd={directory})\n",
        f"import os\nos.chdir({str(tmp_path)!r})\nopen('outside.txt', 'w').write('pwned')\n",
    ):
        result = run_python(program, SandboxLimits(timeout_s=120.0, python_guard=guard))
        # refused, or (with a private /tmp) the directory is not even there
        assert result.status == "failed", program
        assert "PermissionError" in result.output or "FileNotFoundError" in result.output, (
            result.output
        )
    assert not outside.exists()
    assert keep.read_text() == "precious"


@pytest.mark.parametrize("guard", LAYERS, indirect=True)
def test_writes_to_shared_memory_fail_or_stay_private(guard):
    """/dev/shm is world-writable: the guard refuses the write; namespaces give the program its own /dev/shm."""
    if not guard and not isolation().private_tmp:
        pytest.skip(
            f"isolation {isolation().name}: no mount namespace here, /dev/shm is the host's"
        )
    target = Path("/dev/shm") / f"softgrpo-sandbox-escape-{os.getpid()}"
    program = f"open({str(target)!r}, 'w').write('x')\nprint(open({str(target)!r}).read())\n"
    try:
        result = run_python(program, SandboxLimits(timeout_s=120.0, python_guard=guard))
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)
    if guard:
        assert result.status == "failed" and "outside the working directory" in result.output
    else:  # written into the program's own /dev/shm, gone with it
        assert result.passed and result.output.strip() == "x", result.output


def test_python_guard_refuses_writes_to_world_writable_places():
    target = Path(tempfile.gettempdir()) / f"softgrpo-sandbox-escape-{os.getpid()}.txt"
    result = run_python(f"open({str(target)!r}, 'w').write('x')\n", PATIENT)
    assert result.status == "failed" and "outside the working directory" in result.output
    assert not target.exists()


@pytest.mark.parametrize("guard", LAYERS, indirect=True)
def test_no_network_not_even_the_hosts_loopback(guard):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')\n"
        result = run_python(program, SandboxLimits(timeout_s=120.0, python_guard=guard))
        assert result.status == "failed"
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected


def test_program_runs_in_a_private_directory_with_a_clean_environment(monkeypatch):
    monkeypatch.setenv("SOFTGRPO_SECRET_TOKEN", "do-not-leak")
    program = (
        "import os, sys\n"
        "open('scratch.txt', 'w').write('ok')\n"
        "assert open('scratch.txt').read() == 'ok'\n"
        "print(os.getcwd())\n"
        "print(sorted(os.environ))\n"
        "print(sys.flags.isolated, sys.flags.dont_write_bytecode)\n"
    )
    result = run_python(program, PATIENT)
    assert result.passed, result.output
    workdir, env_keys, flags = result.output.splitlines()[-3:]
    assert "softgrpo-sandbox-" in workdir and not Path(workdir).exists()  # deleted afterwards
    assert "SOFTGRPO_SECRET_TOKEN" not in env_keys
    assert eval(env_keys) == ["HOME", "LANG", "PATH", "TMPDIR"]
    assert flags == "1 1"
