"""The one batch container: the rollout's rows, and what each later stage adds to them.

`Batch` carries every field an RL step reads or writes, and each field declares its shape:

- per position ([B, S], `records` included: a `MixtureRecord` whose mixture fields are per slot,
  [B, S, K]);
- per scored unit: the log-densities, [B, S], or [B, S, K] where the scorer scores each slot
  (`Scorer.per_slot`, Multiplex Thinking; `Scorer.scored_units` says which);
- per row ([B] tensors, or lists of B items such as the decoded texts).

Select, slice, pad, concatenate and the data-parallel gather are written once, over the declared
fields; a new field is one line here. A field no stage has filled yet is None.

Alignment: every per-position field is indexed by **record position**: index j is the stored
record j of a row (prompt tokens, then the generated steps, then right padding), and every
per-position value at j belongs to record j:

    loss_mask[b, j]     record j is a generated step to score (prompt and padding: False)
    rollout_logp[b, j]  its log-density under the rollout (the decoding's own numbers)
    advantages[b, j]    the advantage of the response that record j belongs to
    old_logp[b, j]      its log-density under the old policy (PolicyWorker.compute_logprobs)
    ref_logp[b, j]      the same under the reference policy

The log-density of record j is computed from the model's output at position j - 1 (the model
reads records 0..j-1 as inputs): the worker shifts internally, callers never do. Record 0 has no
context and is never scored (loss_mask[:, 0] is False). Rows are right-padded to one length S,
after every real record, so causal attention leaves the real positions unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from megatron_softgrpo.distributed import ParallelState, gather_data_parallel, max_data_parallel
from megatron_softgrpo.soft import MixtureRecord

ROW, POSITION, UNIT = "row", "position", "unit"


def _per(shape: str):
    return field(default=None, metadata={"shape": shape})


@dataclass
class Batch:
    """B rows, prompt-major when they come from a rollout (row p*G + g)."""

    records: MixtureRecord  # [B, S]: record j is the model's input at position j
    loss_mask: torch.Tensor = _per(POSITION)  # bool
    rollout_logp: torch.Tensor | None = _per(UNIT)
    advantages: torch.Tensor | None = _per(POSITION)
    old_logp: torch.Tensor | None = _per(UNIT)
    ref_logp: torch.Tensor | None = _per(UNIT)
    # per row: the rollout's
    prompt_lengths: torch.Tensor | None = _per(ROW)
    response_lengths: torch.Tensor | None = _per(ROW)
    think_lengths: torch.Tensor | None = _per(ROW)  # before the answer phase (= length if none)
    finish_reasons: list[str] | None = _per(ROW)  # "eos" | "stop" | "length"
    truncated: torch.Tensor | None = _per(ROW)  # bool: finish reason "length"
    texts: list[str] | None = _per(ROW)  # the whole response
    thinking_texts: list[str] | None = _per(ROW)
    answer_texts: list[str] | None = _per(ROW)
    # per row: the reward stage's
    correct: torch.Tensor | None = _per(ROW)  # the named reward (correctness)
    answered: torch.Tensor | None = _per(ROW)  # an answer can be read (env.answer_format)
    rewards: torch.Tensor | None = _per(ROW)  # after shaping: what the advantages use
    penalty: torch.Tensor | None = _per(ROW)  # the env.overlong_penalty part of `rewards`
    policy_version: int = 0  # optimizer steps of the policy that decoded the rows

    def __post_init__(self):
        shape = tuple(self.records.tokens.shape)
        if len(shape) != 2:
            raise ValueError(f"records must be [B, S], got tokens of shape {shape}")
        for name, kind in _SHAPES.items():
            value = getattr(self, name)
            if value is None:
                continue
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else (len(value),)
            want = shape[:1] if kind == ROW else shape
            dims = {POSITION: (2,), UNIT: (2, 3)}.get(kind)  # a unit may be a slot: [B, S, K]
            if got[: len(want)] != want or (dims and len(got) not in dims):
                raise ValueError(f"{name} has shape {got}; the records are {shape}")
        if self.loss_mask is not None:
            if self.loss_mask.dtype != torch.bool:
                raise ValueError(f"loss_mask must be bool, got {self.loss_mask.dtype}")
            if shape[1] and self.loss_mask[:, 0].any():
                raise ValueError("loss_mask[:, 0] is True: record 0 has no context")

    @property
    def num_rows(self) -> int:
        return self.records.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.records.tokens.shape[1]

    def _apply(self, rows: Callable | None, positions: Callable | None) -> Batch:
        """`rows` on every per-row field (tensors and lists), `positions` on every per-position
        or per-unit one and the records; None leaves those fields as they are."""
        changed = {}
        for name, kind in _SHAPES.items():
            fn, value = (rows if kind == ROW else positions), getattr(self, name)
            if fn is not None and value is not None:
                changed[name] = fn(value)
        if positions is not None:
            changed["records"] = self.records.map(positions)
        return replace(self, **changed)

    def row_slice(self, start: int, stop: int) -> Batch:
        return self._apply(lambda x: x[start:stop], lambda t: t[start:stop])

    def select(self, index: Sequence[int] | torch.Tensor) -> Batch:
        """The rows `index`, in that order."""
        index = torch.as_tensor(index, dtype=torch.long)
        picks = index.tolist()

        def pick(x):
            return x[index.to(x.device)] if isinstance(x, torch.Tensor) else [x[i] for i in picks]

        return self._apply(pick, pick)

    def to(self, device) -> Batch:
        return self._apply(
            lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, lambda t: t.to(device)
        )

    def positions(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """`fn` on every per-position tensor and the records (trimming, padding columns)."""
        return self._apply(None, fn)

    def padded_positions(self, seq_len: int) -> Batch:
        """All-zero positions (unscored, zero input weights) appended up to `seq_len`."""
        extra = seq_len - self.seq_len
        if extra <= 0:
            return self
        return self.positions(
            lambda t: torch.cat([t, t.new_zeros((t.shape[0], extra, *t.shape[2:]))], 1)
        )

    def padded_rows(self, num_rows: int) -> Batch:
        """All-zero rows (no scored position, zero input weights, empty texts) up to `num_rows`."""
        extra = num_rows - self.num_rows
        if extra <= 0:
            return self

        def pad(x):
            if isinstance(x, torch.Tensor):
                return torch.cat([x, x.new_zeros((extra, *x.shape[1:]))])
            return list(x) + [""] * extra

        return self._apply(pad, pad)

    def only(self, *names: str) -> Batch:
        """The records, the loss mask and the fields `names`; the others empty (what a stage
        hands on)."""
        kept = {"records", "loss_mask", *names}
        return replace(self, **{n: None for n in _SHAPES if n not in kept})

    @staticmethod
    def cat(parts: Sequence[Batch], pad: Callable[[Batch, int], Batch] | None = None) -> Batch:
        """The rows of every part in order, each right-padded to the longest first (`pad(part,
        seq_len)`; default all-zero positions). Fields empty in any part are empty here."""
        width = max(p.seq_len for p in parts)
        parts = [(pad or Batch.padded_positions)(p, width) for p in parts]
        joined = {"records": MixtureRecord.cat([p.records for p in parts])}
        for name in _SHAPES:
            values = [getattr(p, name) for p in parts]
            if any(v is None for v in values):
                continue
            joined[name] = (
                torch.cat(values)
                if isinstance(values[0], torch.Tensor)
                else [x for v in values for x in v]
            )
        return Batch(**joined, policy_version=min(p.policy_version for p in parts))

    def gather_data_parallel(self, parallel: ParallelState) -> Batch:
        """Every data-parallel rank's rows, in rank order, on every rank. Lists (texts) stay with
        the rank that decoded them: empty here."""
        device = self.records.tokens.device  # the grading's CPU tensors join the model's device
        local = self.to(device).padded_positions(max_data_parallel(parallel, self.seq_len, device))
        gather = lambda t: gather_data_parallel(parallel, t)  # noqa: E731  (one name, both shapes)
        tensors = [n for n in _SHAPES if isinstance(getattr(self, n), torch.Tensor)]
        return local.only(*tensors)._apply(gather, gather)


_SHAPES = {f.name: f.metadata["shape"] for f in fields(Batch) if "shape" in f.metadata}
