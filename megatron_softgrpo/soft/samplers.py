"""Samplers: one decoding step from this rank's vocabulary shard of the last-position logits.

Interface (every sampler): `sample(logits [N, W], shard, raw=None) -> SampledStep`, called
identically on every TP rank, which all return the same step. `raw` is the step's randomness
drawn ahead (`draw_ahead(steps, rows, device)`, [steps, rows, ...], one slice per step): a
rollout draws it once for every (step, row), so no step touches a generator and the noise of
a row does not depend on which other rows are still decoding. Without it the sampler draws
inside `rng.noise_rng()` itself. `input_offset(records)` is what the step adds to the mixed input
embedding (None: nothing). Which sampler a recipe runs is `algorithms/registry.py`'s choice:

- `discrete`: temperature, top-k, top-p, min-p (greedy = top_k 1); a multinomial draw.
  Records are one-hot; the log-density is log_softmax(l / T)[token] over the whole
  vocabulary (the quantity the policy update scores).
- `gumbel`, `gaussian`, `dirichlet`, `embedding_noise`: a soft step (docs/algorithm.md section 1):
  truncation, the top-K support, pt over it, the noise kind's mixture; slots sorted by
  weight descending (out-of-support slots last), slot 0 is the transcript token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Literal, Protocol

import torch

from megatron_softgrpo.distributed import gather_tensor_parallel, sum_tensor_parallel_
from megatron_softgrpo.soft import rng
from megatron_softgrpo.soft.noises import SoftNoise, support_probs
from megatron_softgrpo.soft.records import MixtureRecord, SampledStep
from megatron_softgrpo.soft.truncation import (
    Candidates,
    Truncation,
    candidates,
    full_support,
    top_logits,
)
from megatron_softgrpo.soft.vocab import NEG_INF, VocabShard, gather_logits, log_normalizer

# when a sampler draws its randomness: never (greedy); "ahead", before the logits are known (the
# rollout's noise tapes); or "at_step", once they are, for the rows it samples (Dirichlet: Gamma(pt))
Draws = Literal["never", "ahead", "at_step"]


class Sampler(Protocol):
    name: str
    mixture_size: int

    def sample(
        self, logits: torch.Tensor, shard: VocabShard, raw: torch.Tensor | None = None
    ) -> SampledStep: ...

    draws: Draws

    def draw_ahead(self, steps: int, rows: int, device) -> torch.Tensor | None: ...

    def input_offset(self, records: MixtureRecord) -> torch.Tensor | None: ...


def _step(records: MixtureRecord, log_density: torch.Tensor) -> SampledStep:
    return SampledStep(
        **{f.name: getattr(records, f.name) for f in fields(records)}, log_density=log_density
    )


def _check_mixture_size(mixture_size: int) -> None:
    if mixture_size < 1:
        raise ValueError(f"mixture_size must be >= 1, got {mixture_size}")


# ------------------------------------------------------------------ discrete


def _draw_from_candidates(found: Candidates, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws among the in-support candidates (identical on every rank): one token
    [N, D] per uniform u [N, D]."""
    mass = torch.exp(found.scaled - found.scaled[:, :1]) * found.support
    cdf = mass.cumsum(dim=-1)
    slot = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    slot = torch.minimum(slot, found.support.sum(dim=-1, keepdim=True) - 1)
    return found.ids.gather(-1, slot)


