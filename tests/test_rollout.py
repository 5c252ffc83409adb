"""The rollout engine: KV cache vs recomputation, padding, phases and markers, TP/PP, re-scoring."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pytest
import torch
from builders import (
    EOS,
    PROMPTS,
    build,
    gumbel,
    new_worker,
    recipe,
    rescoring_recipe,
    run,
    staggered_eos,
)
from distributed_helpers import run_ranks

from megatron_softgrpo.errors import UserError
from megatron_softgrpo.models.forward import CAUSAL, position_ids
from megatron_softgrpo.models.source import load_tokenizer, resolve_model_source
from megatron_softgrpo.rollout.engine import RolloutEngine
from megatron_softgrpo.rollout.megatron_backend import MegatronBackend
from megatron_softgrpo.rollout.settings import RolloutSettings
from megatron_softgrpo.rollout.string_automaton import StringAutomaton
from megatron_softgrpo.soft import (
    DiscreteSampler,
    EmbeddingNoise,
    InputEmbedding,
    MixtureRecord,
    SampledStep,
    SoftSampler,
    Truncation,
    log_density_from_logits,
    seed_noise_rng,
)
from megatron_softgrpo.soft.logprob import discrete_log_density
from megatron_softgrpo.soft.samplers import Draws
from model_patches.mixture_embedding import mixture_embedding


def response(result, i, field="tokens"):
    start = int(result.prompt_lengths[i])
    return getattr(result.records, field)[i, start : start + int(result.response_lengths[i])]


def thinking_sampler(kind):
    return {
        "gumbel": gumbel(),
        "embedding_noise": SoftSampler(Truncation(1.0, 5, 0.95), 5, EmbeddingNoise(0.01, 64)),
        "discrete": None,
    }[kind]


def recomputing(model, parallel):
    return MegatronBackend(model, parallel, use_kv_cache=False)


@pytest.mark.parametrize("thinking", ["gumbel", "embedding_noise", "discrete"])
def test_kv_cache_matches_recomputation(tiny_dir, tokenizer, thinking):
    """Rows finish at different steps (the cache drops them) and switch phase after a thinking budget."""
    model, shard, parallel = build(tiny_dir)
    marker = tokenizer("</think>", add_special_tokens=False)["input_ids"]
    kwargs = {"thinking_sampler": thinking_sampler(thinking), "max_thinking_tokens": 3}
    eos = staggered_eos(model, shard, parallel, tokenizer, marker, **kwargs)
    cached = run(model, shard, parallel, tokenizer, eos_ids=eos, **kwargs)
    recomputed = run(model, shard, parallel, tokenizer, eos_ids=eos, backend=recomputing, **kwargs)
    lengths = cached.response_lengths.tolist()
    assert (
        "eos" in cached.finish_reasons and len(set(lengths)) >= 3
    )  # rows left the batch at different steps
    soft = cached.records.is_soft
    if thinking != "discrete":
        assert (
            soft.any() and (cached.think_lengths < cached.response_lengths).any()
        )  # the phase switched
    assert cached.finish_reasons == recomputed.finish_reasons
    for name in ("response_lengths", "think_lengths", "loss_mask"):
        assert torch.equal(getattr(cached, name), getattr(recomputed, name)), name
    for name in ("tokens", "mix_ids", "support", "is_soft", "noise_seed"):
        assert torch.equal(getattr(cached.records, name), getattr(recomputed.records, name)), name
    # tau_g = 0.1 amplifies the last-ulp logit differences of two attention orders step after step
    # (~1e-6 -> 1e-4 in the weights); embedding noise's density magnifies them by |E| / sigma ~ 160
    assert torch.allclose(cached.records.mix_weights, recomputed.records.mix_weights, atol=1e-3)
    assert torch.allclose(cached.records.noise, recomputed.records.noise, atol=1e-3)
    assert torch.allclose(
        cached.rollout_logp,
        recomputed.rollout_logp,
        atol=1e-3 if thinking == "embedding_noise" else 1e-4,
    )
    assert bool(soft.any()) == (thinking != "discrete")


def test_decoding_in_passes_equals_decoding_at_once(tiny_dir, tokenizer):
    """policy.generation.max_rows_per_pass: whole groups per pass, joined in prompt order and padded
    to the longest pass. Deterministic soft and greedy answer steps: per-batch noise draws differ."""
    model, shard, parallel = build(tiny_dir)
    kwargs = {
        "thinking_sampler": gumbel(scale=0.0, tau=1.0),
        "max_thinking_tokens": 3,
        "answer_sampler": DiscreteSampler(Truncation.greedy(), 5),
    }
    at_once = run(model, shard, parallel, tokenizer, **kwargs)
    in_passes = run(
        model, shard, parallel, tokenizer, max_rows_per_pass=3, **kwargs
    )  # one prompt (2 rows) per pass
    # prompts of 5, 2 and 8 tokens: the passes are narrower than the joined batch
    assert at_once.records.tokens.shape == in_passes.records.tokens.shape == (6, 8 + 12)
    for f in fields(at_once):
        a, b = getattr(at_once, f.name), getattr(in_passes, f.name)
        if f.name == "records":
            for name in ("tokens", "mix_ids", "support", "is_soft"):
                assert torch.equal(getattr(a, name), getattr(b, name)), name
            assert torch.allclose(a.mix_weights, b.mix_weights, atol=1e-4)
        elif isinstance(a, torch.Tensor) and a.is_floating_point():
            assert torch.allclose(a, b, atol=1e-4), f.name
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b), f.name
        else:
            assert a == b, f.name


def test_fp8_row_alignment_pads_the_batch_invisibly(tiny_dir, tokenizer, monkeypatch):
    """Under FP8 the runner keeps every forward at a multiple of the alignment with ghost rows,
    also after rows finish; the trajectories are the unaligned ones."""
    from megatron_softgrpo.rollout import megatron_backend

    model, shard, parallel = build(tiny_dir)
    marker = tokenizer("</think>", add_special_tokens=False)["input_ids"]
    kwargs = {"max_thinking_tokens": 3}
    eos = staggered_eos(model, shard, parallel, tokenizer, marker, **kwargs)
    plain = run(model, shard, parallel, tokenizer, eos_ids=eos, **kwargs)
    batch_sizes = []
    forward = megatron_backend.MegatronBackend._run
    monkeypatch.setattr(megatron_backend, "token_alignment", lambda config: 4)
    monkeypatch.setattr(
        megatron_backend.MegatronBackend,
        "_run",
        lambda self, records, offset, queries: (
            batch_sizes.append(records.tokens.shape[0]),
            forward(self, records, offset, queries),
        )[1],
    )
    aligned = run(model, shard, parallel, tokenizer, eos_ids=eos, **kwargs)
    real_rows = len(PROMPTS) * 2
    assert real_rows % 4 and all(n % 4 == 0 for n in batch_sizes) and len(set(batch_sizes)) > 1
    assert aligned.finish_reasons == plain.finish_reasons
    for name in ("tokens", "mix_ids", "support", "is_soft"):
        assert torch.equal(getattr(aligned.records, name), getattr(plain.records, name)), name
    assert torch.allclose(aligned.records.mix_weights, plain.records.mix_weights, atol=1e-3)
    assert torch.allclose(aligned.rollout_logp, plain.rollout_logp, atol=1e-4)


@pytest.mark.parametrize("thinking", ["deterministic_soft", "greedy"])
def test_padding_invariance(tiny_dir, tokenizer, thinking):
    """A prompt decoded alone and inside a batch of longer and shorter prompts gives the same response."""
    model, shard, parallel = build(tiny_dir)
    # no noise, and tau_g = 1 (weights = pt) so the random model does not amplify last-ulp differences
    kwargs = (
        dict(thinking_sampler=gumbel(scale=0.0, tau=1.0))
        if thinking == "deterministic_soft"
        else dict(thinking_sampler=None, answer_sampler=DiscreteSampler(Truncation.greedy(), 5))
    )
    alone = run(model, shard, parallel, tokenizer, prompts=[PROMPTS[0]], g=1, **kwargs)
    batch = run(model, shard, parallel, tokenizer, prompts=PROMPTS, g=1, **kwargs)
    assert torch.equal(response(alone, 0), response(batch, 0))
    # RoPE sees shifted absolute positions under left padding: equal up to float rounding, which
    # this random model (weights ~ N(0, 0.2^2)) amplifies over the steps; tokens must be identical
    assert torch.allclose(
        response(alone, 0, "mix_weights"), response(batch, 0, "mix_weights"), atol=1e-3
    )


@dataclass
class ScriptedSampler:
    """Soft steps whose transcript tokens follow a script (slot 0 = the scripted token)."""

    script: list[int]
    mixture_size: int = 5
    name: str = "scripted"
    t: int = 0
    draws: Draws = "never"  # scripted: consumes no randomness

    def sample(self, logits, shard, raw=None):
        n = logits.shape[0]
        token = torch.full((n,), self.script[min(self.t, len(self.script) - 1)])
        self.t += 1
        ids = torch.stack([token, token + 1, token + 2, token + 3, token + 4], -1)
        weights = torch.tensor([0.6, 0.2, 0.1, 0.06, 0.04]).expand(n, -1)
        records = MixtureRecord(
            token,
            ids,
            weights.clone(),
            torch.randn(n, 5),
            torch.ones(n, 5, dtype=torch.bool),
            torch.ones(n, dtype=torch.bool),
            torch.zeros(n, dtype=torch.long),
            torch.ones(n, dtype=torch.bool),
        )
        return SampledStep(
            **{f.name: getattr(records, f.name) for f in fields(records)},
            log_density=torch.full((n,), -1.5),
        )

    def input_offset(self, rows):
        return None


def test_multi_token_marker_switches_phase_at_the_right_step(tiny_dir, tokenizer):
    model, shard, parallel = build(tiny_dir)
    marker = tokenizer("</think>", add_special_tokens=False)["input_ids"]
    assert len(marker) > 1  # SmolLM2 has no </think> token
    words = tokenizer(" so the answer", add_special_tokens=False)["input_ids"]
    script = words + marker + [EOS]
    result = run(
        model,
        shard,
        parallel,
        tokenizer,
        prompts=[PROMPTS[0]],
        g=1,
        thinking_sampler=ScriptedSampler(script),
        answer_sampler=DiscreteSampler(Truncation.greedy(), 5),
        max_new_tokens=len(script) + 4,
    )
    end = len(words) + len(marker)  # response steps up to and including the marker's last token
    is_soft = response(result, 0, "is_soft")
    assert is_soft[
        : end - 1
    ].all()  # thinking: the first generated step is soft, and so is a partial marker
    assert not is_soft[
        end - 1 :
    ].any()  # the completing marker step and everything after are discrete
    assert int(result.think_lengths[0]) == end
    assert response(result, 0)[:end].tolist() == words + marker
    # the marker step is one-hot on its token, with only slot 0 in support
    j = int(result.prompt_lengths[0]) + end - 1
    assert result.records.mix_weights[0, j].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert result.records.support[0, j].tolist() == [True, False, False, False, False]
    assert result.records.mix_ids[0, j, 0] == marker[-1] and result.loss_mask[0, j]
    assert (
        result.thinking_texts[0].endswith("</think>") and "</think>" not in result.answer_texts[0]
    )


def test_gumbel_soft_records_follow_the_spec(tiny_dir, tokenizer):
    """docs/algorithm.md section 1 on a real Gumbel rollout: weights softmax(g / tau_g) over the support,
    slots sorted by weight, out-of-support slots last with weight 0, slot 0 the transcript token."""
    model, shard, parallel = build(tiny_dir)
    result = run(model, shard, parallel, tokenizer, max_new_tokens=16)
    soft = result.records.is_soft
    assert soft.sum() >= 20
    w, g, support = (
        result.records.mix_weights[soft],
        result.records.noise[soft],
        result.records.support[soft],
    )
    ids, tokens = result.records.mix_ids[soft], result.records.tokens[soft]
    assert (~support).any() and support.all(-1).any()  # both truncated and full supports occur
    assert torch.equal(ids[:, 0], tokens)
    assert torch.all(w[:, :-1] >= w[:, 1:])  # sorted, descending
    assert torch.all(support[:, :-1] >= support[:, 1:])  # in-support slots first
    assert torch.all(w[~support] == 0) and torch.allclose(w.sum(-1), torch.ones(len(w)))
    expected = torch.softmax((g.double() / 0.1).masked_fill(~support, -torch.inf), -1)
    assert torch.allclose(w.double(), expected, atol=1e-6)
    assert len(set(ids[support].tolist())) > 1 and all(
        len(set(r[m].tolist())) == int(m.sum()) for r, m in zip(ids, support)
    )


def test_eos_during_thinking_ends_the_response_as_a_soft_step(tiny_dir, tokenizer):
    model, shard, parallel = build(tiny_dir)
    result = run(
        model,
        shard,
        parallel,
        tokenizer,
        prompts=[PROMPTS[1]],
        g=1,
        thinking_sampler=ScriptedSampler([100, 101, EOS]),
    )
    assert result.finish_reasons == ["eos"] and int(result.response_lengths[0]) == 3
    assert response(result, 0, "is_soft").all()


def test_thinking_budget_forces_the_marker_and_forced_steps_are_not_scored(tiny_dir, tokenizer):
    model, shard, parallel = build(tiny_dir)
    marker = tokenizer("</think>", add_special_tokens=False)["input_ids"]
    result = run(
        model,
        shard,
        parallel,
        tokenizer,
        prompts=[PROMPTS[1]],
        g=1,
        max_thinking_tokens=3,
        max_new_tokens=10,
    )
    tokens = response(result, 0)
    start = int(result.prompt_lengths[0])
    scored = result.loss_mask[0, start : start + len(tokens)]
    assert tokens[3 : 3 + len(marker)].tolist() == marker
    assert (
        scored[:3].all()
        and not scored[3 : 3 + len(marker)].any()
        and scored[3 + len(marker) :].all()
    )
    assert response(result, 0, "is_soft")[:3].all() and not response(result, 0, "is_soft")[3:].any()


def test_stop_strings_and_length_limit(tiny_dir, tokenizer):
    model, shard, parallel = build(tiny_dir)
    words = tokenizer(" one two STOP three", add_special_tokens=False)["input_ids"]
    result = run(
        model,
        shard,
        parallel,
        tokenizer,
        prompts=[PROMPTS[0]],
        g=1,
        thinking_sampler=ScriptedSampler(words),
        stop_strings=("STOP",),
    )
    assert result.finish_reasons == ["stop"] and result.texts[0].endswith("STOP")
    result = run(
        model,
        shard,
        parallel,
        tokenizer,
        prompts=[PROMPTS[0]],
        g=1,
        thinking_sampler=ScriptedSampler([300]),
        max_new_tokens=5,
    )
    assert result.finish_reasons == ["length"] and int(result.response_lengths[0]) == 5


class RecordingSampler:
    """A sampler that keeps the logits of every call (the rollout's own logits) and delegates."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def sample(self, logits, shard, raw=None):
        self.calls.append(logits.clone())
        return self.inner.sample(logits, shard, raw)


def sampled_logits(result, calls) -> torch.Tensor:
    """[B, S, W]: at each record, the logits the rollout sampled it from.

    The answer sampler draws for every row of the batch at every step (each row then takes its
    phase's draw), and on Megatron's forward finished rows leave the batch at once: step t's call
    holds the rows still decoding, in ascending order.
    """
    b, s = result.records.tokens.shape
    out = torch.zeros(b, s, calls[0].shape[-1])
    assert len(calls) == int(result.response_lengths.max())
    for t, logits in enumerate(calls):
        rows = (result.response_lengths > t).nonzero().squeeze(-1)
        assert logits.shape[0] == len(rows)
        out[rows, result.prompt_lengths[rows] + t] = logits
    return out


@pytest.mark.parametrize(
    "algorithm", ["softgrpo", "gaussian", "dirichlet", "embedding_noise", "grpo"]
)
def test_rescoring_reproduces_the_rollout_log_densities(tiny_dir, tokenizer, algorithm):
    """The trainer's log-prob function (PolicyWorker.compute_logprobs) on a finished rollout gives the
    rollout's own log-densities, soft rows at the thinking temperature and discrete ones at the answer's."""

    from megatron_softgrpo.batch import Batch

    cfg = rescoring_recipe(tiny_dir, algorithm)
    worker = new_worker(cfg)
    base = RolloutSettings.from_recipe(
        cfg, tokenizer, worker.source.arch.hidden_size, max_new_tokens=10, eos_ids=frozenset({EOS})
    )
    answer = RecordingSampler(base.answer_sampler)
    engine = RolloutEngine(
        worker.model, tokenizer, worker.vocab, replace(base, answer_sampler=answer), worker.parallel
    )
    seed_noise_rng(7)
    result = engine.generate(PROMPTS[:2], 2)
    logp = worker.compute_logprobs(Batch(result.records, result.loss_mask))

    mask, soft = result.loss_mask, result.records.is_soft
    assert bool((mask & ~soft).any()) and bool((mask & soft).any()) == (algorithm != "grpo")
    if algorithm != "grpo":  # the budget forced the marker: answer-phase rows come after it
        assert (result.think_lengths < result.response_lengths).all()
    # 1. the rollout's density is the trainer's function at the rollout's own logits
    logits = sampled_logits(result, answer.calls)
    embedding = InputEmbedding(worker.model.embedding.word_embeddings.weight, worker.vocab)
    at_rollout = log_density_from_logits(
        logits, result.records, worker.scorer, worker.vocab, embedding
    )
    assert (at_rollout - result.rollout_logp)[mask].abs().max() <= 1e-5
    # 2. the trainer's full-sequence recompute reproduces it
    error = (logp - result.rollout_logp).abs()
    assert error[mask & ~soft].max() <= 1e-5
    if algorithm != "embedding_noise":
        assert error[mask].max() <= 1e-5
        return
    # The embedding-noise density -|sigma eps + sum_k (w_k - pt_k) E_k|^2 / (2 sigma^2) has slope
    # d logp / d l_k = (eps . E_k) pt-terms / (sigma T) ~ |E_k| / sigma ~ 160 here: the ~1e-6 logit
    # differences between cached decoding and the trainer's recompute (summation orders, RoPE
    # offsets of left padding) become ~1e-4. Bound: first order in the measured logit difference
    # (factor 2 for the trainer's own h @ W rounding; the second-order term is ~1e-8).
    trainer_logits = recomputed_logits(worker.model, result.records, worker.scorer.noise)
    delta = (trainer_logits - logits).gather(-1, result.records.mix_ids).abs().amax(-1)  # [B, S]
    slope = density_slope(logits, result.records, worker.scorer, worker.vocab, embedding)
    bound = 1e-5 + 2 * slope * delta
    assert (error <= bound)[mask].all(), (error[mask], bound[mask])
    assert bound[mask & soft].max() < 1e-2  # and the bound is a real constraint


@pytest.mark.parametrize("algorithm", ["softgrpo", "dirichlet"])
def test_a_sampled_marker_step_is_scored_at_the_temperature_it_was_drawn_at(
    tiny_dir, tokenizer, algorithm
):
    """Thinking temperature 1.3, answer 0.7, and think_end set to two tokens the first response
    writes while thinking, so a sampled step completes it: the rollout scores that step at 1.3,
    the temperature of the thinking sampler that drew it, and the trainer re-scores it to the
    same value, so the importance ratio is 1 before an update."""

    from megatron_softgrpo.batch import Batch

    cfg = rescoring_recipe(tiny_dir, algorithm)
    assert (cfg.softgrpo.thinking.temperature, cfg.policy.generation.temperature) == (1.3, 0.7)
    worker = new_worker(cfg)
    base = RolloutSettings.from_recipe(
        cfg, tokenizer, worker.source.arch.hidden_size, max_new_tokens=10, eos_ids=frozenset({EOS})
    )
    seed_noise_rng(7)
    first = RolloutEngine(worker.model, tokenizer, worker.vocab, base, worker.parallel).generate(
        PROMPTS[:2], 2
    )
    start = int(first.prompt_lengths[0])
    marker = tokenizer.decode(first.records.tokens[0, start + 1 : start + 3])
    answer = RecordingSampler(base.answer_sampler)
    settings = replace(base, answer_sampler=answer, think_end=marker)
    seed_noise_rng(7)
    result = RolloutEngine(
        worker.model, tokenizer, worker.vocab, settings, worker.parallel
    ).generate(PROMPTS[:2], 2)

    mask, records = result.loss_mask, result.records
    drawn = mask & ~records.is_soft & records.thinking  # marker steps the thinking sampler drew
    assert int(result.think_lengths[0]) == 3 and result.thinking_texts[0].endswith(marker)
    assert drawn[0, start + 2] and int(drawn.sum()) == int(
        (~records.is_soft & records.thinking).sum()
    )
    assert bool((mask & ~records.thinking).any())  # answer-phase rows too
    logits = sampled_logits(result, answer.calls)

    def at(temperature):
        flat = logits.reshape(-1, logits.shape[-1])
        lp = discrete_log_density(flat, records.tokens.reshape(-1), temperature, worker.vocab)
        return lp.reshape(records.tokens.shape)

    # the rollout's value is the draw's: log_softmax(l / T_thinking), not l / T_answer
    assert (result.rollout_logp - at(1.3))[drawn].abs().max() <= 1e-5
    assert (at(1.3) - at(0.7))[drawn].abs().min() > 1e-3
    # the trainer re-scores every scored row, the marker step included, to the rollout's value
    logp = worker.compute_logprobs(Batch(records, mask))
    assert (logp - result.rollout_logp)[mask].abs().max() <= 1e-5
    ratio = torch.exp(logp - result.rollout_logp)
    assert (ratio - 1)[drawn].abs().max() <= 1e-5


def recomputed_logits(model, records, noise) -> torch.Tensor:
    """[B, S, W]: the logits that score each record, from one full-sequence forward (as the trainer's)."""
    b, s = records.tokens.shape
    x = mixture_embedding(
        model.embedding.word_embeddings,
        records.mix_ids,
        records.mix_weights,
        noise.input_offset(records),
    )
    with torch.no_grad():
        logits = model(None, position_ids(b, s, "cpu"), CAUSAL, decoder_input=x)
    return torch.cat(
        [torch.zeros_like(logits[:, :1]), logits[:, :-1]], dim=1
    )  # logits at j - 1 score record j


def density_slope(logits, rows, scorer, shard, embedding) -> torch.Tensor:
    """[B, S]: sum_k |d logp / d l_k| of the trainer's function at the given logits."""
    logits = logits.clone().requires_grad_()
    with torch.enable_grad():
        logp = log_density_from_logits(logits, rows, scorer, shard, embedding)
        (grad,) = torch.autograd.grad(logp.sum(), logits)
    return grad.abs().sum(-1)


def _rank_rollout(rank, tiny_dir, tp, pp, tokenizer_dir):
    model, shard, parallel = build(tiny_dir, tp, pp)
    tokenizer = load_tokenizer(resolve_model_source(tokenizer_dir))
    result = run(model, shard, parallel, tokenizer, max_thinking_tokens=5)
    return result.records.tokens, result.records.mix_weights, result.rollout_logp, result.loss_mask


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_same_seed_same_trajectory_at_tp2_and_pp2(tiny_dir, tokenizer, smollm2_hf_dir, tp, pp):
    model, shard, parallel = build(tiny_dir)
    reference = run(model, shard, parallel, tokenizer, max_thinking_tokens=5)
    for tokens, weights, logp, mask in run_ranks(
        tp * pp, _rank_rollout, tiny_dir, tp, pp, str(smollm2_hf_dir)
    ):
        assert torch.equal(tokens, reference.records.tokens)
        assert torch.equal(mask, reference.loss_mask)
        # fp32 sums in another order: the soft weights differ by ~1e-4 and later logits inherit it
        assert torch.allclose(weights, reference.records.mix_weights, atol=1e-3)
        assert torch.allclose(logp, reference.rollout_logp, atol=1e-3)


def test_entropy_cold_stop_forces_the_marker(tiny_dir, tokenizer):
    model, shard, parallel = build(tiny_dir)
    marker = tokenizer("</think>", add_special_tokens=False)["input_ids"]
    # every distribution is below an entropy of 100 nats: the cold stop fires after 2 soft steps
    result = run(
        model,
        shard,
        parallel,
        tokenizer,
        prompts=[PROMPTS[1]],
        g=1,
        cold_stop_entropy=100.0,
        cold_stop_steps=2,
    )
    assert response(result, 0)[2 : 2 + len(marker)].tolist() == marker
    assert response(result, 0, "is_soft")[:2].all() and not response(result, 0, "is_soft")[2:].any()
    # and never below a threshold of 1e-9 nats
    result = run(
        model,
        shard,
        parallel,
        tokenizer,
        prompts=[PROMPTS[1]],
        g=1,
        cold_stop_entropy=1e-9,
        cold_stop_steps=2,
    )
    assert response(result, 0, "is_soft").all()


# ------------------------------------------------------------------ marker matching on text


MARKER = ["</think>"]


def ids_of(tokenizer, *pieces: str) -> list[int]:
    """One token per piece (checked): the transcript spelled with exactly these splits."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in pieces]
    assert all(len(i) == 1 for i in ids), (pieces, ids)
    return [i[0] for i in ids]


def completions(tokenizer, strings: list[str], tokens: list[int]) -> list[str | None]:
    """The string (or None) the automaton says each step of the transcript completes."""
    automaton = StringAutomaton.build(tokenizer, strings, "cpu")
    state, out = automaton.initial(1), []
    for token in tokens:
        state, which = automaton.step(state, torch.tensor([token]))
        out.append(strings[int(which)] if int(which) >= 0 else None)
    return out


def test_marker_spelled_one_character_per_token(tokenizer):
    tokens = ids_of(tokenizer, "so", *"</think>", "The")
    assert completions(tokenizer, MARKER, tokens) == [None] * 8 + ["</think>", None]


def test_marker_inside_merged_tokens(tokenizer):
    # "></" starts the marker mid-token; ">," ends it mid-token: the step that supplies ">" completes it
    assert completions(tokenizer, MARKER, ids_of(tokenizer, "a", "></", "think", ">,")) == [
        None,
        None,
        None,
        "</think>",
    ]
    assert completions(tokenizer, MARKER, ids_of(tokenizer, "</", "think", ">")) == [
        None,
        None,
        "</think>",
    ]
    # a second occurrence completes again
    again = ids_of(tokenizer, "</", "think", ">", "x", "</", "think", ">")
    assert (
        completions(tokenizer, MARKER, again)[-1] == "</think>"
        and completions(tokenizer, MARKER, again)[3:6] == [None] * 3
    )


def test_near_misses_and_lone_sub_tokens_do_not_complete_the_marker(tokenizer):
    for pieces in (
        ("</", "thinking", ">"),
        ("<", "think", ">"),
        ("</", " think", ">"),
        ("think", ">"),
        (">",),
    ):
        assert completions(tokenizer, MARKER, ids_of(tokenizer, *pieces)) == [None] * len(pieces), (
            pieces
        )
    assert completions(tokenizer, [], ids_of(tokenizer, "</", "think", ">")) == [None] * 3


def test_stop_strings_match_the_first_completed_string(tokenizer):
    stops = ["STOP", "\n\n"]
    assert completions(tokenizer, stops, ids_of(tokenizer, " ST", "OP", "x")) == [
        None,
        "STOP",
        None,
    ]
    assert completions(tokenizer, stops, ids_of(tokenizer, "\n", "\n")) == [None, "\n\n"]


# ------------------------------------------------------------------ EOS ids from the recipe


@pytest.mark.parametrize("value,expected", [([7, 11], {7, 11}), (7, {7}), (None, set())])
def test_eos_ids_include_the_generation_config(tiny_dir, tokenizer, tmp_path, value, expected):

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text((Path(tiny_dir) / "config.json").read_text())
    (model_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": value, "use_cache": True})
    )
    settings = RolloutSettings.from_recipe(recipe(model_dir, kl=0), tokenizer, 64)
    assert settings.eos_ids == frozenset({tokenizer.eos_token_id} | expected)


def test_eos_ids_without_a_generation_config_eos_and_a_bad_one(tiny_dir, tokenizer, tmp_path):

    # make_hf_model's generation_config.json has no eos_token_id
    assert RolloutSettings.from_recipe(recipe(tiny_dir, kl=0), tokenizer, 64).eos_ids == {
        tokenizer.eos_token_id
    }
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text((Path(tiny_dir) / "config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": ["</s>"]}))
    with pytest.raises(
        UserError, match="generation_config.json: eos_token_id=\\['</s>'\\]; expected a token id"
    ):
        RolloutSettings.from_recipe(recipe(model_dir, kl=0), tokenizer, 64)
