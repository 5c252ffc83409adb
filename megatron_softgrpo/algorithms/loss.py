"""The policy loss of every algorithm (SPEC.md section 3).

Soft and discrete positions share one log-prob tensor, one mask, one advantage and one
aggregation, so the algorithms differ only in how `logp` was computed. Per position:

    r      = exp(logp - old_logp)
    policy = max(-A r, -A clip(r, 1 - ratio_clip_min, 1 + ratio_clip_max))
             and, for A < 0 with dual clip c: min(that, -A c)
    kl     = clamp(exp(ref - logp) - (ref - logp) - 1, -kl_clamp, kl_clamp)        (k3)
    loss   = policy + reference_policy_kl_penalty * kl - entropy_coef * entropy

each term aggregated over the valid positions as `aggregation` says. This is verl 0.4's
`compute_policy_loss` + `kl_penalty("low_var_kl")` + `agg_loss`, with three guards that change
no value in normal use: positions outside the mask are zeroed before any arithmetic (padding may
hold -inf), the log-ratios are clamped to +-20 before `exp` (as later verl does; an overflowing
exp would turn a zero gradient into NaN), and nothing divides 0 by 0: a row without valid
positions is not counted as a sequence (seq_mean_token_mean), a micro-batch without any gives 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_softgrpo.config.schema import LossCfg

LOG_RATIO_LIMIT = 20.0


@dataclass(frozen=True)
class LossScale:
    """Where a micro-batch sits in its optimizer step: the aggregation's normaliser.

    The data-parallel gradient all-reduce is assumed to average over the ranks. A schedule
    that itself divides each micro-batch's loss by the number of micro-batches (Megatron's
    `forward_step` does for a loss function returning two values) should pass 1 here.
    """

    num_micro_batches: int = 1  # gradient-accumulation steps (token_mean_microbatch, seq_mean_token_mean)
    global_num_tokens: int | None = None  # token_mean_global: valid positions of the whole mini-batch, all ranks
    data_parallel_size: int = 1  # token_mean_global: undoes the all-reduce's average over the ranks


@dataclass(frozen=True)
class PolicyLossMetrics:
    """Detached scalars, means over the micro-batch's valid positions (weight by num_tokens to combine)."""

    num_tokens: Tensor
    clip_frac_low: Tensor  # A < 0 and r < 1 - ratio_clip_min: the lower clip bounds the loss
    clip_frac_high: Tensor  # A > 0 and r > 1 + ratio_clip_max: the upper clip bounds the loss
    dual_clip_frac: Tensor  # A < 0 and -A c bounds the loss
    ratio_mean: Tensor
    kl_mean: Tensor | None  # None when reference_policy_kl_penalty = 0 (no reference model)
    entropy_mean: Tensor | None  # None without an entropy tensor


@dataclass(frozen=True)
class PolicyLossResult:
    loss: Tensor  # the scalar to backpropagate
    policy_loss: Tensor  # the aggregated terms, detached
    kl_loss: Tensor | None
    entropy_loss: Tensor | None
    metrics: PolicyLossMetrics


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: LossCfg,
    *,
    ref_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    scale: LossScale = LossScale(),
) -> PolicyLossResult:
    """All tensors [B, S]; `mask` marks the scored (generated) positions. Only `logp` and `entropy` carry gradient."""
    mask = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(mask, logp, zero)
    old_logp, advantages = (torch.where(mask, t.detach(), zero) for t in (old_logp, advantages))

    ratio = torch.exp(torch.clamp(logp - old_logp, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cfg.ratio_clip_min, 1 + cfg.ratio_clip_max)
    per_token = torch.maximum(unclipped, clipped)
    ratio_bound = clipped > unclipped
    negative = advantages < 0
    dual_bound = torch.zeros_like(mask)
    if cfg.ratio_clip_c is not None:
        dual = -advantages * cfg.ratio_clip_c
        dual_bound = negative & (per_token > dual)
        per_token = torch.where(negative, torch.minimum(per_token, dual), per_token)
    pg = aggregate(per_token, mask, cfg.aggregation, scale)
    loss = pg

    kl_loss = kl_mean = None
    if cfg.reference_policy_kl_penalty > 0:
        if ref_logp is None:
            raise ValueError("reference_policy_kl_penalty > 0 needs ref_logp")
        kl = k3_kl(logp, torch.where(mask, ref_logp.detach(), zero), cfg.kl_clamp)
        kl_loss = aggregate(kl, mask, cfg.aggregation, scale)
        loss = loss + cfg.reference_policy_kl_penalty * kl_loss
        kl_mean = masked_mean(kl, mask)

    entropy_loss = entropy_mean = None
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError("entropy_coef > 0 needs the per-position entropy")
    if entropy is not None:
        entropy = torch.where(mask, entropy, zero)
        entropy_loss = aggregate(entropy, mask, cfg.aggregation, scale)
        loss = loss - cfg.entropy_coef * entropy_loss
        entropy_mean = masked_mean(entropy, mask)

    metrics = PolicyLossMetrics(
        num_tokens=mask.sum(),
        clip_frac_low=masked_mean(ratio_bound & negative, mask),
        clip_frac_high=masked_mean(ratio_bound & (advantages > 0), mask),
        dual_clip_frac=masked_mean(dual_bound, mask),
        ratio_mean=masked_mean(ratio, mask),
        kl_mean=kl_mean,
        entropy_mean=entropy_mean,
    )
    return PolicyLossResult(loss, pg.detach(), _detached(kl_loss), _detached(entropy_loss), metrics)


def k3_kl(logp: Tensor, ref_logp: Tensor, clamp: float) -> Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per position, clamped to [-clamp, clamp]."""
    log_ratio = torch.clamp(ref_logp - logp, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return torch.clamp(torch.exp(log_ratio) - log_ratio - 1, -clamp, clamp)


def aggregate(values: Tensor, mask: Tensor, mode: str, scale: LossScale = LossScale()) -> Tensor:
    """Reduce [B, S] per-position values to this micro-batch's share of the loss (`mode`: LossCfg.aggregation)."""
    mask = mask.bool()
    values = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if mode == "token_mean_microbatch":
        return values.sum() / mask.sum().clamp(min=1) / scale.num_micro_batches
    if mode == "token_mean_global":
        if scale.global_num_tokens is None:
            raise ValueError("token_mean_global needs LossScale.global_num_tokens")
        return values.sum() * scale.data_parallel_size / max(scale.global_num_tokens, 1)
    if mode == "seq_mean_token_mean":
        per_row = mask.sum(dim=1)
        row_means = values.sum(dim=1) / per_row.clamp(min=1)
        return row_means.sum() / (per_row > 0).sum().clamp(min=1) / scale.num_micro_batches
    raise ValueError(f"unknown aggregation {mode!r}")


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Detached mean over the valid positions (0 when there are none)."""
    values = values.detach().float()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)
