"""What a recipe's `softgrpo` and `policy.generation` sections mean for the soft core.

- the thinking phase samples with `softgrpo.thinking` truncation and the algorithm's noise
  (softgrpo -> gumbel; gaussian, dirichlet, embedding_noise -> the ablation of that name;
  grpo has no soft phase);
- the answer phase (and all of GRPO) samples discretely with `policy.generation`;
- the scorer scores soft rows and the marker step (the discrete step the thinking sampler drew,
  flagged `thinking` in its record) with the thinking temperature, and the other discrete rows
  with the answer temperature: the temperatures they were sampled at.
"""

from __future__ import annotations

from megatron_softgrpo.config.schema import GenerationCfg, SoftGRPOCfg, ThinkingCfg
from megatron_softgrpo.errors import UserError
from megatron_softgrpo.soft.logprob import Scorer
from megatron_softgrpo.soft.noises import (
    DirichletNoise,
    EmbeddingNoise,
    GaussianNoise,
    GumbelNoise,
    SoftNoise,
)
from megatron_softgrpo.soft.samplers import DiscreteSampler, SoftSampler
from megatron_softgrpo.soft.truncation import Truncation


def thinking_truncation(thinking: ThinkingCfg) -> Truncation:
    return Truncation(thinking.temperature, thinking.top_k, thinking.top_p, thinking.min_p)


def answer_truncation(generation: GenerationCfg) -> Truncation:
    return Truncation(generation.temperature, generation.top_k, generation.top_p, generation.min_p)


def soft_noise(cfg: SoftGRPOCfg, hidden_size: int | None = None) -> SoftNoise | None:
    """The thinking phase's noise kind; None for discrete GRPO."""
    if cfg.algorithm == "grpo":
        return None
    if cfg.algorithm == "softgrpo":
        return GumbelNoise(tau=cfg.gumbel_tau, scale=cfg.noise_scale)
    if cfg.algorithm == "gaussian":
        return GaussianNoise(sigma=cfg.gaussian_sigma)
    if cfg.algorithm == "dirichlet":
        return DirichletNoise()
    if hidden_size is None:
        raise UserError(
            "softgrpo.algorithm=embedding_noise needs the model's hidden size to draw its noise"
        )
    return EmbeddingNoise(sigma=cfg.embedding_noise_sigma, hidden_size=hidden_size)


def thinking_sampler(cfg: SoftGRPOCfg, hidden_size: int | None = None) -> SoftSampler | None:
    """The soft sampler of the thinking phase; None for discrete GRPO (no thinking phase)."""
    noise = soft_noise(cfg, hidden_size)
    return (
        None
        if noise is None
        else SoftSampler(thinking_truncation(cfg.thinking), cfg.mixture_size, noise)
    )


def answer_sampler(cfg: SoftGRPOCfg, generation: GenerationCfg) -> DiscreteSampler:
    return DiscreteSampler(answer_truncation(generation), cfg.mixture_size)


def scorer(cfg: SoftGRPOCfg, generation: GenerationCfg, hidden_size: int | None = None) -> Scorer:
    return Scorer(soft_noise(cfg, hidden_size), cfg.thinking.temperature, generation.temperature)
