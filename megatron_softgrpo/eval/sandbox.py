"""Running untrusted Python programs (code-benchmark solutions) so that they cannot harm the evaluator or the machine.

Each program runs in its own process, in layers (the strongest this machine allows is probed once):

1. Process: `python -I -B` (no user site, no PYTHON* variables, no bytecode files) with a clean
   environment (PATH, HOME=TMPDIR=its directory), stdin from /dev/null, a fresh private
   directory as working directory (deleted afterwards), in a new session. On the wall-clock
   timeout the program is killed with SIGKILL, and after every run its whole process group.
   A run passes when it exits with status 0 *and* printed the per-run random marker that
   `sandbox_guard.py` prints only once the program (with the benchmark's tests at its end) ran
   to completion: exiting early with status 0 is a failure.
2. Namespaces (`unshare`, util-linux): a new network namespace (no interfaces up: no network at
   all, not even the host's loopback) and a new PID namespace whose init is the program;
   when it exits or is killed, the kernel kills every process it started, even ones that
   left the process group. Where `mount` works there (as root, or in a user namespace) also a
   mount namespace with its own small tmpfs over /tmp, /var/tmp and /dev/shm (the program's
   directory bound back in): what it writes to those world-writable places is private to it
   and gone when it ends. As root the program also runs as an unprivileged user
   (`setpriv`, uid/gid 65534, keeping only the read-everything capability so the interpreter
   stays readable), so the file system refuses its writes outside its directory and world-writable
   places, and RLIMIT_NPROC (which the kernel does not enforce for root) applies. Without root,
   an unprivileged user namespace gives the same network/PID isolation where the kernel allows it.
3. Resource limits (set by `sandbox_guard.py` before the program starts): CPU seconds, address
   space (RLIMIT_AS), file size, open files, no core files, and a process count where the
   kernel accounts it per sandbox (layer 2 present).
4. Python guard (`sandbox_guard.py`, an audit hook): refuses process creation, signals,
   sockets, ctypes, raising limits and file-system changes outside the working directory.

Isolation names (`isolation().name`), strongest first: "namespaces+nobody" (root with
setpriv), "namespaces" (root without setpriv: no process count), "user-namespaces" (not root),
each with "+private-tmp" where the mount namespace works, and "none" (layers 1, 3 without the
process count, and 4; the run log should say so). Residual risk, for a program that defeats the
Python guard (ctypes is refused, but the guard is Python code in the program's own
interpreter; a path can also be swapped between the guard's check and the open by another
thread):
- in every mode: reading files the evaluator can read (it cannot send them anywhere but its own
  output), and using CPU and memory up to the limits;
- without "+private-tmp": writing into world-writable directories (/tmp, /var/tmp, /dev/shm);
- in "namespaces" (root, no setpriv) and "user-namespaces": it runs as root of its namespace
  or as the evaluator's user, so it can write wherever the evaluator can;
- in "none": the above and the network and the evaluator's other processes.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

_GUARD = Path(__file__).with_name("sandbox_guard.py")
# The interpreter behind a virtual environment's link, and the guard copied into the program's
# directory: a project (and its venv) under /tmp stays runnable when the private-tmp isolation
# masks /tmp. Programs and the guard need only the standard library.
_INTERPRETER = os.path.realpath(sys.executable)
_UNPRIVILEGED_ID = 65534  # nobody / nogroup
_OUTPUT_TAIL_BYTES = 4096


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = (
        30.0  # wall clock, whole program: generous, so a busy machine does not fail slow solutions
    )
    cpu_s: int = 10  # RLIMIT_CPU per process: the limit that counts for busy programs
    memory_mb: int = 1024  # RLIMIT_AS per process
    max_processes: int = 32  # RLIMIT_NPROC, where the kernel accounts it per sandbox
    max_file_mb: int = 16  # RLIMIT_FSIZE: largest file it may write (its output included)
    open_files: int = 64  # RLIMIT_NOFILE
    python_guard: bool = True  # the audit-hook layer; False only to test the OS-level layers alone


@dataclass(frozen=True)
class ExecResult:
    status: Literal["passed", "failed", "timeout"]
    returncode: int | None  # None on timeout
    output: str  # the tail of stdout and stderr together

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# Run by `sh` as the mount namespace's root: private tmpfs over the world-writable directories,
# then the program's directory (kept open as fd 3, since it may lie under one of them) bound back
# in at its path, then the rest of the command (`setpriv ...` and the interpreter).
_PRIVATE_TMP_SCRIPT = """set -e
exec 3<"$1"
for d in /tmp /var/tmp /dev/shm; do mount -t tmpfs -o size=64m,nr_inodes=4096,mode=1777 softgrpo-sandbox "$d"; done
mkdir -p "$1"
mount --no-canonicalize --bind /proc/self/fd/3 "$1"
exec 3<&-
cd "$1"
unset PWD OLDPWD
shift
exec "$@"
"""


@dataclass(frozen=True)
class Isolation:
    name: str
    namespaces: tuple[str, ...]  # the `unshare ...` command, () for none
    drop: tuple[str, ...]  # the `setpriv ... --` command that drops privileges, () for none
    run_as: int | None  # uid/gid that must own the working directory
    limit_processes: bool  # RLIMIT_NPROC counts only this sandbox's processes
    private_tmp: bool  # a mount namespace with private /tmp, /var/tmp, /dev/shm

    def command(self, workdir: str, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped in this isolation's layers."""
        if self.private_tmp:
            return [
                *self.namespaces,
                "/bin/sh",
                "-c",
                _PRIVATE_TMP_SCRIPT,
                "sh",
                workdir,
                *self.drop,
                *argv,
            ]
        return [*self.namespaces, *self.drop, *argv]


