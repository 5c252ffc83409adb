"""The rollout engine on the static decode step: the same records as `RolloutEngine`, faster.

`RolloutEngine` (engine.py) is the reference: it drops finished rows from the batch and keeps
each row's phase in host lists, one device-to-host sync and one cache copy per finished row.
This engine runs every step at fixed shapes (docs/architecture.md, "The static decode path"):

- the model step is `model_patches.static_decode.StaticDecoder` over a preallocated cache,
  optionally compiled (`torch.compile(fullgraph=True)`) or captured as a CUDA graph;
- both samplers run on every row and the step is selected per row by its phase; the noise of
  every (step, row) is drawn once ahead (`NoiseTapes`), so a row's randomness is the one the
  reference engine gives it;
- the phase machine (thinking / forced marker / answer, EOS, stop strings, length limit) is
  a handful of tensor ops, and markers and stop strings are matched on the device by byte
  automata over the token vocabulary (`string_automaton.py`), exact for multi-token markers;
- finished rows stay in the batch, masked (their steps are computed and never recorded) until
  half the bucket has finished; then the rows still decoding move to a smaller bucket, one
  cache copy per halving instead of one per finished row. The host reads one count of rows
  still decoding per step, copied without blocking and read a few steps later on a GPU (the
  extra steps are discarded; `flag_lag` sets the lag, so the CPU tests run the GPU's). A late
  count is an upper bound: a shrink that finds no row still decoding ends the pass.

Rows are padded to a batch bucket and the cache to a length bucket, so decoders (and their
compiled code or graphs) are reused across RL steps; weights are the model's own tensors,
updated in place by the trainer, so nothing needs refreshing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from megatron_softgrpo.distributed import (
    ParallelState,
    broadcast_from_last_stage,
    receive_from_previous_stage,
    send_to_next_stage,
)
from megatron_softgrpo.rollout.engine import (
    ANSWER,
    FORCE,
    REASONS,
    THINK,
    NoiseTapes,
    RolloutEngine,
    RolloutSettings,
    _discrete_step,
    _marker_step,
    _ResponseBuffer,
    _RowState,
    _step_tensors,
)
from megatron_softgrpo.rollout.string_automaton import StringAutomaton
from megatron_softgrpo.soft import MixtureRecord, VocabShard
from megatron_softgrpo.soft.logprob import discrete_log_density
from model_patches import static_decode

BATCH_BUCKET = 8  # rows are padded to a multiple of this
GPU_FLAG_LAG = 4  # a GPU step reads the "all finished" flag copied this many steps earlier


def _bucket(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class _DeviceState:
    """Per-row phase machine state, [B] tensors on the device (the host lists of engine.py)."""

    alive: torch.Tensor
    phase: torch.Tensor
    soft_steps: torch.Tensor
    low_entropy: torch.Tensor
    forced_pos: torch.Tensor
    think_length: torch.Tensor
    length: torch.Tensor
    reason: torch.Tensor
    marker: torch.Tensor  # marker automaton state
    stops: torch.Tensor  # stop-string automaton state

    @classmethod
    def start(cls, rows: int, real: int, discrete_only: bool, marker, stops, device):
        zeros = torch.zeros(rows, dtype=torch.long, device=device)
        return cls(
            alive=torch.arange(rows, device=device) < real,  # padding rows never count
            phase=torch.full_like(zeros, ANSWER if discrete_only else THINK),
            soft_steps=zeros.clone(),
            low_entropy=zeros.clone(),
            forced_pos=zeros.clone(),
            think_length=torch.full_like(zeros, 0 if discrete_only else 1 << 30),
            length=zeros.clone(),
            reason=torch.full_like(zeros, REASONS.index("length")),
            marker=marker.initial(rows),
            stops=stops.initial(rows),
        )

    def select(self, index: torch.Tensor, valid: torch.Tensor) -> None:
        """Keep the rows `index` (a smaller batch); rows where `valid` is False are fillers."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name)[index])
        self.alive = self.alive & valid


@dataclass
class _Kept:
    index: torch.Tensor  # [B'] batch positions kept (fillers repeat one)
    valid: torch.Tensor  # [B'] False for fillers


class _Outcome:
    """Each original row's (length, think length, finish reason), kept across shrinks."""

    def __init__(self, rows: int, state: _DeviceState):
        self.values = torch.stack([state.length, state.think_length, state.reason])[:, :1].repeat(
            1, rows
        )

    def record(self, origin: torch.Tensor, state: _DeviceState) -> None:
        self.values[:, origin] = torch.stack([state.length, state.think_length, state.reason])


