"""GRPO group advantages (docs/algorithm.md section 3), as verl 0.4 computes them.

Responses are grouped prompt-major: the G responses of prompt i are rows i*G .. i*G+G-1.
"""

from __future__ import annotations

import torch

EPS = 1e-6


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, normalize: bool = True
) -> torch.Tensor:
    """A = (R - mean_G(R)) / (std_G(R) + 1e-6) per response, std unbiased over the group.

    `normalize=False` (grpo.normalize_rewards) keeps R - mean_G(R). A group of one response has
    no baseline: as in verl, its mean is taken as 0 and its std as 1.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}"
        )
    groups = rewards.view(-1, group_size)
    if group_size == 1:
        mean, std = torch.zeros_like(groups), torch.ones_like(groups)
    else:
        mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, keepdim=True)
    centred = groups - mean
    return (centred / (std + EPS) if normalize else centred).reshape(-1)


def broadcast_to_positions(per_response: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, S]: each response's advantage on its scored positions, 0 elsewhere."""
    return per_response.unsqueeze(1) * loss_mask.to(per_response.dtype)
