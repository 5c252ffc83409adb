"""Runs inside the sandboxed interpreter: resource limits, then an audit-hook guard, then the program.

Started by `sandbox.py` as `python -I -B sandbox_guard.py SETTINGS_JSON` in the program's private
directory. It imports nothing from the project (the child must not depend on it) and is the
innermost of the sandbox's layers (see `sandbox.py`): the Python guard refuses, with
PermissionError, process creation and signals, sockets, raising resource limits, ctypes, any
change to the file system outside the program's directory, opening a directory outside it (a
directory descriptor would let `dir_fd=` calls reach outside) and changing into one. A
determined program could get past a Python-level guard; the OS-level layers in `sandbox.py` do
not depend on it.

Completion: the evaluator writes a random marker line on the guard's stdin; the guard reads it,
puts /dev/null in its place, and writes the marker to stdout only after the program ran to its
end. An early exit (`sys.exit(0)`, `raise SystemExit`, `os._exit(0)`) therefore leaves no
marker, and the evaluator grades the run failed. (The marker defends against programs that stop
early, not against one that searches the guard's memory for it.)
"""

import builtins
import json
import os
import resource
import sys

_BLOCKED_EVENTS = frozenset(
    {
        "os.fork",
        "os.forkpty",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "subprocess.Popen",
        "os.kill",
        "os.killpg",
        "signal.pthread_kill",
        "resource.setrlimit",
        "resource.prlimit",
        "os.link",
        "os.chroot",
        "ctypes.dlopen",
        "ctypes.dlsym",
        "ctypes.cdata",
        "ctypes.call_function",
    }
)
_BLOCKED_MODULES = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "cffi", "_cffi_backend"})
# event -> positions of the path arguments that must stay inside the program's directory
_PATH_EVENTS = {
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.mkdir": (0,),
    "os.rename": (0, 1),
    "os.chmod": (0,),
    "os.chown": (0,),
    "os.truncate": (0,),
    "os.utime": (0,),
    "os.symlink": (1,),
    "os.mkfifo": (0,),
    "os.mknod": (0,),
    "shutil.rmtree": (0,),
    "os.chflags": (0,),
    "os.setxattr": (0,),
    "os.removexattr": (0,),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _set_limits(limits: dict) -> None:
    cpu = limits["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] << 20,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["max_file_mb"] << 20,) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if limits["max_processes"] is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"],) * 2)


def _install_guard(workdir: str) -> None:
    root = os.path.realpath(workdir)

    def inside(path) -> bool:
        if isinstance(path, int):  # an already open descriptor
            return True
        real = os.path.realpath(os.fsdecode(path))
        return real == root or real.startswith(root + os.sep) or real == os.devnull

    def hook(event: str, args: tuple) -> None:
        if event in _BLOCKED_EVENTS or event.startswith("socket."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].partition(".")[0] in _BLOCKED_MODULES:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = (flags & _WRITE_FLAGS) or (mode is not None and any(c in mode for c in "wax+"))
            if writes and not inside(path):
                raise PermissionError(
                    f"sandbox: writing {path!r} outside the working directory is not allowed"
                )
            # the event does not carry dir_fd: a descriptor of an outside directory would open a way out
            if not isinstance(path, int) and not inside(path) and os.path.isdir(path):
                raise PermissionError(
                    f"sandbox: opening the directory {path!r} outside the working directory is not allowed"
                )
        elif event == "os.chdir":
            if not inside(args[0]):
                raise PermissionError(
                    f"sandbox: changing into {args[0]!r} outside the working directory is not allowed"
                )
        elif event in _PATH_EVENTS:
            for position in _PATH_EVENTS[event]:
                if not inside(args[position]):
                    raise PermissionError(f"sandbox: {event} on {args[position]!r} is not allowed")

    for name in _BLOCKED_MODULES:  # a module loaded before the hook would not raise an import event
        sys.modules.pop(name, None)
    sys.addaudithook(hook)


def _read_marker() -> bytes:
    """The completion marker line from stdin (the evaluator's pipe), then /dev/null as stdin."""
    marker = b""
    while not marker.endswith(b"\n"):
        chunk = os.read(0, 256)
        if not chunk:
            break
        marker += chunk
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return marker


def main() -> None:
    marker = _read_marker()
    write = os.write  # bound before the program runs: it could replace os.write
    settings = json.loads(sys.argv[1])
    _set_limits(settings["limits"])
    with open(settings["program"], encoding="utf-8") as f:
        source = f.read()
    code = compile(source, settings["program"], "exec")
    if settings["python_guard"]:
        _install_guard(settings["workdir"])
    sys.argv = [settings["program"]]
    try:
        exec(
            code,
            {"__name__": "__main__", "__file__": settings["program"], "__builtins__": builtins},
        )
    except SystemExit as exc:
        # an exit before the end skips the tests that follow it
        print(
            f"sandbox: the program exited (SystemExit({exc.code!r})) before it ran to its end",
            file=sys.stderr,
        )
        sys.exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    write(1, marker)


if __name__ == "__main__":
    main()
