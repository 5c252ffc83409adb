"""The decode backend on the fixed-shape step (`model_patches.static_decode`).

Shapes depend only on the bucket (rows, cache columns), and a step reads its cache column from
the device, so the engine can replay a whole token step around `decode` (`replay.py`): captured
as a CUDA graph on a GPU (`cuda_graphs`), or compiled (`compile`), once per (rows, length
bucket), reused across shrinks and passes until `release()`: a shrink moves the rows still
decoding to the front of the same cache. At PP > 1 the token step hands off between stages, so
only each stage's layers are replayed, from a static input.
Weights are the model's own tensors, updated in place by the trainer, so nothing needs
refreshing, except on an x86 CPU in fp32 (uncompiled), where the step multiplies by packed
copies, packed again at every pass's start. Not for FP8 or sequence parallelism
(`static_decode.unsupported`; `config/checks.py` refuses them).
"""

from __future__ import annotations

import torch

from megatron_softgrpo.distributed import (
    ParallelState,
    receive_from_previous_stage,
    send_to_next_stage,
)
from megatron_softgrpo.rollout.backend import DecodeBackend
from megatron_softgrpo.rollout.replay import Replays
from megatron_softgrpo.soft import MixtureRecord
from model_patches import static_decode

BATCH_BUCKET = 8  # rows are padded to a multiple of this


class StaticBackend(DecodeBackend):
    def __init__(
        self,
        model,
        parallel: ParallelState,
        compile: bool = False,
        cuda_graphs: bool = False,
        row_bucket: int | None = None,
    ):
        """`compile`, `cuda_graphs` (on a GPU): how the engine replays a token step at PP=1.
        `row_bucket`: None is BATCH_BUCKET where a new row count costs a compile or a capture,
        else 1: an eager step takes any shape for free, so finished rows leave at once, as on
        Megatron's forward."""
        super().__init__(model)
        mode = (
            "graph"
            if cuda_graphs and self.device.type == "cuda"
            else "compile"
            if compile
            else None
        )
        self.capture = mode if parallel.pp == 1 else None  # the engine's, of whole token steps
        # between pipeline stages' hand-offs: this stage's layers alone, from a static input
        self.stage_steps = Replays(mode if parallel.pp > 1 else None)
        if row_bucket is None:
            row_bucket = 1 if mode is None else BATCH_BUCKET
        self.row_bucket = row_bucket
        self.dtype = next(model.parameters()).dtype
        self.parallel = parallel
        self.decoder: static_decode.StaticDecoder | None = None
        self.column, self.length = 0, 0  # the host's next cache column, its length bucket
        self.columns: torch.Tensor | None = None  # [1] the same column, on the device
        self.pad: torch.Tensor | None = None  # [rows] each row's left padding, in place
        self.x = self.out = None  # a replayed stage step's input and output

    def start(self, rows: int, max_len: int) -> bool:
        max_len = -(-max_len // static_decode.MIN_LENGTH_BUCKET) * static_decode.MIN_LENGTH_BUCKET
        dec = self.decoder
        if dec is not None and dec.max_len == max_len and dec.batch >= rows:
            dec.pack_weights()  # the trainer may have updated the weights since
            return False
        self.decoder = None  # one cache allocation at a time
        replayed = self.capture or self.stage_steps.mode  # packed copies: eager steps only
        pack = not replayed and static_decode.can_pack(self.dtype, self.device)
        self.decoder = static_decode.StaticDecoder(
            self.model, rows, max_len, self.parallel.groups.tp, pack
        )
        dec = self.decoder
        self.columns = torch.zeros(1, dtype=torch.long, device=self.device)
        self.pad = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.stage_steps.clear()
        if self.stage_steps.mode is not None:
            self.x = torch.zeros(rows, 1, dec.hidden, dtype=dec.dtype, device=self.device)
            self.out = (
                torch.zeros(rows, dec.output_param.shape[0], device=self.device)  # fp32 logits
                if dec.last_stage
                else torch.zeros_like(self.x)
            )
        return True

    @torch.no_grad()
    def prefill(self, records, pad, offset):
        q = records.tokens.shape[1]
        self.pad[: len(pad)] = pad
        self.column, self.length = 0, 0
        x = self._input(records, offset)
        columns = torch.arange(q, device=self.device)
        out = self.decoder.forward(x, columns, self.pad[: len(pad)], self._advance(q))
        self.columns.fill_(q)
        return self._output(out)

    def advance(self) -> int:
        return self._advance(1)

    @torch.no_grad()
    def decode(self, records, offset):
        b = records.tokens.shape[0]
        replayed = self.stage_steps.mode is not None
        x = self._input(
            records.map(lambda t: t[:, None]),
            None if offset is None else offset[:, None],
            self.x[:b] if replayed else None,  # the replayed stage step's static input
        )
        if not replayed:
            out = self.decoder.forward(x, self.columns, self.pad[:b], self.length)
        else:
            self.stage_steps.run((b, self.length), lambda: self._stage_step(b, self.length))
            out = self.out[:b]  # rewritten by the next step: consumed before it
        self.columns.add_(1)  # on the device: a replayed step moves on by itself
        return self._output(out)

    def release(self) -> None:
        self.decoder = self.columns = self.pad = self.x = self.out = None
        self.stage_steps.clear()

    def _stage_step(self, b: int, length: int):
        x, out, pad = self.x[:b], self.out[:b], self.pad[:b]

        def step() -> None:
            out.copy_(self.decoder.forward(x, self.columns, pad, length))

        return step

    def keep_rows(self, index: torch.Tensor) -> None:
        self.decoder.keep_rows(index)  # one cache copy, in place
        self.pad[: len(index)] = self.pad[index]

    def _advance(self, q: int) -> int:
        """The host's bookkeeping of q new positions: the length bucket attention reads."""
        self.column += q
        self.length = static_decode.length_bucket(self.column, self.decoder.max_len)
        return self.length

    def _input(self, records: MixtureRecord, offset, into: torch.Tensor | None = None):
        """This stage's input [B, q, h]: the mixed embedding, or the previous stage's output
        (received straight into `into`, where given)."""
        dec = self.decoder
        if dec.first_stage:
            x = dec.embed(records.mix_ids, records.mix_weights, offset)
            return x if into is None else into.copy_(x)
        b, q = records.tokens.shape
        if into is None:
            into = torch.empty(b, q, dec.hidden, dtype=dec.dtype, device=dec.device)
        receive_from_previous_stage(self.parallel, into)
        return into

    def _output(self, out: torch.Tensor) -> torch.Tensor | None:
        if not self.decoder.last_stage:
            send_to_next_stage(self.parallel, out)
            return None
        return out
