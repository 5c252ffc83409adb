"""Which responses a step learns from: DAPO's dynamic sampling and overlong handling.

Pure functions on [B] tensors grouped prompt-major (the G responses of prompt i are rows
i*G .. i*G+G-1, as in `advantages.py`); the trainer (`train/loop.py`) applies them, the policy
worker only ever sees the resulting rows, advantages and loss mask.

- `informative_groups`: a group whose rewards are all equal has zero advantages, so its
  responses cost a rollout and an update and teach nothing (`grpo.dynamic_sampling`).
- `overlong_penalty`: DAPO's soft overlong punishment (`env.overlong_penalty`), added to the
  reward of responses that end in the last `buffer` tokens before the length limit.
- `group_rows`: the row indices of chosen groups.
"""

from __future__ import annotations

import torch


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] rewards -> [B / G] bool: the group's rewards are not all equal (nonzero spread, i.e.
    std > 0 as verl's DAPO recipe keeps them). A group of one response is never informative."""
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}"
        )
    groups = rewards.view(-1, group_size)
    return groups.amax(dim=1) > groups.amin(dim=1)


def group_rows(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """Indices [len(groups) * G] of the rows of the groups `groups` (indices), in that order."""
    offsets = torch.arange(group_size, device=groups.device)
    return (groups.long().unsqueeze(1) * group_size + offsets).reshape(-1)


def overlong_penalty(
    lengths: torch.Tensor, max_len: int, buffer: int, factor: float
) -> torch.Tensor:
    """DAPO's soft overlong punishment per response of length L, for the limit Lmax = `max_len`
    and the buffer Lc = `buffer`:

        0                        L <= Lmax - Lc
        (Lmax - Lc - L) / Lc     Lmax - Lc < L <= Lmax   (from 0 down to -1)
        -1                       L > Lmax

    times `factor` (float32, <= 0), to be added to the reward."""
    if buffer < 1 or buffer > max_len:
        raise ValueError(f"overlong buffer {buffer} must be in [1, max_len={max_len}]")
    lengths = lengths.to(torch.float32)
    ramp = ((max_len - buffer) - lengths) / buffer
    penalty = torch.where(lengths > max_len, torch.full_like(ramp, -1.0), ramp.clamp(max=0.0))
    return penalty * factor
