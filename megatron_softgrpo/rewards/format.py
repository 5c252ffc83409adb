"""An R1-style format bonus on top of a correctness reward (`env.format_reward`; 0 in the reference)."""

from __future__ import annotations

import torch


def with_format_bonus(
    correct: torch.Tensor, answered: torch.Tensor, truncated: torch.Tensor, bonus: float
) -> torch.Tensor:
    """correct + bonus for each response that gives an answer (`env.answer_format`) and ends before the length limit."""
    return correct + bonus * (answered & ~truncated).to(correct.dtype)
