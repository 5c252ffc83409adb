"""The policy's batch of trajectories and its alignment convention.

Every [B, S] field is indexed by **record position**: index j is the stored record j of a
row (`rows`: prompt tokens, then the generated steps, then right padding), and every
per-position value at j belongs to record j:

    loss_mask[b, j]   record j is a generated step to score (prompt and padding: False)
    advantages[b, j]  the advantage of the response that record j belongs to
    old_logp[b, j]    log-density of record j under the old policy (PolicyWorker.compute_logprobs)
    ref_logp[b, j]    the same under the reference policy

The log-density of record j is computed from the model's output at position j - 1 (the model
reads records 0..j-1 as inputs): the worker shifts internally, callers never do. Record 0 has
no context and is never scored (loss_mask[:, 0] must be False). Results of the worker are
record-aligned too, with 0 wherever loss_mask is False.

Rows are right-padded to one length S; the worker runs them at that length (pipeline
parallelism needs one sequence length per call), so pad a batch to its longest row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from megatron_softgrpo.soft import MixtureRecord


@dataclass
class PolicyBatch:
    records: MixtureRecord  # [B, S] records; row j is the model's input at position j
    loss_mask: torch.Tensor  # [B, S] bool
    advantages: torch.Tensor | None = None  # [B, S] fp32 (train_step)
    old_logp: torch.Tensor | None = None  # [B, S] fp32 (train_step)
    ref_logp: torch.Tensor | None = None  # [B, S] fp32 (train_step with a KL penalty)

    def __post_init__(self):
        shape = tuple(self.records.tokens.shape)
        if len(shape) != 2:
            raise ValueError(f"records must be [B, S], got tokens of shape {shape}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "records" and value is not None and tuple(value.shape) != shape:
                raise ValueError(
                    f"{f.name} has shape {tuple(value.shape)}; the records are {shape}"
                )
        if self.loss_mask.dtype != torch.bool:
            raise ValueError(f"loss_mask must be bool, got {self.loss_mask.dtype}")
        if shape[1] and self.loss_mask[:, 0].any():
            raise ValueError(
                "loss_mask[:, 0] is True: record 0 has no context and cannot be scored"
            )

    @property
    def num_rows(self) -> int:
        return self.records.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.records.tokens.shape[1]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PolicyBatch:
        """`fn` applied to every tensor (row slicing, padding, device moves); absent fields stay None."""
        return PolicyBatch(
            records=self.records.map(fn),
            **{
                f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                for f in fields(self)
                if f.name != "records"
            },
        )

    def row_slice(self, start: int, stop: int) -> PolicyBatch:
        return self.map(lambda t: t[start:stop])

    def padded_rows(self, num_rows: int) -> PolicyBatch:
        """Append all-zero rows (no scored position, zero input weights) up to `num_rows` rows."""
        extra = num_rows - self.num_rows
        if extra <= 0:
            return self
        return self.map(lambda t: torch.cat([t, t.new_zeros((extra, *t.shape[1:]))]))

    def padded_positions(self, seq_len: int) -> PolicyBatch:
        """Append all-zero positions (unscored, zero input weights) up to `seq_len`: after every
        real record, so causal attention leaves the real positions' outputs unchanged."""
        extra = seq_len - self.seq_len
        if extra <= 0:
            return self
        return self.map(
            lambda t: torch.cat([t, t.new_zeros((t.shape[0], extra, *t.shape[2:]))], dim=1)
        )

    def without_targets(self) -> PolicyBatch:
        """Records and mask only: what scoring needs."""
        return replace(self, advantages=None, old_logp=None, ref_logp=None)
