"""The policy loss of every algorithm (docs/algorithm.md section 3).

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

`token_terms` gives the per-position terms and `aggregation_weights` the aggregation as
per-position weights. `PolicyLoss` is what the policy worker is handed (NeMo-RL's
`policy.train(data, loss_fn)`): per micro-batch, a per-position objective that the worker's fused
chunked pass sums as it scores positions (`soft.objective_from_hidden`), and the step's metrics
as named sums that the worker adds up by key without knowing what they are. `policy_loss` is
the same loss on one [B, S] batch, whose metrics have the same names (`position_metrics`).
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

    num_micro_batches: int = (
        1  # gradient-accumulation steps (token_mean_microbatch, seq_mean_token_mean)
    )
    global_num_tokens: int | None = (
        None  # token_mean_global: valid positions of the whole mini-batch, all ranks
    )
    data_parallel_size: int = 1  # token_mean_global: undoes the all-reduce's average over the ranks


@dataclass(frozen=True)
class PolicyLossResult:
    loss: Tensor  # the scalar to backpropagate
    policy_loss: Tensor  # the aggregated terms, detached
    kl_loss: Tensor | None
    entropy_loss: Tensor | None
    metrics: dict[str, Tensor]  # the worker's metrics (`position_metrics`), means over the mask


@dataclass(frozen=True)
class TokenTerms:
    """The loss terms of each position, before aggregation ([B, S] or [n]); 0 outside the mask."""

    policy: Tensor
    kl: Tensor | None  # None when reference_policy_kl_penalty = 0
    entropy: Tensor | None
    ratio: Tensor
    ratio_bound: Tensor  # the clipped ratio bounds the loss
    dual_bound: Tensor  # A < 0 and -A c bounds the loss

    def objective(self, cfg: LossCfg) -> Tensor:
        """policy + reference_policy_kl_penalty * kl - entropy_coef * entropy, per position."""
        out = self.policy
        if self.kl is not None:
            out = out + cfg.reference_policy_kl_penalty * self.kl
        if self.entropy is not None:
            out = out - cfg.entropy_coef * self.entropy
        return out


def token_terms(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: LossCfg,
    *,
    ref_logp: Tensor | None = None,
    entropy: Tensor | None = None,
) -> TokenTerms:
    """Each position's terms; tensors of one shape, `mask` marking the scored positions. Only `logp`
    and `entropy` carry gradient."""
    mask = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(mask, logp, zero)
    old_logp, advantages = (torch.where(mask, t.detach(), zero) for t in (old_logp, advantages))

    ratio = torch.exp(torch.clamp(logp - old_logp, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cfg.ratio_clip_min, 1 + cfg.ratio_clip_max)
    policy = torch.maximum(unclipped, clipped)
    ratio_bound = clipped > unclipped
    dual_bound = torch.zeros_like(mask)
    if cfg.ratio_clip_c is not None:
        negative = advantages < 0
        dual = -advantages * cfg.ratio_clip_c
        dual_bound = negative & (policy > dual)
        policy = torch.where(negative, torch.minimum(policy, dual), policy)

    kl = None
    if cfg.reference_policy_kl_penalty > 0:
        if ref_logp is None:
            raise ValueError("reference_policy_kl_penalty > 0 needs ref_logp")
        kl = torch.where(
            mask, k3_kl(logp, torch.where(mask, ref_logp.detach(), zero), cfg.kl_clamp), zero
        )
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError("entropy_coef > 0 needs the per-position entropy")
    if entropy is not None:
        entropy = torch.where(mask, entropy, zero)
    return TokenTerms(
        torch.where(mask, policy, zero), kl, entropy, ratio, ratio_bound & mask, dual_bound & mask
    )


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
    terms = token_terms(logp, old_logp, advantages, mask, cfg, ref_logp=ref_logp, entropy=entropy)
    pg = aggregate(terms.policy, mask, cfg.aggregation, scale)
    loss = pg

    kl_loss = None
    if terms.kl is not None:
        kl_loss = aggregate(terms.kl, mask, cfg.aggregation, scale)
        loss = loss + cfg.reference_policy_kl_penalty * kl_loss

    entropy_loss = None
    if terms.entropy is not None:
        entropy_loss = aggregate(terms.entropy, mask, cfg.aggregation, scale)
        loss = loss - cfg.entropy_coef * entropy_loss

    advantages = torch.where(mask, advantages.detach(), 0.0)
    metrics = {k: masked_mean(v, mask) for k, v in position_metrics(terms, advantages).items()}
    return PolicyLossResult(loss, pg.detach(), _detached(kl_loss), _detached(entropy_loss), metrics)


def position_metrics(terms: TokenTerms, advantages: Tensor) -> dict[str, Tensor]:
    """The per-position values behind each reported mean, under its `metrics.jsonl` name."""
    bound = terms.ratio_bound
    metrics = {
        "clip_fraction": bound & (advantages != 0),
        "clip_fraction/low": bound & (advantages < 0),  # r < 1 - ratio_clip_min bounds the loss
        "clip_fraction/high": bound & (advantages > 0),  # r > 1 + ratio_clip_max bounds it
        "dual_clip_fraction": terms.dual_bound,  # A < 0 and -A c bounds it
        "ratio/mean": terms.ratio,
    }
    if terms.kl is not None:  # reference_policy_kl_penalty > 0
        metrics["kl/mean"] = terms.kl
    if terms.entropy is not None:
        metrics["entropy/mean"] = terms.entropy
    return metrics


@dataclass(frozen=True)
class StepShape:
    """How the policy worker runs one optimizer step, which the loss normalises for: the schedule
    divides each micro-batch's returned loss by `num_micro_batches` and DDP averages the gradients
    over `data_parallel_size` ranks; `num_tokens` counts the scored positions of the whole
    mini-batch (all ranks)."""

    num_micro_batches: int
    data_parallel_size: int
    num_tokens: int


class PolicyLoss:
    """The policy loss as the policy worker takes it (LossCfg decides everything)."""

    def __init__(self, cfg: LossCfg):
        self.cfg = cfg

    @property
    def needs_entropy(self) -> bool:
        """The objective reads each scored position's entropy (the worker computes it)."""
        return self.cfg.entropy_coef > 0

    def micro_batch(
        self,
        loss_mask: Tensor,
        at: tuple[Tensor, Tensor],
        old_logp: Tensor,
        advantages: Tensor,
        ref_logp: Tensor | None,
        step: StepShape,
    ) -> MicroBatchLoss:
        """The objective of one micro-batch's scored positions `at` (indices into its [b, s]
        `loss_mask` and the record-aligned tensors)."""
        scale = LossScale(
            global_num_tokens=step.num_tokens, data_parallel_size=step.data_parallel_size
        )
        weights = aggregation_weights(loss_mask, self.cfg.aggregation, scale)[at].float()
        if self.cfg.aggregation == "token_mean_global":
            # normalised over the whole mini-batch already: undo the schedule's division
            weights = weights * step.num_micro_batches
        ref = None if ref_logp is None else ref_logp[at]
        return MicroBatchLoss(self.cfg, weights, old_logp[at], advantages[at], ref)

    def report(self, sums: dict[str, float], step: StepShape) -> dict[str, float]:
        """The step's metrics from `MicroBatchLoss.metrics` summed over its micro-batches and
        ranks: the loss terms as the update descends them (the schedule's mean over micro-batches,
        DDP's over ranks), the rest as means over the step's scored positions."""
        per_step = step.num_micro_batches * step.data_parallel_size
        tokens = max(step.num_tokens, 1)
        return {k: v / (per_step if k in _LOSS_TERMS else tokens) for k, v in sums.items()}

    def zero_metrics(self, device) -> dict[str, Tensor]:
        """Every metric this loss reports, at zero (a micro-batch that scores nothing)."""
        empty = torch.zeros(0, device=device)
        ref = empty if self.cfg.reference_policy_kl_penalty > 0 else None
        return MicroBatchLoss(self.cfg, empty, empty, empty, ref).metrics


