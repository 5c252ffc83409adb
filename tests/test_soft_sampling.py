"""Samplers and truncation against float64 references: same inputs, same noise; statistics; edge cases."""

from __future__ import annotations

import math

import pytest
import soft_reference as ref
import torch

from megatron_softgrpo.soft import (
    DirichletNoise,
    DiscreteSampler,
    EmbeddingNoise,
    GaussianNoise,
    GumbelNoise,
    MixtureRecord,
    SoftSampler,
    Truncation,
    VocabShard,
    noise_rng,
    seed_noise_rng,
)
from megatron_softgrpo.soft.rng import gaussian_from_seeds
from megatron_softgrpo.soft.truncation import full_support, top_logits

VOCAB, PADDED = 1000, 1024
SHARD = VocabShard.whole(PADDED, VOCAB)
TOL = 1e-5


NOISE_KINDS = {k.name: k for k in (GumbelNoise, GaussianNoise, DirichletNoise, EmbeddingNoise)}


def make_sampler(name, truncation, mixture_size, **noise_params):
    """The sampler of one name: discrete, or a soft one with that noise kind."""
    if name == "discrete":
        return DiscreteSampler(truncation, mixture_size)
    return SoftSampler(truncation, mixture_size, NOISE_KINDS[name](**noise_params))


def random_logits(rows=16, scale=3.0, seed=0, padded=PADDED, vocab=VOCAB):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, padded, generator=gen) * scale
    logits[:, vocab:] = 50.0  # padding rows carry large junk: must never be selected
    return logits


def draw(seed, fn):
    """The noise a sampler seeded with `seed` draws first (the tests' 'same noise')."""
    seed_noise_rng(seed)
    with noise_rng():
        return fn()


def sample(sampler, logits, seed=7, shard=SHARD):
    seed_noise_rng(seed)
    return sampler.sample(logits, shard)


TRUNCATIONS = [
    dict(temperature=1.0, top_k=5, top_p=0.95),
    dict(temperature=0.7, top_k=30, top_p=0.9, min_p=0.02),
    dict(temperature=1.3, top_k=None, top_p=0.8),
    dict(temperature=1.0, top_k=None, top_p=1.0, min_p=0.1),
    dict(temperature=0.6, top_k=3, top_p=1.0),
]


# ------------------------------------------------------------------ truncation


@pytest.mark.parametrize("trunc", TRUNCATIONS)
def test_truncated_support_and_probabilities_match_reference(trunc):
    logits = random_logits(scale=2.0)
    found = full_support(logits, SHARD, Truncation(**trunc))
    expected = ref.truncated_probs(logits[:, :VOCAB], **trunc)
    q = torch.exp(found.scaled.double() - found.scaled[:, :1].double()) * found.support
    ours = torch.zeros_like(expected).scatter(-1, found.ids, q / q.sum(-1, keepdim=True))
    assert torch.equal(ours > 0, expected > 0)
    assert (ours - expected).abs().max() <= TOL


def test_top_p_keeps_the_minimal_nucleus():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(200, 64, generator=gen) * 2
    top_p = torch.rand(200, generator=gen) * 0.9 + 0.05
    shard = VocabShard.whole(64, 64)
    for row, p in zip(logits, top_p.tolist()):
        found = full_support(row[None], shard, Truncation(top_p=p))
        probs = torch.softmax(row.double(), -1)[found.ids[0]]
        kept = probs[found.support[0]]
        assert kept.sum() >= p - 1e-6  # holds at least top_p ...
        assert kept[:-1].sum() < p + 1e-6  # ... and no smaller prefix does
        assert torch.all(kept.min() >= probs[~found.support[0]])  # the most probable tokens


def test_top_p_alone_grows_the_candidates_to_a_large_nucleus():
    logits = torch.randn(4, PADDED) * 0.05  # nearly flat: the 0.9 nucleus holds ~900 tokens
    found = full_support(logits, SHARD, Truncation(top_p=0.9))
    expected = ref.truncated_probs(logits[:, :VOCAB], top_p=0.9)
    assert found.support.sum(-1).tolist() == (expected > 0).sum(-1).tolist()
    assert int(found.support.sum(-1).min()) > 800


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_candidates_break_ties_by_lower_id(dtype):
    gen = torch.Generator().manual_seed(8)
    logits = torch.randint(0, 6, (32, PADDED), generator=gen).to(
        dtype
    )  # hundreds of ties per value
    logits[:, VOCAB:] = 10  # padding above everything
    for count in (1, 5, 30, 300):
        ids, values = top_logits(logits, SHARD, count)
        expected = ref.by_logit(logits[:, :VOCAB].float())[:, :count]
        assert torch.equal(ids, expected)
        assert torch.equal(values, logits.float().gather(-1, expected))


