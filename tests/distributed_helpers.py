"""Run a function on N CPU ranks (gloo), the way torchrun would, and collect each rank's result.

Ranks are forked from a forkserver that imported the package's heavy modules once (Megatron-Core,
torch, transformers: ~8 s a rank, two ranks on two cores, on every call under "spawn"); the
server runs no torch op before forking, so a rank starts as clean as a spawned one.

A rank's result crosses the queue as bytes (`torch.save`), never as a tensor: a tensor is sent
as a shared-memory file descriptor that the parent fetches from the rank later, and a rank that
has exited by then leaves the parent a `FileNotFoundError` (a race under load).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import socket
import traceback

import torch

# by package name: Python 3.11's forkserver ignores the parent's sys.path, so tests/ is not on it
PRELOAD = [
    "pytest",
    "transformers",
    "megatron_softgrpo.train.loop",
    "megatron_softgrpo.eval.runner",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, args, queue, env):
    """fn in the caller's environment, as a spawned rank has it (the server's is from its start;
    multiprocessing already moves the rank to the caller's directory)."""
    os.environ.clear()
    os.environ.update(
        env,
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        torch.set_num_threads(1)
        buffer = io.BytesIO()
        torch.save(fn(rank, *args), buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report everything, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        from megatron_softgrpo.distributed import destroy_distributed

        destroy_distributed()


def run_ranks(world_size: int, fn, *args, timeout: float = 600.0) -> list:
    """fn(rank, *args) on `world_size` new processes; returns results ordered by rank."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, r, world_size, port, args, queue, dict(os.environ)),
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.terminate()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