class StaticRolloutEngine(RolloutEngine):
    def __init__(
        self,
        model,
        tokenizer,
        shard: VocabShard,
        settings: RolloutSettings,
        parallel: ParallelState,
        pad_id: int = 0,
        compile: bool = False,
        cuda_graphs: bool = False,
        shrink: bool = True,
        flag_lag: int | None = None,
    ):
        """`shrink`: move to a smaller batch bucket once half the rows have finished (else they
        stay, masked, to the end of the pass). `flag_lag`: steps the host reads the count of rows
        still decoding late (None: GPU_FLAG_LAG on a GPU, 0 on the CPU)."""
        super().__init__(model, tokenizer, shard, settings, parallel, pad_id)
        self.device = next(model.parameters()).device
        self.compile = compile
        self.cuda_graphs = cuda_graphs
        self.shrink = shrink
        if flag_lag is None:  # a GPU reads the count late not to stall; the CPU at once (free)
            flag_lag = GPU_FLAG_LAG if self.device.type == "cuda" else 0
        self.flag_lag = flag_lag
        self.marker_automaton = StringAutomaton.build(tokenizer, [settings.think_end], self.device)
        self.stop_automaton = StringAutomaton.build(
            tokenizer, list(settings.stop_strings), self.device
        )
        self.eos = torch.tensor(sorted(settings.eos_ids), dtype=torch.long, device=self.device)
        self.marker_tokens = torch.tensor(self.marker_ids, dtype=torch.long, device=self.device)
        self._decoders: dict[tuple[int, int], _Decoder] = {}

    # ------------------------------------------------------------------ decoding pass

    def _generate(self, prompts: list[list[int]], num_generations: int, progress):
        last_stage = self.parallel.last_stage
        device, k = self.device, self.mixture_size
        prompt_rows = [p for p in prompts for _ in range(num_generations)]
        b, plen = len(prompt_rows), max(len(p) for p in prompt_rows)
        max_new = self.settings.max_new_tokens
        rows = _bucket(b, BATCH_BUCKET)
        decoder = self._decoder(rows, _bucket(plen + max_new, static_decode.MIN_LENGTH_BUCKET))

        tokens = torch.full((rows, plen), self.pad_id, dtype=torch.long, device=device)
        pad = torch.full(
            (rows,), plen - 1, dtype=torch.long, device=device
        )  # padding rows: 1 token
        for i, p in enumerate(prompt_rows):
            tokens[i, plen - len(p) :] = torch.tensor(p, device=device)
            pad[i] = plen - len(p)
        logits = decoder.run(MixtureRecord.discrete(tokens, k), 0, pad)

        # one spare buffer row (index `rows`) takes the records of rows added after a shrink
        out = _ResponseBuffer(rows + 1, max_new, k, device)
        tapes = (
            _padded(NoiseTapes.draw(self.settings, max_new, b, device), rows + 1)
            if last_stage
            else None
        )
        state = _DeviceState.start(
            rows,
            b,
            self.settings.thinking_sampler is None,
            self.marker_automaton,
            self.stop_automaton,
            device,
        )
        origin = torch.arange(rows, device=device)  # batch position -> buffer (= original) row
        outcome = _Outcome(rows + 1, state)
        flags = _FinishedFlags(device, self.flag_lag)
        for t in range(max_new):
            if last_stage:
                step, scored = self._step(logits, state, t, tapes, origin)
            else:
                step, scored = self._empty_step(len(origin), device), state.alive.clone()
            broadcast_from_last_stage(self.parallel, *_step_tensors(step), scored, state.alive)
            out.record(origin, t, step, scored)
            alive = flags.alive_rows(state.alive)
            if progress is not None:
                progress(b - min(alive, b), t + 1)  # the lagged count: finished rows, or fewer
            if t == max_new - 1 or alive == 0:
                break
            feed = MixtureRecord(**{f.name: getattr(step, f.name) for f in fields(MixtureRecord)})
            if self.shrink and _bucket(alive, BATCH_BUCKET) <= len(origin) // 2:
                outcome.record(origin, state)  # the rows about to leave keep their outcome
                keep = self._shrink(decoder, state)
                if keep is None:  # the late count was stale: every row has finished
                    break
                origin = torch.where(keep.valid, origin[keep.index], rows)
                pad, feed = pad[keep.index], feed.map(lambda x: x[keep.index])
                logits = None if logits is None else logits[keep.index]
            logits = decoder.run(feed.map(lambda x: x[:, None]), plen + t, pad)

        outcome.record(origin, state)
        result = _RowState(b, self.settings.thinking_sampler is None, device)
        if last_stage:
            result.length, result.think_length, reasons = outcome.values[:, :b].tolist()
            result.reason = [REASONS[r] for r in reasons]
        out.keep_first(b)
        result.share_from_last_stage(self.parallel, out)
        return self._assemble(prompt_rows, out, result, device)

    def _shrink(self, decoder: _Decoder, state: _DeviceState) -> _Kept | None:
        """Move the rows still decoding to a smaller batch bucket (one cache copy per halving);
        None, and nothing moved, when no row is still decoding."""
        index = state.alive.nonzero().squeeze(-1)  # one host sync per shrink, not per step
        n = len(index)
        if n == 0:
            return None
        size = _bucket(n, BATCH_BUCKET)
        valid = torch.arange(size, device=index.device) < n
        index = torch.cat([index, index[:1].expand(size - n)])  # fillers: a kept row's cache
        decoder.keep_rows(index)
        state.select(index, valid)
        return _Kept(index, valid)

    def _decoder(self, rows: int, max_len: int) -> _Decoder:
        key = (rows, max_len)
        cached = self._decoders.get(key)
        if cached is None or cached.decoder.batch != rows:  # a shrink left it smaller
            self._decoders.clear()  # one cache allocation at a time
            group = self.parallel.groups.tp
            self._decoders[key] = _Decoder(
                static_decode.StaticDecoder(self.model, rows, max_len, group),
                self.parallel,
                self.settings.input_offset,
                self.compile,
                self.cuda_graphs,
            )
        return self._decoders[key]

    # ------------------------------------------------------------------ one step, on the device

    def _step(self, logits, st: _DeviceState, t: int, tapes: NoiseTapes, origin: torch.Tensor):
        """Sample every row, select each row's step by its phase and advance the phase machine;
        row i draws the noise of original row origin[i]."""
        s, shard = self.settings, self.shard
        think, force, answer = st.phase == THINK, st.phase == FORCE, st.phase == ANSWER
        forced = self.marker_tokens[st.forced_pos.clamp(max=len(self.marker_ids) - 1)]
        step = _discrete_step(forced, self.mixture_size)
        if s.thinking_sampler is not None:
            soft = s.thinking_sampler.sample(logits, shard, tapes.at("thinking", t, origin))
            step = soft.where(think, step)
        step = s.answer_sampler.sample(logits, shard, tapes.at("answer", t, origin)).where(
            answer, step
        )
        tokens = step.tokens

        st.marker, marker_done = self.marker_automaton.advance(st.marker, tokens)
        st.stops, stop_done = self.stop_automaton.advance(st.stops, tokens)
        eos = torch.isin(tokens, self.eos)
        # thinking: EOS ends the row as a soft step; the marker step is a discrete step
        marker_step = think & ~eos & marker_done
        if s.thinking_sampler is not None:  # no thinking phase (GRPO): no marker step to score
            lp = discrete_log_density(logits, tokens, s.thinking_temperature, shard)
            step = _marker_step(tokens, self.mixture_size, lp).where(marker_step, step)
        soft_step = think & ~eos & ~marker_done
        st.soft_steps = st.soft_steps + soft_step.long()
        if s.cold_stop_entropy is not None:
            cold = self._low_entropy(logits, think)
            run = torch.where(cold, st.low_entropy + 1, 0)  # consecutive low-entropy soft steps
            st.low_entropy = torch.where(soft_step, run, st.low_entropy)
        to_force = soft_step & (st.low_entropy >= s.cold_stop_steps)
        if s.max_thinking_tokens is not None:
            to_force |= soft_step & (st.soft_steps >= s.max_thinking_tokens)
        # forced marker: its tokens one by one, then the answer
        st.forced_pos = st.forced_pos + force.long()
        enters_answer = marker_step | (force & (st.forced_pos == len(self.marker_ids)))
        st.think_length = torch.where(enters_answer & st.alive, t + 1, st.think_length)
        scored = ~force
        st.phase = torch.where(enters_answer, ANSWER, torch.where(to_force, FORCE, st.phase))
        # the end of a row: EOS (thinking or answer, not a forced token), a stop string, the limit
        by_eos = eos & ~force
        by_stop = ~by_eos & stop_done
        reason = torch.where(
            by_eos,
            REASONS.index("eos"),
            torch.where(by_stop, REASONS.index("stop"), REASONS.index("length")),
        )
        ends = by_eos | by_stop | (t + 1 == s.max_new_tokens)
        finished = st.alive & ends
        st.reason = torch.where(finished, reason, st.reason)
        st.length = torch.where(finished, t + 1, st.length)
        st.alive = st.alive & ~finished
        return step, scored


