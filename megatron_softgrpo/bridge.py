"""A process group that joins ranks of two roles (training and generation), each of which runs
its own default world (`distributed.init_distributed`).

Megatron-Core 0.16 builds its groups over the default world, so each role gets a world of its
own and a bridge spans the two: a gloo backend on the job's rendezvous store under its own
prefix, outside torch's registry of groups. It therefore speaks through the backend's own
methods (torch's `dist.send(group=...)` refuses an unregistered group), and its timeout bounds
every wait: a peer that died (its connection closes) or stopped answering raises `PeerLost`,
one line naming it, instead of hanging.

On GPUs (`device` cuda) a bridge also holds an NCCL backend on the same store, and tensors on
the device travel over it without passing through host memory (the refit's buckets); objects
still go over gloo. NCCL's waits are the stream's, not the host's: a lost peer surfaces as
NCCL's watchdog timeout, not as `PeerLost`.
"""

from __future__ import annotations

import datetime
import pickle
import re

import torch
import torch.distributed as dist

from megatron_softgrpo.errors import PeerLost

CPU = torch.device("cpu")


class Bridge:
    """Ranks `members` (global ranks, in bridge-rank order) of the job; the caller is one."""

    def __init__(
        self,
        store,
        name: str,
        members: list[int],
        global_rank: int,
        timeout_s: float,
        device: torch.device = CPU,
    ):
        self.name, self.members, self.timeout_s = name, list(members), timeout_s
        self.rank = self.members.index(global_rank)
        self.size = len(self.members)
        self.device = device  # where the tensors it broadcasts are received
        timeout = datetime.timedelta(seconds=timeout_s)
        prefixed = dist.PrefixStore(f"bridge/{name}/", store)
        self._pg = dist.ProcessGroupGloo(prefixed, self.rank, self.size, timeout)
        self._nccl = None
        if device.type == "cuda":  # untested here: no machine with two GPUs
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            nccl_store = dist.PrefixStore("nccl/", prefixed)
            self._nccl = dist.ProcessGroupNCCL(nccl_store, self.rank, self.size, options)

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """`tensor` filled in place from bridge rank `src` (over NCCL when both are on the GPU,
        else through host memory)."""
        options = dist.BroadcastOptions()
        options.rootRank = src
        if self._nccl is not None and tensor.is_cuda:
            self._nccl.broadcast([tensor], options).wait()  # the stream waits, not the host
            return tensor
        host = tensor if tensor.device.type == "cpu" else tensor.cpu()
        others = [r for i, r in enumerate(self.members) if i != self.rank]
        peer = f"global rank {others[0]}" if len(others) == 1 else f"one of global ranks {others}"
        self._wait(self._pg.broadcast([host], options), peer)
        if host is not tensor:
            tensor.copy_(host)
        return tensor

    def broadcast_object(self, obj, src: int):
        """Bridge rank `src`'s picklable `obj`, on every member."""
        size = torch.zeros(1, dtype=torch.int64)
        payload = _pickled(obj) if self.rank == src else None
        if payload is not None:
            size[0] = len(payload)
        self.broadcast(size, src)
        payload = payload if payload is not None else torch.empty(int(size), dtype=torch.uint8)
        return _unpickled(self.broadcast(payload, src))

    def send_object(self, obj, dst: int) -> None:
        payload, peer = _pickled(obj), f"global rank {self.members[dst]}"
        self._wait(self._pg.send([torch.tensor([len(payload)])], dst, 0), peer)
        self._wait(self._pg.send([payload], dst, 1), peer)

    def recv_object(self, src: int):
        size, peer = torch.zeros(1, dtype=torch.int64), f"global rank {self.members[src]}"
        self._wait(self._pg.recv([size], src, 0), peer)
        payload = torch.empty(int(size), dtype=torch.uint8)
        self._wait(self._pg.recv([payload], src, 1), peer)
        return _unpickled(payload)

    def _wait(self, work, peer: str) -> None:
        try:
            work.wait()
        except RuntimeError as e:  # gloo: a closed connection, or the timeout
            what = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip()).split(". ")[0]  # no file:line
            raise PeerLost(
                f"{self.name} bridge: {peer} died or did not answer within {self.timeout_s:.0f} s "
                f"({what})"
            ) from None


def _pickled(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def _unpickled(payload: torch.Tensor):
    return pickle.loads(payload.numpy().tobytes())
