"""The decode backend on Megatron's own forward (the eager reference, and what FP8 needs).

The KV cache is Megatron's StaticInferenceContext (through `model_patches.inference_cache`);
hidden states go between pipeline stages every step. Left padding: every row ends at the same
position, so one cache offset serves the batch. Padded keys are masked out explicitly (Megatron's
local attention applies the mask we pass, also in decode mode). RoPE sees shifted absolute
positions, which leaves attention unchanged because it depends only on relative positions.

`use_kv_cache=False` recomputes the whole sequence every step: the reference that tests hold
the cached path to.

FP8 (Transformer Engine) GEMMs need a token count that is a multiple of 16 (32 for MXFP8), and
the batch shrinks as rows finish. The backend keeps its batch at a multiple of that alignment
by appending "ghost" rows, copies of the first real row (its input, padding and cache), whose
outputs are dropped; the engine never sees them.
"""

from __future__ import annotations

import torch

from megatron_softgrpo.distributed import (
    ParallelState,
    receive_from_previous_stage,
    send_to_next_stage,
)
from megatron_softgrpo.models.build import token_alignment
from megatron_softgrpo.rollout.backend import DecodeBackend
from megatron_softgrpo.soft import MixtureRecord
from model_patches.inference_cache import KVCache
from model_patches.mixture_embedding import mixture_embedding
from model_patches.output_layer import sharded_inference_logits
from model_patches.sdpa_attention import additive_mask


class MegatronBackend(DecodeBackend):
    def __init__(self, model, parallel: ParallelState, use_kv_cache: bool = True):
        super().__init__(model)
        self.parallel, self.use_kv_cache = parallel, use_kv_cache
        self.dtype = next(model.parameters()).dtype
        self.hidden_size = model.config.hidden_size
        self.row_alignment = token_alignment(model.config)
        self.cache: KVCache | None = None
        self.max_len = 0
        self.ghosts = 0  # rows appended to reach the alignment (copies of row 0)
        self.key_pad: torch.Tensor | None = None  # [B, L] True where the key is left padding
        self.history: tuple[MixtureRecord, torch.Tensor | None] | None = None  # recompute mode

    @property
    def length(self) -> int:
        return 0 if self.key_pad is None else self.key_pad.shape[1]

    def start(self, rows: int, max_len: int) -> bool:
        self.max_len = max_len
        if self.use_kv_cache:
            self.cache = KVCache(_aligned(rows, self.row_alignment), max_len)
        return True

    @torch.no_grad()
    def prefill(self, records, pad, offset):
        self.ghosts = _aligned(len(pad), self.row_alignment) - len(pad)
        records, pad = _with_ghosts(records, self.ghosts), _with_ghosts(pad, self.ghosts)
        offset = _with_ghosts(offset, self.ghosts)
        width = records.tokens.shape[1]
        self.key_pad = torch.arange(width, device=self.device)[None] < pad[:, None].to(self.device)
        if self.cache is None:
            self.history = records, offset
        return self._real(self._run(records, offset, queries=width))

    @torch.no_grad()
    def decode(self, records, offset):  # grows the host's padding mask: never captured
        if self.length >= self.max_len:
            raise RuntimeError(f"decoding past the KV cache length {self.max_len}")
        b = self.key_pad.shape[0]
        self.key_pad = torch.cat([self.key_pad, self.key_pad.new_zeros(b, 1)], dim=1)
        new = _with_ghosts(records, self.ghosts).map(lambda t: t[:, None])
        offset = None if offset is None else _with_ghosts(offset, self.ghosts)[:, None]
        if self.cache is None:
            seen, seen_offset = self.history
            self.history = (
                MixtureRecord.cat([seen, new], dim=1),
                None if offset is None else torch.cat([seen_offset, offset], dim=1),
            )
            return self._real(self._run(*self.history, queries=self.length))
        self.cache.decode_mode()
        return self._real(self._run(new, offset, queries=1))

    def release(self) -> None:
        self.cache, self.history, self.key_pad = None, None, None

    def keep_rows(self, index: torch.Tensor) -> None:
        self.ghosts = _aligned(len(index), self.row_alignment) - len(index)
        index = _with_ghosts(index, self.ghosts)
        self.key_pad = self.key_pad[index]
        if self.cache is None:
            records, offset = self.history
            self.history = (
                records.map(lambda t: t[index]),
                None if offset is None else offset[index],
            )
        else:
            self.cache.keep_rows(index)

    def _real(self, logits: torch.Tensor | None) -> torch.Tensor | None:
        if logits is None or not self.ghosts:
            return logits
        return logits[: logits.shape[0] - self.ghosts]

    def _mask(self, queries: int) -> torch.Tensor:
        """[B, 1, q, L] additive mask, built once for all layers: future keys and left padding blocked."""
        length = self.length
        causal = torch.ones(queries, length, dtype=torch.bool, device=self.device).triu(
            length - queries + 1
        )
        return additive_mask(causal[None, None] | self.key_pad[:, None, None, :], self.dtype)

    def _run(self, records: MixtureRecord, offset, queries: int) -> torch.Tensor | None:
        b = records.tokens.shape[0]
        decoder_input = None
        if self.parallel.first_stage:
            emb = self.model.embedding.word_embeddings
            decoder_input = mixture_embedding(emb, records.mix_ids, records.mix_weights, offset)
        else:
            hidden = torch.empty(queries, b, self.hidden_size, dtype=self.dtype, device=self.device)
            self.model.set_input_tensor(receive_from_previous_stage(self.parallel, hidden))
        position_ids = torch.arange(self.length - queries, self.length, device=self.device).expand(
            b, -1
        )
        with sharded_inference_logits(self.model):
            out = self.model(
                None,
                position_ids,
                self._mask(queries),
                decoder_input=decoder_input,
                inference_context=None if self.cache is None else self.cache.context,
                runtime_gather_output=True,
            )
        if self.cache is not None:
            self.cache.advance(queries)
        if not self.parallel.last_stage:
            send_to_next_stage(self.parallel, out)
            return None
        return out[:, -1].float()


def _aligned(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _with_ghosts(x, ghosts: int):
    """`x` (a tensor or MixtureRecord, rows first; or None) with `ghosts` copies of its first row."""
    if not ghosts or x is None:
        return x
    if isinstance(x, MixtureRecord):
        return x.map(lambda t: _with_ghosts(t, ghosts))
    return torch.cat([x, x[:1].expand(ghosts, *x.shape[1:])])
