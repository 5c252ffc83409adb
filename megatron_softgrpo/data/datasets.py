"""Problems for training and validation: one typed record per problem, from a file or a generator.

Sources (a recipe's `data.train` / `data.validation`):

- files (`kind: json`): a JSON list of objects, JSONL (one object per line; also a `.json`
  file that does not start with `[`), or parquet. The problem and answer fields are dotted
  paths into a row (`problem_key`, `answer_key`; integers index lists, e.g. `prompt.0.value`).
  Unset, each is the first known layout present in the first row: `problem`/`answer`
  (MATH, DeepScaleR, the built-in training files) or `prompt.0.value`/`final_answer` (the
  reference evaluation files). `builtin: NAME` reads a file shipped with the package
  (`data/builtin/`) instead of `path`.
- `reasoning-gym` generators (`kind: reasoning_gym`): a task, its config, a size and a seed.

Every row is checked when the dataset is loaded, so bad input stops the run at start-up with
one line naming the file and the row (JSON and parquet: `row N`, the 0-based index; JSONL:
`line N`, 1-based), or, with `data.skip_malformed_rows`, is skipped and counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from megatron_softgrpo.config.schema import DataCfg, DatasetCfg
from megatron_softgrpo.data import builtin
from megatron_softgrpo.data.prompts import encode_prompt
from megatron_softgrpo.errors import UserError

# dotted-path candidates, in order, for the keys a recipe leaves unset
KNOWN_PROBLEM_KEYS = ("problem", "prompt.0.value")
KNOWN_ANSWER_KEYS = ("answer", "final_answer")

Split = Literal["train", "validation"]

# reasoning-gym draws entry i from Random(seed + i), so seeds 0 and 1 would share all but one
# problem (a validation set overlapping the training set); recipe seeds are spread this far apart.
# It keeps seed * stride + size below 2**32 (what numpy-seeded tasks accept) for seeds < 4096.
REASONING_GYM_SEED_STRIDE = 2**20


@dataclass(frozen=True)
class Problem:
    """One problem. For a reasoning-gym problem, the task's own scorer takes the entry
    `{"question": problem, "answer": answer, "metadata": metadata}`; `metadata["source_dataset"]`
    names the task (`reasoning_gym.get_score_answer_fn`)."""

    id: str  # stable: "<file name>:<row>" or "<task>:<seed>:<index>"
    problem: str  # the text that fills the prompt template's {problem}
    answer: (
        str | dict
    )  # numbers are read as their text; an object is a structured answer (code tests)
    metadata: dict  # the row's other top-level fields; reasoning-gym: the entry's metadata


@dataclass(frozen=True)
class ReadResult:
    """The problems of one source and what was skipped on the way."""

    source: str  # the file, or "reasoning-gym TASK"
    problems: list[Problem]
    skipped_malformed: int = 0
    first_skip: str | None = None  # where and why the first skipped row was rejected


@dataclass(frozen=True)
class PromptDataset:
    """A split ready for the trainer: read, checked, and filtered by rendered prompt length."""

    key: str  # "data.train" or "data.validation"
    read: ReadResult
    problems: list[Problem]  # those whose rendered prompt fits data.max_input_seq_length
    max_prompt_tokens: int

    @property
    def dropped_too_long(self) -> int:
        return len(self.read.problems) - len(self.problems)

    def summary(self) -> str:
        """One line for the run log (the counted skips are reported here, once)."""
        line = f"{self.key}: {len(self.problems)} problems from {self.read.source}"
        if self.read.skipped_malformed:
            line += f"; skipped {self.read.skipped_malformed} malformed rows (first: {self.read.first_skip})"
        if self.dropped_too_long:
            line += f"; dropped {self.dropped_too_long} prompts longer than {self.max_prompt_tokens} tokens"
        return line


def load_split(data: DataCfg, split: Split, tokenizer) -> PromptDataset:
    """Read `data.<split>` and drop the problems whose chat prompt exceeds `data.max_input_seq_length`."""
    key = f"data.{split}"
    cfg = getattr(data, split)
    if cfg is None:
        raise UserError(
            f"{key}: not set; give a file (kind: json, path: ...) or a reasoning-gym task"
        )
    read = read_problems(cfg, key=key, skip_malformed_rows=data.skip_malformed_rows)
    kept = filter_by_prompt_length(
        read.problems,
        tokenizer,
        template=data.prompt_template,
        system_prompt=data.system_prompt,
        max_tokens=data.max_input_seq_length,
    )
    if not kept:
        raise UserError(
            f"data.max_input_seq_length={data.max_input_seq_length}: all {len(read.problems)} prompts of "
            f"{read.source} are longer; raise it or shorten data.prompt_template"
        )
    return PromptDataset(key, read, kept, data.max_input_seq_length)


def read_problems(cfg: DatasetCfg, *, key: str, skip_malformed_rows: bool = False) -> ReadResult:
    """All problems of one source, checked; `key` ("data.train") names the recipe section in errors."""
    if cfg.kind == "reasoning_gym":
        result = _read_reasoning_gym(cfg, key, skip_malformed_rows)
    else:
        result = _read_file(cfg, key, skip_malformed_rows)
    if not result.problems:
        skipped = ""
        if result.skipped_malformed:
            skipped = (
                f" ({result.skipped_malformed} malformed rows skipped, first: {result.first_skip})"
            )
        raise UserError(f"{result.source}: no problems{skipped}")
    return result


def filter_by_prompt_length(
    problems: list[Problem], tokenizer, *, template: str, system_prompt: str | None, max_tokens: int
) -> list[Problem]:
    """The problems whose rendered chat prompt (template, chat template, generation prompt) has <= max_tokens tokens."""
    try:
        template.format(problem="")
    except (KeyError, IndexError, ValueError) as e:  # other placeholders, or unbalanced braces
        raise UserError(
            f"data.prompt_template={template!r}: cannot be filled ({type(e).__name__}: {e}); "
            "its only placeholder is {problem}, write {{ and }} for literal braces"
        ) from None
    return [
        p
        for p in problems
        if len(encode_prompt(tokenizer, p.problem, template, system_prompt)) <= max_tokens
    ]


# ---------------------------------------------------------------- rows


class _MalformedRow(Exception):
    """A row that cannot become a Problem; the message says why (the caller adds where)."""


_MISSING = object()


def _lookup(row: Any, path: str) -> Any:
    """The value at a dotted path (`prompt.0.value`), or _MISSING."""
    cur = row
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return _MISSING
    return cur


_JSON_TYPE_NAMES = {
    type(None): "null",
    dict: "object",
    list: "list",
    str: "string",
    bool: "boolean",
}


def _type_name(value: Any) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _problem_and_answer(row: Any, problem_key: str, answer_key: str) -> tuple[str, str | dict]:
    if not isinstance(row, dict):
        raise _MalformedRow(f"expected an object, got {_type_name(row)}")
    problem = _lookup(row, problem_key)
    if problem is _MISSING:
        raise _MalformedRow(f"no field '{problem_key}'")
    if not isinstance(problem, str) or not problem.strip():
        raise _MalformedRow(
            f"field '{problem_key}' must be a non-empty string, got {_type_name(problem)}"
        )
    answer = _lookup(row, answer_key)
    if answer is _MISSING:
        raise _MalformedRow(f"no field '{answer_key}'")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, (str, dict)):
        raise _MalformedRow(
            f"field '{answer_key}' must be a string, a number or an object, got {_type_name(answer)}"
        )
    return problem, answer


class _Collector:
    """Builds a ReadResult: keeps good rows, and either raises on the first bad row or counts it."""

    def __init__(self, source: str, skip_malformed_rows: bool):
        self.source, self.skip = source, skip_malformed_rows
        self.problems: list[Problem] = []
        self.skipped = 0
        self.first_skip: str | None = None

    def malformed(self, where: str, why: str) -> None:
        if not self.skip:
            raise UserError(
                f"{self.source} {where}: {why} (data.skip_malformed_rows=true skips such rows)"
            )
        self.skipped += 1
        self.first_skip = self.first_skip or f"{where}: {why}"

    def result(self) -> ReadResult:
        return ReadResult(self.source, self.problems, self.skipped, self.first_skip)


# ---------------------------------------------------------------- files


def _read_file(cfg: DatasetCfg, key: str, skip_malformed_rows: bool) -> ReadResult:
    if cfg.builtin is not None:
        path = builtin.path_of(cfg.builtin)
    elif not cfg.path:
        raise UserError(f"{key}.path: required when kind=json (a JSON, JSONL or parquet file)")
    else:
        path = Path(cfg.path).expanduser()
        if not path.is_file():
            raise UserError(f"{key}.path={cfg.path}: no such file")
    rows = list(_file_rows(path))
    first_object = next((row for _, _, row in rows if isinstance(row, dict)), None)
    problem_key = cfg.problem_key or _detect(
        first_object, KNOWN_PROBLEM_KEYS, path, f"{key}.problem_key"
    )
    answer_key = cfg.answer_key or _detect(
        first_object, KNOWN_ANSWER_KEYS, path, f"{key}.answer_key"
    )
    top_level = {problem_key.split(".")[0], answer_key.split(".")[0]}
    out = _Collector(str(path), skip_malformed_rows)
    for where, number, row in rows:
        try:
            problem, answer = _problem_and_answer(row, problem_key, answer_key)
        except _MalformedRow as e:
            out.malformed(where, str(e))
            continue
        metadata = {k: v for k, v in row.items() if k not in top_level}
        out.problems.append(Problem(f"{path.name}:{number}", problem, answer, metadata))
    return out.result()


def _detect(
    first_object: dict | None, candidates: tuple[str, ...], path: Path, recipe_key: str
) -> str:
    if first_object is None:  # no object rows: every row is reported as malformed whatever the key
        return candidates[0]
    for candidate in candidates:
        if _lookup(first_object, candidate) is not _MISSING:
            return candidate
    raise UserError(
        f"{path}: none of the known fields ({', '.join(candidates)}) in its first object row; "
        f"set {recipe_key} to the field's dotted path (e.g. prompt.0.value)"
    )


def _file_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    """(where, number, row) for every row of a JSON list, JSONL or parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    if suffix not in (".json", ".jsonl"):
        raise UserError(
            f"{path}: unsupported file type '{path.suffix}'; expected .json, .jsonl or .parquet"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read ({e})") from None
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
            ) from None
        yield from ((f"row {i}", i, row) for i, row in enumerate(rows))
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path} line {number}: invalid JSON ({e.msg}); expected a JSON list of objects or one object per line"
            ) from None
        yield f"line {number}", number, row


