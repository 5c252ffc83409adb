"""Log-densities (and entropies) for the policy update: float64 references, gradcheck, chunked == plain,
rollout == training."""

from __future__ import annotations

from dataclasses import fields

import pytest
import soft_reference as ref
import torch

from megatron_softgrpo.soft import (
    DirichletNoise,
    DiscreteSampler,
    EmbeddingNoise,
    GaussianNoise,
    GumbelNoise,
    InputEmbedding,
    MixtureRecord,
    Scorer,
    SoftSampler,
    Truncation,
    VocabShard,
    log_density_and_entropy_from_hidden,
    log_density_from_hidden,
    log_density_from_logits,
    objective_from_hidden,
    seed_noise_rng,
)
from megatron_softgrpo.soft.logprob import discrete_log_density
from megatron_softgrpo.soft.rng import gaussian_from_seeds

VOCAB, PADDED, HIDDEN, K = 200, 256, 16, 5
SHARD = VocabShard.whole(PADDED, VOCAB)
TOL = 1e-5
NOISES = {
    "gumbel": GumbelNoise(tau=0.1, scale=1.0),
    "gaussian": GaussianNoise(sigma=0.05),
    "dirichlet": DirichletNoise(),
    # its density moves by |eps| |E| / sigma per unit of weight: sigma 0.1 keeps fp32 logit
    # rounding (1e-7) below the 1e-5 tolerance at this hidden size
    "embedding_noise": EmbeddingNoise(sigma=0.1, hidden_size=HIDDEN),
}
TRUNC = Truncation(temperature=0.8, top_k=K, top_p=0.95)


def scorer(name):
    return Scorer(NOISES[name], soft_temperature=0.8, discrete_temperature=1.1)


SMALL = VocabShard.whole(32, 30)  # gradcheck perturbs every input: keep them few


def table(seed=1, rows=PADDED):
    return torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(seed))


def mixed_rows(name, logits, seed=0, drift=0.0, shard=SHARD):
    """Records [B, S] as a rollout makes them: soft steps of the noise kind and discrete steps, mixed.

    drift > 0 samples them from a slightly different (older) policy: the Gumbel density has
    kinks where the recovered noise meets its clamp, which is exactly where it sits at the
    sampling policy itself; gradient comparisons are made away from them.
    """
    b, s, _ = logits.shape
    gen = torch.Generator().manual_seed(seed + 100)
    flat = (logits + drift * torch.randn(logits.shape, generator=gen)).reshape(-1, shard.width)
    seed_noise_rng(seed)
    soft = SoftSampler(TRUNC, K, NOISES[name]).sample(flat, shard)
    discrete = DiscreteSampler(Truncation(temperature=1.1), K).sample(flat, shard)
    draws = torch.rand(b * s, generator=torch.Generator().manual_seed(seed))
    is_soft = draws < 0.7
    step = soft.where(is_soft, discrete)
    # some discrete rows are marker steps: drawn by the thinking sampler (T = 0.8), scored at it
    marker = draws > 0.85
    step.thinking = step.thinking | marker
    at_thinking = discrete_log_density(flat, step.tokens, TRUNC.temperature, shard)
    step.log_density = torch.where(marker, at_thinking, step.log_density)
    records = MixtureRecord(**{f.name: getattr(step, f.name) for f in fields(MixtureRecord)})
    return step, records.map(lambda t: t.reshape(b, s, *t.shape[1:]))


