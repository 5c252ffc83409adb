"""The policy loss of every algorithm (docs/algorithm.md section 3).

Soft and discrete positions share one log-prob tensor, one mask, one advantage and one
aggregation, so the algorithms differ only in how `logp` was computed. Per position:

    r      = exp(logp - old_logp)
    policy = max(-A r, -A clip(r, 1 - ratio_clip_min, 1 + ratio_clip_max))
             and, for A < 0 with dual clip c: min(that, -A c)
             (use_cispo: -A sg(clip(r, 1 - ratio_clip_min, 1 + ratio_clip_max)) logp)
             times, with use_importance_sampling_correction, the detached rollout-correction
             weight w = exp(old_logp - rollout_logp), truncated as the loss says
             (`rollout_correction`)
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
as named sums that the worker adds up by key without knowing what they are (or, for a name
ending in /min or /max, reduces by that: `metric_reduction`). `policy_loss` is the same loss on
one [B, S] batch, whose metrics have the same names and values (`position_metrics`,
`correction_metrics`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from megatron_softgrpo.config.schema import LossCfg

LOG_RATIO_LIMIT = 20.0
F64 = torch.float64


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
    ratio_bound: Tensor  # the clipped ratio bounds the loss (CISPO: the IS weight is clipped)
    dual_bound: Tensor  # A < 0 and -A c bounds the loss
    clip_low: Tensor  # the bound 1 - ratio_clip_min is the one that binds
    clip_high: Tensor  # the bound 1 + ratio_clip_max is the one that binds

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
    is_weight: Tensor | None = None,
    response: Tensor | None = None,
) -> TokenTerms:
    """Each position's terms; tensors of one shape, `mask` marking the scored positions. Only `logp`
    and `entropy` carry gradient. `is_weight`: the rollout correction's weight of each position
    (`rollout_correction`), a factor of its policy term. `response`: each position's response
    (an integer id) for GSPO's ratio, which then reads every position of a response."""
    mask = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(mask, logp, zero)
    old_logp, advantages = (torch.where(mask, t.detach(), zero) for t in (old_logp, advantages))

    log_ratio = torch.clamp(logp - old_logp, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    if cfg.sequence_level_importance_ratios:  # GSPO: the geometric mean over the response
        if response is None:
            raise ValueError("sequence_level_importance_ratios needs each position's response")
        log_ratio = _response_mean(log_ratio, response, mask)
    ratio = torch.exp(log_ratio)
    low, high = 1 - cfg.ratio_clip_min, 1 + cfg.ratio_clip_max
    dual_bound = torch.zeros_like(mask)
    if cfg.use_cispo:
        # the IS weight is clipped and detached, never the term: every position keeps the
        # gradient -A sg(clip(r)) grad(logp) (MiniMax-M1's CISPO)
        policy = -advantages * torch.clamp(ratio, low, high).detach() * logp
        clip_low, clip_high = ratio < low, ratio > high
    else:
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, low, high)
        policy = torch.maximum(unclipped, clipped)
        bound = clipped > unclipped
        clip_low, clip_high = bound & (advantages < 0), bound & (advantages > 0)
        if cfg.ratio_clip_c is not None:
            negative = advantages < 0
            dual = -advantages * cfg.ratio_clip_c
            dual_bound = negative & (policy > dual)
            policy = torch.where(negative, torch.minimum(policy, dual), policy)
    if is_weight is not None:
        policy = policy * torch.where(mask, is_weight.detach(), zero)

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
    clip_low, clip_high = clip_low & mask, clip_high & mask
    return TokenTerms(
        torch.where(mask, policy, zero),
        kl,
        entropy,
        ratio,
        clip_low | clip_high,
        dual_bound & mask,
        clip_low,
        clip_high,
    )


