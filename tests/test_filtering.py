"""Dynamic sampling's group filter and DAPO's soft overlong penalty (algorithms/filtering.py)
against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from megatron_softgrpo.algorithms.advantages import group_advantages
from megatron_softgrpo.algorithms.filtering import group_rows, informative_groups, overlong_penalty


def test_informative_groups_are_those_with_reward_spread():
    rewards = torch.tensor(
        [1.0, 1.0, 1.0, 1.0] + [0.0, 1.0, 0.0, 0.0] + [0.5, 0.5, 0.5, 0.5] + [0.0, 0.0, 0.0, 1e-3]
    )
    assert informative_groups(rewards, 4).tolist() == [False, True, False, True]
    # exactly the groups whose advantages are not all zero
    advantages = group_advantages(rewards, 4).view(-1, 4)
    assert (advantages != 0).any(dim=1).tolist() == [False, True, False, True]
    # a group of one response has no spread
    assert informative_groups(torch.tensor([0.0, 1.0]), 1).tolist() == [False, False]
    assert informative_groups(torch.tensor([]), 4).tolist() == []
    with pytest.raises(ValueError, match="groups of 4"):
        informative_groups(torch.zeros(6), 4)


def test_group_rows_lists_the_rows_of_the_chosen_groups_in_order():
    assert group_rows(torch.tensor([2, 0]), 3).tolist() == [6, 7, 8, 0, 1, 2]
    assert group_rows(torch.tensor([], dtype=torch.long), 3).tolist() == []


def test_overlong_penalty_is_dapos_soft_punishment():
    # Lmax = 16, buffer Lc = 4: no penalty up to 12 tokens, then -(L - 12) / 4, and -1 beyond 16
    lengths = torch.tensor([0, 5, 12, 13, 14, 15, 16, 17, 40])
    expected = [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]
    assert overlong_penalty(lengths, 16, 4, 1.0).tolist() == expected
    assert overlong_penalty(lengths, 16, 4, 0.5).tolist() == [0.5 * x for x in expected]
    assert overlong_penalty(lengths, 16, 4, 1.0).dtype == torch.float32
    # the whole range as buffer: the penalty ramps from the first token
    assert overlong_penalty(torch.tensor([0, 2, 4]), 4, 4, 1.0).tolist() == [0.0, -0.5, -1.0]
    for buffer in (0, 17):
        with pytest.raises(ValueError, match="buffer"):
            overlong_penalty(lengths, 16, buffer, 1.0)