def random_logits(b=2, s=12, seed=0, dtype=torch.float32, width=PADDED):
    return (torch.randn(b, s, width, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype)


def reference(name, logits, records, emb_table):
    """float64 logp [N] of flat rows: discrete at T=1.1 (marker steps at 0.8), soft rows by
    docs/algorithm.md section 2/5 at T=0.8."""
    flat = records.flatten()
    lg = logits.reshape(-1, PADDED).double()
    out = torch.where(
        flat.thinking,
        ref.discrete_log_prob(lg, flat.tokens, 0.8, VOCAB),
        ref.discrete_log_prob(lg, flat.tokens, 1.1, VOCAB),
    )
    k_logits = lg.gather(-1, flat.mix_ids)
    if name == "gumbel":
        soft = ref.gumbel_density(k_logits, flat.support, flat.noise, 0.8)
    elif name == "gaussian":
        soft = ref.gaussian_density(k_logits, flat.support, flat.noise, 0.8, 0.05)
    elif name == "dirichlet":
        soft = ref.dirichlet_density(k_logits, flat.support, flat.noise, 0.8)
    else:
        eps = torch.tensor(
            [ref.gaussian_from_seed(int(s), HIDDEN) for s in flat.noise_seed], dtype=torch.float64
        )
        soft = ref.embedding_density(
            k_logits, flat.support, flat.mix_weights, eps, emb_table[flat.mix_ids], 0.8, 0.1
        )
    return torch.where(flat.is_soft, soft, out)


@pytest.mark.parametrize("name", NOISES)
def test_log_density_matches_reference(name):
    logits = random_logits()
    _, records = mixed_rows(name, logits)
    emb = table()
    logp = log_density_from_logits(logits, records, scorer(name), SHARD, InputEmbedding(emb, SHARD))
    assert logp.shape == records.tokens.shape and logp.dtype == torch.float32
    assert 0 < int(records.is_soft.sum()) < records.is_soft.numel()
    assert bool((records.thinking & ~records.is_soft).any())  # marker steps among the discrete rows
    assert (logp.reshape(-1).double() - reference(name, logits, records, emb)).abs().max() <= TOL


def test_discrete_rows_drawn_while_thinking_are_scored_at_the_thinking_temperature():
    """The marker step (discrete, `thinking`) at T_thinking = 0.8, other discrete rows at 1.1."""
    logits = random_logits()
    _, records = mixed_rows("gumbel", logits)
    marker, answer = records.thinking & ~records.is_soft, ~records.thinking & ~records.is_soft
    assert bool(marker.any()) and bool(answer.any())
    logp = log_density_from_logits(logits, records, scorer("gumbel"), SHARD).double()
    flat = logits.reshape(-1, PADDED).double()

    def at(temperature):
        lp = ref.discrete_log_prob(flat, records.tokens.reshape(-1), temperature, VOCAB)
        return lp.reshape(records.tokens.shape)

    assert (logp - at(0.8))[marker].abs().max() <= TOL
    assert (logp - at(1.1))[answer].abs().max() <= TOL
    assert (at(0.8) - at(1.1))[marker].abs().min() > 1e-3  # the two temperatures differ there


@pytest.mark.parametrize("name", NOISES)
def test_rollout_density_equals_training_density(name):
    """The health metric of docs/algorithm.md section 2: the rollout's own logp equals the trainer's at the same logits."""
    logits = random_logits()
    step, rows = mixed_rows(name, logits)
    logp = log_density_from_logits(
        logits, rows, scorer(name), SHARD, InputEmbedding(table(), SHARD)
    )
    assert (logp.reshape(-1) - step.log_density).abs().max() <= TOL


@pytest.mark.parametrize("name", NOISES)
def test_old_equals_new_policy_gives_ratio_exactly_one(name):
    logits = random_logits()
    _, rows = mixed_rows(name, logits)
    hidden, weight = torch.randn(12, 2, HIDDEN), torch.randn(PADDED, HIDDEN) * 0.3
    args = (hidden, weight, rows, scorer(name), SHARD)
    old = log_density_from_hidden(*args, chunk_size=7, embedding=InputEmbedding(table(), SHARD))
    new = log_density_from_hidden(*args, chunk_size=7, embedding=InputEmbedding(table(), SHARD))
    assert torch.equal(torch.exp(new - old), torch.ones_like(new))


@pytest.mark.parametrize("name", NOISES)
def test_gradcheck_with_respect_to_logits(name):
    logits = random_logits(b=1, s=6, width=SMALL.width)
    _, rows = mixed_rows(name, logits, drift=0.5, shard=SMALL)
    emb = InputEmbedding(table(rows=SMALL.width).double(), SMALL)
    x = logits.double().requires_grad_()
    fn = lambda l: log_density_from_logits(l, rows, scorer(name), SMALL, emb)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", NOISES)
@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_chunked_from_hidden_equals_plain_on_logits(name, chunk_size):
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(12, 2, HIDDEN, generator=gen, requires_grad=True)  # [s, b, h]
    weight = (torch.randn(PADDED, HIDDEN, generator=gen) * 0.5).requires_grad_()
    weight.data[VOCAB:] = 0.0  # Megatron's padding rows: logit 0, which must not count
    logits = (hidden.transpose(0, 1) @ weight.t()).detach()
    _, rows = mixed_rows(name, logits, drift=0.5)
    emb = InputEmbedding(table(), SHARD)
    coef = torch.randn(2, 12, generator=gen)

    plain_logits = hidden.transpose(0, 1) @ weight.t()
    plain = log_density_from_logits(plain_logits, rows, scorer(name), SHARD, emb)
    g_hidden, g_weight = torch.autograd.grad((coef * plain).sum(), (hidden, weight))
    chunked = log_density_from_hidden(
        hidden, weight, rows, scorer(name), SHARD, chunk_size=chunk_size, embedding=emb
    )
    c_hidden, c_weight = torch.autograd.grad((coef * chunked).sum(), (hidden, weight))
    assert torch.all(
        (chunked - plain).abs() <= TOL * plain.abs().clamp(min=1)
    )  # fp32 rounding of both
    assert (c_hidden - g_hidden).abs().max() <= 1e-4 * max(1.0, g_hidden.abs().max())
    assert (c_weight - g_weight).abs().max() <= 1e-4 * max(1.0, g_weight.abs().max())
    assert g_weight.abs().sum() > 0


@pytest.mark.parametrize("name", NOISES)
def test_gradcheck_chunked_from_hidden(name):
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 2, HIDDEN, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = (
        torch.randn(SMALL.width, HIDDEN, generator=gen, dtype=torch.float64) * 0.5
    ).requires_grad_()
    _, rows = mixed_rows(
        name, (hidden.transpose(0, 1) @ weight.t()).float().detach(), drift=0.5, shard=SMALL
    )
    emb = InputEmbedding(table(rows=SMALL.width).double(), SMALL)

    def fn(h, w):
        return log_density_from_hidden(h, w, rows, scorer(name), SMALL, chunk_size=3, embedding=emb)

    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-5, fast_mode=True)