def _response_mean(values: Tensor, response: Tensor, mask: Tensor) -> Tensor:
    """Each position's value replaced by the mean of `values` over its response's positions of
    `mask` (differentiable in `values`)."""
    ids, keep = response.flatten().long(), mask.flatten()
    n = int(ids.max()) + 1 if ids.numel() else 0
    flat = torch.where(keep, values.flatten(), 0.0)
    sums = flat.new_zeros(n).index_add(0, ids, flat)
    counts = flat.new_zeros(n).index_add(0, ids, keep.to(flat.dtype))
    return (sums / counts.clamp(min=1))[ids].view(values.shape)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: LossCfg,
    *,
    ref_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    rollout_logp: Tensor | None = None,
    is_soft: Tensor | None = None,
    scale: LossScale = LossScale(),
) -> PolicyLossResult:
    """All tensors [B, S] (a row is one response); `mask` marks the scored (generated) positions.
    Only `logp` and `entropy` carry gradient. `rollout_logp` is needed with the rollout correction;
    `is_soft` (the records' flag; default: none soft) splits its metrics by the kind of step."""
    mask = mask.bool()
    correction = _correction(old_logp, rollout_logp, mask, cfg)
    terms = token_terms(
        logp,
        old_logp,
        advantages,
        mask,
        cfg,
        ref_logp=ref_logp,
        entropy=entropy,
        is_weight=None if correction is None else correction.weight,
        response=torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask),
    )
    agg = functools.partial(
        aggregate, mask=mask, mode=cfg.aggregation, scale=scale, norm=cfg.loss_scale_factor
    )
    pg = agg(terms.policy)
    loss = pg

    kl_loss = None
    if terms.kl is not None:
        kl_loss = agg(terms.kl)
        loss = loss + cfg.reference_policy_kl_penalty * kl_loss

    entropy_loss = None
    if terms.entropy is not None:
        entropy_loss = agg(terms.entropy)
        loss = loss - cfg.entropy_coef * entropy_loss

    advantages = torch.where(mask, advantages.detach(), 0.0)
    values = position_metrics(terms, advantages)
    if correction is not None:
        soft = torch.zeros_like(mask) if is_soft is None else is_soft.bool()
        values |= correction_metrics(correction, soft)
    sums = {k: reduced(v, mask, metric_reduction(k)) for k, v in values.items()}
    metrics = {k: torch.tensor(v, dtype=F64) for k, v in normalised(sums, int(mask.sum())).items()}
    return PolicyLossResult(loss, pg.detach(), _detached(kl_loss), _detached(entropy_loss), metrics)


def position_metrics(terms: TokenTerms, advantages: Tensor) -> dict[str, Tensor]:
    """The per-position values behind each reported mean, under its `metrics.jsonl` name."""
    moving = advantages != 0  # a bound only matters where the term has a gradient to stop
    metrics = {
        "clip_fraction": terms.ratio_bound & moving,
        "clip_fraction/low": terms.clip_low & moving,  # r < 1 - ratio_clip_min bounds the loss
        "clip_fraction/high": terms.clip_high & moving,  # r > 1 + ratio_clip_max bounds it
        "dual_clip_fraction": terms.dual_bound,  # A < 0 and -A c bounds it
        "ratio/mean": terms.ratio,
    }
    if terms.kl is not None:  # reference_policy_kl_penalty > 0
        metrics["kl/mean"] = terms.kl
    if terms.entropy is not None:
        metrics["entropy/mean"] = terms.entropy
    return metrics


# ---------------------------------------------------------------- rollout correction


@dataclass(frozen=True)
class RolloutCorrection:
    """The rollout correction of each position ([B, S], or the scored positions [n]), detached."""

    weight: Tensor  # the factor of the policy term: w after truncation
    raw: Tensor  # w = exp(old_logp - rollout_logp)
    log_ratio: Tensor  # old_logp - rollout_logp
    truncated: Tensor  # bool: the truncation changed w (clamped, or zeroed with its row)

    def at(self, index) -> RolloutCorrection:
        """The positions `index` (e.g. a micro-batch's scored ones, flattened)."""
        return RolloutCorrection(*(getattr(self, f.name)[index] for f in fields(self)))


def rollout_correction(
    old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, cfg: LossCfg
) -> RolloutCorrection:
    """w = exp(old_logp - rollout_logp) of every position of `mask` in [B, S] (rows are responses;
    0 elsewhere), truncated to [truncated_importance_sampling_ratio_min,
    truncated_importance_sampling_ratio] as `truncated_importance_sampling_type` says when the
    upper bound is set: tis clamps w, icepop zeroes the positions outside, seq-mask-tis zeroes
    the rows whose geometric-mean w (over their positions of `mask`) is outside. Per-slot
    log-densities [B, S, K] count each slot of `mask` [B, S, K] as a position of its row."""
    if old_logp.dim() > 2:
        rows = old_logp.shape[0]
        flat = rollout_correction(
            *(t.reshape(rows, -1) for t in (old_logp, rollout_logp, mask)), cfg
        )
        return RolloutCorrection(*(getattr(flat, f.name).view(mask.shape) for f in fields(flat)))
    mask = mask.bool()
    zero = torch.zeros((), dtype=old_logp.dtype, device=old_logp.device)
    log_ratio = torch.where(mask, (old_logp - rollout_logp).detach(), zero)
    raw = torch.where(mask, _exp(log_ratio), zero)
    hi, lo = cfg.truncated_importance_sampling_ratio, cfg.truncated_importance_sampling_ratio_min
    kind = cfg.truncated_importance_sampling_type
    if hi is None:
        return RolloutCorrection(raw, raw, log_ratio, torch.zeros_like(mask))
    if kind == "tis":
        weight = torch.clamp(raw, lo, hi)
        truncated = (raw < lo) | (raw > hi)
    elif kind == "icepop":
        truncated = (raw < lo) | (raw > hi)
        weight = torch.where(truncated, zero, raw)
    elif kind == "seq-mask-tis":
        count = mask.sum(dim=-1, keepdim=True)
        geo_mean = _exp(log_ratio.sum(dim=-1, keepdim=True) / count.clamp(min=1))
        truncated = ((geo_mean < lo) | (geo_mean > hi)).expand_as(mask)
        weight = torch.where(truncated, zero, raw)
    else:
        raise ValueError(f"unknown truncated_importance_sampling_type {kind!r}")
    return RolloutCorrection(torch.where(mask, weight, zero), raw, log_ratio, truncated & mask)


