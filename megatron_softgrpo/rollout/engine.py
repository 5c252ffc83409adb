"""Batched generation with a soft thinking phase and a discrete answer phase (docs/algorithm.md section 1).

Every response starts in the thinking phase, sampled by the algorithm's soft sampler (or
discretely for GRPO, which has no soft phase). The step whose transcript token completes the
think-end marker is recorded as a discrete step (one-hot on its token; drawn by the thinking
sampler, so marked `thinking` and scored at the thinking temperature), and every later step is
sampled discretely with the answer-phase parameters.
Optional: a thinking budget and the entropy "cold stop" force the marker's tokens (forced steps
are not the policy's actions: they are fed and recorded, but not scored). A response ends at
EOS (also during thinking, as a soft step), at a stop string, or at the length limit; finished
rows leave the batch.

Sampling and phase bookkeeping happen on the last pipeline stage (identically on its TP
ranks); the resulting step is broadcast to every stage, so all ranks hold the same records.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from megatron_softgrpo.algorithms.registry import answer_sampler, decoding_algorithm
from megatron_softgrpo.batch import Batch
from megatron_softgrpo.config.schema import RecipeCfg
from megatron_softgrpo.distributed import ParallelState, broadcast_from_last_stage
from megatron_softgrpo.errors import UserError
from megatron_softgrpo.models.source import resolve_model_source
from megatron_softgrpo.rollout.model_runner import ModelRunner
from megatron_softgrpo.rollout.text_match import TextMatcher
from megatron_softgrpo.soft import MixtureRecord, SampledStep, Sampler, VocabShard, rng
from megatron_softgrpo.soft.logprob import discrete_log_density
from megatron_softgrpo.soft.vocab import log_normalizer, softmax_entropy

THINK, FORCE, ANSWER = 0, 1, 2
GENERATION_CONFIG = "generation_config.json"
REASONS = ("eos", "stop", "length")


@dataclass(frozen=True)
class RolloutSettings:
    thinking_sampler: Sampler | None  # None: discrete from the first step (GRPO, plain decoding)
    answer_sampler: Sampler
    thinking_temperature: float  # the thinking sampler's: scores the marker step it draws
    think_end: str
    max_new_tokens: int
    eos_ids: frozenset[int]
    stop_strings: tuple[str, ...] = ()
    max_thinking_tokens: int | None = None
    cold_stop_entropy: float | None = None
    cold_stop_steps: int = 256
    use_kv_cache: bool = True
    max_rows_per_pass: int | None = None  # decode in passes of at most this many rows

    @classmethod
    def from_recipe(
        cls, cfg: RecipeCfg, tokenizer, hidden_size: int, **overrides
    ) -> RolloutSettings:
        soft, gen = cfg.softgrpo, cfg.policy.generation
        eos = eos_token_ids(cfg.policy.model_name, tokenizer)
        settings = dict(
            # softgrpo.sampler may decode as another algorithm would (soft decoding of a GRPO model)
            thinking_sampler=decoding_algorithm(soft).thinking_sampler(soft, hidden_size),
            answer_sampler=answer_sampler(soft, gen),
            thinking_temperature=soft.thinking.temperature,
            think_end=soft.think_end,
            max_new_tokens=gen.max_new_tokens,
            eos_ids=eos,
            stop_strings=tuple(gen.stop_strings),
            max_thinking_tokens=soft.thinking.max_thinking_tokens,
            cold_stop_entropy=soft.thinking.cold_stop_entropy,
            cold_stop_steps=soft.thinking.cold_stop_steps,
            max_rows_per_pass=gen.max_rows_per_pass,
        )
        settings.update(overrides)
        return cls(**settings)

    def input_offset(self, records: MixtureRecord) -> torch.Tensor | None:
        """What a fed step adds to its mixed input: the thinking noise's (zero on discrete rows)."""
        return (
            None if self.thinking_sampler is None else self.thinking_sampler.input_offset(records)
        )