def test_gradients_reach_only_the_logits():
    logits = random_logits().requires_grad_()
    _, rows = mixed_rows("embedding_noise", logits.detach())
    emb_table = table().requires_grad_()
    logp = log_density_from_logits(
        logits, rows, scorer("embedding_noise"), SHARD, InputEmbedding(emb_table, SHARD)
    )
    logp.sum().backward()
    assert emb_table.grad is None and logits.grad.abs().sum() > 0
    assert not any(t.requires_grad for t in vars(rows).values())


def test_padding_columns_do_not_count():
    logits = random_logits()
    _, rows = mixed_rows("gumbel", logits)
    junk = logits.clone()
    junk[..., VOCAB:] = 1e4
    clean = log_density_from_logits(logits, rows, scorer("gumbel"), SHARD)
    assert torch.equal(clean, log_density_from_logits(junk, rows, scorer("gumbel"), SHARD))


def test_bf16_logits_score_like_their_fp32_values():
    logits = random_logits().bfloat16()
    _, rows = mixed_rows("gumbel", logits.float())
    a = log_density_from_logits(logits, rows, scorer("gumbel"), SHARD)
    b = log_density_from_logits(logits.float(), rows, scorer("gumbel"), SHARD)
    assert a.dtype == torch.float32 and torch.equal(a, b)


def test_bf16_weights_chunked_matches_plain_bf16_logits():
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(12, 2, HIDDEN, generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(PADDED, HIDDEN, generator=gen) * 0.5).bfloat16().requires_grad_()
    logits = hidden.transpose(0, 1) @ weight.t()  # bf16, as Megatron's output layer returns them
    _, rows = mixed_rows("gumbel", logits.float().detach(), drift=0.5)
    plain = log_density_from_logits(logits, rows, scorer("gumbel"), SHARD)
    chunked = log_density_from_hidden(hidden, weight, rows, scorer("gumbel"), SHARD, chunk_size=5)
    assert (
        chunked - plain
    ).abs().max() <= 1e-2  # bf16 products summed in another order: an ulp of bf16
    chunked.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    assert bool(torch.isfinite(weight.grad.float()).all())


