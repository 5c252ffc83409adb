"""The worker side of `TimeoutPool`: a fresh interpreter that answers (fn, item) requests.

`main(fd, settings)`: fd is the worker's end of the socket pair; settings hold the modules to
import before announcing readiness and the address-space limit.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from importlib import import_module
from multiprocessing.connection import Connection

READY = "ready"


def _serve(conn: Connection) -> None:
    """Worker loop: answer (fn, item) with (ok, result) until the pool closes the connection."""
    while True:
        try:
            fn, item = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply = (True, fn(item))
        except Exception as exc:  # the caller's default stands in for any failure
            reply = (False, f"{type(exc).__name__}: {exc}")
        conn.send(reply)


def _exit_when_orphaned(parent: int) -> None:
    """A worker busy with a runaway item would outlive a crashed caller; stop when the parent is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def main(fd: int, settings: dict) -> None:
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    if settings["memory_limit_mb"] is not None:
        limit = settings["memory_limit_mb"] << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for module in settings["preload"]:
        import_module(module)
    conn = Connection(fd)
    conn.send(READY)
    _serve(conn)
    os._exit(0)  # skip interpreter teardown (atexit hooks of preloaded libraries)