def _draw_from_shards(
    scaled: torch.Tensor, log_norm: torch.Tensor, u: torch.Tensor, shard: VocabShard
):
    """Inverse-CDF draws over the whole sharded vocabulary in id order, without gathering it: one
    token [N, D] per uniform u [N, D].

    Each rank's probability mass is all-gathered; the rank whose id range holds the
    target u * total finds the token in its own cumulative sum and shares the id.
    A rank's mass is its cumulative sum's last value (a plain sum rounds otherwise: the
    target could pass the end of the sum searched), and a target at or past an end (u * total
    may round to total) takes the last token with mass, never a zero-probability one.
    """
    probs = torch.exp(scaled - log_norm.unsqueeze(-1))  # padding columns are exp(-inf) = 0
    cdf = probs.cumsum(dim=-1)
    masses = gather_tensor_parallel(cdf[:, -1:], shard.group)  # [N, TP]
    ends = masses.cumsum(dim=-1)
    target = u * ends[:, -1:]
    last = (ends < ends[:, -1:]).sum(dim=-1, keepdim=True)  # the last rank with mass
    owner = torch.minimum((ends.unsqueeze(1) <= target.unsqueeze(-1)).sum(dim=-1), last)
    starts = torch.nn.functional.pad(ends[:, :-1], (1, 0))  # the mass of the ranks before
    local_target = target - starts.gather(-1, owner)
    column = torch.searchsorted(cdf, local_target, right=True)
    # the last column with mass
    column = torch.minimum(column, (cdf < cdf[:, -1:]).sum(dim=-1, keepdim=True))
    token = column + shard.start
    token = torch.where(owner == shard.rank, token, torch.zeros_like(token))
    return sum_tensor_parallel_(token, shard.group)  # only the owner's is non-zero


def _draw(logits, scaled, log_norm, truncation: Truncation, u: torch.Tensor, shard: VocabShard):
    """Tokens [N, D] drawn by inverse CDF from the truncated distribution, one per uniform u
    [N, D]: among candidates holding its whole support when it truncates, else over the whole
    sharded vocabulary (`scaled`, `log_norm`: the logits at its temperature, their normaliser)."""
    if truncation.truncates:
        return _draw_from_candidates(full_support(logits, shard, truncation, log_norm), u)
    return _draw_from_shards(scaled, log_norm, u, shard)


@dataclass(frozen=True)
class DiscreteSampler:
    truncation: Truncation
    mixture_size: int
    name: ClassVar[str] = "discrete"

    def __post_init__(self):
        _check_mixture_size(self.mixture_size)

    @property
    def draws(self) -> Draws:
        return "never" if self.truncation.top_k == 1 else "ahead"

    def draw_ahead(self, steps: int, rows: int, device) -> torch.Tensor | None:
        """Uniforms [steps, rows] for the inverse-CDF draw (None: greedy consumes none)."""
        return None if self.truncation.top_k == 1 else rng.uniform((steps, rows), device)

    def input_offset(self, records: MixtureRecord) -> None:
        return None  # a one-hot row is the token's own embedding

    def sample(
        self, logits: torch.Tensor, shard: VocabShard, raw: torch.Tensor | None = None
    ) -> SampledStep:
        trunc = self.truncation
        scaled = shard.scaled(logits, trunc.temperature)
        log_norm = log_normalizer(scaled, shard)
        if trunc.top_k == 1:  # greedy: no randomness consumed
            token = top_logits(logits, shard, 1)[0][:, 0]
        else:
            if raw is None:
                with rng.noise_rng():
                    raw = self.draw_ahead(1, logits.shape[0], logits.device)[0]
            token = _draw(logits, scaled, log_norm, trunc, raw.unsqueeze(-1), shard).squeeze(-1)
        log_density = gather_logits(scaled, token.unsqueeze(-1), shard).squeeze(-1) - log_norm
        return _step(MixtureRecord.discrete(token, self.mixture_size), log_density)


# ------------------------------------------------------------------ soft


