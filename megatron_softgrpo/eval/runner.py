"""`softgrpo eval`: decode n samples per problem of each benchmark, grade them, write samples and summary.

Per benchmark (`eval.benchmarks`, in order) under `logger.log_dir`/eval/<benchmark>/:
1. The problems (`eval.files.<name>`, else the benchmark's file in `eval.data_dir`; the first
   `eval.num_problems`) are cut into fixed batches of `eval.batch_size` problems.
2. The main rank resumes the sample file (`samples.SampleFile`): finished batches are skipped.
3. The remaining batches are dealt to the data-parallel replicas (`benchmarks.shard`); in each
   round every replica decodes one batch (batch_size x n responses in one generate call), its
   first rank grades them, and the main rank gathers and appends the samples.
4. The main rank computes the metrics from the sample file and rewrites summary.json/summary.md.

Every batch seeds the sampling noise from (eval.seed, benchmark, batch index), so the samples
do not depend on the number of replicas nor on interruptions.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_softgrpo.algorithms.registry import decoding_algorithm
from megatron_softgrpo.config.recipe import LoadedRecipe
from megatron_softgrpo.config.schema import RecipeCfg
from megatron_softgrpo.data import builtin
from megatron_softgrpo.data.datasets import read_problems
from megatron_softgrpo.data.prompts import encode_prompt
from megatron_softgrpo.distributed import ParallelState, gather_to_main, share_from_main
from megatron_softgrpo.errors import UserError
from megatron_softgrpo.eval.benchmarks import (
    Benchmark,
    Problem,
    get_benchmark,
    grade_responses,
    load_problems,
    shard,
)
from megatron_softgrpo.eval.metrics import BenchmarkMetrics, summarize
from megatron_softgrpo.eval.report import EvalSummary, write_summary
from megatron_softgrpo.eval.samples import SampleFile, SampleRecord, batches, sample_table
from megatron_softgrpo.eval.sandbox import isolation
from megatron_softgrpo.models.checkpoint import is_checkpoint
from megatron_softgrpo.rewards.answers import AnswerFormat
from megatron_softgrpo.rewards.math import MathGrader
from megatron_softgrpo.soft import seed_noise_rng
from megatron_softgrpo.train.checkpointing import latest_checkpoint


@dataclass(frozen=True)
class BenchmarkPlan:
    benchmark: Benchmark
    source: str  # where the problems come from: the resolved file, or the validation split's config
    problems: list[Problem]  # the evaluated ones: the first eval.num_problems of the source
    template: str  # the prompt template with its {problem} placeholder


@dataclass(frozen=True)
class Responses:
    """Decoded responses of a batch, prompt-major (row p * n + s)."""

    texts: list[str]
    lengths: list[int]
    thinking_lengths: list[int]
    finish_reasons: list[str]


def batch_seed(seed: int, benchmark: str, batch_index: int) -> int:
    """The sampling-noise seed of one batch: a function of its identity only (not of rank or history)."""
    digest = hashlib.sha256(f"{seed}/{benchmark}/{batch_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def checkpoint_model_name(checkpoint: str) -> str:
    """`checkpoint=DIR`: a megatron-softgrpo checkpoint, or a checkpoint_dir whose `latest` names one."""
    path = Path(checkpoint).expanduser()
    if is_checkpoint(path):
        return str(path)
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise UserError(
            f"checkpoint={checkpoint}: not a megatron-softgrpo checkpoint (softgrpo_checkpoint.json) "
            "nor a checkpointing.checkpoint_dir with a `latest` checkpoint"
        )
    return str(latest)


def plan_eval(loaded: LoadedRecipe) -> list[BenchmarkPlan]:
    """The problems of every requested benchmark, read before any model is loaded (bad files fail fast)."""
    ev, data = loaded.cfg.eval, loaded.cfg.data
    plans = []
    for name in ev.benchmarks:
        benchmark = get_benchmark(name)
        if benchmark.filename is None:
            source, problems = _validation_problems(loaded)
        else:
            path = _benchmark_file(loaded, name, benchmark.filename)
            source, problems = str(path.resolve()), load_problems(name, path)
        plan = BenchmarkPlan(
            benchmark,
            source,
            problems[: ev.num_problems],
            benchmark.prompt_template or data.prompt_template,
        )
        SampleFile(eval_dir(loaded.cfg) / name).check_settings(sample_settings(loaded.cfg, plan))
        plans.append(plan)
    return plans


def _benchmark_file(loaded: LoadedRecipe, name: str, filename: str) -> Path:
    ev = loaded.cfg.eval
    if name in ev.files:
        return Path(ev.files[name]).expanduser()
    data_dir = builtin.EVAL_DIR if ev.data_dir is None else Path(ev.data_dir).expanduser()
    if not data_dir.is_dir():
        raise loaded.error(
            "eval.data_dir",
            f"no such directory (a relative path is resolved from the current "
            f"directory, {Path.cwd()}); point it at the benchmark files, or set eval.files.{name}",
        )
    return data_dir / filename


def _validation_problems(loaded: LoadedRecipe) -> tuple[str, list[Problem]]:
    """The `validation` benchmark: the recipe's held-out split, as training validates on it."""
    data = loaded.cfg.data
    if data.validation is None:
        raise loaded.error("eval.benchmarks", "'validation' needs data.validation (not set)")
    read = read_problems(
        data.validation, key="data.validation", skip_malformed_rows=data.skip_malformed_rows
    )
    problems = []
    for p in read.problems:
        if not isinstance(p.answer, str):
            raise UserError(
                f"data.validation: problem {p.id}: the 'validation' benchmark grades math answers, "
                f"got a structured answer ({type(p.answer).__name__})"
            )
        problems.append(Problem(p.id, p.problem, p.answer))
    return f"data.validation {json.dumps(data.validation.model_dump(), sort_keys=True)}", problems