# ------------------------------------------------------------------ same inputs, same noise


@pytest.mark.parametrize("trunc", TRUNCATIONS[:3])
@pytest.mark.parametrize("K", [5, 30])
def test_gumbel_step_matches_reference(trunc, K):
    logits = random_logits(scale=1.5)
    noise = GumbelNoise(tau=0.1, scale=0.8)
    step = sample(SoftSampler(Truncation(**trunc), K, noise), logits)
    eps = draw(7, lambda: -torch.empty(16, K).exponential_().log()).double().clamp(-1.5, 3)

    ids, pt, support = ref.soft_slots(logits[:, :VOCAB], K, **trunc)
    k_logits = logits.double().gather(-1, ids)
    g = torch.log(pt + 1e-6) + 0.8 * eps
    w = torch.softmax(torch.where(support, g / 0.1, ref.NEG_INF), -1)
    w, support, ids, g, k_logits = ref.sort_slots(w, support, ids, g, k_logits)
    assert torch.equal(step.mix_ids, ids) and torch.equal(step.support, support)
    assert torch.equal(step.tokens, ids[:, 0]) and bool(step.is_soft.all())
    assert (step.mix_weights - w).abs().max() <= TOL
    assert (step.noise - g).abs().max() <= TOL
    expected = ref.gumbel_density(k_logits, support, g, trunc["temperature"])
    assert (step.log_density - expected).abs().max() <= TOL


def test_gaussian_step_matches_reference():
    logits = random_logits(scale=1.0)
    trunc = dict(temperature=1.0, top_k=5, top_p=0.95)
    step = sample(SoftSampler(Truncation(**trunc), 5, GaussianNoise(sigma=0.05)), logits)
    normal = draw(7, lambda: torch.randn(16, 5)).double()
    ids, pt, support = ref.soft_slots(logits[:, :VOCAB], 5, **trunc)
    x = torch.where(support, pt + 0.05 * normal, 0.0)
    k_logits = logits.double().gather(-1, ids)
    w, support, ids, x, k_logits = ref.sort_slots(
        x / x.sum(-1, keepdim=True), support, ids, x, k_logits
    )
    assert torch.equal(step.mix_ids, ids) and torch.equal(step.support, support)
    assert (step.noise - x).abs().max() <= TOL
    assert (step.mix_weights - w).abs().max() <= TOL
    assert (
        step.log_density - ref.gaussian_density(k_logits, support, x, 1.0, 0.05)
    ).abs().max() <= TOL


def test_dirichlet_step_matches_reference():
    logits = random_logits(scale=1.0)
    trunc = dict(temperature=1.0, top_k=5, top_p=0.95)
    step = sample(SoftSampler(Truncation(**trunc), 5, DirichletNoise()), logits)
    ids, pt, support = ref.soft_slots(logits[:, :VOCAB], 5, **trunc)
    # Gamma(pt, 1) from the same generator state (the concentration rounded to fp32 as the sampler's)
    x = draw(7, lambda: torch._standard_gamma(torch.where(support, pt, 1.0).float())).double()
    x = torch.where(support, x, 0.0)
    k_logits = logits.double().gather(-1, ids)
    w, support, ids, x, k_logits = ref.sort_slots(
        x / x.sum(-1, keepdim=True), support, ids, x, k_logits
    )
    assert torch.equal(step.mix_ids, ids) and torch.equal(step.support, support)
    assert torch.allclose(step.noise.double(), x, rtol=1e-4, atol=1e-6)
    # weights and density follow from the stored x exactly
    stored = step.noise.double()
    assert (step.mix_weights - stored / stored.sum(-1, keepdim=True)).abs().max() <= TOL
    assert (
        step.log_density - ref.dirichlet_density(k_logits, support, stored, 1.0)
    ).abs().max() <= TOL


