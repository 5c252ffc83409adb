"""Plain float64 references for the soft-token math, written from docs/algorithm.md sections 1, 2 and 5.

Deliberately naive (whole vocabulary, one process, sort-based) and independent of
megatron_softgrpo.soft, which the tests compare against these.
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def by_logit(logits: torch.Tensor) -> torch.Tensor:
    """Token order: logit descending, ties by lower id."""
    return torch.sort(-logits.double(), dim=-1, stable=True).indices


def truncated_probs(logits, temperature=1.0, top_k=None, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """[N, V] -> [N, V] float64: softmax(l / T), top-k renormalised, top-p on it, min-p, renormalised."""
    l = logits.double()
    order = by_logit(l)
    p = torch.softmax(l / temperature, dim=-1).gather(-1, order)
    keep = torch.ones_like(p, dtype=torch.bool)
    if top_k is not None:
        keep[:, top_k:] = False
    q = p * keep
    q = q / q.sum(-1, keepdim=True)
    if top_p < 1:
        mass_before = torch.cat([torch.zeros_like(q[:, :1]), q.cumsum(-1)[:, :-1]], dim=-1)
        keep &= mass_before < top_p
    if min_p > 0:
        keep &= q >= min_p * q[:, :1]
    q = p * keep
    q = q / q.sum(-1, keepdim=True)
    return torch.zeros_like(q).scatter(-1, order, q)


def soft_slots(logits, K, **truncation):
    """(ids, pt, support) of the top-K slots: ids by logit, pt the renormalised truncated mass."""
    ids = by_logit(logits)[:, :K]
    q = truncated_probs(logits, **truncation).gather(-1, ids)
    return ids, q / q.sum(-1, keepdim=True), q > 0


def sort_slots(weights, support, *per_slot):
    """Slots by weight descending, out-of-support last (stable)."""
    key = torch.where(support, weights.double(), torch.full_like(weights.double(), NEG_INF))
    order = torch.sort(-key, dim=-1, stable=True).indices
    return [t.gather(-1, order) for t in (weights, support, *per_slot)]


def masked_mean(values, mask):
    m = mask.double()
    return (values * m).sum(-1) / m.sum(-1).clamp(min=1)


def support_softmax(k_logits, support, temperature):
    return torch.softmax(torch.where(support, k_logits.double() / temperature, NEG_INF), dim=-1)


# ------------------------------------------------------------------ densities (docs/algorithm.md sections 2 and 5)


def discrete_log_prob(logits, tokens, temperature, vocab_size):
    lp = torch.log_softmax(logits.double()[:, :vocab_size] / temperature, dim=-1)
    return lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def gumbel_density(k_logits, support, g, temperature):
    lam = torch.log(support_softmax(k_logits, support, temperature) + 1e-6)
    z = (g.double() - lam).clamp(-1.5, 3)
    return masked_mean(-z - torch.exp(-z), lam > -3)


def gaussian_density(k_logits, support, x, temperature, sigma):
    pt = support_softmax(k_logits, support, temperature)
    xc = torch.minimum(torch.maximum(x.double(), pt - 3 * sigma), pt + 3 * sigma)
    log_n = -((xc - pt) ** 2) / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))
    return masked_mean(log_n, (pt > 0.05) & support)


def dirichlet_density(k_logits, support, x, temperature):
    pt = support_softmax(k_logits, support, temperature)
    out = torch.zeros(pt.shape[0], dtype=torch.float64)
    for n in range(pt.shape[0]):  # per slot, with torch.distributions, where in support, pt > 0.05
        one = torch.tensor(1.0, dtype=torch.float64)
        terms = [
            torch.distributions.Gamma(pt[n, k], one).log_prob(x[n, k].double()).clamp(-5, 3)
            for k in range(pt.shape[1])
            if support[n, k] and pt[n, k] > 0.05
        ]
        out[n] = torch.stack(terms).mean() if terms else 0.0  # no slot in the mask: 0
    return out


def embedding_density(k_logits, support, weights, eps, table_rows, temperature, sigma):
    """-|x - mu|^2 / (2 sigma^2), x = sum w E + sigma eps, mu = sum pt E (table_rows [N, K, h])."""
    pt = support_softmax(k_logits, support, temperature)
    x = torch.einsum("nk,nkh->nh", weights.double(), table_rows.double()) + sigma * eps.double()
    mu = torch.einsum("nk,nkh->nh", pt, table_rows.double())
    return -((x - mu) ** 2).sum(-1) / (2 * sigma**2)


# ------------------------------------------------------------------ counter-based normals, in Python ints


def _lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def gaussian_from_seed(seed: int, dim: int) -> list[float]:
    lo, hi = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    a = _lowbias32(lo ^ _lowbias32(hi))
    b = _lowbias32(hi ^ _lowbias32(lo ^ 0x9E3779B9))
    out = []
    for d in range(dim):
        c = _lowbias32(d)
        u1 = ((_lowbias32(a ^ c) >> 8) + 1) / 2**24
        u2 = ((_lowbias32(b ^ c) >> 8) + 1) / 2**24
        out.append(math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2))
    return out