def eval_dir(cfg: RecipeCfg) -> Path:
    return Path(cfg.logger.log_dir) / "eval"


def max_new_tokens(cfg: RecipeCfg) -> int:
    return cfg.eval.max_new_tokens or cfg.policy.generation.max_new_tokens


def sample_settings(cfg: RecipeCfg, plan: BenchmarkPlan) -> dict:
    """Everything that determines a benchmark's samples (a resumed evaluation must match them)."""
    return {
        "policy.model_name": cfg.policy.model_name,
        "policy.tokenizer": cfg.policy.tokenizer.model_dump(),
        "policy.precision": cfg.policy.precision,
        "policy.generation": cfg.policy.generation.model_dump(exclude={"max_new_tokens"}),
        "softgrpo": cfg.softgrpo.model_dump(),
        "decoding": decoding_algorithm(cfg.softgrpo).sampler,
        "max_new_tokens": max_new_tokens(cfg),
        "prompt_template": plan.template,
        "data.system_prompt": cfg.data.system_prompt,
        "env.answer_format": cfg.env.answer_format,  # samples are stored graded
        "problem_file": plan.source,
        "eval.n": cfg.eval.n,
        "eval.batch_size": cfg.eval.batch_size,
        "eval.seed": cfg.eval.seed,
    }


# ---------------------------------------------------------------- grading (the first rank of each replica)


