"""The rollout engine: KV cache vs recomputation, padding, phases and markers, TP/PP, re-scoring."""

from __future__ import annotations

from dataclasses import dataclass, fields

import pytest
import torch
from distributed_helpers import run_ranks
from tiny_models import make_hf_model

from megatron_softgrpo.config.schema import MegatronCfg
from megatron_softgrpo.distributed import ParallelLayout, init_distributed
from megatron_softgrpo.models.forward import CAUSAL, position_ids
from megatron_softgrpo.models.loading import load_model
from megatron_softgrpo.models.source import load_tokenizer, resolve_model_source
from megatron_softgrpo.rollout.engine import RolloutEngine, RolloutSettings
from megatron_softgrpo.soft import (
    DiscreteSampler,
    GumbelNoise,
    MixtureRows,
    SampledStep,
    Scorer,
    SoftSampler,
    Truncation,
    VocabShard,
    log_density_from_logits,
    seed_noise_rng,
)
from model_patches.mixture_embedding import mixture_embedding

VOCAB = 49152  # SmolLM2's tokenizer, on tiny random models
PROMPTS = [[5, 17, 999, 3, 42], [7, 8], [1, 2, 3, 4, 5, 6, 7, 8]]
EOS = 2


@pytest.fixture(scope="module")
def tokenizer(smollm2_hf_dir):
    return load_tokenizer(resolve_model_source(str(smollm2_hf_dir)))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_hf_model("qwen2", path, vocab_size=VOCAB)
    return str(path)


