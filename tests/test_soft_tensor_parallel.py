"""TP=2 (two CPU ranks, gloo) equals TP=1: samplers (Multiplex Thinking's too), log-densities, the entropy term's entropies, the
fused per-position objective and their gradients (also under sequence parallelism)."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from distributed_helpers import run_ranks

from megatron_softgrpo.distributed import ParallelLayout, init_distributed
from megatron_softgrpo.soft import (
    DirichletNoise,
    DiscreteSampler,
    EmbeddingNoise,
    GaussianNoise,
    GumbelNoise,
    InputEmbedding,
    MixtureRecord,
    MultiplexSampler,
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

VOCAB, PADDED, HIDDEN, ROWS = 1000, 1024, 16, 24
NOISES = {
    "gumbel": GumbelNoise(tau=0.1),
    "gaussian": GaussianNoise(sigma=0.05),
    "dirichlet": DirichletNoise(),
    "embedding_noise": EmbeddingNoise(sigma=0.1, hidden_size=HIDDEN),
}
SAMPLERS = {
    "discrete": DiscreteSampler(
        Truncation(temperature=0.9), 5
    ),  # the whole vocabulary: sharded inverse CDF
    "discrete_top_p": DiscreteSampler(Truncation(top_p=0.9), 5),  # adaptive candidates
    "discrete_top_k": DiscreteSampler(Truncation(top_k=20, top_p=0.95, min_p=0.01), 5),
    "greedy": DiscreteSampler(Truncation.greedy(), 5),
    "gumbel": SoftSampler(Truncation(top_k=5, top_p=0.95), 5, NOISES["gumbel"]),
    "gumbel_k30_top_p": SoftSampler(Truncation(temperature=1.2, top_p=0.9), 30, NOISES["gumbel"]),
    "gaussian": SoftSampler(Truncation(top_k=5, top_p=0.95), 5, NOISES["gaussian"]),
    "dirichlet": SoftSampler(Truncation(top_k=5, top_p=0.95), 5, NOISES["dirichlet"]),
    "embedding_noise": SoftSampler(Truncation(top_k=8, top_p=0.9), 5, NOISES["embedding_noise"]),
    "multiplex": MultiplexSampler(Truncation(temperature=0.8, top_p=0.9), 3),  # candidates
    "multiplex_whole": MultiplexSampler(Truncation(), 4, uniform=True),  # sharded inverse CDF
}


def scorer(name):
    return Scorer(NOISES[name], soft_temperature=0.8, discrete_temperature=1.1)


def make_inputs():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(ROWS, PADDED, generator=gen) * 2
    logits[0] = 0.0
    logits[0, [600, 100]] = 5.0  # ties across the shard boundary: lower ids first
    logits[:, VOCAB:] = 40.0  # padding junk
    hidden = torch.randn(6, 4, HIDDEN, generator=gen)  # [s, b, h]: 24 positions
    weight = torch.randn(PADDED, HIDDEN, generator=gen) * 0.4
    table = torch.randn(PADDED, HIDDEN, generator=gen)
    coef = torch.randn(4, 6, generator=gen)
    rows = {}
    for name in NOISES:  # mixed records from a drifted policy (away from the Gumbel clamp kinks)
        drifted = logits + 0.5 * torch.randn(logits.shape, generator=gen)
        seed_noise_rng(3)
        soft = SAMPLERS[name].sample(drifted, VocabShard.whole(PADDED, VOCAB))
        discrete = SAMPLERS["discrete"].sample(drifted, VocabShard.whole(PADDED, VOCAB))
        mixed = soft.where(torch.arange(ROWS) % 3 != 0, discrete)
        rows[name] = MixtureRecord(
            **{k: v for k, v in asdict(mixed).items() if k != "log_density"}
        ).map(lambda t: t.reshape(4, 6, *t.shape[1:]))
    return logits, hidden, weight, table, coef, rows


def compute(shard: VocabShard, logits, hidden, weight, table, coef, rows):
    """Everything compared across TP sizes, on this rank's shard."""
    cols = slice(shard.start, shard.end)
    out = {}
    for name, sampler in SAMPLERS.items():
        seed_noise_rng(11)
        out[f"sample/{name}"] = asdict(sampler.sample(logits[:, cols], shard))
    emb = InputEmbedding(table[cols], shard)
    for name in NOISES:
        local = logits[:, cols].reshape(4, 6, -1).clone().requires_grad_()
        logp = log_density_from_logits(local, rows[name], scorer(name), shard, emb)
        (coef * logp).sum().backward()
        h, w = hidden.clone().requires_grad_(), weight[cols].clone().requires_grad_()
        chunked = log_density_from_hidden(
            h, w, rows[name], scorer(name), shard, chunk_size=7, embedding=emb
        )
        (coef * chunked).sum().backward()
        # under sequence parallelism each rank holds its slice of the positions
        part = hidden.shape[0] // shard.world_size
        h_sp = hidden[shard.rank * part : (shard.rank + 1) * part].clone().requires_grad_()
        sp = log_density_from_hidden(
            h_sp,
            weight[cols],
            rows[name],
            scorer(name),
            shard,
            chunk_size=7,
            embedding=emb,
            sequence_parallel=True,
        )
        (coef * sp).sum().backward()
        out[f"density/{name}"] = dict(
            logp=logp.detach(),
            grad_logits=local.grad,
            chunked=chunked.detach(),
            grad_hidden=h.grad,
            grad_weight=w.grad,
            sequence_parallel=sp.detach(),
            grad_hidden_sp=h_sp.grad,
        )
    out["entropy/gumbel"] = _entropy(
        shard, hidden, weight[cols], coef, rows["gumbel"], InputEmbedding(table[cols], shard)
    )
    return out


