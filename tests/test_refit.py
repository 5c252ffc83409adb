"""Refit pieces: bucketing, the broadcast of full-layout tensors over a bridge between ranks, and
loading them into a model at another tensor-parallel layout."""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import run_ranks
from tiny_models import make_hf_model

from megatron_softgrpo.bridge import Bridge
from megatron_softgrpo.errors import UserError
from megatron_softgrpo.train.refit import buckets, receive_weights, send_weights


def _named():
    g = torch.Generator().manual_seed(0)
    return [
        ("a", torch.randn(5, 7, generator=g)),  # 140 bytes
        ("b", torch.randn(3, generator=g)),  # 12
        ("c", torch.randn(2, 2, generator=g).to(torch.bfloat16)),  # another dtype
        ("d", torch.randn(40, generator=g)),  # 160: alone past the 150-byte bucket
        ("e", torch.arange(6).view(2, 3)),  # int64
    ]


def test_buckets_close_at_the_byte_bound_and_at_a_dtype_change():
    got = [[name for name, _ in bucket] for bucket in buckets(_named(), bucket_bytes=150)]
    assert got == [["a"], ["b"], ["c"], ["d"], ["e"]]
    got = [[name for name, _ in bucket] for bucket in buckets(_named(), bucket_bytes=1000)]
    assert got == [["a", "b"], ["c"], ["d"], ["e"]]


def _bridge(rank: int, members: list[int]) -> Bridge:
    """A bridge over the default world's store (dedicated generation builds its own)."""
    store = torch.distributed.distributed_c10d._get_default_store()
    return Bridge(store, "test", members, rank, timeout_s=60)


def _rank_transport(rank):
    from megatron_softgrpo.distributed import ParallelLayout, init_distributed

    init_distributed(ParallelLayout(1, 1))
    if rank == 1:  # outside the bridge
        return None
    bridge = _bridge(rank, [0, 2])
    if rank == 0:
        stats = send_weights(_named(), bridge, src=0, bucket_bytes=150)
        return stats.tensors, stats.bytes, stats.buckets
    return {name: t.clone() for name, t in receive_weights(bridge, src=0)}


@pytest.mark.multiproc
def test_weights_reach_the_receiving_group_bucket_by_bucket():
    sent, idle, received = run_ranks(3, _rank_transport)
    named = dict(_named())
    assert sent == (5, sum(t.nbytes for t in named.values()), 5) and idle is None
    assert received.keys() == named.keys()
    for name, tensor in named.items():
        assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor)


def _rank_refit_round_trip(rank, model_dir):
    from megatron_softgrpo.config.schema import MegatronCfg
    from megatron_softgrpo.distributed import ParallelLayout, init_distributed
    from megatron_softgrpo.models.hf_mapping import (
        HFCheckpointReader,
        full_megatron_tensor,
        full_to_shards,
        load_shards,
        named_model_tensors,
        tp_gather,
    )
    from megatron_softgrpo.models.loading import load_model
    from megatron_softgrpo.models.source import resolve_model_source

    parallel = init_distributed(ParallelLayout(2, 1))
    source = resolve_model_source(model_dir)
    model, padded = load_model(source, MegatronCfg(tensor_model_parallel_size=2), parallel)
    mine = {name: p.detach().clone() for name, _, p in named_model_tensors(model)}
    tp = parallel.groups.tp
    full = [(n, tp_gather(p.detach().clone(), p, n, tp)) for n, _, p in named_model_tensors(model)]
    reader = HFCheckpointReader(source.path)
    ungathered = [  # the full layout is the one built from the HF checkpoint
        n
        for n, t in full
        if not torch.equal(t, full_megatron_tensor(n, source.arch, padded, reader.get))
    ]
    sharded = sum(getattr(p, "tensor_model_parallel", False) for p in model.parameters())
    bridge = _bridge(rank, [0, 1])
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    if rank == 0:  # the sender; rank 1 receives and reloads its own slices
        send_weights(full, bridge, src=0, bucket_bytes=4096)
        send_weights(full[:-1], bridge, src=0, bucket_bytes=4096)
        return ungathered, sharded, None
    load_shards(model, full_to_shards(model, receive_weights(bridge, src=0), "refit from rank 0"))
    restored = all(torch.equal(p.detach(), mine[n]) for n, _, p in named_model_tensors(model))
    with pytest.raises(UserError, match=f"refit from rank 0: {full[-1][0]}: not sent"):
        full_to_shards(model, receive_weights(bridge, src=0), "refit from rank 0")
    return ungathered, sharded, restored


@pytest.mark.multiproc
def test_a_tp2_rank_reloads_its_slices_from_the_full_tensors_sent(tmp_path):
    """Gathered over TP=2 (`tp_gather`), every parameter is the full tensor built from the HF
    checkpoint, [gate; up] and grouped QKV included; sent in buckets and cut again by the
    receiving rank, its shards come back bit for bit; a refit that leaves one parameter out is
    refused with the parameter's name."""
    make_hf_model("qwen2", tmp_path)
    (ungathered0, sharded, _), (ungathered1, _, restored) = run_ranks(
        2, _rank_refit_round_trip, str(tmp_path)
    )
    assert ungathered0 == ungathered1 == [] and sharded >= 8  # qkv, proj, fc1, fc2 x 2, vocab
    assert restored is True