def build(tiny_dir, tp=1, pp=1):
    init_distributed(ParallelLayout(tp, pp))
    model, padded = load_model(resolve_model_source(tiny_dir), MegatronCfg(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    model.eval()
    return model, VocabShard.from_parallel_state(padded, VOCAB)


def gumbel(scale=1.0, tau=0.1):
    return SoftSampler(Truncation(1.0, 5, 0.95), 5, GumbelNoise(tau=tau, scale=scale))


def settings(**overrides):
    base = dict(
        thinking_sampler=gumbel(),
        # a bounded support: an inverse-CDF draw over a near-flat 49k-token nucleus would flip on
        # the last-ulp logit differences between TP layouts, which the TP/PP test compares
        answer_sampler=DiscreteSampler(Truncation(1.0, top_k=20, top_p=0.9), 5),
        answer_temperature=1.0,
        think_end="</think>",
        max_new_tokens=12,
        eos_ids=frozenset({EOS}),
    )
    return RolloutSettings(**{**base, **overrides})


def run(model, shard, tokenizer, prompts=PROMPTS, g=2, seed=7, **overrides):
    seed_noise_rng(seed)
    return RolloutEngine(model, tokenizer, shard, settings(**overrides)).generate(prompts, g)


def response(result, i, field="tokens"):
    start = int(result.prompt_lengths[i])
    return getattr(result.rows, field)[i, start : start + int(result.response_lengths[i])]


@pytest.mark.parametrize("thinking", ["gumbel", "discrete"])
def test_kv_cache_matches_recomputation(tiny_dir, tokenizer, thinking):
    model, shard = build(tiny_dir)
    sampler = gumbel() if thinking == "gumbel" else None
    cached = run(model, shard, tokenizer, thinking_sampler=sampler)
    recomputed = run(model, shard, tokenizer, thinking_sampler=sampler, use_kv_cache=False)
    assert torch.equal(cached.rows.tokens, recomputed.rows.tokens)
    assert torch.equal(cached.rows.mix_ids, recomputed.rows.mix_ids)
    assert torch.equal(cached.loss_mask, recomputed.loss_mask)
    # tau_g = 0.1 amplifies the last-ulp differences of two attention orders step after step
    assert torch.allclose(cached.rows.mix_weights, recomputed.rows.mix_weights, atol=1e-3)
    assert torch.allclose(cached.rollout_logp, recomputed.rollout_logp, atol=1e-4)
    assert bool(cached.rows.is_soft.any()) == (thinking == "gumbel")


@pytest.mark.parametrize("thinking", ["deterministic_soft", "greedy"])
def test_padding_invariance(tiny_dir, tokenizer, thinking):
    """A prompt decoded alone and inside a batch of longer and shorter prompts gives the same response."""
    model, shard = build(tiny_dir)
    # no noise, and tau_g = 1 (weights = pt) so the random model does not amplify last-ulp differences
    kwargs = dict(thinking_sampler=gumbel(scale=0.0, tau=1.0)) if thinking == "deterministic_soft" else dict(
        thinking_sampler=None, answer_sampler=DiscreteSampler(Truncation.greedy(), 5)
    )
    alone = run(model, shard, tokenizer, prompts=[PROMPTS[0]], g=1, **kwargs)
    batch = run(model, shard, tokenizer, prompts=PROMPTS, g=1, **kwargs)
    assert torch.equal(response(alone, 0), response(batch, 0))
    # RoPE sees shifted absolute positions under left padding: equal up to float rounding, which
    # this random model (weights ~ N(0, 0.2^2)) amplifies over the steps; tokens must be identical
    assert torch.allclose(response(alone, 0, "mix_weights"), response(batch, 0, "mix_weights"), atol=1e-3)


@dataclass
class ScriptedSampler:
    """Soft steps whose transcript tokens follow a script (slot 0 = the scripted token)."""

    script: list[int]
    mixture_size: int = 5
    name: str = "scripted"
    t: int = 0

    def sample(self, logits, shard):
        n = logits.shape[0]
        token = torch.full((n,), self.script[min(self.t, len(self.script) - 1)])
        self.t += 1
        ids = torch.stack([token, token + 1, token + 2, token + 3, token + 4], -1)
        weights = torch.tensor([0.6, 0.2, 0.1, 0.06, 0.04]).expand(n, -1)
        rows = MixtureRows(token, ids, weights.clone(), torch.randn(n, 5), torch.ones(n, 5, dtype=torch.bool),
                           torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long))
        return SampledStep(**{f.name: getattr(rows, f.name) for f in fields(rows)}, log_density=torch.full((n,), -1.5))


def test_multi_token_marker_switches_phase_at_the_right_step(tiny_dir, tokenizer):
    model, shard = build(tiny_dir)
    marker = tokenizer("</think>", add_special_tokens=False)["input_ids"]
    assert len(marker) > 1  # SmolLM2 has no </think> token
    words = tokenizer(" so the answer", add_special_tokens=False)["input_ids"]
    script = words + marker + [EOS]
    result = run(model, shard, tokenizer, prompts=[PROMPTS[0]], g=1, thinking_sampler=ScriptedSampler(script),
                 answer_sampler=DiscreteSampler(Truncation.greedy(), 5), max_new_tokens=len(script) + 4)
    end = len(words) + len(marker)  # response steps up to and including the marker's last token
    is_soft = response(result, 0, "is_soft")
    assert is_soft[: end - 1].all()  # thinking: the first generated step is soft, and so is a partial marker
    assert not is_soft[end - 1:].any()  # the completing marker step and everything after are discrete
    assert int(result.think_lengths[0]) == end
    assert response(result, 0)[: end].tolist() == words + marker
    # the marker step is one-hot on its token, with only slot 0 in support
    j = int(result.prompt_lengths[0]) + end - 1
    assert result.rows.mix_weights[0, j].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert result.rows.support[0, j].tolist() == [True, False, False, False, False]
    assert result.rows.mix_ids[0, j, 0] == marker[-1] and result.loss_mask[0, j]
    # soft rows keep their sorted slots
    w = response(result, 0, "mix_weights")[0]
    assert torch.all(w[:-1] >= w[1:])
    assert result.thinking_texts[0].endswith("</think>") and "</think>" not in result.answer_texts[0]


def test_eos_during_thinking_ends_the_response_as_a_soft_step(tiny_dir, tokenizer):
    model, shard = build(tiny_dir)
    result = run(model, shard, tokenizer, prompts=[PROMPTS[1]], g=1, thinking_sampler=ScriptedSampler([100, 101, EOS]))
    assert result.finish_reasons == ["eos"] and int(result.response_lengths[0]) == 3
    assert response(result, 0, "is_soft").all()


def test_thinking_budget_forces_the_marker_and_forced_steps_are_not_scored(tiny_dir, tokenizer):
    model, shard = build(tiny_dir)
    marker = tokenizer("</think>", add_special_tokens=False)["input_ids"]
    result = run(model, shard, tokenizer, prompts=[PROMPTS[1]], g=1, max_thinking_tokens=3, max_new_tokens=10)
    tokens = response(result, 0)
    start = int(result.prompt_lengths[0])
    scored = result.loss_mask[0, start : start + len(tokens)]
    assert tokens[3 : 3 + len(marker)].tolist() == marker
    assert scored[:3].all() and not scored[3 : 3 + len(marker)].any() and scored[3 + len(marker):].all()
    assert response(result, 0, "is_soft")[:3].all() and not response(result, 0, "is_soft")[3:].any()


def test_stop_strings_and_length_limit(tiny_dir, tokenizer):
    model, shard = build(tiny_dir)
    words = tokenizer(" one two STOP three", add_special_tokens=False)["input_ids"]
    result = run(model, shard, tokenizer, prompts=[PROMPTS[0]], g=1, thinking_sampler=ScriptedSampler(words), stop_strings=("STOP",))
    assert result.finish_reasons == ["stop"] and result.texts[0].endswith("STOP")
    result = run(model, shard, tokenizer, prompts=[PROMPTS[0]], g=1, thinking_sampler=ScriptedSampler([300]), max_new_tokens=5)
    assert result.finish_reasons == ["length"] and int(result.response_lengths[0]) == 5


def rescore(model, shard, result, scorer):
    """The training-side log-density of every row, from one uncached forward on the stored mixtures."""
    rows = result.rows
    b, s = rows.tokens.shape
    x = mixture_embedding(model.embedding.word_embeddings, rows.mix_ids, rows.mix_weights)
    with torch.no_grad():
        logits = model(None, position_ids(b, s, "cpu"), CAUSAL, decoder_input=x)
    shifted = rows.map(lambda t: t[:, 1:])  # logits at j score row j + 1
    ell = log_density_from_logits(logits[:, :-1], shifted, scorer, shard)
    return torch.cat([torch.zeros(b, 1), ell], dim=1)


def test_rescoring_reproduces_the_rollout_log_densities(tiny_dir, tokenizer):
    model, shard = build(tiny_dir)
    marker = tokenizer("</think>", add_special_tokens=False)["input_ids"]
    result = run(model, shard, tokenizer, g=2, max_thinking_tokens=4, max_new_tokens=10)
    ell = rescore(model, shard, result, Scorer(GumbelNoise(tau=0.1, scale=1.0), 1.0, 1.0))
    mask = result.loss_mask
    assert mask.sum() > 0 and (result.rows.is_soft & mask).sum() > 0 and (~result.rows.is_soft & mask).sum() > 0
    assert len(marker) > 1
    assert (ell - result.rollout_logp)[mask].abs().max() <= 1e-5


def _rank_rollout(rank, tiny_dir, tp, pp, tokenizer_dir):
    model, shard = build(tiny_dir, tp, pp)
    tokenizer = load_tokenizer(resolve_model_source(tokenizer_dir))
    result = run(model, shard, tokenizer, max_thinking_tokens=5)
    return result.rows.tokens, result.rows.mix_weights, result.rollout_logp, result.loss_mask


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_same_seed_same_trajectory_at_tp2_and_pp2(tiny_dir, tokenizer, smollm2_hf_dir, tp, pp):
    model, shard = build(tiny_dir)
    reference = run(model, shard, tokenizer, max_thinking_tokens=5)
    for tokens, weights, logp, mask in run_ranks(tp * pp, _rank_rollout, tiny_dir, tp, pp, str(smollm2_hf_dir)):
        assert torch.equal(tokens, reference.rows.tokens)
        assert torch.equal(mask, reference.loss_mask)
        assert torch.allclose(weights, reference.rows.mix_weights, atol=1e-3)
        assert torch.allclose(logp, reference.rollout_logp, atol=1e-4)


def test_entropy_cold_stop_forces_the_marker(tiny_dir, tokenizer):
    model, shard = build(tiny_dir)
    marker = tokenizer("</think>", add_special_tokens=False)["input_ids"]
    # every distribution is below an entropy of 100 nats: the cold stop fires after 2 soft steps
    result = run(model, shard, tokenizer, prompts=[PROMPTS[1]], g=1, cold_stop_entropy=100.0, cold_stop_steps=2)
    assert response(result, 0)[2 : 2 + len(marker)].tolist() == marker
    assert response(result, 0, "is_soft")[:2].all() and not response(result, 0, "is_soft")[2:].any()
    # and never below a threshold of 1e-9 nats
    result = run(model, shard, tokenizer, prompts=[PROMPTS[1]], g=1, cold_stop_entropy=1e-9, cold_stop_steps=2)
    assert response(result, 0, "is_soft").all()
