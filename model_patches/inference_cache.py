"""Megatron-Core's `StaticInferenceContext` as the reference (eager) engine uses it.

Megatron's layers allocate each layer's key/value tensors in the context on first use and read
them up to `sequence_len_offset`. Two things here go beyond its API: a new pass clears the
per-layer tensors (a context built for a larger batch would otherwise keep them), and finished
rows are dropped by indexing those tensors in place ([s, b, ...]: rows are dim 1).
"""

from __future__ import annotations

import torch
from megatron.core.inference.contexts import StaticInferenceContext


class KVCache:
    def __init__(self, max_batch: int, max_len: int):
        self.context = StaticInferenceContext(max_batch, max_len)  # handed to GPTModel.forward

    def reset(self) -> None:
        """Empty, for a new pass (the layers allocate again for its batch)."""
        self.context.reset()
        self.context.key_value_memory_dict.clear()

    def decode_mode(self) -> None:
        self.context.enable_decode_mode()

    def advance(self, positions: int) -> None:
        """The model has written `positions` more positions of every row."""
        self.context.sequence_len_offset += positions

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Only the rows `rows` (indices, in that order) of every layer's keys and values."""
        memory = self.context.key_value_memory_dict
        for layer, (k, v) in memory.items():
            memory[layer] = (k[:, rows].contiguous(), v[:, rows].contiguous())

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for kv in self.context.key_value_memory_dict.values()
            for t in kv
        )