def _entropy(shard: VocabShard, hidden, weight, coef, rows, emb):
    """Log-densities and entropies from hidden states, with and without sequence parallelism, and the
    gradients of a mix of both."""
    out = {}
    part = hidden.shape[0] // shard.world_size
    for label, h, sp in (
        ("", hidden, False),
        ("_sp", hidden[shard.rank * part : (shard.rank + 1) * part], True),
    ):
        h, w = h.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, entropy = log_density_and_entropy_from_hidden(
            h, w, rows, scorer("gumbel"), shard, chunk_size=7, embedding=emb, sequence_parallel=sp
        )
        (coef * logp + coef.flip(-1) * entropy).sum().backward()
        out |= {
            f"logp{label}": logp.detach(),
            f"entropy{label}": entropy.detach(),
            f"grad_hidden{label}": h.grad,
            f"grad_weight{label}": w.grad,
        }
        # the same (linear) objective, fused: its gradient taken in the forward
        flat_ell, flat_entropy = coef.reshape(-1), coef.flip(-1).reshape(-1)
        h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        fused = objective_from_hidden(
            h,
            w,
            rows,
            scorer("gumbel"),
            shard,
            lambda e, H, at: flat_ell[at] * e + flat_entropy[at] * H,
            True,
            chunk_size=7,
            embedding=emb,
            sequence_parallel=sp,
        )
        fused.value.backward()
        out |= {
            f"fused_value{label}": fused.value.detach(),
            f"fused_logp{label}": fused.logp,
            f"grad_hidden_fused{label}": h.grad,
            f"grad_weight_fused{label}": w.grad,
        }
    return out


def _rank(rank, inputs):
    parallel = init_distributed(ParallelLayout(2, 1))
    return compute(VocabShard.of_group(PADDED, VOCAB, parallel.groups.tp), *inputs)


# per-rank slices: vocabulary or sequence
SHARDED = {
    "grad_logits": -1,
    "grad_weight": 0,
    "grad_weight_sp": 0,
    "grad_hidden_sp": 0,
    "grad_weight_fused": 0,
    "grad_weight_fused_sp": 0,
    "grad_hidden_fused_sp": 0,
}


@pytest.mark.multiproc
def test_tensor_parallel_2_equals_1():
    inputs = make_inputs()
    single = compute(VocabShard.whole(PADDED, VOCAB), *inputs)
    ranks = run_ranks(2, _rank, inputs)
    for key, expected in single.items():
        for field, value in expected.items():
            if field in SHARDED:
                got = torch.cat([r[key][field] for r in ranks], dim=SHARDED[field])
            else:
                assert all(torch.equal(ranks[0][key][field], r[key][field]) for r in ranks), (
                    key,
                    field,
                )
                got = ranks[0][key][field]
            if value.dtype in (torch.int64, torch.bool):
                assert torch.equal(got, value), (key, field)
            else:
                scale = value.abs().max().clamp(min=1)
                assert (got - value).abs().max() <= 1e-5 * scale, (key, field)
    gumbel = single["sample/gumbel"]
    assert sorted(gumbel["mix_ids"][0, :2].tolist()) == [100, 600] and gumbel["mix_ids"][
        0, 2:
    ].tolist() == [0, 1, 2]
    assert all(
        r["density/gumbel"]["grad_weight"].abs().sum() > 0 for r in ranks
    )  # both shards get gradient
    entropy = single["entropy/gumbel"]
    assert torch.equal(
        entropy["logp"], single["density/gumbel"]["chunked"]
    )  # the log-densities are unchanged
    assert bool((entropy["entropy"] > 0).all()) and all(
        r["entropy/gumbel"]["grad_weight"].abs().sum() > 0 for r in ranks
    )
    for label in ("", "_sp"):  # fused == scores then autograd, at TP=1 (TP=2 equals TP=1 above)
        assert torch.equal(entropy[f"fused_logp{label}"], entropy[f"logp{label}"])
        for grad in ("grad_hidden", "grad_weight"):
            want = entropy[f"{grad}{label}"]
            assert (entropy[f"{grad}_fused{label}"] - want).abs().max() <= 1e-5 * want.abs().max()