class _Decoder:
    """A StaticDecoder with its input step (embedding on the first stage, receive elsewhere),
    the pipeline hand-off around it, and the decode step compiled or captured when asked for."""

    def __init__(
        self,
        decoder: static_decode.StaticDecoder,
        parallel: ParallelState,
        input_offset: Callable[[MixtureRecord], torch.Tensor | None] | None,
        compile: bool,
        cuda_graphs: bool,
    ):
        self.decoder, self.parallel = decoder, parallel
        self.input_offset = input_offset
        self.step = decoder.forward
        if compile:
            import torch._dynamo

            # one compiled graph per length bucket (powers of two): more than dynamo's default 8
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self.step = torch.compile(decoder.forward, fullgraph=True, dynamic=False)
        self.graphs: dict[int, _GraphedStep] | None = (
            {} if cuda_graphs and decoder.device.type == "cuda" else None
        )

    def keep_rows(self, index: torch.Tensor) -> None:
        self.decoder.keep_rows(index)
        if self.graphs is not None:
            self.graphs.clear()  # captured for the larger batch

    @torch.no_grad()
    def run(self, records: MixtureRecord, start: int, pad: torch.Tensor) -> torch.Tensor | None:
        """Feed positions [start, start + q) of every row (rows [B, q]); the last stage's logits."""
        dec = self.decoder
        b, q = records.tokens.shape
        if dec.first_stage:
            offset = None if self.input_offset is None else self.input_offset(records)
            x = dec.embed(records.mix_ids, records.mix_weights, offset)
        else:
            x = torch.empty(b, q, dec.hidden, dtype=dec.dtype, device=dec.device)
            receive_from_previous_stage(self.parallel, x)
        columns = torch.arange(start, start + q, device=dec.device)
        length = static_decode.length_bucket(start + q, dec.max_len)
        if q > 1:  # prefill: eager (one shape per prompt length)
            out = dec.forward(x, columns, pad, length)
        elif self.graphs is None:
            out = self.step(x, columns, pad, length)
        else:
            if length not in self.graphs:
                self.graphs[length] = _GraphedStep(self.step, x, columns, pad, length)
            out = self.graphs[length](x, columns, pad)
        if not dec.last_stage:
            send_to_next_stage(self.parallel, out)
            return None
        return out


