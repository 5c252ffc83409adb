"""Which prompts each RL step trains on: a deterministic order per (seed, epoch), batches of
`grpo.num_prompts_per_step`, and a position small enough to store in a checkpoint.

An epoch's order depends only on (seed, epoch), so a run restored from `state_dict()` hands
out exactly the batches the uninterrupted run would have. Each batch lies inside one epoch:
the last `len(problems) % batch_size` problems of an epoch's order are left out of that epoch
(others, after the next shuffle).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Generic, TypeVar

import numpy as np

from megatron_softgrpo.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class SamplerState:
    """The position of the next batch, plus what it is only valid for (checked on restore)."""

    epoch: int
    index: int  # items of this epoch's order already handed out
    num_items: int
    seed: int
    shuffle: bool


class PromptSampler(Generic[T]):
    """Hands out `batch_size` items per call; `epoch` is the epoch of the next batch (stop at grpo.max_num_epochs)."""

    def __init__(self, items: Sequence[T], batch_size: int, *, seed: int, shuffle: bool = True):
        if len(items) < batch_size:
            raise UserError(
                f"grpo.num_prompts_per_step={batch_size}: the dataset has only {len(items)} problems; "
                "lower it or use a larger dataset"
            )
        self.items, self.batch_size, self.seed, self.shuffle = items, batch_size, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = -1, np.arange(0)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.items) // self.batch_size

    def order(self, epoch: int) -> np.ndarray:
        """The item indices of an epoch, in the order they are handed out."""
        if not self.shuffle:
            return np.arange(len(self.items))
        # SeedSequence mixes (seed, epoch) into independent streams; seeds must be non-negative
        return np.random.default_rng([self.seed % 2**64, epoch]).permutation(len(self.items))

    def next_batch(self) -> list[T]:
        if self._order_epoch != self.epoch:
            self._order_epoch, self._order = self.epoch, self.order(self.epoch)
        chosen = self._order[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        self._wrap()
        return [self.items[i] for i in chosen]

    def _wrap(self) -> None:
        """Keep `epoch` the epoch of the next batch: start the next epoch when this one cannot fill a batch."""
        if self.index + self.batch_size > len(self.items):
            self.epoch, self.index = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return asdict(
            SamplerState(self.epoch, self.index, len(self.items), self.seed, self.shuffle)
        )

    def load_state_dict(self, state: dict) -> None:
        try:
            saved = SamplerState(**state)
        except TypeError:
            expected = list(SamplerState.__dataclass_fields__)
            raise UserError(
                f"checkpoint data position {state}: expected the keys {expected}"
            ) from None
        this_run = SamplerState(saved.epoch, saved.index, len(self.items), self.seed, self.shuffle)
        if saved != this_run:
            raise UserError(
                f"checkpoint data position was saved for {saved.num_items} problems with seed {saved.seed} and "
                f"shuffle={saved.shuffle}; this run has {len(self.items)} problems with seed {self.seed} and "
                f"shuffle={self.shuffle}: resuming needs the same data, grpo.seed and data.shuffle"
            )
        self.epoch, self.index = saved.epoch, saved.index
        self._wrap()  # a run resumed with a larger batch size