def test_dirichlet_density_counts_only_slots_with_pt_above_0_05_as_the_reference():
    """pt = (0.90, 0.07, 0.03), x = (0.80, 0.10, 1e-4): the reference masks pt > 0.05 (-0.7127);
    a mask by the support alone would let the 0.03 slot's clamped term (+3) in (0.5249)."""
    pt, x = [0.90, 0.07, 0.03], [0.80, 0.10, 1e-4]

    def clamped_gamma(a, v):  # log Gamma(v; a, 1) in closed form, clamped to (-5, 3)
        return min(3.0, max(-5.0, (a - 1) * math.log(v) - v - math.lgamma(a)))

    terms = [clamped_gamma(a, v) for a, v in zip(pt, x)]
    reference, by_support = sum(terms[:2]) / 2, sum(terms) / 3
    assert abs(reference - -0.7127) <= 1e-4 and abs(by_support - 0.5249) <= 1e-4
    records = MixtureRecord.discrete(torch.tensor([5]), 3)
    records.mix_ids[:] = torch.tensor([5, 6, 7])
    records.support[:], records.is_soft[:] = True, True
    records.noise = torch.tensor([x])
    for dtype in (torch.float64, torch.float32):
        scaled = torch.log(torch.tensor([pt], dtype=dtype)) + 1.5  # logits / T: pt is their softmax
        ours = DirichletNoise().log_density(scaled, records)
        assert abs(float(ours) - reference) <= 1e-5
        assert abs(float(ours) - -0.7127) <= 1e-4
    # K = 30 uniform slots: none has pt > 0.05, so the row scores 0 (the reference: 0/0)
    wide = MixtureRecord.discrete(torch.tensor([5]), 30)
    wide.support[:], wide.noise = True, torch.full((1, 30), 0.02)
    assert float(DirichletNoise().log_density(torch.zeros(1, 30), wide)) == 0.0


def test_embedding_noise_step_matches_reference():
    logits = random_logits(scale=1.0)
    trunc = dict(temperature=0.9, top_k=8, top_p=0.9)
    step = sample(
        SoftSampler(Truncation(**trunc), 5, EmbeddingNoise(sigma=0.02, hidden_size=32)), logits
    )
    seeds = draw(7, lambda: torch.randint(0, 2**62, (16,), dtype=torch.int64))
    ids, pt, support = ref.soft_slots(logits[:, :VOCAB], 5, **trunc)
    assert torch.equal(step.noise_seed, seeds) and torch.equal(step.mix_ids, ids)
    assert (step.mix_weights - pt).abs().max() <= TOL and not bool(step.noise.any())
    eps = torch.tensor([ref.gaussian_from_seed(int(s), 32) for s in seeds], dtype=torch.float64)
    assert (step.log_density - (-0.5 * (eps**2).sum(-1))).abs().max() <= TOL


def test_seeded_gaussians_match_the_reference_generator_and_are_standard_normal():
    seeds = torch.tensor([0, 1, 2**40 + 17, 2**62 - 1, 123456789])
    ours = gaussian_from_seeds(seeds, 48).double()
    expected = torch.tensor(
        [ref.gaussian_from_seed(int(s), 48) for s in seeds], dtype=torch.float64
    )
    assert (ours - expected).abs().max() <= TOL
    many = gaussian_from_seeds(torch.arange(4000) * 7919, 256).double()
    n = many.numel()
    assert abs(many.mean()) <= 5 / math.sqrt(n)
    assert abs(many.var() - 1) <= 5 * math.sqrt(2 / n)
    assert abs(torch.corrcoef(many[:, :2].t())[0, 1]) <= 5 / math.sqrt(
        4000
    )  # dimensions independent
    assert abs(torch.corrcoef(torch.stack([many[:-1, 0], many[1:, 0]]))[0, 1]) <= 5 / math.sqrt(
        4000
    )  # rows too


@pytest.mark.parametrize(
    "trunc", [dict(top_k=5, top_p=0.95), dict(top_p=0.7, min_p=0.05), dict(temperature=1.2)]
)
def test_discrete_step_matches_reference(trunc):
    logits = random_logits(scale=2.0)
    step = sample(DiscreteSampler(Truncation(**trunc), 5), logits)
    u = draw(7, lambda: torch.rand(16)).double()
    probs = ref.truncated_probs(logits[:, :VOCAB], **trunc)
    # the draw is the inverse CDF at u: over tokens by logit when truncated, in id order otherwise
    order = (
        ref.by_logit(logits[:, :VOCAB])
        if Truncation(**trunc).truncates
        else torch.arange(VOCAB).expand(16, -1)
    )
    cdf = probs.gather(-1, order).cumsum(-1)
    expected = order.gather(
        -1, torch.searchsorted(cdf, u[:, None], right=True).clamp(max=VOCAB - 1)
    ).squeeze(-1)
    assert torch.equal(step.tokens, expected)
    temperature = trunc.get("temperature", 1.0)
    assert (
        step.log_density - ref.discrete_log_prob(logits, expected, temperature, VOCAB)
    ).abs().max() <= TOL
    assert torch.equal(step.mix_ids[:, 0], expected) and not bool(step.mix_ids[:, 1:].any())
    assert torch.equal(
        step.mix_weights, torch.nn.functional.one_hot(torch.zeros(16, dtype=torch.long), 5).float()
    )
    assert torch.equal(step.support, step.mix_weights.bool()) and not bool(step.is_soft.any())