def _exp(log_ratio: Tensor) -> Tensor:
    return torch.exp(torch.clamp(log_ratio, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))


def _correction(
    old_logp: Tensor, rollout_logp: Tensor | None, mask: Tensor, cfg: LossCfg
) -> RolloutCorrection | None:
    if not cfg.use_importance_sampling_correction:
        return None
    if rollout_logp is None:
        raise ValueError("loss_fn.use_importance_sampling_correction needs the rollout's logp")
    return rollout_correction(old_logp, rollout_logp, mask, cfg)


STEP_KINDS = ("soft", "discrete")  # the correction's metrics, also by the kind of step


def correction_metrics(c: RolloutCorrection, is_soft: Tensor) -> dict[str, Tensor]:
    """The per-position values behind the correction's metrics, over every scored position and
    over its soft and discrete ones (`/soft`, `/discrete`; positions/<kind> counts them). A value
    outside its kind is the reduction's identity. gen_kl is the k3 estimate of KL(rollout || old)
    (NeMo-RL's), exp(d) - d - 1 with d = old_logp - rollout_logp: >= 0, and 0 iff they agree."""
    gen_kl = c.raw - c.log_ratio - 1
    out: dict[str, Tensor] = {}
    for kind, keep in (("", torch.ones_like(is_soft)), ("/soft", is_soft), ("/discrete", ~is_soft)):
        out[f"is_weight{kind}/mean"] = torch.where(keep, c.raw, 0.0)
        out[f"is_weight{kind}/min"] = torch.where(keep, c.raw, math.inf)
        out[f"is_weight{kind}/max"] = torch.where(keep, c.raw, -math.inf)
        out[f"is_weight{kind}/truncated_fraction"] = c.truncated & keep
        out[f"gen_kl{kind}"] = torch.where(keep, gen_kl, 0.0)
        if kind:
            out[f"positions{kind}"] = keep
    return out


# ---------------------------------------------------------------- metric reductions


def metric_reduction(name: str) -> str:
    """How a metric combines over positions, micro-batches and ranks, by its name: "min" and
    "max" for names ending so, else "sum" (a mean once `normalised`)."""
    last = name.rsplit("/", 1)[-1]
    return last if last in ("min", "max") else "sum"


def reduced(values: Tensor, mask: Tensor, how: str) -> Tensor:
    """The float64 sum, min or max of `values` over `mask` (min over nothing: +inf; max: -inf)."""
    identity = {"sum": 0.0, "min": math.inf, "max": -math.inf}[how]
    picked = torch.where(mask.bool(), values.detach().double(), identity).flatten()
    if how == "sum":
        return picked.sum()
    picked = torch.cat([picked, picked.new_full((1,), identity)])  # defined for no positions
    return picked.amin() if how == "min" else picked.amax()


_LOSS_TERMS = ("loss", "policy_loss")  # aggregated by the loss's weights; the rest are means


def normalised(sums: dict, num_tokens: int, loss_divisor: float = 1.0) -> dict[str, float]:
    """The reported metrics from their reductions over a step's (or batch's) scored positions: the
    loss terms divided by `loss_divisor`, other sums by the number of positions they run over (of
    their kind, for a /soft or /discrete name; positions/<kind> is that count and not reported),
    a min or max over no position as NaN (null in metrics.jsonl)."""
    out = {}
    for name, value in sums.items():
        value = float(value)
        parts = name.split("/")
        if parts[0] == "positions":
            continue
        how = metric_reduction(name)
        if how != "sum":
            out[name] = value if math.isfinite(value) else math.nan
        elif name in _LOSS_TERMS:
            out[name] = value / loss_divisor
        else:
            kind = next((k for k in STEP_KINDS if k in parts), None)
            count = num_tokens if kind is None else float(sums[f"positions/{kind}"])
            out[name] = value / max(count, 1)
    return out


