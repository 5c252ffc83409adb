"""The decode backend interface: how the rollout engine runs the model, one step at a time.

A backend owns the model side of a decoding pass: its KV cache, the rows' left padding, the
mixture input embedding and the pipeline hand-off. The engine owns everything else (sampling,
the phase machine, records), so a backend never sees a sampler or a phase. Adding one: subclass
`DecodeBackend`, implement the abstract methods, and name it in `engine.make_engine`; the
backend-against-backend equality tests (tests/test_rollout_backends.py) then hold it to the
others.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

from megatron_softgrpo.soft import MixtureRecord


class DecodeBackend(ABC):
    row_bucket: int = 1  # the engine pads a pass's rows, and shrinks them, to multiples of this
    capture: str | None = None  # how the engine replays a token step (`replay.Replays`' modes)

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device

    @abstractmethod
    def start(self, rows: int, max_len: int) -> bool:
        """Begin a pass of `rows` rows and at most `max_len` positions (prompt included); True
        when it allocated a new cache (a step captured on the old one is stale)."""

    @abstractmethod
    def prefill(
        self, records: MixtureRecord, pad: torch.Tensor, offset: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Run the left-padded prompts (records [B, P]; pad [B] each row's padding length);
        returns this TP rank's logit shard of the last position [B, V/TP] on the last pipeline
        stage, None elsewhere. `offset` [B, P, h] (or None) is added to the mixed input."""

    def advance(self) -> int | None:
        """The host's part of the next step; the step's shape key (the same key: the same
        kernels on the same tensors), or None: `decode` cannot be captured."""
        return None

    @abstractmethod
    def decode(self, records: MixtureRecord, offset: torch.Tensor | None) -> torch.Tensor | None:
        """Feed one new position per row (records [B]) after `advance`; the next logits, as
        `prefill`."""

    def step(self, records: MixtureRecord, offset: torch.Tensor | None) -> torch.Tensor | None:
        """One whole step: `advance`, then `decode`."""
        self.advance()
        return self.decode(records, offset)

    @abstractmethod
    def release(self) -> None:
        """Free the cache (the next `start` allocates it again)."""

    @abstractmethod
    def keep_rows(self, index: torch.Tensor) -> None:
        """Continue with the rows `index` only (rows may repeat: fillers of a bucket)."""

    @torch.no_grad()
    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy `weights` (this rank's shards, by parameter name) into the model in place: every
        backend decodes on the model's own tensors, so nothing else needs refreshing."""
        params = dict(self.model.named_parameters())
        unknown = sorted(set(weights) - set(params))
        if unknown:
            raise KeyError(f"load_weights: no parameter named {unknown[0]!r} in the model")
        for name, value in weights.items():
            params[name].copy_(value)
