"""Rewards: answer extraction, math-verify grading under a hard timeout, and the reward registry."""

from megatron_softgrpo.rewards.boxed import last_boxed
from megatron_softgrpo.rewards.registry import REWARDS, RewardFn, get_reward

__all__ = ["REWARDS", "RewardFn", "get_reward", "last_boxed"]