def test_tiny_temperature_densities_stay_finite():
    logits = random_logits().requires_grad_()
    _, rows = mixed_rows("gumbel", logits.detach())
    sharp = Scorer(NOISES["gumbel"], soft_temperature=1e-4, discrete_temperature=1e-4)
    logp = log_density_from_logits(logits, rows, sharp, SHARD)
    logp.sum().backward()
    assert bool(torch.isfinite(logp).all() and torch.isfinite(logits.grad).all())


def test_embedding_noise_offset_is_the_seeded_vector_on_soft_rows():
    logits = random_logits()
    _, records = mixed_rows("embedding_noise", logits)
    offset = NOISES["embedding_noise"].input_offset(records)
    assert offset.shape == (*records.tokens.shape, HIDDEN)
    assert not bool(offset[~records.is_soft].any())
    expected = 0.1 * gaussian_from_seeds(records.noise_seed[records.is_soft], HIDDEN)
    assert torch.equal(offset[records.is_soft], expected)


# ------------------------------------------------------------------ the entropy term's entropies


def reference_entropy(logits, records, vocab=VOCAB):
    """float64 entropy [b, s] of softmax(l / T) over the real vocabulary: T = 0.8 on soft rows and
    marker steps (`thinking`), 1.1 on the other discrete rows."""
    temperature = torch.where(
        records.thinking,
        torch.tensor(0.8, dtype=torch.float64),
        torch.tensor(1.1, dtype=torch.float64),
    )
    p = torch.softmax(logits.double()[..., :vocab] / temperature.unsqueeze(-1), dim=-1)
    return torch.special.entr(p).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_chunked_entropy_matches_float64_reference_and_keeps_the_log_densities(chunk_size):
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(12, 2, HIDDEN, generator=gen, requires_grad=True)  # [s, b, h]
    weight = (torch.randn(PADDED, HIDDEN, generator=gen) * 0.5).requires_grad_()
    weight.data[VOCAB:] *= 8.0  # large padding logits: counted, they would dominate the entropy
    logits64 = hidden.double().transpose(0, 1) @ weight.double().t()
    _, records = mixed_rows("gumbel", logits64.float().detach(), drift=0.5)
    assert 0 < int(records.is_soft.sum()) < records.is_soft.numel()
    logp, entropy = log_density_and_entropy_from_hidden(
        hidden, weight, records, scorer("gumbel"), SHARD, chunk_size=chunk_size
    )
    expected = reference_entropy(logits64, records)
    assert entropy.shape == records.tokens.shape and entropy.dtype == torch.float32
    assert (entropy.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert torch.equal(
        logp,
        log_density_from_hidden(
            hidden, weight, records, scorer("gumbel"), SHARD, chunk_size=chunk_size
        ),
    )
    # the gradient of a mix of both outputs against float64 autograd through full logits
    c_ell, c_entropy = torch.randn(2, 2, 12, generator=gen)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    full = h64.transpose(0, 1) @ w64.t()
    plain = (c_ell * log_density_from_logits(full, records, scorer("gumbel"), SHARD)).sum()
    want = torch.autograd.grad(
        plain + (c_entropy * reference_entropy(full, records)).sum(), (h64, w64)
    )
    got = torch.autograd.grad((c_ell * logp + c_entropy * entropy).sum(), (hidden, weight))
    for g, w in zip(got, want):
        assert (g.double() - w).abs().max() <= 1e-4 * w.abs().max()
    assert (
        got[1][VOCAB:].abs().max() == 0 and got[1][:VOCAB].abs().sum() > 0
    )  # padding rows: no gradient


@pytest.mark.parametrize("name", ["gumbel", "embedding_noise"])
def test_gradcheck_chunked_entropy_from_hidden(name):
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(4, 2, HIDDEN, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = (
        torch.randn(SMALL.width, HIDDEN, generator=gen, dtype=torch.float64) * 0.5
    ).requires_grad_()
    _, records = mixed_rows(
        name, (hidden.transpose(0, 1) @ weight.t()).float().detach(), drift=0.5, shard=SMALL
    )
    assert 0 < int(records.is_soft.sum()) < records.is_soft.numel()
    emb = InputEmbedding(table(rows=SMALL.width).double(), SMALL)

    def fn(h, w):
        return log_density_and_entropy_from_hidden(
            h, w, records, scorer(name), SMALL, chunk_size=3, embedding=emb
        )

    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-5, fast_mode=True)


def test_entropy_at_tiny_temperature_stays_finite():
    gen = torch.Generator().manual_seed(9)
    hidden = torch.randn(6, 2, HIDDEN, generator=gen, requires_grad=True)
    weight = torch.randn(PADDED, HIDDEN, generator=gen).requires_grad_()
    _, rows = mixed_rows("gumbel", (hidden.transpose(0, 1) @ weight.t()).detach())
    sharp = Scorer(NOISES["gumbel"], soft_temperature=1e-4, discrete_temperature=1e-4)
    _, entropy = log_density_and_entropy_from_hidden(
        hidden, weight, rows, sharp, SHARD, chunk_size=5
    )
    entropy.sum().backward()
    assert bool(
        torch.isfinite(entropy).all() and (entropy >= 0).all() and entropy.max() < 1e-3
    )  # nearly one-hot
    assert bool(torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all())


def _objective(old, coef_ell, coef_entropy):
    """A nonlinear per-position objective like the policy loss's: depends on its positions' data."""
    old, coef_ell, coef_entropy = (t.reshape(-1) for t in (old, coef_ell, coef_entropy))

    def objective(logp, entropy, positions: slice):
        out = coef_ell[positions] * torch.exp(torch.clamp(logp - old[positions], -20, 20))
        return out if entropy is None else out + coef_entropy[positions] * entropy

    return objective


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("name", NOISES)
def test_fused_objective_equals_scores_then_autograd(name, with_entropy):
    gen = torch.Generator().manual_seed(10)
    hidden = torch.randn(12, 2, HIDDEN, generator=gen, requires_grad=True)  # [s, b, h]
    weight = (torch.randn(PADDED, HIDDEN, generator=gen) * 0.5).requires_grad_()
    weight.data[VOCAB:] *= 8.0  # padding rows must get no gradient
    _, rows = mixed_rows(name, (hidden.transpose(0, 1) @ weight.t()).detach(), drift=0.5)
    emb = InputEmbedding(table(), SHARD)
    old = log_density_from_hidden(hidden, weight, rows, scorer(name), SHARD, embedding=emb).detach()
    old = old + 0.1 * torch.randn(old.shape, generator=gen)
    objective = _objective(
        old, torch.randn(2, 12, generator=gen), torch.randn(2, 12, generator=gen)
    )
    for chunk_size in (5, 1024):
        args = (hidden, weight, rows, scorer(name), SHARD)
        if with_entropy:
            logp, entropy = log_density_and_entropy_from_hidden(
                *args, chunk_size=chunk_size, embedding=emb
            )
        else:
            logp, entropy = (
                log_density_from_hidden(*args, chunk_size=chunk_size, embedding=emb),
                None,
            )
        want_value = objective(
            logp.reshape(-1), None if entropy is None else entropy.reshape(-1), slice(None)
        ).sum()
        want = torch.autograd.grad(want_value, (hidden, weight))
        fused = objective_from_hidden(
            *args, objective, with_entropy, chunk_size=chunk_size, embedding=emb
        )
        got = torch.autograd.grad(fused.value, (hidden, weight))
        assert torch.equal(fused.logp, logp.detach())  # the same log-densities, bitwise
        assert (fused.entropy is None) == (not with_entropy)
        if with_entropy:
            assert torch.equal(fused.entropy, entropy.detach())
        assert abs(float(fused.value.detach() - want_value.detach())) <= 1e-5 * max(
            1.0, abs(float(want_value.detach()))
        )
        for g, w in zip(got, want):
            assert (g - w).abs().max() <= 1e-5 * max(1.0, float(w.abs().max()))
        assert got[1][VOCAB:].abs().max() == 0 and got[1][:VOCAB].abs().sum() > 0


def test_fused_objective_gradient_scales_with_the_output_gradient_and_passes_gradcheck():
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(4, 2, HIDDEN, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = (
        torch.randn(SMALL.width, HIDDEN, generator=gen, dtype=torch.float64) * 0.5
    ).requires_grad_()
    _, records = mixed_rows(
        "gumbel", (hidden.transpose(0, 1) @ weight.t()).float().detach(), drift=0.5, shard=SMALL
    )
    assert 0 < int(records.is_soft.sum()) < records.is_soft.numel()
    old = torch.randn(2, 4, generator=gen, dtype=torch.float64) - 2.0
    objective = _objective(old, *torch.randn(2, 2, 4, generator=gen, dtype=torch.float64))

    def fn(h, w):
        return objective_from_hidden(
            h, w, records, scorer("gumbel"), SMALL, objective, True, chunk_size=3
        ).value

    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-5, fast_mode=True)
    once = torch.autograd.grad(fn(hidden, weight), (hidden, weight))
    scaled = torch.autograd.grad(
        -2.5 * fn(hidden, weight), (hidden, weight)
    )  # a loss scale, a division by micro-batches
    for a, b in zip(once, scaled):
        assert torch.allclose(-2.5 * a, b, rtol=1e-12, atol=0)


def test_fused_objective_adds_its_weight_gradient_into_ddp_main_grad():
    """With the trainer's sink (`add_to_main_grad`), a weight wrapped by Megatron's DDP (a
    `main_grad`, and the `grad_added_to_main_grad` flag its hook reads) takes the scaled weight
    gradient in main_grad, accumulating over micro-batches, as Megatron's own linear layers do
    under gradient_accumulation_fusion; a weight tied to the input embedding (`zero_out_wgrad`)
    takes it in `.grad`; without a sink the soft core knows nothing of DDP: `.grad` too."""
    from model_patches.wgrad_accumulation import add_to_main_grad

    gen = torch.Generator().manual_seed(12)
    hidden = torch.randn(6, 2, HIDDEN, generator=gen, requires_grad=True)
    weight = (torch.randn(PADDED, HIDDEN, generator=gen) * 0.5).requires_grad_()
    _, rows = mixed_rows("gumbel", (hidden.transpose(0, 1) @ weight.t()).detach(), drift=0.5)
    objective = _objective(*torch.randn(3, 2, 6, generator=gen))

    def value(w, sink=add_to_main_grad):
        return objective_from_hidden(
            hidden, w, rows, scorer("gumbel"), SHARD, objective, True, weight_gradient=sink
        )

    (want,) = torch.autograd.grad(-0.5 * value(weight).value, weight)
    wrapped = weight.detach().clone().requires_grad_()
    wrapped.main_grad, wrapped.grad_added_to_main_grad = torch.ones_like(wrapped), False
    for _ in range(2):  # two micro-batches
        (-0.5 * value(wrapped).value).backward()
    assert wrapped.grad_added_to_main_grad  # DDP's hook then skips the placeholder in .grad
    torch.testing.assert_close(wrapped.main_grad, 1 + 2 * want, rtol=1e-6, atol=1e-6)
    # tied to the input embedding on this stage: DDP's hook adds .grad, so the gradient is there
    tied = weight.detach().clone().requires_grad_()
    tied.main_grad, tied.grad_added_to_main_grad = torch.ones_like(tied), False
    tied.zero_out_wgrad = True
    (-0.5 * value(tied).value).backward()
    assert not tied.grad_added_to_main_grad and torch.equal(tied.main_grad, torch.ones_like(tied))
    torch.testing.assert_close(tied.grad, want, rtol=1e-6, atol=1e-6)
    plain = weight.detach().clone().requires_grad_()
    plain.main_grad, plain.grad_added_to_main_grad = torch.ones_like(plain), False
    (-0.5 * value(plain, sink=None).value).backward()
    assert not plain.grad_added_to_main_grad and torch.equal(
        plain.main_grad, torch.ones_like(plain)
    )
    torch.testing.assert_close(plain.grad, want, rtol=1e-6, atol=1e-6)