# ---------------------------------------------------------------- the loss the worker is handed


@dataclass(frozen=True)
class StepShape:
    """How the policy worker runs one optimizer step, which the loss normalises for: the schedule
    divides each micro-batch's returned loss by `num_micro_batches` and DDP averages the gradients
    over `data_parallel_size` ranks; `num_tokens` counts the scored positions of the whole
    mini-batch (all ranks), and `num_units` its scored units, over which the metrics are means:
    where a position has several log-densities (one per scored slot, Multiplex Thinking); None:
    one per position."""

    num_micro_batches: int
    data_parallel_size: int
    num_tokens: int
    num_units: int | None = None


class PolicyLoss:
    """The policy loss as the policy worker takes it (LossCfg decides everything)."""

    def __init__(self, cfg: LossCfg):
        if cfg.aggregation == "seq_mean_token_sum_norm" and cfg.loss_scale_factor is None:
            raise ValueError("aggregation seq_mean_token_sum_norm needs loss_fn.loss_scale_factor")
        self.cfg = cfg

    @property
    def needs_entropy(self) -> bool:
        """The objective reads each scored position's entropy (the worker computes it)."""
        return self.cfg.entropy_coef > 0

    @property
    def per_position(self) -> bool:
        """The objective is a sum of per-position terms, so the worker's fused chunked pass may
        compute it chunk by chunk; else (GSPO: a ratio per response) the worker hands it every
        scored log-density of a micro-batch at once, and autograd takes the gradient."""
        return not self.cfg.sequence_level_importance_ratios

    @property
    def batch_fields(self) -> tuple[str, ...]:
        """The per-position batch fields `micro_batch` reads (the worker hands them over)."""
        names = ["advantages", "old_logp"]
        if self.cfg.reference_policy_kl_penalty > 0:
            names.append("ref_logp")
        if self.cfg.use_importance_sampling_correction:
            names.append("rollout_logp")
        return tuple(names)

    metric_reduction = staticmethod(metric_reduction)

    def micro_batch(
        self,
        loss_mask: Tensor,
        at: tuple[Tensor, Tensor],
        old_logp: Tensor,
        advantages: Tensor,
        ref_logp: Tensor | None,
        step: StepShape,
        *,
        rollout_logp: Tensor | None = None,
        is_soft: Tensor | None = None,
    ) -> MicroBatchLoss:
        """The objective of one micro-batch's scored units `at`: indices (row, position) into its
        [b, s] `loss_mask` and the record-aligned tensors, or (row, position, slot) where the
        log-densities are per slot [b, s, K] (each slot a term of its own, weighted as its
        position: a position's slots sum). A row is one whole response."""
        scale = LossScale(
            global_num_tokens=step.num_tokens, data_parallel_size=step.data_parallel_size
        )
        cfg = self.cfg
        positions = at[:2]
        weights = aggregation_weights(loss_mask, cfg.aggregation, scale, cfg.loss_scale_factor)
        weights = weights[positions].float()
        if cfg.aggregation == "token_mean_global":
            # normalised over the whole mini-batch already: undo the schedule's division
            weights = weights * step.num_micro_batches
        ref = None if ref_logp is None else ref_logp[at]
        # w reads old and rollout log-densities only, so it is fixed before any forward pass; a
        # response's geometric mean (seq-mask-tis) needs its whole row, which a micro-batch holds
        correction = None
        if cfg.use_importance_sampling_correction:
            scored = torch.zeros(old_logp.shape, dtype=torch.bool, device=old_logp.device)
            scored[at] = True  # loss_mask, or its scored slots
            correction = _correction(old_logp, rollout_logp, scored, cfg).at(at)
            is_soft = torch.zeros_like(loss_mask) if is_soft is None else is_soft.bool()
            is_soft = is_soft[positions]
        return MicroBatchLoss(
            cfg,
            weights,
            old_logp[at],
            advantages[positions],
            ref,
            correction=correction,
            is_soft=is_soft,
            response=at[0],
        )

    def report(self, sums: dict[str, float], step: StepShape) -> dict[str, float]:
        """The step's metrics from `MicroBatchLoss.metrics` reduced over its micro-batches and
        ranks (`metric_reduction`): the loss terms as the update descends them (the schedule's
        mean over micro-batches, DDP's over ranks), the rest as means over the step's scored
        positions (or min and max)."""
        units = step.num_tokens if step.num_units is None else step.num_units
        return normalised(sums, units, step.num_micro_batches * step.data_parallel_size)

    def zero_metrics(self, device) -> dict[str, Tensor]:
        """Every metric this loss reports, at its reduction's identity (a micro-batch that scores
        nothing)."""
        empty = torch.zeros(0, device=device)
        ref = empty if self.cfg.reference_policy_kl_penalty > 0 else None
        correction = None
        if self.cfg.use_importance_sampling_correction:
            correction = RolloutCorrection(empty, empty, empty, empty.bool())
        return MicroBatchLoss(
            self.cfg,
            empty,
            empty,
            empty,
            ref,
            correction=correction,
            is_soft=empty.bool(),
            response=empty.long(),
        ).metrics