class _GraphedStep:
    """One length bucket's decode step as a CUDA graph: inputs are copied into static buffers and
    the captured kernels (TP all-reduces included) replay. The cache and weights are the same
    tensors at every replay, so a weight update in place needs no recapture."""

    def __init__(self, step, x, columns, pad, length: int):
        self.x, self.columns, self.pad = x.clone(), columns.clone(), pad.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (allocations, autotuning)
            step(self.x, self.columns, self.pad, length)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: NCCL's watchdog thread polls its events during a capture of the TP
        # all-reduces, which the default (global) mode would turn into a capture error
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.out = step(self.x, self.columns, self.pad, length)

    def __call__(self, x, columns, pad) -> torch.Tensor:
        self.x.copy_(x)
        self.columns.copy_(columns)
        self.pad.copy_(pad)
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites the graph's output


class _FinishedFlags:
    """How many rows are still decoding, read on the host without stalling the device.

    Lag 0 (the CPU's default): read at once (free). Otherwise each step's count is read `lag`
    steps later, a fixed lag, so every rank (TP and PP) stops at the same step; the steps decoded
    after the end are never recorded. On a GPU the count is copied without blocking into pinned
    memory; on the CPU (tests of the GPU's lag) it is just kept.
    """

    def __init__(self, device, lag: int):
        self.lag, self.cuda = lag, device.type == "cuda"
        self.pending: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []

    def alive_rows(self, alive: torch.Tensor) -> int:
        """Rows still decoding `lag` steps ago: an upper bound of those decoding now."""
        if not self.lag:
            return int(alive.sum())
        flag, event = alive.sum(), None
        if self.cuda:
            flag = torch.empty((), dtype=torch.long, pin_memory=True).copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self.pending.append((flag, event))
        if len(self.pending) <= self.lag:
            return len(alive)
        flag, event = self.pending.pop(0)
        if event is not None:
            event.synchronize()  # recorded `lag` steps ago: normally long complete
        return int(flag)


def _padded(tapes: NoiseTapes, rows: int) -> NoiseTapes:
    """Tapes of the real rows, zero-extended to the bucket's padding rows (never recorded)."""

    def pad(tape):
        if tape is None or tape.shape[1] == rows:
            return tape
        extra = torch.zeros(
            (tape.shape[0], rows - tape.shape[1], *tape.shape[2:]),
            dtype=tape.dtype,
            device=tape.device,
        )
        return torch.cat([tape, extra], dim=1)

    return NoiseTapes(pad(tapes.thinking), pad(tapes.answer))


def make_engine(
    gen, model, tokenizer, shard: VocabShard, settings: RolloutSettings, parallel: ParallelState
) -> RolloutEngine:
    """The engine `policy.generation.engine` names (gen: the recipe's GenerationCfg)."""
    if gen.engine == "eager":
        return RolloutEngine(model, tokenizer, shard, settings, parallel)
    return StaticRolloutEngine(
        model,
        tokenizer,
        shard,
        settings,
        parallel,
        compile=gen.compile_decode,
        cuda_graphs=gen.cuda_graphs,
    )