_LOSS_TERMS = ("loss", "policy_loss")  # aggregated by the loss's weights; the rest are means


class MicroBatchLoss:
    """One micro-batch's scored positions [n], called chunk by chunk by the fused pass: returns each
    position's weighted objective, and adds the chunk's detached terms to `metrics`.

    A metric is a sum over this micro-batch's positions (detached, float64), which the worker adds
    up over the step's micro-batches and ranks and `PolicyLoss.report` normalises: the loss terms
    by the step's shape, the rest by its scored positions. A new metric is one entry in
    `position_metrics`."""

    def __init__(
        self,
        cfg: LossCfg,
        weights: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        ref_logp: Tensor | None,
    ):
        self.cfg, self.weights = cfg, weights
        self.old_logp, self.advantages, self.ref_logp = old_logp, advantages, ref_logp
        none = slice(0, 0)  # the metrics' names, at zero: the same sums over no positions
        entropy = old_logp[none] if cfg.entropy_coef > 0 else None
        self.metrics: dict[str, Tensor] = self._sums(old_logp[none], entropy, none)[1]

    def __call__(self, logp: Tensor, entropy: Tensor | None, positions: slice) -> Tensor:
        weighted, sums = self._sums(logp, entropy, positions)
        for name, value in sums.items():
            self.metrics[name] = self.metrics[name] + value
        return weighted

    def _sums(self, logp, entropy, positions: slice) -> tuple[Tensor, dict[str, Tensor]]:
        advantages = self.advantages[positions]
        terms = token_terms(
            logp,
            self.old_logp[positions],
            advantages,
            torch.ones_like(advantages, dtype=torch.bool),  # every position given is scored
            self.cfg,
            ref_logp=None if self.ref_logp is None else self.ref_logp[positions],
            entropy=entropy,
        )
        weights = self.weights[positions]
        weighted = weights * terms.objective(self.cfg)
        sums = {
            "loss": weighted,  # what the update descends (a _LOSS_TERMS entry)
            "policy_loss": weights * terms.policy,
            **position_metrics(terms, advantages),
        }
        return weighted, {k: v.detach().double().sum() for k, v in sums.items()}