def grade_batch(
    benchmark: Benchmark,
    rows: Sequence[int],
    problems: Sequence[Problem],
    responses: Responses,
    n: int,
    grader,
    sandbox_workers: int = 2,
    answer_format: AnswerFormat = "boxed",
) -> list[SampleRecord]:
    """Records of the n responses to each problem (`rows`: their rows in the benchmark file).

    `grader` is a `rewards.math.MathGrader` (math benchmarks; it also clusters the answers for
    majority voting; answers are read in `answer_format`); code benchmarks run in the sandbox and
    do not vote.
    """
    expanded = [p for p in problems for _ in range(n)]
    grades = grade_responses(
        benchmark.name,
        expanded,
        responses.texts,
        math_grader=grader,
        answer_format=answer_format,
        max_parallel=sandbox_workers,
    )
    answers = [g.answer for g in grades]
    if benchmark.kind == "math":
        classes = [
            c
            for group in grader.classes(
                [answers[i * n : (i + 1) * n] for i in range(len(problems))]
            )
            for c in group
        ]
    else:
        classes = [None] * len(grades)
    return [
        SampleRecord(
            problem_id=problems[i // n].id,
            problem_index=rows[i // n],
            sample=i % n,
            text=responses.texts[i],
            answer=answers[i],
            correct=grades[i].correct,
            answer_class=classes[i],
            length=responses.lengths[i],
            thinking_length=responses.thinking_lengths[i],
            finish_reason=responses.finish_reasons[i],
        )
        for i in range(len(grades))
    ]


# ---------------------------------------------------------------- the run


def run_eval(
    cfg: RecipeCfg, plans: Sequence[BenchmarkPlan], engine, tokenizer, parallel: ParallelState
) -> EvalSummary | None:
    """Evaluate every planned benchmark (a collective: every rank calls it); the main rank returns the summary.

    `engine` is this rank's `RolloutEngine`, built after `init_distributed` with `max_new_tokens(cfg)`.
    """
    ev = cfg.eval
    out_dir = eval_dir(cfg)
    needs_math = any(p.benchmark.kind == "math" for p in plans)
    grader = (
        MathGrader(cfg.env.num_workers, cfg.env.timeout_s)
        if parallel.replica_lead and needs_math
        else None
    )
    if parallel.main and any(p.benchmark.kind == "code" for p in plans):
        name = isolation().name
        caveat = (
            " (no namespaces: eval/sandbox.py says what a program could still do)"
            if name == "none"
            else ""
        )
        _log(f"code sandbox isolation: {name}{caveat}")
    metrics: dict[str, BenchmarkMetrics] = {}
    try:
        for plan in plans:
            name = plan.benchmark.name
            result = _run_benchmark(cfg, plan, engine, tokenizer, grader, parallel, out_dir / name)
            if parallel.main:  # after each benchmark: a long evaluation reports as it goes
                metrics[name] = result
                summary = EvalSummary(
                    cfg.policy.model_name,
                    decoding_algorithm(cfg.softgrpo).sampler,
                    ev.n,
                    max_new_tokens(cfg),
                    ev.seed,
                    dict(metrics),
                )
                write_summary(out_dir, summary)
    finally:
        if grader is not None:
            grader.close()
    if parallel.main:
        _log(f"wrote {out_dir / 'summary.md'}")
        return summary
    return None


def _run_benchmark(
    cfg: RecipeCfg,
    plan: BenchmarkPlan,
    engine,
    tokenizer,
    grader,
    parallel: ParallelState,
    out_dir: Path,
) -> BenchmarkMetrics | None:
    """Decode, grade and record what is left of one benchmark; the main rank returns its metrics."""
    ev, name = cfg.eval, plan.benchmark.name
    problem_batches = batches(len(plan.problems), ev.batch_size)
    sample_file = SampleFile(out_dir)
    done = _from_main(
        parallel, lambda: sample_file.resume(sample_settings(cfg, plan), problem_batches, ev.n)
    )
    remaining = [b for b in range(len(problem_batches)) if b not in done]
    mine = shard(remaining, parallel.dp_rank, parallel.dp)
    problems_done = sum(len(problem_batches[b]) for b in done)
    if parallel.main:
        _log(
            f"{name}: {len(plan.problems)} problems x {ev.n} samples from {plan.source}"
            + (f"; resuming with {problems_done} done" if done else "")
        )
    start, decoded = time.monotonic(), 0
    for round_index in range(math.ceil(len(remaining) / parallel.dp)):
        records: list[SampleRecord] = []
        if round_index < len(mine):
            batch = mine[round_index]
            rows = problem_batches[batch]
            problems = [plan.problems[row] for row in rows]
            prompts = [
                encode_prompt(tokenizer, p.prompt, plan.template, cfg.data.system_prompt)
                for p in problems
            ]
            seed_noise_rng(batch_seed(ev.seed, name, batch))
            out = engine.generate(prompts, ev.n)
            if parallel.replica_lead:
                lengths, thinking = out.response_lengths.tolist(), out.think_lengths.tolist()
                responses = Responses(out.texts, lengths, thinking, list(out.finish_reasons))
                records = grade_batch(
                    plan.benchmark,
                    rows,
                    problems,
                    responses,
                    ev.n,
                    grader,
                    cfg.env.num_workers,
                    cfg.env.answer_format,
                )
        gathered = gather_to_main(parallel, records)
        if parallel.main:
            gathered.sort(key=lambda r: (r.problem_index, r.sample))
            sample_file.append(gathered)
            decoded += len(gathered)
            problems_done += len(gathered) // ev.n
            _log(
                f"{name}: "
                + progress(
                    problems_done, len(plan.problems), ev.n, decoded, time.monotonic() - start
                )
            )
    if not parallel.main:
        return None
    current = sample_file.records(
        len(plan.problems)
    )  # the file may hold more (an earlier, larger eval)
    metrics = summarize(sample_table(current), ev.ks, vote=plan.benchmark.kind == "math")
    _log(f"{name}: {_headline(metrics)}")
    return metrics


def progress(problems_done: int, problems: int, n: int, decoded: int, elapsed_s: float) -> str:
    """The per-round progress line: problems done/total, this session's samples/s, and the time left at that rate."""
    rate = decoded / max(elapsed_s, 1e-9)
    left_s = round((problems - problems_done) * n / rate) if rate > 0 else None
    eta = (
        f"{left_s // 3600}:{left_s // 60 % 60:02d}:{left_s % 60:02d}"
        if left_s is not None
        else "unknown"
    )
    return f"{problems_done}/{problems} problems, {rate:.2f} samples/s, ETA {eta}"


def _headline(m: BenchmarkMetrics) -> str:
    k = max(m.pass_at_k)
    majority = f", maj@{k} {100 * m.maj_at_k[k]:.2f}%" if m.maj_at_k else ""
    return (
        f"mean@{m.n} {100 * m.mean_at_n:.2f}%, pass@{k} {100 * m.pass_at_k[k]:.2f}%{majority}, "
        f"mean length {m.mean_length:.1f}, truncated {100 * m.truncated_fraction:.1f}%"
    )


def _log(message: str) -> None:
    print(f"[eval] {message}", file=sys.stderr, flush=True)


def _from_main(parallel: ParallelState, fn):
    """fn() evaluated on the main rank and shared with all; its UserError is raised on every rank."""
    result: tuple = (None, None)
    if parallel.main:
        try:
            result = (fn(), None)
        except UserError as exc:
            result = (None, str(exc))
    value, error = share_from_main(parallel, result)
    if error is not None:
        raise UserError(error)
    return value
