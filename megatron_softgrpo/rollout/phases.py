"""The phase machine of a rollout: which sampler draws each row's step, and when a row ends.

Every response starts in the thinking phase, sampled by the algorithm's soft sampler (or
discretely for GRPO, which has no soft phase). The step whose token completes the think-end
marker is recorded as a discrete step (one-hot on its token; drawn by the thinking sampler, so
marked `thinking` and scored at the thinking temperature), and every later step is sampled
discretely with the answer-phase parameters. A thinking budget and the entropy "cold stop"
force the marker's tokens (forced steps are fed and recorded, but not the policy's actions, so
not scored). A response ends at EOS (also while thinking, as a soft step), at a stop string, or
at the length limit.

All of it is tensor ops on [B] row state, with markers and stop strings matched by byte automata
over the vocabulary (`string_automaton.py`): no host sync, so a step can be compiled or captured.
Both samplers run on every row and each row takes its phase's draw; a sampler whose noise cannot
be drawn ahead (Dirichlet) draws for its phase's live rows only, so it consumes the noise RNG row
by row in the same order whatever the batch holds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from megatron_softgrpo.rollout.settings import RolloutSettings
from megatron_softgrpo.rollout.string_automaton import StringAutomaton
from megatron_softgrpo.rollout.tapes import NoiseTapes
from megatron_softgrpo.soft import MixtureRecord, SampledStep, Sampler, VocabShard
from megatron_softgrpo.soft.logprob import discrete_log_density
from megatron_softgrpo.soft.vocab import log_normalizer, softmax_entropy

THINK, FORCE, ANSWER = 0, 1, 2
REASONS = ("eos", "stop", "length")


@dataclass
class RowState:
    """Each row's place in the phase machine, [B] tensors on the device."""

    alive: torch.Tensor
    phase: torch.Tensor
    soft_steps: torch.Tensor
    low_entropy: torch.Tensor  # consecutive low-entropy soft steps (cold stop)
    forced_pos: torch.Tensor  # marker tokens forced so far
    think_length: torch.Tensor
    length: torch.Tensor
    reason: torch.Tensor  # index into REASONS
    marker: torch.Tensor  # marker automaton state
    stops: torch.Tensor  # stop-string automaton state

    def rows(self, n: int) -> RowState:
        """The first n rows, as views: written in place, they write this state."""
        return RowState(**{f.name: getattr(self, f.name)[:n] for f in fields(self)})

    def assign(self, other: RowState) -> None:
        """Take `other`'s values, in place."""
        for f in fields(self):
            getattr(self, f.name).copy_(getattr(other, f.name))

    def select(self, index: torch.Tensor, valid: torch.Tensor) -> None:
        """Keep the rows `index` as the first len(index) rows, in place (rows where `valid` is
        False are fillers)."""
        for f in fields(self):
            x = getattr(self, f.name)
            x[: len(index)] = x[index]  # the gather reads before it writes
        self.alive[: len(index)] &= valid

    def outcome(self) -> torch.Tensor:
        """[3, B]: each row's length, think length and finish reason."""
        return torch.stack([self.length, self.think_length, self.reason])