def eos_token_ids(model_name: str, tokenizer) -> frozenset[int]:
    """The tokenizer's EOS id and every id in the model's generation_config.json `eos_token_id`
    (an id or a list: instruct models often end turns with a token other than the tokenizer's EOS)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    source = resolve_model_source(model_name)
    for path in dict.fromkeys(
        [source.path / GENERATION_CONFIG, source.tokenizer_path / GENERATION_CONFIG]
    ):
        if path.is_file():
            ids |= _generation_config_eos(path)
    return frozenset(ids)


def _generation_config_eos(path: Path) -> set[int]:
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: not a readable JSON object ({e})") from None
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise UserError(
            f"{path}: eos_token_id={value!r}; expected a token id or a list of token ids"
        )
    return set(values)


Progress = Callable[[int, int], None]  # (rows finished, decode steps done)


def _offset(progress: Progress | None, rows: int) -> Progress | None:
    """`progress` of a later pass: the rows of the passes before it have finished."""
    return None if progress is None else lambda done, step: progress(rows + done, step)


def _step_tensors(step: SampledStep) -> list[torch.Tensor]:
    return [getattr(step, f.name) for f in fields(step)]


class RolloutEngine:
    def __init__(
        self,
        model,
        tokenizer,
        shard: VocabShard,
        settings: RolloutSettings,
        parallel: ParallelState,
        pad_id: int = 0,
    ):
        self.model = model
        self.parallel = parallel
        self.tokenizer = tokenizer
        self.shard = shard
        self.settings = settings
        self.pad_id = pad_id
        self.mixture_size = settings.answer_sampler.mixture_size
        self.marker = TextMatcher(tokenizer, [settings.think_end])
        self.stops = TextMatcher(tokenizer, list(settings.stop_strings))
        self.marker_ids = tokenizer(settings.think_end, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ public

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
            if self.settings.max_rows_per_pass is not None:
                per_pass = max(
                    1, self.settings.max_rows_per_pass // num_generations
                )  # whole groups per pass
            passes = [
                self._generate(
                    prompts[i : i + per_pass],
                    num_generations,
                    _offset(progress, i * num_generations),
                )
                for i in range(0, len(prompts), per_pass)
            ]
            return passes[0] if len(passes) == 1 else Batch.cat(passes, self._padded_pass)
        finally:
            self.model.train(was_training)

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

    def _generate(self, prompts: list[list[int]], num_generations: int, progress) -> Batch:
        device = next(self.model.parameters()).device
        last_stage = self.parallel.last_stage
        prompt_rows = [p for p in prompts for _ in range(num_generations)]
        b, plen = len(prompt_rows), max(len(p) for p in prompt_rows)
        max_new = self.settings.max_new_tokens
        runner = ModelRunner(
            self.model,
            b,
            plen + max_new,
            self.parallel,
            self.settings.use_kv_cache,
            self.settings.input_offset,
        )

        tokens = torch.full((b, plen), self.pad_id, dtype=torch.long, device=device)
        pad = torch.ones(b, plen, dtype=torch.bool, device=device)
        for i, p in enumerate(prompt_rows):
            tokens[i, plen - len(p) :] = torch.tensor(p, device=device)
            pad[i, plen - len(p) :] = False
        logits = runner.prefill(MixtureRecord.discrete(tokens, self.mixture_size), pad)

        out = _ResponseBuffer(b, max_new, self.mixture_size, device)
        state = _RowState(b, self.settings.thinking_sampler is None, device)
        tapes = NoiseTapes.draw(self.settings, max_new, b, device) if last_stage else None
        active = torch.arange(b, device=device)
        for t in range(max_new):
            step = self._empty_step(len(active), device)
            scored = torch.zeros(len(active), dtype=torch.bool, device=device)
            finished = torch.zeros(len(active), dtype=torch.bool, device=device)
            if last_stage:
                step, scored, finished = self._sample(logits, state, active, t, tapes)
            broadcast_from_last_stage(self.parallel, *_step_tensors(step), scored, finished)
            out.record(active, t, step, scored)
            if progress is not None:
                progress(b - len(active) + int(finished.sum()), t + 1)  # one host read per step
            if t == max_new - 1:
                break
            keep = ~finished
            if not keep.all():
                active = active[keep]
                if len(active) == 0:
                    break
                runner.keep_rows(keep.nonzero().squeeze(-1))
                step = step.map(lambda x: x[keep])
            logits = runner.step(step)
        state.share_from_last_stage(self.parallel, out)
        return self._assemble(prompt_rows, out, state, device)

    # ------------------------------------------------------------------ one step (last pipeline stage)

    def _sample(self, logits: torch.Tensor, state: _RowState, active: torch.Tensor, t: int, tapes):
        """The step of the active rows; the per-row bookkeeping runs on host lists (one sync per step)."""
        n, device = len(active), logits.device
        rows = active.tolist()
        phases = [state.phase[row] for row in rows]
        phase = torch.tensor(phases, device=device)
        step = self._empty_step(n, device)
        think = phase == THINK
        answer = phase == ANSWER
        if THINK in phases:
            raw = tapes.at("thinking", t, active)
            sampled = self.settings.thinking_sampler.sample(
                logits[think], self.shard, None if raw is None else raw[think]
            )
            step = self._fill(step, think, sampled)
        if ANSWER in phases:
            raw = tapes.at("answer", t, active)
            sampled = self.settings.answer_sampler.sample(
                logits[answer], self.shard, None if raw is None else raw[answer]
            )
            step = self._fill(step, answer, sampled)
        scored = phase != FORCE
        if FORCE in phases:
            ids = [
                self.marker_ids[state.forced_pos[row]]
                for row, ph in zip(rows, phases)
                if ph == FORCE
            ]
            step = self._fill(
                step,
                phase == FORCE,
                _discrete_step(torch.tensor(ids, device=device), self.mixture_size),
            )
        cold = (
            self._low_entropy(logits, think).tolist()
            if self.settings.cold_stop_entropy is not None and THINK in phases
            else [False] * n
        )

        done: list[int] = []
        for i, (row, ph, token) in enumerate(zip(rows, phases, step.tokens.tolist())):
            state.transcripts[row].append(token)
            if ph == THINK:
                if token in self.settings.eos_ids:
                    state.finish(row, "eos", t + 1, done, i)
                    continue
                if self.marker.completed(state.transcripts[row]):
                    # the marker step is a discrete step, scored at the temperature it was drawn at
                    lp = discrete_log_density(
                        logits[i : i + 1],
                        step.tokens[i : i + 1],
                        self.settings.thinking_temperature,
                        self.shard,
                    )
                    step = self._fill(
                        step,
                        _index_mask(i, n, device),
                        _marker_step(step.tokens[i : i + 1], self.mixture_size, lp),
                    )
                    state.enter_answer(row, t + 1)
                else:
                    state.soft_steps[row] += 1
                    state.low_entropy[row] = state.low_entropy[row] + 1 if cold[i] else 0
                    budget = (
                        self.settings.max_thinking_tokens is not None
                        and state.soft_steps[row] >= self.settings.max_thinking_tokens
                    )
                    if budget or state.low_entropy[row] >= self.settings.cold_stop_steps:
                        state.phase[row] = FORCE
            elif ph == FORCE:
                state.forced_pos[row] += 1
                if state.forced_pos[row] == len(self.marker_ids):
                    state.enter_answer(row, t + 1)
            elif token in self.settings.eos_ids:
                state.finish(row, "eos", t + 1, done, i)
                continue
            if self.stops.completed(state.transcripts[row]):
                state.finish(row, "stop", t + 1, done, i)
            elif t + 1 == self.settings.max_new_tokens:
                state.finish(row, "length", t + 1, done, i)
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        finished[done] = True
        return step, scored, finished

    def _low_entropy(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Entropy of p = softmax(l / T_thinking) over the whole sharded vocabulary, below the threshold."""
        scaled = self.shard.scaled(logits, self.settings.thinking_sampler.truncation.temperature)
        entropy = softmax_entropy(scaled, log_normalizer(scaled, self.shard), self.shard)
        return (entropy < self.settings.cold_stop_entropy) & rows

    # ------------------------------------------------------------------ helpers

    def _empty_step(self, n: int, device) -> SampledStep:
        records = MixtureRecord.discrete(
            torch.full((n,), self.pad_id, dtype=torch.long, device=device), self.mixture_size
        )
        return SampledStep(
            **{f.name: getattr(records, f.name) for f in fields(records)},
            log_density=torch.zeros(n, device=device),
        )

    @staticmethod
    def _fill(step: SampledStep, where: torch.Tensor, part: SampledStep) -> SampledStep:
        """`step` with the rows selected by `where` replaced by `part` (in order)."""
        idx = where.nonzero().squeeze(-1)

        def put(dst, src):
            dst = dst.clone()
            dst[idx] = src.to(dst.dtype)
            return dst

        return SampledStep(
            **{f.name: put(getattr(step, f.name), getattr(part, f.name)) for f in fields(step)}
        )

    def _assemble(self, prompt_rows, out: _ResponseBuffer, state: _RowState, device) -> Batch:
        b = len(prompt_rows)
        lengths = torch.tensor(state.length, dtype=torch.long, device=device)
        plens = torch.tensor([len(p) for p in prompt_rows], device=device)
        total = int((plens + lengths).max())
        records = MixtureRecord.discrete(
            torch.full((b, total), self.pad_id, dtype=torch.long, device=device), self.mixture_size
        )
        loss_mask = torch.zeros(b, total, dtype=torch.bool, device=device)
        logp = torch.zeros(b, total, device=device)
        for i, p in enumerate(prompt_rows):
            records.tokens[i, : len(p)] = torch.tensor(p, device=device)
            records.mix_ids[i, : len(p), 0] = records.tokens[i, : len(p)]
            n, lo = int(lengths[i]), len(p)
            for f in fields(records):
                getattr(records, f.name)[i, lo : lo + n] = getattr(out.records, f.name)[i, :n]
            loss_mask[i, lo : lo + n] = out.scored[i, :n]
            logp[i, lo : lo + n] = out.log_density[i, :n]
        texts, thinking, answers = [], [], []
        for i in range(b):
            response = state.transcripts[i][: int(lengths[i])]
            cut = min(state.think_length[i], len(response))
            texts.append(self.tokenizer.decode(response, skip_special_tokens=True))
            thinking.append(self.tokenizer.decode(response[:cut], skip_special_tokens=True))
            answers.append(self.tokenizer.decode(response[cut:], skip_special_tokens=True))
        return Batch(
            records=records,
            loss_mask=loss_mask,
            rollout_logp=logp,
            prompt_lengths=plens,
            response_lengths=lengths,
            think_lengths=torch.tensor(
                [min(state.think_length[i], int(lengths[i])) for i in range(b)], device=device
            ),
            finish_reasons=list(state.reason),
            truncated=torch.tensor([r == "length" for r in state.reason], device=device),
            texts=texts,
            thinking_texts=thinking,
            answer_texts=answers,
        )


