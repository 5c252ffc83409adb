"""The decode backend on the fixed-shape step (`model_patches.static_decode`): eager, compiled
(`torch.compile(fullgraph=True)`) or captured as a CUDA graph.

Shapes depend only on the bucket (rows, cache columns), so the cache, the compiled code and the
graphs (one per (rows, length) bucket, in one memory pool) are reused across shrinks, passes and
RL steps: a shrink moves the rows still decoding to the front of the same cache. Weights are the
model's own tensors, updated in place by the trainer, so nothing needs refreshing, except on an
x86 CPU in fp32, where the step multiplies by packed copies, packed again at every pass's start.
Not for FP8 or sequence parallelism (`static_decode.unsupported`; `config/checks.py` refuses
them).
"""

from __future__ import annotations

import torch

from megatron_softgrpo.distributed import (
    ParallelState,
    receive_from_previous_stage,
    send_to_next_stage,
)
from megatron_softgrpo.rollout.backend import DecodeBackend
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
        """`row_bucket`: None is BATCH_BUCKET where a new row count costs a compile or a capture
        (compiled, or graphs on a GPU), else 1: an eager step takes any shape for free, so
        finished rows leave at once, as on Megatron's forward."""
        super().__init__(model)
        if row_bucket is None:
            shapes_cost = compile or (cuda_graphs and self.device.type == "cuda")
            row_bucket = BATCH_BUCKET if shapes_cost else 1
        self.row_bucket = row_bucket
        self.dtype = next(model.parameters()).dtype
        self.parallel = parallel
        self.step_fn = None  # the decode step: compiled on first use when asked for
        self.compile = compile
        self.cuda_graphs = cuda_graphs  # on a GPU only
        self.decoder: static_decode.StaticDecoder | None = None
        self.graphs: dict[tuple[int, int], _GraphedStep] = {}  # by (rows, length bucket)
        self.pool = None  # the graphs' shared memory pool
        self.column, self.pad = 0, None

    def start(self, rows: int, max_len: int) -> None:
        max_len = -(-max_len // static_decode.MIN_LENGTH_BUCKET) * static_decode.MIN_LENGTH_BUCKET
        dec = self.decoder
        if dec is None or dec.max_len != max_len or dec.batch < rows:  # else reuse, graphs too
            self.decoder = None  # one cache allocation at a time
            self.graphs.clear()
            pack = not self.compile and static_decode.can_pack(self.dtype, self.device)
            self.decoder = static_decode.StaticDecoder(
                self.model, rows, max_len, self.parallel.groups.tp, pack
            )
            self.step_fn = self.decoder.forward
            if self.compile:
                import torch._dynamo

                # one compiled graph per length bucket (powers of two): more than dynamo's default 8
                torch._dynamo.config.cache_size_limit = max(
                    torch._dynamo.config.cache_size_limit, 64
                )
                self.step_fn = torch.compile(self.decoder.forward, fullgraph=True, dynamic=False)
        else:
            self.decoder.pack_weights()  # the trainer may have updated the weights since

    @torch.no_grad()
    def prefill(self, records, pad, offset):
        self.pad, self.column = pad, 0
        return self._run(records, offset)

    @torch.no_grad()
    def step(self, records, offset):
        return self._run(
            records.map(lambda x: x[:, None]), None if offset is None else offset[:, None]
        )

    def keep_rows(self, index: torch.Tensor) -> None:
        self.decoder.keep_rows(index)  # one cache copy, in place
        self.pad = self.pad[index]

    def _run(self, records: MixtureRecord, offset) -> torch.Tensor | None:
        """Feed positions [column, column + q) of every row (records [B, q])."""
        dec = self.decoder
        b, q = records.tokens.shape
        if dec.first_stage:
            x = dec.embed(records.mix_ids, records.mix_weights, offset)
        else:
            x = torch.empty(b, q, dec.hidden, dtype=dec.dtype, device=dec.device)
            receive_from_previous_stage(self.parallel, x)
        columns = torch.arange(self.column, self.column + q, device=dec.device)
        self.column += q
        length = static_decode.length_bucket(self.column, dec.max_len)
        if q > 1:  # prefill: eager (one shape per prompt length)
            out = dec.forward(x, columns, self.pad, length)
        elif not (self.cuda_graphs and dec.device.type == "cuda"):
            out = self.step_fn(x, columns, self.pad, length)
        else:
            key = (b, length)
            if key not in self.graphs:
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                self.graphs[key] = _GraphedStep(
                    self.step_fn, x, columns, self.pad, length, self.pool
                )
            out = self.graphs[key](x, columns, self.pad)
        if not dec.last_stage:
            send_to_next_stage(self.parallel, out)
            return None
        return out


class _GraphedStep:
    """One length bucket's decode step as a CUDA graph: inputs are copied into static buffers and
    the captured kernels (TP all-reduces included) replay. The cache and weights are the same
    tensors at every replay, so a weight update in place needs no recapture."""

    def __init__(self, step, x, columns, pad, length: int, pool):
        self.x, self.columns, self.pad = x.clone(), columns.clone(), pad.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (allocations, autotuning)
            step(self.x, self.columns, self.pad, length)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: NCCL's watchdog thread polls its events during a capture of the TP
        # all-reduces, which the default (global) mode would turn into a capture error
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.out = step(self.x, self.columns, self.pad, length)

    def __call__(self, x, columns, pad) -> torch.Tensor:
        self.x.copy_(x)
        self.columns.copy_(columns)
        self.pad.copy_(pad)
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites the graph's output
