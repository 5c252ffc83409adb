"""One decoding step of the (TP/PP-sharded) policy on mixtures of token embeddings.

The runner owns everything model-side of decoding: the KV cache (Megatron's
StaticInferenceContext, through `model_patches.inference_cache`), left padding, the mixture input embedding, hidden states sent between
pipeline stages each step, and dropping finished rows from the cache. It returns this TP rank's
vocabulary shard of the last-position logits on the last pipeline stage (None elsewhere).

Left padding: every row ends at the same position, so one cache offset serves the batch. Padded
keys are masked out explicitly (Megatron's local attention applies the mask we pass, also in
decode mode). RoPE sees shifted absolute positions, which leaves attention unchanged because it
depends only on relative positions.

`use_kv_cache=False` recomputes the whole sequence every step: the reference that tests hold
the cached path to.

FP8 (Transformer Engine) GEMMs need a token count that is a multiple of 16 (32 for MXFP8), and
the batch shrinks as rows finish. The runner keeps its batch at a multiple of that alignment by
appending "ghost" rows, copies of the first real row (its input, padding and cache), whose
outputs are dropped; callers never see them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_softgrpo.distributed import (
    ParallelState,
    receive_from_previous_stage,
    send_to_next_stage,
)
from megatron_softgrpo.models.build import token_alignment
from megatron_softgrpo.soft import MixtureRecord
from model_patches.inference_cache import KVCache
from model_patches.mixture_embedding import mixture_embedding
from model_patches.output_layer import sharded_inference_logits
from model_patches.sdpa_attention import additive_mask


class ModelRunner:
    def __init__(
        self,
        model,
        max_batch: int,
        max_len: int,
        parallel: ParallelState,
        use_kv_cache: bool = True,
        input_offset: Callable[[MixtureRecord], torch.Tensor | None] | None = None,
    ):
        """`input_offset(rows)`: what is added to the mixed input embedding (None: nothing)."""
        self.model, self.parallel = model, parallel
        self.input_offset = input_offset
        self.max_len = max_len
        self.use_kv_cache = use_kv_cache
        self.first_stage, self.last_stage = parallel.first_stage, parallel.last_stage
        self.dtype = next(model.parameters()).dtype
        self.hidden_size = model.config.hidden_size
        self.device = next(model.parameters()).device
        self.row_alignment = token_alignment(model.config)
        self.ghosts = 0  # rows appended to reach the alignment (copies of row 0)
        self.cache = (
            KVCache(_aligned(max_batch, self.row_alignment), max_len) if use_kv_cache else None
        )
        self.key_pad: torch.Tensor | None = None  # [B, L] True where the key is left padding
        self.history: MixtureRecord | None = None  # recompute mode: every input so far [B, L]

    @property
    def length(self) -> int:
        return 0 if self.key_pad is None else self.key_pad.shape[1]

    @torch.no_grad()
    def prefill(self, records: MixtureRecord, pad: torch.Tensor) -> torch.Tensor | None:
        """Run the left-padded prompts (rows [B, P]); returns last-position logits [B, V/TP]."""
        self.ghosts = _aligned(pad.shape[0], self.row_alignment) - pad.shape[0]
        records, pad = _with_ghosts(records, self.ghosts), _with_ghosts(pad, self.ghosts)
        self.key_pad = pad.to(self.device)
        if self.cache is not None:
            self.cache.reset()
        else:
            self.history = records
        return self._real(self._run(records, queries=pad.shape[1]))

    @torch.no_grad()
    def step(self, records: MixtureRecord) -> torch.Tensor | None:
        """Feed one new position per row (rows [B]); returns the next last-position logits."""
        if self.length >= self.max_len:
            raise RuntimeError(f"decoding past the KV cache length {self.max_len}")
        b = self.key_pad.shape[0]
        self.key_pad = torch.cat([self.key_pad, self.key_pad.new_zeros(b, 1)], dim=1)
        new = _with_ghosts(records, self.ghosts).map(lambda t: t[:, None])
        if self.cache is None:
            self.history = MixtureRecord.cat([self.history, new], dim=1)
            return self._real(self._run(self.history, queries=self.length))
        self.cache.decode_mode()
        return self._real(self._run(new, queries=1))

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished rows: later steps cost only the rows still decoding (and the ghosts that
        keep the batch aligned, copies of the first kept row)."""
        self.ghosts = _aligned(len(rows), self.row_alignment) - len(rows)
        rows = _with_ghosts(rows, self.ghosts)
        self.key_pad = self.key_pad[rows]
        if self.cache is None:
            self.history = self.history.map(lambda t: t[rows])
        else:
            self.cache.keep_rows(rows)

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

    def _run(self, records: MixtureRecord, queries: int) -> torch.Tensor | None:
        b = records.tokens.shape[0]
        decoder_input = None
        if self.first_stage:
            decoder_input = mixture_embedding(
                self.model.embedding.word_embeddings,
                records.mix_ids,
                records.mix_weights,
                None if self.input_offset is None else self.input_offset(records),
            )
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
        if not self.last_stage:
            send_to_next_stage(self.parallel, out)
            return None
        return out[:, -1].float()


def _aligned(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _with_ghosts(x, ghosts: int):
    """`x` (a tensor or MixtureRecord, rows first) with `ghosts` copies of its first row appended."""
    if not ghosts:
        return x
    if isinstance(x, MixtureRecord):
        return x.map(lambda t: _with_ghosts(t, ghosts))
    return torch.cat([x, x[:1].expand(ghosts, *x.shape[1:])])
