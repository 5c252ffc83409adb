"""Reward shaping: what the advantages see on top of correctness (pure functions on [B] tensors).

- an R1-style format bonus (`env.format_reward`; 0 in the reference);
- DAPO's soft overlong penalty (`env.overlong_penalty`; `algorithms/filtering.py`).
"""

from __future__ import annotations

import torch

from megatron_softgrpo.algorithms.filtering import overlong_penalty
from megatron_softgrpo.config.schema import EnvCfg


def with_format_bonus(
    correct: torch.Tensor, answered: torch.Tensor, truncated: torch.Tensor, bonus: float
) -> torch.Tensor:
    """correct + bonus for each response that gives an answer (`env.answer_format`) and ends before the length limit."""
    return correct + bonus * (answered & ~truncated).to(correct.dtype)


def shaped_rewards(
    correct: torch.Tensor,
    answered: torch.Tensor,
    truncated: torch.Tensor,
    lengths: torch.Tensor,
    env: EnvCfg,
    max_new_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, penalty): correctness with the format bonus and the overlong penalty, and the
    penalty's part alone (0 without `env.overlong_penalty`)."""
    rewards = with_format_bonus(correct, answered, truncated, env.format_reward)
    penalty = torch.zeros_like(rewards)
    if (over := env.overlong_penalty) is not None:
        penalty = overlong_penalty(lengths, max_new_tokens, over.buffer, over.factor)
        penalty = penalty.to(rewards.device)
    return rewards + penalty, penalty