def _parquet_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: not a readable parquet file ({first_line})") from None
    yield from ((f"row {i}", i, row) for i, row in enumerate(table.to_pylist()))


# ---------------------------------------------------------------- reasoning-gym


def _read_reasoning_gym(cfg: DatasetCfg, key: str, skip_malformed_rows: bool) -> ReadResult:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if cfg.task not in DATASETS:
        raise UserError(
            f"{key}.task={cfg.task}: not a reasoning-gym task (e.g. basic_arithmetic, gsm_symbolic)"
        )
    try:
        generator = reasoning_gym.create_dataset(
            cfg.task, seed=cfg.seed * REASONING_GYM_SEED_STRIDE, size=cfg.size, **cfg.task_config
        )
    except (TypeError, ValueError, AssertionError) as e:
        raise UserError(
            f"{key}.task_config={cfg.task_config}: rejected by reasoning-gym task {cfg.task} ({e})"
        ) from None
    out = _Collector(f"reasoning-gym {cfg.task}", skip_malformed_rows)
    for index, entry in enumerate(generator):
        try:
            problem, answer = _problem_and_answer(entry, "question", "answer")
        except _MalformedRow as e:
            out.malformed(f"entry {index}", str(e))
            continue
        metadata = dict(entry.get("metadata") or {})
        metadata.setdefault("source_dataset", cfg.task)
        out.problems.append(Problem(f"{cfg.task}:{cfg.seed}:{index}", problem, answer, metadata))
    return out.result()
