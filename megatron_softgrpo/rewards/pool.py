"""A pool of worker processes that runs one function call per item under a hard wall-clock timeout.

Graders parse untrusted model output with sympy, where one pathological answer can run for
hours. `signal.alarm` (math-verify's own timeout) only works on the main thread and cannot
interrupt long C calls, so each item runs in a worker process instead: an item that overruns
its deadline gets the caller's default value, and its worker is killed (SIGKILL) and replaced.
Callers on any thread may use the pool; calls are serialised.

Workers are fresh interpreters (`pool_worker.main`), not forks of the
caller: a trainer's threads, CUDA context and `__main__` are never duplicated or re-imported.
They talk to the pool over a socket pair with `multiprocessing.connection` framing.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import TypeVar

from megatron_softgrpo.rewards.pool_worker import READY

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger(__name__)

_STARTUP_TIMEOUT_S = 120.0  # importing the preload modules on a busy machine
# The caller's sys.path first, so that the package and the pickled functions import as they do here.
_WORKER_BOOT = (
    "import json, sys; settings = json.loads(sys.argv[2]); sys.path[:] = settings['sys_path']; "
    "from megatron_softgrpo.rewards.pool_worker import main; main(int(sys.argv[1]), settings)"
)


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection


class TimeoutPool:
    """`map(fn, items, default)`: fn(item) for each item in worker processes, in order, each within `timeout_s`.

    `fn` must be picklable (a module-level function). An item whose call raises, times out or
    kills its worker yields `default`; `timeouts` and `failures` count those cases. Workers start
    on the first `map`, import `preload` before taking work, and keep their address space under
    `memory_limit_mb` (RLIMIT_AS; None: unlimited).
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 10.0,
        memory_limit_mb: int | None = 4096,
        preload: Sequence[str] = (),
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.preload = tuple(preload)
        self.timeouts = 0
        self.failures = 0
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ workers

    def _launch(self) -> _Worker:
        ours, theirs = socket.socketpair()
        settings = {
            "sys_path": sys.path,
            "preload": self.preload,
            "memory_limit_mb": self.memory_limit_mb,
        }
        process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, str(theirs.fileno()), json.dumps(settings)],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        return _Worker(process, Connection(ours.detach()))

    def _await_ready(self, workers: list[_Worker]) -> None:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        for worker in workers:
            try:
                ready = (
                    worker.conn.poll(max(0.0, deadline - time.monotonic()))
                    and worker.conn.recv() == READY
                )
            except (EOFError, OSError):  # it exited: its error is on stderr
                ready = False
            if not ready:
                raise RuntimeError(
                    f"grading worker {worker.process.pid} did not start (preload {self.preload})"
                )

    @staticmethod
    def _stop(worker: _Worker) -> None:
        worker.conn.close()
        worker.process.kill()
        worker.process.wait()

    def _replace(self, worker: _Worker) -> _Worker:
        self._stop(worker)
        self._workers.remove(worker)
        self._ensure_workers(len(self._workers) + 1)
        return self._workers[-1]

    def _ensure_workers(self, wanted: int) -> None:
        started = [self._launch() for _ in range(wanted - len(self._workers))]
        try:
            self._await_ready(started)
        except RuntimeError:
            for worker in started:
                self._stop(worker)
            raise
        self._workers.extend(started)

    # ------------------------------------------------------------------ map

    def map(self, fn: Callable[[T], R], items: Sequence[T], default: R) -> list[R]:
        with self._lock:
            self._ensure_workers(min(self.num_workers, len(items)))
            busy: dict[
                Connection, tuple[_Worker, int, float]
            ] = {}  # conn -> (worker, item index, deadline)
            try:
                return self._dispatch(fn, items, default, busy)
            except (
                BaseException
            ):  # e.g. KeyboardInterrupt: busy workers hold answers nobody will read
                for worker, _, _ in busy.values():
                    self._stop(worker)
                    self._workers.remove(worker)
                raise

    def _dispatch(
        self, fn: Callable[[T], R], items: Sequence[T], default: R, busy: dict
    ) -> list[R]:
        results: list[R] = [default] * len(items)
        pending = deque(enumerate(items))
        idle = list(self._workers)
        while pending or busy:
            while pending and idle:
                worker = idle.pop()
                index, item = pending.popleft()
                try:
                    worker.conn.send((fn, item))
                except OSError:  # died while idle: retry the item on a fresh worker
                    pending.appendleft((index, item))
                    idle.append(self._replace(worker))
                    continue
                busy[worker.conn] = (worker, index, time.monotonic() + self.timeout_s)
            next_deadline = min(deadline for _, _, deadline in busy.values())
            for conn in wait(list(busy), timeout=max(0.0, next_deadline - time.monotonic())):
                worker, index, _ = busy.pop(conn)
                try:
                    ok, value = conn.recv()
                except (EOFError, OSError):  # the worker died (killed by the kernel, a crash)
                    self.failures += 1
                    idle.append(self._replace(worker))
                    continue
                if ok:
                    results[index] = value
                else:
                    self.failures += 1
                    logger.debug("item %d failed: %s", index, value)
                idle.append(worker)
            now = time.monotonic()
            for conn, (worker, index, deadline) in list(busy.items()):
                if deadline <= now:
                    del busy[conn]
                    self.timeouts += 1
                    logger.warning(
                        "item %d exceeded the %.1f s timeout; its worker was killed",
                        index,
                        self.timeout_s,
                    )
                    idle.append(self._replace(worker))
        return results

    def worker_pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers]

    def close(self) -> None:
        with self._lock:
            for worker in self._workers:
                self._stop(worker)
            self._workers.clear()

    def __enter__(self) -> TimeoutPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