@dataclass(frozen=True)
class SoftSampler:
    truncation: Truncation
    mixture_size: int
    noise: SoftNoise

    def __post_init__(self):
        _check_mixture_size(self.mixture_size)

    @property
    def name(self) -> str:
        return self.noise.name

    @property
    def draws(self) -> Draws:
        return "ahead" if self.noise.draws_ahead else "at_step"

    def draw_ahead(self, steps: int, rows: int, device) -> torch.Tensor:
        return self.noise.draw_ahead((steps, rows), self.mixture_size, device)

    def input_offset(self, records: MixtureRecord) -> torch.Tensor | None:
        return self.noise.input_offset(records)

    def sample(
        self, logits: torch.Tensor, shard: VocabShard, raw: torch.Tensor | None = None
    ) -> SampledStep:
        k = self.mixture_size
        found = candidates(logits, shard, self.truncation, max(k, self.truncation.top_k or 0))
        ids, scaled, support = found.ids[:, :k], found.scaled[:, :k], found.support[:, :k]
        pt = support_probs(scaled, support)
        if raw is None:
            with rng.noise_rng():
                raw = self.noise.draw(pt, support)
        mixture = self.noise.mix(pt, support, raw)
        # slots by weight descending, out-of-support last; stable, so ties keep the logit order
        order = torch.sort(
            mixture.weights.masked_fill(~support, NEG_INF), dim=-1, descending=True, stable=True
        ).indices
        ids, scaled, support = (
            ids.gather(-1, order),
            scaled.gather(-1, order),
            support.gather(-1, order),
        )
        records = MixtureRecord(
            tokens=ids[:, 0],
            mix_ids=ids,
            mix_weights=mixture.weights.gather(-1, order),
            noise=mixture.noise.gather(-1, order),
            support=support,
            is_soft=torch.ones_like(ids[:, 0], dtype=torch.bool),
            noise_seed=mixture.noise_seed,
            thinking=torch.ones_like(ids[:, 0], dtype=torch.bool),
        )
        return _step(records, self.noise.rollout_log_density(scaled, records))


# ------------------------------------------------------------------ multiplex


@dataclass(frozen=True)
class MultiplexSampler:
    """Multiplex Thinking (Tang et al. 2026): K = `mixture_size` tokens drawn independently, with
    replacement, from the truncated distribution; the input mixes their embeddings by
    w_k = p(i_k) / sum_j p(i_j), p the whole-vocabulary softmax(l / T) (a token drawn twice counts
    twice), or by 1 / K (`uniform`). Slots keep the draw order: slot 0, the first draw, is the
    transcript token. The stored noise of slot k is its log-probability log p(i_k), the quantity the
    trainer scores per slot; the step's log-density is their sum (the K draws' joint, up to the
    truncation's renormalisation, as the trainer scores it)."""

    truncation: Truncation
    mixture_size: int
    uniform: bool = False
    name: ClassVar[str] = "multiplex"
    draws: ClassVar[Draws] = "ahead"

    def __post_init__(self):
        _check_mixture_size(self.mixture_size)

    def draw_ahead(self, steps: int, rows: int, device) -> torch.Tensor:
        """Uniforms [steps, rows, K]: one inverse-CDF draw per slot."""
        return rng.uniform((steps, rows, self.mixture_size), device)

    def input_offset(self, records: MixtureRecord) -> None:
        return None

    def sample(
        self, logits: torch.Tensor, shard: VocabShard, raw: torch.Tensor | None = None
    ) -> SampledStep:
        trunc = self.truncation
        scaled = shard.scaled(logits, trunc.temperature)
        log_norm = log_normalizer(scaled, shard)
        if raw is None:
            with rng.noise_rng():
                raw = self.draw_ahead(1, logits.shape[0], logits.device)[0]
        ids = _draw(logits, scaled, log_norm, trunc, raw, shard)  # [N, K]
        slot_logp = gather_logits(scaled, ids, shard) - log_norm.unsqueeze(-1)
        weights = (
            torch.full_like(slot_logp, 1.0 / self.mixture_size)
            if self.uniform
            else torch.softmax(slot_logp, dim=-1)  # p(i_k) / sum_j p(i_j)
        )
        soft = torch.ones_like(ids[:, 0], dtype=torch.bool)
        records = MixtureRecord(
            tokens=ids[:, 0],
            mix_ids=ids,
            mix_weights=weights.float(),
            noise=slot_logp.float(),
            support=torch.ones_like(ids, dtype=torch.bool),  # every draw is a scored slot
            is_soft=soft,
            noise_seed=torch.zeros_like(ids[:, 0]),
            thinking=soft,
        )
        return _step(records, slot_logp.sum(dim=-1))
