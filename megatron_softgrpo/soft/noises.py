"""The noises of a soft step: how each perturbs the K-slot mixture, and its log-density.

A noise kind owns three things for the K globally selected slots of a step:
- `draw(pt, support)`: the raw randomness (called inside `rng.noise_rng()`, identically
  on every TP rank); `draw_ahead(lead, k, device)` draws the same for many steps at once,
  for the kinds whose randomness does not depend on pt (all but Dirichlet);
- `mix(pt, support, raw)`: the pure map to the mixture weights, the stored noise value
  and the per-row seed;
- `log_density(scaled, records, embedding)`: the action log-density that the policy update
  uses, from the K stored ids' logits / T of the model being evaluated (docs/algorithm.md
  sections 2 and 5). `pt` is always the softmax of those logits over the in-support slots, so the
  rollout's own density (`rollout_log_density`) is the same function at rollout logits.

Inputs are rebuilt exactly as the rollout built them (stored weights; the reference's
Gaussian/Dirichlet trainer used softmax(x / tau_g) instead, a defect not copied here).
Masked means divide by max(1, mask count): a row with no slot in the mask scores 0
rather than the reference's 0/0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from megatron_softgrpo.distributed import copy_to_tensor_parallel, sum_tensor_parallel
from megatron_softgrpo.soft import rng
from megatron_softgrpo.soft.records import MixtureRecord
from megatron_softgrpo.soft.vocab import NEG_INF, VocabShard

LOG_EPS = 1e-6  # g = log(pt + 1e-6) + c * eps
GUMBEL_CLAMP = (-1.5, 3.0)  # clamp of the Gumbel noise, in the rollout and in the density
GUMBEL_MASK_LOG_PROB = -3.0  # density slots: log(pt + 1e-6) > -3
GAUSSIAN_MASK_PROB = 0.05  # Gaussian density slots: pt > 0.05
GAUSSIAN_CLAMP_SIGMAS = 3.0  # x clamped to pt +- 3 sigma (the reference's +-0.15 at sigma 0.05)
DIRICHLET_CLAMP = (-5.0, 3.0)  # clamp of the Gamma log-density
DIRICHLET_MASK_PROB = 0.05  # Dirichlet density slots: pt > 0.05, as the reference's


def support_probs(scaled: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """pt: softmax of the K scaled logits over the in-support slots (0 elsewhere)."""
    return torch.softmax(scaled.masked_fill(~support, NEG_INF), dim=-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)


@dataclass
class Mixture:
    weights: torch.Tensor  # [N, K] fed to the model
    noise: torch.Tensor  # [N, K] stored noisy value
    noise_seed: torch.Tensor  # [N] int64


@dataclass(frozen=True)
class InputEmbedding:
    """This rank's shard of the input embedding table (detached), for the embedding-noise density."""

    table: torch.Tensor  # [W, h] (VocabParallelEmbedding.weight)
    shard: VocabShard

    def vectors(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """E[ids] [..., K, h] for the ids this rank owns, zero vectors for the others."""
        vectors = self.table.detach()[self.shard.local_index(ids)].to(dtype)
        return vectors * self.shard.owns(ids).unsqueeze(-1).to(dtype)


class SoftNoise:
    name: ClassVar[str]
    draws_ahead: ClassVar[bool] = True  # its randomness does not depend on pt (see draw_ahead)
    perturbs_input: ClassVar[bool] = False  # input_offset adds a vector of the model's width
    needs_input_table: ClassVar[bool] = False  # log_density reads the input embedding table

    def draw(self, pt: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        return self.draw_ahead(pt.shape[:-1], pt.shape[-1], pt.device)

    def draw_ahead(self, lead: tuple[int, ...], k: int, device) -> torch.Tensor:
        """The raw randomness of rows `lead` with k slots, before pt is known."""
        raise NotImplementedError(f"{self.name} noise depends on pt and is drawn per step")

    def mix(self, pt: torch.Tensor, support: torch.Tensor, raw: torch.Tensor) -> Mixture:
        raise NotImplementedError

    def log_density(
        self, scaled: torch.Tensor, records: MixtureRecord, embedding: InputEmbedding | None = None
    ):
        raise NotImplementedError

    def rollout_log_density(self, scaled: torch.Tensor, records: MixtureRecord) -> torch.Tensor:
        return self.log_density(scaled, records)

    def input_offset(self, records: MixtureRecord) -> torch.Tensor | None:
        """What is added to the mixed input embedding [..., h] (None: nothing)."""
        return None


def _no_seed(pt: torch.Tensor) -> torch.Tensor:
    return torch.zeros(pt.shape[:-1], dtype=torch.int64, device=pt.device)


@dataclass(frozen=True)
class GumbelNoise(SoftNoise):
    """SofT-GRPO: g = log(pt + 1e-6) + c * clamp(Gumbel, -1.5, 3); weights softmax(g / tau_g)."""

    tau: float = 0.1
    scale: float = 1.0
    name: ClassVar[str] = "gumbel"

    def __post_init__(self):
        if not self.tau > 0 or not self.scale >= 0:
            raise ValueError(
                f"gumbel noise needs tau > 0 and scale >= 0, got tau={self.tau} scale={self.scale}"
            )

    def draw_ahead(self, lead, k, device):
        return rng.standard_gumbel((*lead, k), device).clamp(*GUMBEL_CLAMP)

    def mix(self, pt, support, raw):
        g = torch.log(pt + LOG_EPS) + self.scale * raw
        weights = torch.softmax((g / self.tau).masked_fill(~support, NEG_INF), dim=-1)
        return Mixture(weights, g, _no_seed(pt))

    def log_density(self, scaled, records, embedding=None):
        lam = torch.log(support_probs(scaled, records.support) + LOG_EPS)
        z = (records.noise.to(lam.dtype) - lam).clamp(*GUMBEL_CLAMP)
        return masked_mean(-z - torch.exp(-z), lam > GUMBEL_MASK_LOG_PROB)


@dataclass(frozen=True)
class GaussianNoise(SoftNoise):
    """Reference ablation: x ~ N(pt, sigma^2) on the in-support slots; weights x / sum(x).

    Only the support is perturbed, a deliberate deviation: the reference draws on all K slots, so
    its mixture takes in tokens outside the truncated support (docs/algorithm.md section 5).
    """

    sigma: float = 0.05
    name: ClassVar[str] = "gaussian"

    def __post_init__(self):
        if not self.sigma > 0:
            raise ValueError(f"gaussian noise needs sigma > 0, got {self.sigma}")

    def draw_ahead(self, lead, k, device):
        return rng.standard_normal((*lead, k), device)

    def mix(self, pt, support, raw):
        x = torch.where(support, pt + self.sigma * raw, torch.zeros_like(pt))
        return Mixture(x / x.sum(dim=-1, keepdim=True), x, _no_seed(pt))

    def log_density(self, scaled, records, embedding=None):
        pt = support_probs(scaled, records.support)
        half_width = GAUSSIAN_CLAMP_SIGMAS * self.sigma
        x = torch.minimum(
            torch.maximum(records.noise.to(pt.dtype), pt - half_width), pt + half_width
        )
        log_n = (
            -0.5 * ((x - pt) / self.sigma) ** 2 - math.log(self.sigma) - 0.5 * math.log(2 * math.pi)
        )
        return masked_mean(log_n, (pt > GAUSSIAN_MASK_PROB) & records.support)


@dataclass(frozen=True)
class DirichletNoise(SoftNoise):
    """Reference ablation: x ~ Gamma(pt, 1) on the in-support slots; weights x / sum(x) ~ Dirichlet(pt)."""

    name: ClassVar[str] = "dirichlet"
    draws_ahead: ClassVar[bool] = False  # Gamma(pt) sampling consumes randomness that depends on pt

    def draw(self, pt, support):
        return rng.gamma(torch.where(support, pt, torch.ones_like(pt)))

    def mix(self, pt, support, raw):
        # a Gamma sample with a small concentration can underflow to 0; keep log(x) finite
        x = torch.where(support, raw.clamp(min=torch.finfo(raw.dtype).tiny), torch.zeros_like(raw))
        return Mixture(x / x.sum(dim=-1, keepdim=True), x, _no_seed(pt))

    def log_density(self, scaled, records, embedding=None):
        pt = support_probs(scaled, records.support)
        tiny = torch.finfo(pt.dtype).tiny
        # out-of-support slots are masked below; give them harmless finite terms
        alpha = torch.where(records.support, pt.clamp(min=tiny), torch.ones_like(pt))
        x = torch.where(records.support, records.noise.to(pt.dtype), torch.ones_like(pt)).clamp(
            min=tiny
        )
        log_gamma = (alpha - 1) * torch.log(x) - x - torch.lgamma(alpha)
        # the reference's mask (its rollout and trainer alike): slots with pt <= 0.05 do not count
        mask = (pt > DIRICHLET_MASK_PROB) & records.support
        return masked_mean(log_gamma.clamp(*DIRICHLET_CLAMP), mask)


@dataclass(frozen=True)
class EmbeddingNoise(SoftNoise):
    """Butt et al. (2025): input s = sum_k pt_k E[ids_k] + sigma * eps, eps ~ N(0, I_h) from a per-row seed.

    The log-density is that of the perturbation, -|x - mu|^2 / (2 sigma^2) with
    mu = sum_k pt_k E[ids_k] under the evaluated policy, without the constant
    -(h/2) log(2 pi sigma^2) (it cancels in every ratio and KL). Slot 0 (the transcript
    token) is the most probable in-support token.
    """

    sigma: float = 0.01
    hidden_size: int = 0
    name: ClassVar[str] = "embedding_noise"
    perturbs_input: ClassVar[bool] = True
    needs_input_table: ClassVar[bool] = True

    def __post_init__(self):
        if not self.sigma > 0 or self.hidden_size < 1:
            raise ValueError(
                "embedding noise needs sigma > 0 and hidden_size >= 1, "
                f"got sigma={self.sigma} hidden_size={self.hidden_size}"
            )

    def draw_ahead(self, lead, k, device):
        return rng.random_seeds(lead, device)

    def mix(self, pt, support, raw):
        return Mixture(pt, torch.zeros_like(pt), raw)

    def noise_vectors(
        self, seeds: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        return self.sigma * rng.gaussian_from_seeds(seeds, self.hidden_size, dtype)

    def input_offset(self, records):
        return self.noise_vectors(records.noise_seed) * records.is_soft.unsqueeze(-1)

    def rollout_log_density(self, scaled, records):
        eps = rng.gaussian_from_seeds(records.noise_seed, self.hidden_size, torch.float64)
        return (-0.5 * (eps * eps).sum(dim=-1)).to(scaled.dtype)

    def log_density(self, scaled, records, embedding=None):
        if embedding is None:
            raise ValueError(
                "the embedding-noise density needs the input embedding table (InputEmbedding)"
            )
        # in float64: rounding of the weights, amplified by |E| / sigma, would otherwise reach 1e-5
        pt = support_probs(scaled.double(), records.support)
        group = embedding.shard.group
        shift = copy_to_tensor_parallel(records.mix_weights.double() - pt, group)  # grads summed
        own = torch.einsum("nk,nkh->nh", shift, embedding.vectors(records.mix_ids, torch.float64))
        v = sum_tensor_parallel(own, group) + self.noise_vectors(records.noise_seed, torch.float64)
        return (-0.5 * (v * v).sum(dim=-1) / self.sigma**2).to(scaled.dtype)
