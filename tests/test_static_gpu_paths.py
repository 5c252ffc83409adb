"""The GPU-only branches, run on the CPU: the finished-row count read GPU_FLAG_LAG steps late
(on the fixed-shape backend), and the truncation's branch without host reads; against the
engine on Megatron's forward with the CPU's lag, and the CPU's branch."""

from __future__ import annotations

import pytest
import torch
from builders import (
    PROMPTS,
    SAMPLERS,
    assert_same_records,
    build64,
    eos_ending_within,
    settings,
    static_engine,
)

from megatron_softgrpo.rollout import replay
from megatron_softgrpo.rollout.engine import GPU_FLAG_LAG, RolloutEngine
from megatron_softgrpo.soft import DiscreteSampler, Truncation, VocabShard, seed_noise_rng
from megatron_softgrpo.soft import truncation as trunc_module
from megatron_softgrpo.soft.truncation import full_support, top_logits


def _lagged_run(tiny_dir, tokenizer, sampler, prompts, g, choices, max_new, compile=False):
    """(reference, static engine with the GPU's lag, its result, what each shrink kept): rows
    ending within the first windows of `choices` EOS ids can give (row i: windows[i // g]);
    `compile`: the engine's token steps replayed compiled."""
    model, shard, parallel = build64(tiny_dir)
    base = settings(max_new_tokens=max_new, **SAMPLERS[sampler])
    seed_noise_rng(7)
    free = RolloutEngine(model, tokenizer, shard, base, parallel).generate(prompts, g)
    rows = range(len(prompts) * g)
    found = [(w, eos_ending_within(free, [w[i // g] for i in rows])) for w in choices]
    windows, eos = next((w, eos) for w, eos in found if eos is not None)
    s = settings(max_new_tokens=max_new, eos_ids=eos, **SAMPLERS[sampler])
    seed_noise_rng(7)
    ref = RolloutEngine(model, tokenizer, shard, s, parallel).generate(prompts, g)
    for i, n in enumerate(ref.response_lengths.tolist()):
        lo, hi = windows[i // g]
        assert lo <= n <= hi and ref.finish_reasons[i] == "eos"
    engine = static_engine(
        model, tokenizer, shard, s, parallel, compile=compile, flag_lag=GPU_FLAG_LAG
    )
    shrinks, shrink = [], engine._shrink

    def counted(live, n):  # (batch size, rows still decoding) after each shrink
        size = shrink(live, n)
        shrinks.append((size, int(live.state.alive[:size].sum())))
        return size

    engine._shrink = counted
    seed_noise_rng(7)
    return ref, engine, engine.generate(prompts, g), shrinks


@pytest.mark.parametrize("sampler", ["greedy", "gumbel"])
def test_last_rows_ending_within_the_lag(tiny_dir, tokenizer, sampler):
    """2 prompts x 8 rows: one group ends at step 2-3, the other at step 4-6, within the lag. The
    late count still says 8 rows decode when none does: the shrink finds none and the pass ends
    (the shrink raised a RuntimeError on its empty index)."""
    ref, _, static, shrinks = _lagged_run(
        tiny_dir, tokenizer, sampler, PROMPTS[:2], 8, [[(2, 3), (4, 6)]], max_new=12
    )
    assert_same_records(ref, static)
    assert shrinks == [(0, 0)]  # the shrink was reached, with no row left to move


@pytest.mark.parametrize("sampler", ["greedy", "gumbel"])
def test_every_row_ending_at_the_same_step(tiny_dir, tokenizer, sampler):
    """18 rows (a 24-row bucket) all ending at one step (the first from 2 EOS ids can give): the
    pass decodes on, unrecorded, until the late count says 0, and never shrinks."""
    ref, _, static, shrinks = _lagged_run(
        tiny_dir, tokenizer, sampler, PROMPTS, 6, [[(t, t)] * 3 for t in range(2, 9)], max_new=12
    )
    assert_same_records(ref, static)
    assert len(set(ref.response_lengths.tolist())) == 1 and shrinks == []


@pytest.mark.parametrize("sampler", ["greedy", "gumbel"])
def test_staggered_ends_shrink_at_each_group_on_the_late_count(tiny_dir, tokenizer, sampler):
    """4 prompts x 8 rows ending by groups more than the lag apart: 32 -> 24 -> 16 -> 8 rows,
    each shrink on a count 4 steps old; the rows moved keep drawing their own noise."""
    ref, engine, static, shrinks = _lagged_run(
        tiny_dir,
        tokenizer,
        sampler,
        [*PROMPTS, [9, 10, 11]],
        8,
        [[(2, 3), (7, 9), (14, 16), (21, 23)]],
        max_new=24,
    )
    assert_same_records(ref, static)
    assert shrinks == [(24, 24), (16, 16), (8, 8)]
    assert engine.backend.decoder.batch == 32  # the rows moved within the one cache


@pytest.mark.parametrize("sampler", ["greedy", "gumbel"])
def test_the_whole_token_step_is_traced_once_per_bucket_and_replayed(
    tiny_dir, tokenizer, sampler, monkeypatch
):
    """The token step (embedding, model, truncation, sampler, phase machine, record writes) as
    one graph, traced with fullgraph=True: a host read anywhere in it would raise, as it would
    break a CUDA graph capture. 4 prompts x 8 rows (one prompt crossing from the 64-column length
    bucket to the 128 one) end by groups on the GPU's late count: each (rows, length bucket) is
    traced once and replayed on the rows moved within the same tensors; a second pass, on
    weights updated in place, traces only buckets it had not met."""
    traces = []

    def counting(gm, inputs):
        traces.append(len(gm.graph.nodes))
        return gm.forward

    monkeypatch.setattr(replay, "COMPILE_BACKEND", counting)
    prompts = [*PROMPTS, list(range(9, 69))]
    windows = [
        [(2, 3), (7, 9), (14, 16), (21, 23)],
        [(2, 4), (8, 11), (15, 18), (22, 24)],
        [(3, 5), (9, 12), (16, 19), (22, 24)],
        [(2, 5), (8, 12), (15, 19), (21, 26)],
    ]  # tried in turn: the first some EOS ids can give
    ref, engine, static, shrinks = _lagged_run(
        tiny_dir, tokenizer, sampler, prompts, 8, windows, max_new=28, compile=True
    )
    assert_same_records(ref, static)
    keys = set(engine._live.replays.steps)
    assert len(traces) == len(keys)  # nothing traced twice: no host value baked in
    assert {n for n, _ in keys} == {32, 24, 16, 8} and {n for _, n in keys} == {64, 128}
    with torch.no_grad():  # as the trainer updates them: in place
        for p in engine.model.parameters():
            p.mul_(1.05)
    seed_noise_rng(7)
    again = engine.generate(prompts, 8)
    seed_noise_rng(7)
    fresh = RolloutEngine(
        engine.model, tokenizer, engine.phases.shard, engine.settings, engine.parallel
    )
    assert_same_records(fresh.generate(prompts, 8), again)
    assert not torch.equal(again.records.tokens, static.records.tokens)  # the new weights decoded
    assert len(traces) == len(engine._live.replays.steps)  # only new buckets traced


# ------------------------------------------------------------------ truncation without host reads

VOCAB, PADDED = 1000, 1024
SHARD = VocabShard.whole(PADDED, VOCAB)
TRUNCATIONS = [
    Truncation.greedy(),
    Truncation(top_k=5, top_p=0.95),
    Truncation(temperature=0.7, top_k=30, top_p=0.9, min_p=0.02),
    Truncation(temperature=1.3, top_p=0.8),
    Truncation(min_p=0.1),
    Truncation(top_p=0.5, min_p=0.3),
]


def awkward_logits() -> torch.Tensor:
    """Random rows, rows of few distinct values (ties everywhere, at every boundary), rows of one
    finite logit, an all -inf row, and padding columns of large junk."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, PADDED, generator=g) * 3
    logits[4:8] = torch.randint(-3, 3, (4, PADDED), generator=g).float()
    logits[8:11] = float("-inf")
    logits[8, 500] = logits[9, 0] = logits[10, VOCAB - 1] = 1.0
    logits[11] = float("-inf")
    logits[:, VOCAB:] = 50.0
    return logits


@pytest.mark.parametrize("truncation", TRUNCATIONS, ids=str)
def test_the_gpu_truncation_branch_equals_the_cpu_branch(truncation, monkeypatch):
    logits = awkward_logits()
    cpu = full_support(logits, SHARD, truncation)
    tops = [top_logits(logits, SHARD, c) for c in (1, 7, 64)]
    monkeypatch.setattr(trunc_module, "_host_checks", lambda x: False)
    gpu = full_support(logits, SHARD, truncation)
    c = cpu.ids.shape[1]
    if truncation.top_k is None:  # every token a candidate, where the CPU grows its count
        assert gpu.ids.shape[1] == VOCAB and not bool(gpu.support[:, c:].any())
    assert torch.equal(gpu.ids[:, :c], cpu.ids)
    assert torch.equal(gpu.scaled[:, :c], cpu.scaled)
    assert torch.equal(gpu.support[:, :c], cpu.support)
    for (ids, values), c in zip(tops, (1, 7, 64), strict=True):
        gpu_ids, gpu_values = top_logits(logits, SHARD, c)
        assert torch.equal(gpu_ids, ids) and torch.equal(gpu_values, values)
    ids = tops[-1][0]
    assert ids[8:11, 0].tolist() == [500, 0, VOCAB - 1]  # the one finite logit leads
    assert ids[11, :3].tolist() == [0, 1, 2]  # all tied: by id


def test_static_engine_on_both_gpu_branches_gives_the_reference(tiny_dir, tokenizer, monkeypatch):
    """The late count and the truncation without host reads together, as a GPU runs them: a
    gumbel thinking phase (top-k candidates), a forced marker, and answers by top-p and min-p
    alone (every token a candidate)."""
    model, shard, parallel = build64(tiny_dir)
    s = settings(
        max_thinking_tokens=4,
        answer_sampler=DiscreteSampler(Truncation(top_p=0.9, min_p=0.3), 5),
    )
    seed_noise_rng(7)
    ref = RolloutEngine(model, tokenizer, shard, s, parallel).generate(PROMPTS, 2)
    monkeypatch.setattr(trunc_module, "_host_checks", lambda x: False)
    engine = static_engine(model, tokenizer, shard, s, parallel, flag_lag=GPU_FLAG_LAG)
    seed_noise_rng(7)
    assert_same_records(ref, engine.generate(PROMPTS, 2))
    assert (ref.think_lengths < ref.response_lengths).any()  # some rows sampled answers