class PhaseMachine:
    def __init__(self, tokenizer, shard: VocabShard, settings: RolloutSettings, device):
        self.settings, self.shard = settings, shard
        self.mixture_size = settings.answer_sampler.mixture_size
        self.marker = StringAutomaton.build(tokenizer, [settings.think_end], device)
        self.stops = StringAutomaton.build(tokenizer, list(settings.stop_strings), device)
        self.eos = torch.tensor(sorted(settings.eos_ids), dtype=torch.long, device=device)
        marker_ids = tokenizer(settings.think_end, add_special_tokens=False)["input_ids"]
        self.marker_tokens = torch.tensor(marker_ids, dtype=torch.long, device=device)

    def start(self, rows: int, real: int) -> RowState:
        """The state of `rows` rows, of which the first `real` decode (the rest pad a bucket)."""
        device = self.eos.device
        discrete_only = self.settings.thinking_sampler is None
        zeros = torch.zeros(rows, dtype=torch.long, device=device)
        return RowState(
            alive=torch.arange(rows, device=device) < real,
            phase=torch.full_like(zeros, ANSWER if discrete_only else THINK),
            soft_steps=zeros.clone(),
            low_entropy=zeros.clone(),
            forced_pos=zeros.clone(),
            think_length=torch.full_like(zeros, 0 if discrete_only else 1 << 30),
            length=zeros.clone(),
            reason=torch.full_like(zeros, REASONS.index("length")),
            marker=self.marker.initial(rows),
            stops=self.stops.initial(rows),
        )

    def empty_step(self, rows: int) -> SampledStep:
        """A step of pad tokens: what ranks off the last pipeline stage receive the step into."""
        return discrete_step(
            torch.zeros(rows, dtype=torch.long, device=self.eos.device), self.mixture_size
        )

    def step(
        self,
        logits: torch.Tensor,
        st: RowState,
        t: torch.Tensor,
        tapes: NoiseTapes,
        origin: torch.Tensor,
    ) -> tuple[SampledStep, torch.Tensor]:
        """Step t (a 0-dim tensor: no host read) of every row (row i draws the noise of original
        row origin[i]) and whether it is scored; advances `st` (new tensors, not in place)."""
        s = self.settings
        think, force, answer = st.phase == THINK, st.phase == FORCE, st.phase == ANSWER
        forced = self.marker_tokens[st.forced_pos.clamp(max=len(self.marker_tokens) - 1)]
        step = discrete_step(forced, self.mixture_size)
        if s.thinking_sampler is not None:
            step = self._draw(
                s.thinking_sampler, logits, think & st.alive, tapes.at("thinking", t, origin), step
            )
        step = self._draw(
            s.answer_sampler, logits, answer & st.alive, tapes.at("answer", t, origin), step
        )
        tokens = step.tokens

        st.marker, marker_done = self.marker.advance(st.marker, tokens)
        st.stops, stop_done = self.stops.advance(st.stops, tokens)
        eos = torch.isin(tokens, self.eos)
        # thinking: EOS ends the row as a soft step; the marker step is a discrete step
        marker_step = think & ~eos & marker_done
        if s.thinking_sampler is not None:  # no thinking phase (GRPO): no marker step to score
            lp = discrete_log_density(logits, tokens, s.thinking_temperature, self.shard)
            step = marker_step_of(tokens, self.mixture_size, lp).where(marker_step, step)
        soft_step = think & ~eos & ~marker_done
        st.soft_steps = st.soft_steps + soft_step.long()
        if s.cold_stop_entropy is not None:
            run = torch.where(self._low_entropy(logits), st.low_entropy + 1, 0)
            st.low_entropy = torch.where(soft_step, run, st.low_entropy)
        to_force = soft_step & (st.low_entropy >= s.cold_stop_steps)
        if s.max_thinking_tokens is not None:
            to_force |= soft_step & (st.soft_steps >= s.max_thinking_tokens)
        # forced marker: its tokens one by one, then the answer
        st.forced_pos = st.forced_pos + force.long()
        enters_answer = marker_step | (force & (st.forced_pos == len(self.marker_tokens)))
        st.think_length = torch.where(enters_answer & st.alive, t + 1, st.think_length)
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
        return step, ~force

    def _draw(self, sampler: Sampler, logits, rows, tape, step: SampledStep) -> SampledStep:
        """`step` with the rows `rows` drawn by `sampler`."""
        if sampler.draws != "at_step":  # noise on the tape, or none: every row, selected after
            return sampler.sample(logits, self.shard, tape).where(rows, step)
        index = rows.nonzero().squeeze(-1)  # drawn now: for these rows only (one host sync)
        if not len(index):
            return step
        part = sampler.sample(logits[index], self.shard, None)
        return SampledStep(
            **{
                f.name: _put(getattr(step, f.name), index, getattr(part, f.name))
                for f in fields(step)
            }
        )

    def _low_entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """Entropy of softmax(l / T_thinking) over the whole sharded vocabulary below the threshold."""
        temperature = self.settings.thinking_sampler.truncation.temperature
        scaled = self.shard.scaled(logits, temperature)
        entropy = softmax_entropy(scaled, log_normalizer(scaled, self.shard), self.shard)
        return entropy < self.settings.cold_stop_entropy


def _put(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    dst = dst.clone()
    dst[index] = src.to(dst.dtype)
    return dst


def discrete_step(
    tokens: torch.Tensor, mixture_size: int, log_density: torch.Tensor | None = None
) -> SampledStep:
    records = MixtureRecord.discrete(tokens, mixture_size)
    lp = torch.zeros(len(tokens), device=tokens.device) if log_density is None else log_density
    return SampledStep(
        **{f.name: getattr(records, f.name) for f in fields(records)}, log_density=lp
    )


def marker_step_of(
    tokens: torch.Tensor, mixture_size: int, log_density: torch.Tensor
) -> SampledStep:
    """The step that completes the think-end marker: one-hot on its token like a discrete step,
    but drawn by the thinking sampler, so marked `thinking`: the trainer scores it at the thinking
    temperature, as `log_density` (log_softmax(l / T_thinking)[token]) does."""
    step = discrete_step(tokens, mixture_size, log_density)
    return replace(step, thinking=torch.ones_like(step.thinking))