class MicroBatchLoss:
    """One micro-batch's scored positions [n], called chunk by chunk by the fused pass: returns each
    position's weighted objective, and adds the chunk's detached terms to `metrics`.

    A metric is a reduction over this micro-batch's positions (detached, float64: a sum, or a min
    or max by its name, `metric_reduction`), which the worker reduces the same way over the step's
    micro-batches and ranks and `PolicyLoss.report` normalises: the loss terms by the step's
    shape, the other sums by their positions. A new metric is one entry in `position_metrics`
    (or `correction_metrics`)."""

    def __init__(
        self,
        cfg: LossCfg,
        weights: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        ref_logp: Tensor | None,
        *,
        correction: RolloutCorrection | None = None,
        is_soft: Tensor | None = None,
        response: Tensor | None = None,
    ):
        self.cfg, self.weights = cfg, weights
        self.response = response  # each position's row of the micro-batch
        self.old_logp, self.advantages, self.ref_logp = old_logp, advantages, ref_logp
        self.correction = correction
        none = slice(
            0, 0
        )  # the metrics' names, at their identity: the same reductions over nothing
        entropy = old_logp[none] if cfg.entropy_coef > 0 else None
        self.metrics: dict[str, Tensor] = self._sums(old_logp[none], entropy, none)[1]
        if correction is not None:  # fixed by the old and rollout log-densities: counted once
            every = torch.ones_like(correction.truncated)
            values = correction_metrics(correction, is_soft)
            self.metrics |= {k: reduced(v, every, metric_reduction(k)) for k, v in values.items()}

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
            is_weight=None if self.correction is None else self.correction.weight[positions],
            response=None if self.response is None else self.response[positions],
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


def aggregation_weights(
    mask: Tensor, mode: str, scale: LossScale = LossScale(), norm: int | None = None
) -> Tensor:
    """Each position's weight in the aggregate [B, S] (float64, 0 outside the mask): `aggregate(v)` is
    sum(weights * v), so a caller can also sum per-position terms as it computes them. `norm`:
    seq_mean_token_sum_norm's constant (LossCfg.loss_scale_factor)."""
    mask = mask.bool()
    valid = mask.double()
    if mode == "token_mean_microbatch":
        return valid / mask.sum().clamp(min=1) / scale.num_micro_batches
    if mode == "token_mean_global":
        if scale.global_num_tokens is None:
            raise ValueError("token_mean_global needs LossScale.global_num_tokens")
        return valid * scale.data_parallel_size / max(scale.global_num_tokens, 1)
    if mode in ("seq_mean_token_mean", "seq_mean_token_sum_norm"):
        per_row = mask.sum(dim=1, keepdim=True)
        if mode == "seq_mean_token_sum_norm":
            if norm is None:
                raise ValueError("seq_mean_token_sum_norm needs its constant (loss_scale_factor)")
            # Dr. GRPO: a constant instead of the response's length, so that no length bias
            # enters the gradient
            per_row = torch.full_like(per_row, norm)
        return (
            valid
            / per_row.clamp(min=1)
            / (mask.sum(dim=1, keepdim=True) > 0).sum().clamp(min=1)
            / scale.num_micro_batches
        )
    raise ValueError(f"unknown aggregation {mode!r}")


def aggregate(
    values: Tensor,
    mask: Tensor,
    mode: str,
    scale: LossScale = LossScale(),
    norm: int | None = None,
) -> Tensor:
    """Reduce [B, S] per-position values to this micro-batch's share of the loss (`mode`:
    LossCfg.aggregation; `norm`: LossCfg.loss_scale_factor)."""
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return (
        aggregation_weights(mask, mode, scale, norm).to(values.dtype)
        * torch.where(mask.bool(), values, zero)
    ).sum()


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()