def _candidates() -> list[Isolation]:
    unshare, setpriv, mount = (
        shutil.which("unshare"),
        shutil.which("setpriv"),
        shutil.which("mount"),
    )
    plain = []
    namespaces = ("--net", "--pid", "--fork", "--kill-child")
    if unshare and setpriv and os.geteuid() == 0:
        caps = "-all,+dac_read_search"
        drop = (
            setpriv,
            f"--reuid={_UNPRIVILEGED_ID}",
            f"--regid={_UNPRIVILEGED_ID}",
            "--clear-groups",
            f"--inh-caps={caps}",
            f"--ambient-caps={caps}",
            f"--bounding-set={caps}",
            "--no-new-privs",
            "--",
        )
        plain.append(
            Isolation(
                "namespaces+nobody", (unshare, *namespaces), drop, _UNPRIVILEGED_ID, True, False
            )
        )
    if unshare and os.geteuid() == 0:  # root without setpriv: RLIMIT_NPROC would not bind
        plain.append(Isolation("namespaces", (unshare, *namespaces), (), None, False, False))
    if unshare and os.geteuid() != 0:
        plain.append(
            Isolation(
                "user-namespaces",
                (unshare, "--user", "--map-root-user", *namespaces),
                (),
                None,
                True,
                False,
            )
        )
    found = []
    for candidate in plain:  # each first with its private /tmp, where mount works in the namespace
        if mount and os.path.exists("/bin/sh"):
            found.append(
                Isolation(
                    candidate.name + "+private-tmp",
                    (*candidate.namespaces, "--mount", "--propagation", "private"),
                    candidate.drop,
                    candidate.run_as,
                    candidate.limit_processes,
                    True,
                )
            )
        found.append(candidate)
    found.append(Isolation("none", (), (), None, False, False))
    return found


@functools.cache
def isolation() -> Isolation:
    """The strongest isolation that runs a small program here (probed once per process)."""
    for candidate in _candidates():
        # imports a module after start-up: the interpreter's files must be readable as run_as
        probe = _run(
            candidate,
            "import hashlib\nassert hashlib.sha256(b'').digest()\n",
            SandboxLimits(timeout_s=60.0),
        )
        if probe.passed:
            logger.info("code sandbox isolation: %s", candidate.name)
            return candidate
        logger.info(
            "code sandbox isolation %s unavailable: %s", candidate.name, probe.output.strip()[-200:]
        )
    raise RuntimeError(f"the sandbox cannot run even an empty program: {probe.output}")


