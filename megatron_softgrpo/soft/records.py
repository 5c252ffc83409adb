"""The per-position mixture record (docs/architecture.md "The data that flows") and a sampled step.

One layout serves prompt tokens, soft steps and discrete steps: K slots of
(id, weight, stored noise, in-support flag). Prompt and discrete positions are one-hot:
slot 0 holds the token with weight 1, the other slots are out of support (id 0,
weight 0). Leading dimensions are free ([N] for a decoding step, [B, S] for a batch).
`thinking` says which sampler drew a position, hence the temperature that scores it: the
thinking phase's (every soft step, and the discrete step that completes the think-end marker)
or the answer phase's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch


@dataclass
class MixtureRecord:
    tokens: torch.Tensor  # [...] int64 transcript token (what the text, stop checks and reward see)
    mix_ids: torch.Tensor  # [..., K] int64 support ids of the mixture
    mix_weights: torch.Tensor  # [..., K] fp32 exact weights fed to the model (one-hot for discrete)
    noise: (
        torch.Tensor
    )  # [..., K] fp32 stored noisy value (Gumbel: g; Gaussian/Dirichlet: x; else 0)
    support: torch.Tensor  # [..., K] bool slot is in the truncated support
    is_soft: torch.Tensor  # [...] bool soft step (vs prompt/discrete)
    noise_seed: (
        torch.Tensor
    )  # [...] int64 embedding-noise seed of the input at this position (else 0)
    thinking: torch.Tensor  # [...] bool drawn by the thinking sampler (soft steps, the marker step)

    @classmethod
    def discrete(cls, tokens: torch.Tensor, mixture_size: int) -> MixtureRecord:
        """One-hot records of plain tokens (prompt or discrete steps)."""
        k_shape = (*tokens.shape, mixture_size)
        first = torch.zeros(k_shape, dtype=torch.bool, device=tokens.device)
        first[..., 0] = True
        return cls(
            tokens=tokens,
            mix_ids=torch.where(
                first, tokens.unsqueeze(-1), torch.zeros_like(first, dtype=torch.int64)
            ),
            mix_weights=first.float(),
            noise=torch.zeros(k_shape, device=tokens.device),
            support=first,
            is_soft=torch.zeros_like(tokens, dtype=torch.bool),
            noise_seed=torch.zeros_like(tokens, dtype=torch.int64),
            thinking=torch.zeros_like(tokens, dtype=torch.bool),
        )

    @property
    def mixture_size(self) -> int:
        return self.mix_ids.shape[-1]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        """The same record type with `fn` applied to every field (row indexing, device moves, ...)."""
        return type(self)(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    @classmethod
    def cat(cls, parts: Sequence[MixtureRecord], dim: int = 0) -> MixtureRecord:
        """Records joined along rows (dim 0) or positions (dim 1)."""
        return cls(
            **{f.name: torch.cat([getattr(p, f.name) for p in parts], dim) for f in fields(cls)}
        )

    def flatten(self):
        """Leading dimensions merged into one: [...] -> [N]."""
        lead = self.tokens.dim()
        return self.map(lambda t: t.reshape(-1, *t.shape[lead:]))

    def where(self, keep: torch.Tensor, other):
        """Per position: this record where `keep` [...] is True, `other` elsewhere."""
        lead = self.tokens.dim()

        def pick(a, b):
            mask = keep.reshape(*keep.shape, *([1] * (a.dim() - lead)))
            return torch.where(mask, a, b)

        return type(self)(
            **{f.name: pick(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)}
        )


@dataclass
class SampledStep(MixtureRecord):
    """A sampler's output for one decoding step ([N] rows): the record plus the rollout's log-density."""

    log_density: torch.Tensor  # [N] fp32 log-density of this step under the sampling policy