def test_greedy_takes_the_argmax_with_lower_id_on_ties():
    logits = random_logits(scale=2.0)
    logits[0, 10] = logits[0, 20] = 100.0
    step = sample(DiscreteSampler(Truncation.greedy(), 3), logits)
    assert step.tokens[0] == 10
    assert torch.equal(step.tokens[1:], logits[1:, :VOCAB].argmax(-1))


# ------------------------------------------------------------------ statistics


def test_gumbel_transcript_token_follows_the_clamped_process():
    """Slot 0 is argmax_i log(pt_i + 1e-6) + c * clamp(G_i, -1.5, 3): pt up to the clamp's bias."""
    pt = torch.tensor([0.45, 0.3, 0.15, 0.07, 0.03], dtype=torch.float64)
    logits = torch.full((40_000, 64), -30.0)
    logits[:, :5] = torch.log(pt).float()
    sampler = SoftSampler(Truncation(top_k=5), 5, GumbelNoise(tau=0.1, scale=1.0))
    step = sample(sampler, logits, seed=11, shard=VocabShard.whole(64, 64))
    freq = torch.bincount(step.tokens, minlength=64)[:5].double() / 40_000

    gen = torch.Generator().manual_seed(5)
    sims = 4_000_000
    eps = (-torch.empty(sims, 5, dtype=torch.float64).exponential_(generator=gen).log()).clamp(
        -1.5, 3
    )
    simulated = torch.bincount((torch.log(pt + 1e-6) + eps).argmax(-1), minlength=5).double() / sims
    bound = 5 * torch.sqrt(simulated * (1 - simulated) / 40_000) + 5 * torch.sqrt(
        simulated * (1 - simulated) / sims
    )
    assert torch.all((freq - simulated).abs() <= bound), (freq, simulated)
    assert torch.any(
        (simulated - pt).abs() > bound
    )  # the clamp bias is visible at this sample size


@pytest.mark.parametrize(
    "trunc", [dict(), dict(top_k=4, top_p=0.9), dict(top_p=0.75, min_p=0.05), dict(temperature=0.5)]
)
def test_discrete_frequencies_match_truncated_probabilities(trunc):
    gen = torch.Generator().manual_seed(2)
    row = torch.randn(50, generator=gen) * 1.5
    logits = (
        torch.cat([row, torch.full((14,), 9.0)]).expand(40_000, -1).contiguous()
    )  # 14 padding columns
    step = sample(
        DiscreteSampler(Truncation(**trunc), 2), logits, seed=13, shard=VocabShard.whole(64, 50)
    )
    probs = ref.truncated_probs(row[None], **trunc)[0]
    freq = torch.bincount(step.tokens, minlength=64).double() / 40_000
    assert not bool(freq[50:].any())
    assert torch.all(
        (freq[:50] - probs).abs() <= 5 * torch.sqrt(probs * (1 - probs) / 40_000) + 1e-12
    )


# ------------------------------------------------------------------ edge cases


SOFT_KINDS = [
    ("gumbel", dict(tau=0.1)),
    ("gaussian", {}),
    ("dirichlet", {}),
    ("embedding_noise", dict(hidden_size=8)),
]


@pytest.mark.parametrize("name,params", SOFT_KINDS)
def test_all_mass_on_one_token(name, params):
    logits = torch.zeros(8, PADDED)
    logits[:, 7] = 100.0
    step = sample(make_sampler(name, Truncation(top_k=5, top_p=0.95), 5, **params), logits)
    assert bool((step.tokens == 7).all())
    assert step.support.tolist() == [[True, False, False, False, False]] * 8
    assert step.mix_ids[0].tolist() == [7, 0, 1, 2, 3]  # ties among the rest: lower ids first
    assert torch.equal(step.mix_weights, step.support.float())
    assert bool(torch.isfinite(step.log_density).all())


def test_mixture_size_larger_than_the_surviving_support():
    logits = random_logits()
    step = sample(SoftSampler(Truncation(top_k=2), 6, GumbelNoise()), logits)
    assert step.support.sum(-1).tolist() == [2] * 16
    assert bool((step.mix_weights[:, 2:] == 0).all())
    assert torch.allclose(step.mix_weights.sum(-1), torch.ones(16))
    top_two = ref.by_logit(logits[:, :VOCAB])[:, :2]
    assert torch.equal(torch.sort(step.mix_ids[:, :2], -1).values, torch.sort(top_two, -1).values)