def run_python(source: str, limits: SandboxLimits = SandboxLimits()) -> ExecResult:
    """Run one program in the sandbox; passed = ran to its end and exited with status 0 within the time limit."""
    return _run(isolation(), source, limits)


def run_python_many(
    sources: Sequence[str], limits: SandboxLimits = SandboxLimits(), max_parallel: int = 2
) -> list[ExecResult]:
    """`run_python` over many programs, `max_parallel` at a time, results in order."""
    isolation()  # probe once before the threads start
    with ThreadPoolExecutor(max_workers=max_parallel) as executor:
        return list(executor.map(lambda source: run_python(source, limits), sources))


def _run(iso: Isolation, source: str, limits: SandboxLimits) -> ExecResult:
    workdir = tempfile.mkdtemp(prefix="softgrpo-sandbox-")
    try:
        program = os.path.join(workdir, "main.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        if iso.run_as is not None:
            os.chown(workdir, iso.run_as, iso.run_as)
        child_limits = asdict(limits)
        if not iso.limit_processes:
            child_limits["max_processes"] = None
        settings = {
            "program": program,
            "workdir": workdir,
            "limits": child_limits,
            "python_guard": limits.python_guard,
        }
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        guard = shutil.copy(_GUARD, os.path.join(workdir, "_sandbox_guard.py"))
        command = iso.command(workdir, [_INTERPRETER, "-I", "-B", guard, json.dumps(settings)])
        marker = f"softgrpo-sandbox-completed-{secrets.token_hex(16)}\n"
        with tempfile.TemporaryFile() as output:
            process = subprocess.Popen(
                command,
                cwd=workdir,
                env=env,
                stdin=subprocess.PIPE,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:  # fits the pipe's buffer: does not block
                process.stdin.write(marker.encode())
                process.stdin.close()
            except BrokenPipeError:
                pass  # the guard died before reading it: the run fails without the marker
            try:
                returncode = process.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                returncode = None
                _kill_program(process, namespaced=bool(iso.namespaces))
            _kill_group(process)
            output.seek(max(0, output.seek(0, os.SEEK_END) - _OUTPUT_TAIL_BYTES))
            text = output.read().decode("utf-8", errors="replace")
    finally:
        _remove_tree(workdir)
    if returncode is None:
        return ExecResult("timeout", None, text)
    completed = marker in text
    text = text.replace(marker, "")
    if returncode == 0 and not completed:
        text += "\nsandbox: the program exited with status 0 before it ran to its end\n"
    return ExecResult("passed" if returncode == 0 and completed else "failed", returncode, text)


def _kill_program(process: subprocess.Popen, namespaced: bool) -> None:
    """Kill a program that ran out of time, and return only once all its processes are gone.

    Namespaced, the program is the child (PID-namespace init) of `unshare`: killing it makes the
    kernel kill the rest of the namespace, and `unshare` exits only after reaping it, so waiting
    for `unshare` waits for all of them. Otherwise the program is `process` itself.
    """
    children = _children(process.pid) if namespaced else []
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if not children:  # not namespaced, or still starting up
        _kill_group(process)
    process.wait()


def _children(pid: int) -> list[int]:
    """The direct children of `pid`, from /proc (stat field 4 is the parent's pid)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # exited meanwhile
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                children.append(int(entry.name))
    return children


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the program's process group (the session it leads), then reap the leader."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone
    process.wait()


def _remove_tree(path: str) -> None:
    """Delete the working directory even where the program removed permissions inside it."""

    def make_writable_and_retry(function, failed_path, _exc_info):
        os.chmod(os.path.dirname(failed_path), 0o700)
        if os.path.isdir(failed_path) and not os.path.islink(failed_path):
            os.chmod(failed_path, 0o700)
        function(failed_path)

    shutil.rmtree(path, onerror=make_writable_and_retry)
