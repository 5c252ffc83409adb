"""The one batch container: shapes checked on construction, and select / slice / pad / cat applied
to every declared field by its shape."""

from __future__ import annotations

import pytest
import torch

from megatron_softgrpo.batch import Batch
from megatron_softgrpo.soft import MixtureRecord


def _batch(rows: int, width: int, first: int = 0) -> Batch:
    tokens = torch.arange(first, first + rows * width).view(rows, width)
    mask = torch.ones(rows, width, dtype=torch.bool)
    mask[:, 0] = False
    return Batch(
        MixtureRecord.discrete(tokens, 3),
        mask,
        rollout_logp=-tokens.float(),
        response_lengths=torch.arange(first, first + rows),
        texts=[f"t{first + i}" for i in range(rows)],
        policy_version=first,
    )


def test_fields_are_checked_against_the_records():
    with pytest.raises(
        ValueError, match=r"rollout_logp has shape \(2, 3\); the records are \(2, 4\)"
    ):
        Batch(_batch(2, 4).records, _batch(2, 4).loss_mask, rollout_logp=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"texts has shape \(3,\)"):
        Batch(_batch(2, 4).records, _batch(2, 4).loss_mask, texts=["a", "b", "c"])
    with pytest.raises(ValueError, match="record 0 has no context"):
        Batch(_batch(2, 4).records, torch.ones(2, 4, dtype=torch.bool))


def test_select_and_slice_take_rows_of_every_field():
    b = _batch(4, 3)
    picked = b.select([2, 0])
    assert picked.texts == ["t2", "t0"] and picked.response_lengths.tolist() == [2, 0]
    assert torch.equal(picked.records.tokens, b.records.tokens[[2, 0]])
    assert torch.equal(picked.rollout_logp, b.rollout_logp[[2, 0]])
    part = b.row_slice(1, 3)
    assert part.texts == ["t1", "t2"] and torch.equal(part.loss_mask, b.loss_mask[1:3])


def test_cat_pads_positions_with_unscored_zeros_and_joins_rows():
    a, b = _batch(2, 3), _batch(1, 5, first=10)
    joined = Batch.cat([a, b])
    assert (joined.num_rows, joined.seq_len) == (3, 5)
    assert joined.texts == ["t0", "t1", "t10"]
    assert not joined.loss_mask[:2, 3:].any() and (joined.records.mix_weights[:2, 3:] == 0).all()
    assert torch.equal(joined.records.tokens[2], b.records.tokens[0])
    assert joined.policy_version == 0  # the oldest policy among the parts
    # a field one part lacks is empty in the whole
    assert Batch.cat([a, b.only("rollout_logp")]).texts is None


def test_padded_rows_and_only():
    b = _batch(2, 3).padded_rows(4)
    assert b.num_rows == 4 and b.texts[2:] == ["", ""] and not b.loss_mask[2:].any()
    kept = b.only("rollout_logp")
    assert kept.rollout_logp is not None and kept.texts is None and kept.response_lengths is None
    assert kept.loss_mask is b.loss_mask


def test_positions_leave_per_row_fields_alone():
    b = _batch(2, 4).positions(lambda t: t[:, :2])
    assert b.seq_len == 2 and b.rollout_logp.shape == (2, 2) and b.response_lengths.shape == (2,)