@dataclass
class NoiseTapes:
    """The randomness of every (step, row) of a decoding pass, drawn once before the first step
    from the noise RNG: a row's noise is then the same whichever rows are still decoding and
    however the engine batches them, and no step touches a generator (CUDA-graph capture).
    None: the sampler needs none (greedy) or draws per step (Dirichlet noise depends on pt)."""

    thinking: torch.Tensor | None  # [steps, rows, ...]
    answer: torch.Tensor | None

    @classmethod
    def draw(cls, settings: RolloutSettings, steps: int, rows: int, device) -> NoiseTapes:
        samplers = {"thinking": settings.thinking_sampler, "answer": settings.answer_sampler}
        ahead = {name: s for name, s in samplers.items() if s is not None and s.draws_ahead}
        tapes = dict.fromkeys(samplers)
        if ahead:
            with rng.noise_rng():
                for name, sampler in ahead.items():
                    tapes[name] = sampler.draw_ahead(steps, rows, device)
        return cls(**tapes)

    def at(self, name: str, t: int, rows: torch.Tensor) -> torch.Tensor | None:
        tape = getattr(self, name)
        return None if tape is None else tape[t][rows]


def _discrete_step(
    tokens: torch.Tensor, mixture_size: int, log_density: torch.Tensor | None = None
) -> SampledStep:
    records = MixtureRecord.discrete(tokens, mixture_size)
    lp = torch.zeros(len(tokens), device=tokens.device) if log_density is None else log_density
    return SampledStep(
        **{f.name: getattr(records, f.name) for f in fields(records)}, log_density=lp
    )


