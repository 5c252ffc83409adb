"""The evaluation benchmarks: a named loader and a grader for each, and sharding across data-parallel ranks.

Math (aime2024, aime2025, amc23, math500, gsm8k, and `validation`: the recipe's own
`data.validation` split, e.g. generated reasoning-gym problems): the answer read as
`env.answer_format` says, graded by math-verify (`rewards.math`). Code (humaneval, mbpp): the last ```python block run against the
benchmark's tests in the sandbox (`code_grading`, `sandbox`).

Files: a JSON list, or JSONL (one object per line, `.jsonl`); errors name the file and the
row (the 0-based index of the problem). A row is the format of the built-in evaluation
files (`data/builtin/eval`) -- `{"prompt": [{"from": "user", "value": TEXT}], "final_answer": ANSWER}`
-- where `prompt` may also be a plain string or `problem`/`question`, and `final_answer` may
also be `answer`. Code rows keep their tests in `final_answer` (HumanEval: task_id,
canonical_solution, test, entry_point; MBPP: task_id, code, test_list, test_import(s)).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from megatron_softgrpo.errors import UserError
from megatron_softgrpo.eval.code_grading import (
    CodeTests,
    HumanEvalTests,
    MbppTests,
    last_python_block,
)
from megatron_softgrpo.eval.sandbox import SandboxLimits, run_python_many
from megatron_softgrpo.rewards.answers import AnswerFormat, extract_answer

if TYPE_CHECKING:
    from megatron_softgrpo.rewards.math import MathGrader

T = TypeVar("T")


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str  # the problem text that fills the prompt template
    reference: str | CodeTests  # math: the answer; code: the tests


@dataclass(frozen=True)
class Grade:
    correct: bool
    answer: (
        str | None
    )  # the extracted answer (math) or solution code (code); None: nothing extracted


# ---------------------------------------------------------------- loading


def load_problems(name: str, path: str | Path) -> list[Problem]:
    """The problems of benchmark `name` from `path` (its built-in file, or the user's own)."""
    benchmark = get_benchmark(name)
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise UserError(f"{path}: no problems (benchmark {name})")
    problems = []
    first_row: dict[str, int] = {}  # problem id -> row: ids key the samples of a resumed evaluation
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(
                f"{path}: row {index}: expected a JSON object, got {type(row).__name__}"
            )
        problem = benchmark.parse_row(benchmark.name, index, row, _RowErrors(path, index))
        if first_row.setdefault(problem.id, index) != index:
            raise UserError(
                f"{path}: row {index}: problem id {problem.id!r} repeats row {first_row[problem.id]}"
            )
        problems.append(problem)
    return problems


@dataclass(frozen=True)
class _RowErrors:
    path: Path
    index: int

    def __call__(self, message: str) -> UserError:
        return UserError(f"{self.path}: row {self.index}: {message}")


def _read_rows(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{path}: cannot read the benchmark file ({exc.strerror})") from None
    if path.suffix == ".jsonl":
        rows = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(
                        f"{path}: line {line_number}: invalid JSON ({exc.msg})"
                    ) from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(rows, list):
        raise UserError(
            f"{path}: expected a JSON list of problems (or a .jsonl file), got {type(rows).__name__}"
        )
    return rows


def _problem_text(row: dict, error: _RowErrors) -> str:
    prompt = row.get("prompt", row.get("problem", row.get("question")))
    if isinstance(prompt, list):  # chat turns: the last user turn
        turns = [
            t
            for t in prompt
            if isinstance(t, dict) and t.get("from", t.get("role")) in ("user", "human")
        ]
        prompt = turns[-1].get("value", turns[-1].get("content")) if turns else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise error(
            "no problem text: expected 'prompt' (a string or a list of chat turns with a user turn), "
            "'problem' or 'question'"
        )
    return prompt


def _answer_field(row: dict, error: _RowErrors) -> Any:
    for key in ("final_answer", "answer"):
        if key in row:
            return row[key]
    raise error("no answer: expected 'final_answer' or 'answer'")


def _math_problem(name: str, index: int, row: dict, error: _RowErrors) -> Problem:
    answer = _answer_field(row, error)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise error(f"the answer must be a non-empty string or a number, got {answer!r}")
    return Problem(str(row.get("id", f"{name}/{index}")), _problem_text(row, error), answer)


def _code_fields(row: dict, error: _RowErrors, fields: dict[str, tuple[type, ...]]) -> dict:
    tests = _answer_field(row, error)
    if not isinstance(tests, dict):
        raise error(f"'final_answer' must be an object with {', '.join(fields)}")
    for key, kinds in fields.items():
        if not isinstance(tests.get(key), kinds):
            expected = " or ".join(kind.__name__ for kind in kinds)
            raise error(f"'final_answer.{key}' must be a {expected}, got {tests.get(key)!r:.60}")
    return tests


def _humaneval_problem(name: str, index: int, row: dict, error: _RowErrors) -> Problem:
    fields = _code_fields(
        row,
        error,
        {"task_id": (str,), "canonical_solution": (str,), "test": (str,), "entry_point": (str,)},
    )
    prompt = _problem_text(row, error)
    tests = HumanEvalTests(
        prompt, fields["test"], fields["entry_point"], fields["canonical_solution"]
    )
    return Problem(fields["task_id"], prompt, tests)


def _mbpp_problem(name: str, index: int, row: dict, error: _RowErrors) -> Problem:
    fields = _code_fields(row, error, {"task_id": (int, str), "code": (str,), "test_list": (list,)})
    imports = fields.get("test_imports", fields.get("test_import", []))
    for key, lines in (("test_list", fields["test_list"]), ("test_import(s)", imports)):
        if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
            raise error(f"'final_answer.{key}' must be a list of strings")
    tests = MbppTests(tuple(imports), tuple(fields["test_list"]), fields["code"])
    # The description alone does not name the function; the tests show its name and signature.
    prompt = (
        _problem_text(row, error)
        + "\nYour code should pass these tests:\n\n"
        + "\n".join(tests.test_list)
    )
    return Problem(f"{name}/{fields['task_id']}", prompt, tests)


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class Benchmark:
    name: str
    filename: str | None  # its file in `eval.data_dir`; None: the recipe's `data.validation` split
    kind: Literal["math", "code"]
    prompt_template: (
        str | None
    )  # `{problem}` placeholder; None: the recipe's math template (docs/algorithm.md section 6)
    parse_row: Callable[[str, int, dict, _RowErrors], Problem]


_HUMANEVAL_TEMPLATE = (
    "Complete the following Python function. Think step by step, then give the complete function, "
    "with its imports, in one ```python code block at the end.\n\n```python\n{problem}```"
)
_MBPP_TEMPLATE = "{problem}\n\nThink step by step, then give the complete Python function in one ```python code block at the end."

BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("aime2024", "aime2024.json", "math", None, _math_problem),
        Benchmark("aime2025", "aime2025.json", "math", None, _math_problem),
        Benchmark("amc23", "amc23.json", "math", None, _math_problem),
        Benchmark("math500", "math500.json", "math", None, _math_problem),
        Benchmark("gsm8k", "gsm8k_test.json", "math", None, _math_problem),
        # no file: the training recipe's held-out split (data.validation)
        Benchmark("validation", None, "math", None, _math_problem),
        Benchmark("humaneval", "humaneval.json", "code", _HUMANEVAL_TEMPLATE, _humaneval_problem),
        Benchmark("mbpp", "mbpp.json", "code", _MBPP_TEMPLATE, _mbpp_problem),
    )
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


# ---------------------------------------------------------------- grading

DEFAULT_LIMITS = SandboxLimits()  # frozen: one instance serves every call


def grade_responses(
    name: str,
    problems: Sequence[Problem],
    responses: Sequence[str],
    *,
    math_grader: MathGrader | None = None,
    answer_format: AnswerFormat = "boxed",
    sandbox_limits: SandboxLimits = DEFAULT_LIMITS,
    max_parallel: int = 2,
) -> list[Grade]:
    """Grade `responses[i]` against `problems[i]` with benchmark `name`'s grader, in order.

    Math needs `math_grader` (its worker pool is reused across calls) and reads each answer in
    `answer_format` (the recipe's `env.answer_format`, which goes with the recipe's math prompt
    template); code runs up to
    `max_parallel` programs at a time under `sandbox_limits`.
    """
    if len(problems) != len(responses):
        raise ValueError(f"{len(problems)} problems but {len(responses)} responses")
    if get_benchmark(name).kind == "math":
        if math_grader is None:
            raise ValueError(f"benchmark {name} needs a math_grader")
        answers = [extract_answer(r, answer_format) for r in responses]
        correct = math_grader.grade_answers(answers, [p.reference for p in problems])
        return [Grade(ok, answer) for ok, answer in zip(correct, answers)]
    solutions = [last_python_block(r) for r in responses]
    todo = [i for i, code in enumerate(solutions) if code is not None]
    results = run_python_many(
        [problems[i].reference.program(solutions[i]) for i in todo], sandbox_limits, max_parallel
    )
    passed = dict(zip(todo, (r.passed for r in results)))
    return [Grade(passed.get(i, False), code) for i, code in enumerate(solutions)]


# ---------------------------------------------------------------- data parallel


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank `rank`'s share: every `world_size`-th item from `rank` (balances easy and hard problems)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return list(items[rank::world_size])


def merge_shards(shards: Sequence[Sequence[T]]) -> list[T]:
    """Inverse of `shard`: the results of all ranks (in rank order) back in the original item order."""
    merged: list[T] = []
    for position in range(max((len(s) for s in shards), default=0)):
        merged.extend(s[position] for s in shards if position < len(s))
    return merged