def test_untruncated_draw_near_one_lands_on_the_last_token_with_mass():
    """The whole-vocabulary inverse CDF at u = the largest fp32 below 1: where the fp32 sum of a
    row exceeds its cumulative sum's end (some rows here), u * sum passed the end of the searched
    CDF, and the draw fell on the last real id, a token of probability 0."""
    logits = random_logits(rows=256, scale=2.0)
    logits[:, 990:VOCAB] = float("-inf")  # the last real ids have no mass
    logits[:, 989] = 0.0  # the last token with mass: not negligible at u's distance from 1
    scaled = SHARD.scaled(logits, 1.0)
    probs = torch.exp(scaled - torch.logsumexp(scaled, -1, keepdim=True))
    u = torch.full((256,), 1.0).nextafter(torch.tensor(0.0))
    assert bool((u * probs.sum(-1) > probs.cumsum(-1)[:, -1]).any())  # the case arises here
    step = DiscreteSampler(Truncation(), 2).sample(logits, SHARD, u)
    assert step.tokens.tolist() == [989] * 256
    assert bool(torch.isfinite(step.log_density).all())


@pytest.mark.parametrize("name", ["discrete", "gumbel", "gaussian", "dirichlet"])
def test_padding_rows_are_never_selected(name):
    logits = random_logits(rows=512)  # padding columns hold the largest logits of every row
    for trunc in (Truncation(), Truncation(top_k=30), Truncation(top_p=0.9), Truncation.greedy()):
        sampler = make_sampler(name, trunc, 30)
        step = sample(sampler, logits)
        assert int(step.mix_ids.max()) < VOCAB and int(step.tokens.max()) < VOCAB


def test_tiny_gumbel_temperature_gives_one_hot_weights():
    logits = random_logits()
    step = sample(SoftSampler(Truncation(top_k=5, top_p=0.95), 5, GumbelNoise(tau=1e-6)), logits)
    assert bool(torch.isfinite(step.mix_weights).all())
    assert torch.equal(
        step.mix_weights, torch.nn.functional.one_hot(torch.zeros(16, dtype=torch.long), 5).float()
    )
    eps = draw(7, lambda: -torch.empty(16, 5).exponential_().log()).double().clamp(-1.5, 3)
    ids, pt, support = ref.soft_slots(logits[:, :VOCAB], 5, top_k=5, top_p=0.95)
    g = torch.log(pt + 1e-6) + eps
    winner = torch.where(support, g, ref.NEG_INF).argmax(-1, keepdim=True)
    assert torch.equal(step.tokens, ids.gather(-1, winner).squeeze(-1))


def test_tiny_sampling_temperature_concentrates_on_the_argmax():
    logits = random_logits()
    argmax = logits[:, :VOCAB].argmax(-1)
    soft = sample(
        SoftSampler(Truncation(temperature=1e-4, top_k=5, top_p=0.95), 5, GumbelNoise()), logits
    )
    discrete = sample(DiscreteSampler(Truncation(temperature=1e-4), 5), logits)
    assert torch.equal(soft.tokens, argmax) and torch.equal(discrete.tokens, argmax)
    assert bool(soft.support[:, 1:].logical_not().all())
    assert bool(
        torch.isfinite(soft.log_density).all() and torch.isfinite(discrete.log_density).all()
    )


@pytest.mark.parametrize("name", ["discrete", "gumbel", "gaussian", "dirichlet", "embedding_noise"])
def test_bf16_logits_sample_like_their_fp32_values(name):
    params = dict(hidden_size=8) if name == "embedding_noise" else {}
    sampler = make_sampler(name, Truncation(top_k=5, top_p=0.95), 5, **params)
    logits = random_logits().bfloat16()
    a, b = sample(sampler, logits), sample(sampler, logits.float())
    for field in (
        "tokens",
        "mix_ids",
        "mix_weights",
        "noise",
        "support",
        "log_density",
        "noise_seed",
    ):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_bad_input():
    with pytest.raises(ValueError, match="top_p"):
        Truncation(top_p=0.0)
    with pytest.raises(ValueError, match="top 30 tokens of a 20-token"):
        sample(
            SoftSampler(Truncation(), 30, GumbelNoise()),
            torch.zeros(2, 32),
            shard=VocabShard.whole(32, 20),
        )
    with pytest.raises(RuntimeError, match="seed_noise_rng"):
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        get_cuda_rng_tracker().reset()
        DiscreteSampler(Truncation(), 1).sample(torch.zeros(2, 32), VocabShard.whole(32, 32))