def _marker_step(tokens: torch.Tensor, mixture_size: int, log_density: torch.Tensor) -> SampledStep:
    """The step that completes the think-end marker: one-hot on its token like a discrete step,
    but drawn by the thinking sampler, so marked `thinking`: the trainer scores it at the thinking
    temperature, as `log_density` (log_softmax(l / T_thinking)[token]) does."""
    step = _discrete_step(tokens, mixture_size, log_density)
    return replace(step, thinking=torch.ones_like(step.thinking))


def _index_mask(i: int, n: int, device) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[i] = True
    return mask


class _RowState:
    """Per-response phase bookkeeping (last pipeline stage, host lists), indexed by the original row."""

    def __init__(self, b: int, discrete_only: bool, device):
        self.phase = [ANSWER if discrete_only else THINK] * b
        self.transcripts: list[list[int]] = [[] for _ in range(b)]
        self.soft_steps = [0] * b
        self.low_entropy = [0] * b
        self.forced_pos = [0] * b
        self.think_length = [0 if discrete_only else 1 << 30 for _ in range(b)]
        self.length = [0] * b
        self.reason = ["length"] * b
        self.device = device

    def enter_answer(self, row: int, length: int) -> None:
        self.phase[row] = ANSWER
        self.think_length[row] = length

    def finish(self, row: int, reason: str, length: int, done: list[int], i: int) -> None:
        self.reason[row] = reason
        self.length[row] = length
        done.append(i)

    def share_from_last_stage(self, parallel: ParallelState, out: _ResponseBuffer) -> None:
        """Other pipeline stages only saw the steps: give them the outcome of each response."""
        summary = torch.tensor(
            [
                self.length,
                [min(x, 1 << 30) for x in self.think_length],
                [REASONS.index(r) for r in self.reason],
            ],
            dtype=torch.long,
            device=self.device,
        )
        broadcast_from_last_stage(parallel, summary)
        self.length = summary[0].tolist()
        self.think_length = summary[1].tolist()
        self.reason = [REASONS[i] for i in summary[2].tolist()]
        self.transcripts = [
            out.records.tokens[i, : self.length[i]].tolist() for i in range(len(self.length))
        ]


class _ResponseBuffer:
    """Generated rows by (original row, response position)."""

    def __init__(self, b: int, max_new: int, k: int, device):
        self.records = MixtureRecord.discrete(
            torch.zeros(b, max_new, dtype=torch.long, device=device), k
        )
        self.scored = torch.zeros(b, max_new, dtype=torch.bool, device=device)
        self.log_density = torch.zeros(b, max_new, device=device)

    def keep_first(self, b: int) -> None:
        """Only rows [0, b) (the real rows of a padded batch)."""
        self.records = self.records.map(lambda x: x[:b])
        self.scored, self.log_density = self.scored[:b], self.log_density[:b]

    def record(self, active, t: int, step: SampledStep, scored: torch.Tensor) -> None:
        for f in fields(self.records):
            getattr(self.records, f.name)[active, t] = getattr(step, f.name).to(
                getattr(self.records, f.name).dtype
            )
        self.scored[active, t] = scored
        self.log_density[active, t] = step.log_density.float()
