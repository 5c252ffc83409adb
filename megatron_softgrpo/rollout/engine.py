"""The rollout engine: batched generation with a soft thinking phase and a discrete answer phase
(docs/algorithm.md section 1), on any decode backend.

One decoding pass: each prompt is prefilled once (its G rows copy its cache), then every token
step the backend (`backend.py`) feeds the last step and the phase machine (`phases.py`) draws
each row's next step from the logits and the pass's noise tapes (`tapes.py`), recorded by
(row, position). Sampling and phase bookkeeping run on the last pipeline stage (identically on
its TP ranks); each step is broadcast to every stage, so all ranks hold the same records.

A token step reads and writes only tensors kept across passes (`_Live`: the row state, the
step to feed, the step index t on the device, the records, the tapes), in place, so that it can
be replayed (`replay.py`) at PP=1 on a backend whose step can be: one CUDA graph per token
(or, on the CPU, one compiled graph), per (rows, length bucket), kept across shrinks and passes
until `release()` (a training rank's update needs the memory).

Finished rows stay in the batch, masked (their steps are computed and never recorded), until a
whole row bucket of the backend has finished; then the rows still decoding move to the front,
a smaller batch of the same tensors, one cache copy per shrink (`shrink=False`: they stay to
the end of the pass). The host reads one count of rows still decoding per step, copied without
blocking and read a few steps later on a GPU (the extra steps are discarded; `flag_lag` sets
the lag, so the CPU tests run the GPU's). A late count is an upper bound: a shrink that finds
no row still decoding ends the pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from megatron_softgrpo.batch import Batch
from megatron_softgrpo.distributed import ParallelState, broadcast_from_last_stage
from megatron_softgrpo.rollout.backend import DecodeBackend
from megatron_softgrpo.rollout.megatron_backend import MegatronBackend
from megatron_softgrpo.rollout.phases import REASONS, PhaseMachine, RowState
from megatron_softgrpo.rollout.replay import Replays
from megatron_softgrpo.rollout.settings import RolloutSettings
from megatron_softgrpo.rollout.static_backend import StaticBackend
from megatron_softgrpo.rollout.tapes import NoiseTapes
from megatron_softgrpo.soft import MixtureRecord, SampledStep, VocabShard

GPU_FLAG_LAG = 4  # a GPU step reads the count of rows still decoding this many steps late

Progress = Callable[[int, int], None]  # (rows finished, decode steps done)


@dataclass
class _Live:
    """What a token step reads and writes, in place, at the pass's row count (the batch: the
    first n rows, moved to the front at a shrink), so that a replayed step finds its tensors
    where it was captured; reused by the next pass of the same shape."""

    state: RowState
    feed: MixtureRecord  # the step drawn last: what the next step feeds
    origin: torch.Tensor  # [rows + 1] batch position -> buffer (= original) row; last: spare
    t: torch.Tensor  # () the step to draw
    count: torch.Tensor  # () rows still decoding
    out: _ResponseBuffer  # [rows + 1, max_new]: the spare row takes the fillers' records
    tapes: NoiseTapes  # [max_new, rows + 1, ...]
    replays: Replays  # token steps by (rows, the backend's shape key)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.state.alive), self.out.scored.shape[1]

    def rows(self, n: int) -> tuple[RowState, torch.Tensor, MixtureRecord]:
        """The batch of the first n rows, as views: (state, origin, feed)."""
        return self.state.rows(n), self.origin[:n], self.feed.map(lambda x: x[:n])


class RolloutEngine:
    def __init__(
        self,
        model,
        tokenizer,
        shard: VocabShard,
        settings: RolloutSettings,
        parallel: ParallelState,
        backend: DecodeBackend | None = None,
        *,
        shrink: bool = True,
        flag_lag: int | None = None,
        pad_id: int = 0,
    ):
        """`backend`: None is Megatron's own forward. `shrink`: move to a smaller batch once a
        row bucket has finished (else finished rows stay, masked, to the end of the pass).
        `flag_lag`: steps the host reads the count of rows still decoding late (None:
        GPU_FLAG_LAG on a GPU, 0 on the CPU)."""
        self.model, self.tokenizer, self.parallel = model, tokenizer, parallel
        self.settings, self.pad_id, self.shrink = settings, pad_id, shrink
        self.backend = MegatronBackend(model, parallel) if backend is None else backend
        self.device = self.backend.device
        if flag_lag is None:  # a GPU reads the count late not to stall; the CPU at once (free)
            flag_lag = GPU_FLAG_LAG if self.device.type == "cuda" else 0
        self.flag_lag = flag_lag
        self.mixture_size = settings.answer_sampler.mixture_size
        self.phases = PhaseMachine(tokenizer, shard, settings, self.device)
        self._live: _Live | None = None  # the last pass's tensors, reused by the next

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], num_generations: int = 1, progress: Progress | None = None
    ) -> Batch:
        """G responses per prompt (rows prompt-major; the rollout's fields of `Batch`); every rank
        of the model calls this. `progress(rows_finished, steps_done)` after every decode step."""
        was_training = self.model.training
        self.model.eval()  # Megatron's KV-cache path is for inference mode
        try:
            per_pass = len(prompts)
            if self.settings.max_rows_per_pass is not None:  # whole groups per pass
                per_pass = max(1, self.settings.max_rows_per_pass // num_generations)
            passes = [
                self._generate(
                    prompts[i : i + per_pass],
                    num_generations,
                    _offset(progress, i * num_generations),
                )
                for i in range(0, len(prompts), per_pass)
            ]
            return self.joined(passes)
        finally:
            self.model.train(was_training)

    def joined(self, parts: list[Batch]) -> Batch:
        """Rows decoded in parts (passes, or one block's parts on several replicas), in order."""
        return parts[0] if len(parts) == 1 else Batch.cat(parts, self._padded_pass)

    def release(self) -> None:
        """Free the cache, the step tensors and what was captured on them (the next pass makes
        them again): a training rank's update needs the memory."""
        self.backend.release()
        self._live = None

    def load_weights(self, weights) -> None:
        """New policy weights (this rank's shards, by parameter name), for the next pass."""
        self.backend.load_weights(weights)

    # ------------------------------------------------------------------ one decoding pass

    def _generate(self, prompts: list[list[int]], num_generations: int, progress) -> Batch:
        device, backend = self.device, self.backend
        prompt_rows = [p for p in prompts for _ in range(num_generations)]
        b, plen = len(prompt_rows), max(len(p) for p in prompt_rows)
        max_new = self.settings.max_new_tokens
        rows = _bucket(b, backend.row_bucket)
        live = self._live_for(rows, b, backend.start(rows, plen + max_new))

        # each prompt is prefilled once and its rows copy its cache: a group's G rows share it
        tokens = torch.full((len(prompts), plen), self.pad_id, dtype=torch.long, device=device)
        pad = torch.empty(len(prompts), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            tokens[i, plen - len(p) :] = torch.tensor(p, device=device)
            pad[i] = plen - len(p)
        prompt = MixtureRecord.discrete(tokens, self.mixture_size)
        logits = backend.prefill(prompt, pad, self._input_offset(prompt))
        if rows > len(prompts):  # fillers of the bucket copy the last row, as a shrink's do
            group = torch.arange(rows, device=device).clamp(max=b - 1) // num_generations
            backend.keep_rows(group)
            logits = None if logits is None else logits[group]

        n = rows  # the batch: the first n rows of `live`
        outcome = live.state.outcome()[:, :1].repeat(1, rows + 1)  # by original row
        flags = _FinishedFlags(device, self.flag_lag)
        self._draw(logits, live, *live.rows(n))  # step 0, from the prefill's logits
        for t in range(max_new):  # step t is drawn and recorded
            alive = flags.alive_rows(live.count, n)
            if progress is not None:
                progress(b - min(alive, b), t + 1)  # the lagged count: finished rows, or fewer
            if t == max_new - 1 or alive == 0:
                break
            if self.shrink and _bucket(alive, backend.row_bucket) < n:
                # the rows about to leave keep their outcome
                outcome[:, live.origin[:n]] = live.state.rows(n).outcome()
                n = self._shrink(live, n)
                if n == 0:  # the late count was stale: every row has finished
                    break
            key = backend.advance()
            live.replays.run((n, key), lambda n=n: self._token_step(live, n))

        outcome[:, live.origin[:n]] = live.state.rows(n).outcome()
        outcome = outcome[:, :b].contiguous()
        broadcast_from_last_stage(self.parallel, outcome)  # other stages only saw the steps
        return self._assemble(prompt_rows, live.out, outcome)

    def _live_for(self, rows: int, real: int, new_cache: bool) -> _Live:
        """This pass's tensors, reset in place (or made anew, forgetting every replay, where their
        shapes or the backend's cache changed)."""
        s, device = self.settings, self.device
        tapes = (
            NoiseTapes.draw(s, s.max_new_tokens, real, device).padded(rows + 1)
            if self.parallel.last_stage
            else NoiseTapes(None, None)
        )
        state = self.phases.start(rows, real)
        live = self._live
        if new_cache or live is None or live.shape != (rows, s.max_new_tokens):
            capture = self.backend.capture if self._capturable() else None
            self._live = live = _Live(
                state=state,
                feed=MixtureRecord.discrete(
                    torch.zeros(rows, dtype=torch.long, device=device), self.mixture_size
                ),
                origin=torch.arange(rows + 1, device=device),
                t=torch.zeros((), dtype=torch.long, device=device),
                count=torch.zeros((), dtype=torch.long, device=device),
                out=_ResponseBuffer(rows + 1, s.max_new_tokens, self.mixture_size, device),
                tapes=tapes,
                replays=Replays(capture),
            )
            return live
        live.state.assign(state)
        live.tapes.assign(tapes)
        live.origin.copy_(torch.arange(rows + 1, device=device))
        live.t.zero_()  # records need no reset: each row writes every position up to its length
        return live

    def _capturable(self) -> bool:
        """A token step can be replayed: one pipeline stage (no hand-off between steps), and no
        sampler that draws at the step (a generator, and a draw for a row subset)."""
        samplers = [self.settings.thinking_sampler, self.settings.answer_sampler]
        return self.parallel.pp == 1 and not any(s and s.draws == "at_step" for s in samplers)

    def _token_step(self, live: _Live, n: int) -> Callable[[], None]:
        """One token step of the first n rows: feed the last step, then draw the next."""
        st, origin, feed = live.rows(n)

        def token() -> None:
            logits = self.backend.decode(feed, self._input_offset(feed))
            self._draw(logits, live, st, origin, feed)

        return token

    def _draw(self, logits, live: _Live, st: RowState, origin, feed: MixtureRecord) -> None:
        """Step `live.t` of the batch (`live.rows(n)`) from `logits`, recorded, and kept in
        `feed` to feed next."""
        n = len(origin)
        work = replace(st)  # the phase machine makes new tensors: written back in place below
        if self.parallel.last_stage:
            step, scored = self.phases.step(logits, work, live.t, live.tapes, origin)
        else:
            step, scored = self.phases.empty_step(n), work.alive.clone()
        broadcast_from_last_stage(self.parallel, *_tensors(step), scored, work.alive)
        live.out.record(origin, live.t, step, scored)
        st.assign(work)
        for f in fields(feed):
            getattr(feed, f.name).copy_(getattr(step, f.name))
        live.count.copy_(work.alive.sum())
        live.t.add_(1)

    def _shrink(self, live: _Live, n: int) -> int:
        """Move the rows still decoding to the front, in the smallest bucket that holds them (one
        cache copy): the new batch size (0, and nothing moved, when no row is still decoding)."""
        index = live.state.alive[:n].nonzero().squeeze(-1)  # one host sync per shrink
        k = len(index)
        if k == 0:
            return 0
        size = _bucket(k, self.backend.row_bucket)
        valid = torch.arange(size, device=index.device) < k
        index = torch.cat([index, index[:1].expand(size - k)])  # fillers: a kept row's cache
        self.backend.keep_rows(index)
        live.state.select(index, valid)
        for f in fields(live.feed):
            x = getattr(live.feed, f.name)
            x[:size] = x[index]
        spare = len(live.origin) - 1  # the buffer row fillers record into
        live.origin[:size] = torch.where(valid, live.origin[index], spare)
        return size

    def _input_offset(self, records: MixtureRecord) -> torch.Tensor | None:
        """What the first stage adds to the mixed input embedding (the thinking noise's)."""
        return self.settings.input_offset(records) if self.parallel.first_stage else None

    # ------------------------------------------------------------------ records

    def _assemble(self, prompt_rows, out: _ResponseBuffer, outcome: torch.Tensor) -> Batch:
        device, b = self.device, len(prompt_rows)
        lengths, think, reasons = outcome
        lengths_list, think_list = lengths.tolist(), think.tolist()
        plens = torch.tensor([len(p) for p in prompt_rows], device=device)
        total = int((plens + lengths).max())
        records = MixtureRecord.discrete(
            torch.full((b, total), self.pad_id, dtype=torch.long, device=device), self.mixture_size
        )
        loss_mask = torch.zeros(b, total, dtype=torch.bool, device=device)
        logp = torch.zeros(b, total, device=device)
        texts, thinking, answers = [], [], []
        for i, p in enumerate(prompt_rows):
            n, lo = lengths_list[i], len(p)
            records.tokens[i, :lo] = torch.tensor(p, device=device)
            records.mix_ids[i, :lo, 0] = records.tokens[i, :lo]
            for f in fields(records):
                getattr(records, f.name)[i, lo : lo + n] = getattr(out.records, f.name)[i, :n]
            loss_mask[i, lo : lo + n] = out.scored[i, :n]
            logp[i, lo : lo + n] = out.log_density[i, :n]
            response = out.records.tokens[i, :n].tolist()
            cut = min(think_list[i], n)
            texts.append(self.tokenizer.decode(response, skip_special_tokens=True))
            thinking.append(self.tokenizer.decode(response[:cut], skip_special_tokens=True))
            answers.append(self.tokenizer.decode(response[cut:], skip_special_tokens=True))
        reason_names = [REASONS[r] for r in reasons.tolist()]
        return Batch(
            records=records,
            loss_mask=loss_mask,
            rollout_logp=logp,
            prompt_lengths=plens,
            response_lengths=lengths,
            think_lengths=torch.minimum(think, lengths),
            finish_reasons=reason_names,
            truncated=torch.tensor([r == "length" for r in reason_names], device=device),
            texts=texts,
            thinking_texts=thinking,
            answer_texts=answers,
        )

    def _padded_pass(self, batch: Batch, width: int) -> Batch:
        """A pass right-padded to `width` as _assemble pads: pad tokens, unscored."""
        extra = width - batch.seq_len
        if not extra:
            return batch
        pads = torch.full((batch.num_rows, extra), self.pad_id, device=batch.records.tokens.device)
        fill = MixtureRecord.discrete(pads, self.mixture_size)
        return replace(
            batch.padded_positions(width), records=MixtureRecord.cat([batch.records, fill], dim=1)
        )


def make_engine(
    gen, model, tokenizer, shard: VocabShard, settings: RolloutSettings, parallel: ParallelState
) -> RolloutEngine:
    """The engine on the backend `policy.generation.engine` names (gen: the recipe's GenerationCfg)."""
    if gen.engine == "eager":
        backend = MegatronBackend(model, parallel)
    else:
        backend = StaticBackend(model, parallel, gen.compile_decode, gen.cuda_graphs)
    return RolloutEngine(model, tokenizer, shard, settings, parallel, backend)


def _bucket(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _offset(progress: Progress | None, rows: int) -> Progress | None:
    """`progress` of a later pass: the rows of the passes before it have finished."""
    return None if progress is None else lambda done, step: progress(rows + done, step)


def _tensors(record: MixtureRecord) -> list[torch.Tensor]:
    """Every field of a record (or step), in order."""
    return [getattr(record, f.name) for f in fields(record)]


class _ResponseBuffer:
    """Generated rows by (original row, response position)."""

    def __init__(self, b: int, max_new: int, k: int, device):
        self.records = MixtureRecord.discrete(
            torch.zeros(b, max_new, dtype=torch.long, device=device), k
        )
        self.scored = torch.zeros(b, max_new, dtype=torch.bool, device=device)
        self.log_density = torch.zeros(b, max_new, device=device)

    def record(
        self, rows: torch.Tensor, t: torch.Tensor, step: SampledStep, scored: torch.Tensor
    ) -> None:
        """Step t (0-dim, read on the device) of the batch's rows, at their buffer rows."""
        at = (rows, t.expand(len(rows)))
        for f in fields(self.records):
            dst = getattr(self.records, f.name)
            dst.index_put_(at, getattr(step, f.name).to(dst.dtype))
        self.scored.index_put_(at, scored)
        self.log_density.index_put_(at, step.log_density.float())


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

    def alive_rows(self, count: torch.Tensor, rows: int) -> int:
        """Rows still decoding `lag` steps ago (count: now, 0-dim, rewritten by the next step;
        rows: the batch's): an upper bound of those decoding now."""
        if not self.lag:
            return int(count)
        if self.cuda:  # copied before the next step rewrites it: the same stream
            flag = torch.empty((), dtype=torch.long, pin_memory=True)
            flag.copy_(count, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            flag, event = count.clone(), None
        self.pending.append((flag, event))
        if len(self.pending) <= self.lag:
            return rows
        flag, event = self.pending.pop(0)
        if event is not None:
            event.synchronize()  # recorded `lag` steps ago: normally long complete
        return int(flag)