def k3_kl(logp: Tensor, ref_logp: Tensor, clamp: float) -> Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per position, clamped to [-clamp, clamp]."""
    log_ratio = torch.clamp(ref_logp - logp, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return torch.clamp(torch.exp(log_ratio) - log_ratio - 1, -clamp, clamp)


def aggregation_weights(mask: Tensor, mode: str, scale: LossScale = LossScale()) -> Tensor:
    """Each position's weight in the aggregate [B, S] (float64, 0 outside the mask): `aggregate(v)` is
    sum(weights * v), so a caller can also sum per-position terms as it computes them."""
    mask = mask.bool()
    valid = mask.double()
    if mode == "token_mean_microbatch":
        return valid / mask.sum().clamp(min=1) / scale.num_micro_batches
    if mode == "token_mean_global":
        if scale.global_num_tokens is None:
            raise ValueError("token_mean_global needs LossScale.global_num_tokens")
        return valid * scale.data_parallel_size / max(scale.global_num_tokens, 1)
    if mode == "seq_mean_token_mean":
        per_row = mask.sum(dim=1, keepdim=True)
        return (
            valid
            / per_row.clamp(min=1)
            / (per_row > 0).sum().clamp(min=1)
            / scale.num_micro_batches
        )
    raise ValueError(f"unknown aggregation {mode!r}")


def aggregate(values: Tensor, mask: Tensor, mode: str, scale: LossScale = LossScale()) -> Tensor:
    """Reduce [B, S] per-position values to this micro-batch's share of the loss (`mode`: LossCfg.aggregation)."""
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return (
        aggregation_weights(mask, mode, scale).to(values.dtype)
        * torch.where(mask.bool(), values, zero)
    ).sum()


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Detached mean over the valid positions (0 when there are none)."""
    values = values.detach().float()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)
