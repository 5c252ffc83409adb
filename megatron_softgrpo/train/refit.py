"""Refit: new policy weights sent from the training ranks to generation ranks that hold their
own copy of the model, possibly at another tensor-parallel size.

Weights travel in their full (TP=1) layout: the sender gathers each of its shards
(`hf_mapping.tp_gather`), a receiver cuts its own slice (`hf_mapping.tp_slice`), so the two
sides' TP sizes are independent. Tensors go in buckets of about `bucket_bytes`, each one dtype:
per bucket one broadcast of a header (names, shapes, dtype) and one of the packed bytes, over the
`Bridge` that joins the sender to the receivers. A header of None ends the refit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from megatron_softgrpo.bridge import Bridge

BUCKET_BYTES = (
    256 << 20
)  # NeMo-RL's refit buffer order of magnitude: few collectives, bounded memory

Named = tuple[str, torch.Tensor]


@dataclass(frozen=True)
class RefitStats:
    tensors: int
    bytes: int
    buckets: int


def buckets(named: Iterable[Named], bucket_bytes: int = BUCKET_BYTES) -> Iterator[list[Named]]:
    """`named` in order, grouped: a bucket closes before it would exceed `bucket_bytes` (a
    larger tensor goes alone) or change dtype."""
    bucket: list[Named] = []
    size = 0
    for name, tensor in named:
        if bucket and (size + tensor.nbytes > bucket_bytes or tensor.dtype != bucket[0][1].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += tensor.nbytes
    if bucket:
        yield bucket


def send_weights(
    named: Iterable[Named], bridge: Bridge, src: int = 0, bucket_bytes: int = BUCKET_BYTES
) -> RefitStats:
    """Broadcast full-layout tensors from bridge rank `src` to the bridge's other ranks, which
    call `receive_weights` meanwhile."""
    tensors = nbytes = count = 0
    for bucket in buckets(named, bucket_bytes):
        dtype = bucket[0][1].dtype
        header = [(name, tuple(t.shape)) for name, t in bucket]
        bridge.broadcast_object((header, str(dtype)), src)
        flat = torch.cat([t.detach().reshape(-1) for _, t in bucket])
        bridge.broadcast(flat, src)
        tensors, nbytes, count = tensors + len(bucket), nbytes + flat.nbytes, count + 1
    bridge.broadcast_object(None, src)
    return RefitStats(tensors, nbytes, count)


def receive_weights(bridge: Bridge, src: int = 0) -> Iterator[Named]:
    """The tensors `send_weights` broadcasts, one bucket at a time, on the bridge's device
    (views of its buffer: copy them before the next bucket arrives if they must outlive it)."""
    while True:
        message = bridge.broadcast_object(None, src)
        if message is None:
            return
        header, dtype = message
        sizes = [math.prod(shape) for _, shape in header]
        flat = torch.empty(
            sum(sizes), dtype=getattr(torch, dtype.split(".")[-1]), device=bridge.device
        )
        bridge.broadcast(flat, src)
        for (name, shape), part in zip(header, flat.split(sizes), strict=True):
            yield name, part.view(shape)
