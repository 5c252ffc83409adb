"""The sample file of one benchmark's evaluation: its records, its settings, and resuming it.

`eval/<benchmark>/samples.jsonl` holds one JSON object per graded sample (`SampleRecord`).
Problems are decoded in fixed batches (problems [b * batch_size, (b + 1) * batch_size) of the
benchmark file); the samples of a batch are appended in one write once the whole batch is
graded. `settings.json` beside it records what produced the samples (model, decoding, n,
batch size, seed, ...): samples made otherwise are never mixed in.

Resuming (`SampleFile.resume`): the file's lines are read, a torn last line (an interrupted
write) is ignored; a batch is done when each of its problems has all n samples. The samples of
the current problems' unfinished batches are dropped (the file is rewritten without them) and
decoded again: each batch is seeded from its index, so a resumed evaluation writes the samples
an uninterrupted one would. Samples of problems beyond the current ones (an earlier run with a
larger `eval.num_problems`) stay in the file for a later run; the metrics cover only the
current problems (`SampleFile.records(num_problems)`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from megatron_softgrpo.errors import UserError
from megatron_softgrpo.eval.metrics import GradedSample

SAMPLES_FILE = "samples.jsonl"
SETTINGS_FILE = "settings.json"


@dataclass(frozen=True)
class SampleRecord:
    problem_id: str
    problem_index: int  # the problem's row in the benchmark file
    sample: int  # 0 .. n-1
    text: str  # the whole response (thinking and answer)
    answer: (
        str | None
    )  # extracted: the right-most \boxed{} (math) or the last python block (code); None: none
    correct: bool
    answer_class: (
        int | None
    )  # majority-vote class: the sample index of the first equivalent answer; None: no vote
    length: int  # response tokens
    thinking_length: (
        int  # response tokens before the answer phase (= length if thinking never ended)
    )
    finish_reason: str  # "eos" | "stop" | "length"

    def graded(self) -> GradedSample:
        return GradedSample(
            self.correct, self.answer_class, self.length, self.finish_reason == "length"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


_FIELDS = frozenset(f.name for f in fields(SampleRecord))


def batches(num_problems: int, batch_size: int) -> list[range]:
    """The problem rows of each batch, in order."""
    return [
        range(start, min(start + batch_size, num_problems))
        for start in range(0, num_problems, batch_size)
    ]


def sample_table(records: Iterable[SampleRecord]) -> list[list[GradedSample]]:
    """Per problem (in file order), its samples in sample-index order: the input of `metrics.summarize`."""
    by_problem: dict[int, list[SampleRecord]] = {}
    for record in records:
        by_problem.setdefault(record.problem_index, []).append(record)
    return [
        [r.graded() for r in sorted(by_problem[p], key=lambda r: r.sample)]
        for p in sorted(by_problem)
    ]


def read_records(path: Path) -> tuple[list[SampleRecord], bool]:
    """The records of a sample file, and whether it ends in a torn line (one without its newline: ignored)."""
    *lines, tail = path.read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if not isinstance(data, dict) or set(data) != _FIELDS:
                raise ValueError("not a sample record")
            records.append(SampleRecord(**data))
        except ValueError as exc:
            raise UserError(
                f"{path}: line {number}: {exc}; delete the file to evaluate this benchmark afresh"
            ) from None
    return records, tail != ""


class SampleFile:
    """One benchmark's `samples.jsonl` and `settings.json` under `directory` (written by the main rank only)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.path = directory / SAMPLES_FILE
        self.settings_path = directory / SETTINGS_FILE

    def resume(self, settings: dict, problem_batches: Sequence[range], n: int) -> set[int]:
        """Indices of the batches already done; drops the samples of the other batches from the file.

        Raises UserError when the existing samples were produced with other settings.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            _write_atomically(self.settings_path, json.dumps(settings, indent=2) + "\n")
            return set()
        self.check_settings(settings)
        records, torn = read_records(self.path)
        done = set(_complete_problems(records, n))
        done_batches = {
            b for b, rows in enumerate(problem_batches) if all(row in done for row in rows)
        }
        done_rows = {row for b in done_batches for row in problem_batches[b]}
        current_rows = {row for rows in problem_batches for row in rows}
        kept = [
            r
            for r in records
            if r.problem_index in done_rows or r.problem_index not in current_rows
        ]
        if torn or len(kept) != len(records):
            _write_atomically(self.path, "".join(r.to_json() + "\n" for r in kept))
        return done_batches

    def append(self, records: Sequence[SampleRecord]) -> None:
        """Append records in one write, flushed to disk (an interruption tears at most the last line)."""
        if not records:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(r.to_json() + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())

    def records(self, num_problems: int | None = None) -> list[SampleRecord]:
        """The records of the first `num_problems` problems of the benchmark file (None: all)."""
        records = read_records(self.path)[0] if self.path.exists() else []
        return [r for r in records if num_problems is None or r.problem_index < num_problems]

    def check_settings(self, settings: dict) -> None:
        """Raise UserError when samples exist that were produced with other settings."""
        if not self.path.exists():
            return
        try:
            stored = json.loads(self.settings_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise UserError(
                f"{self.settings_path}: missing or unreadable, so the samples in {self.path} cannot be resumed; "
                "delete the directory to evaluate this benchmark afresh"
            ) from None
        stored, settings = _leaves(stored), _leaves(settings)
        for key in sorted(set(settings) | set(stored)):
            if stored.get(key) != settings.get(key):
                raise UserError(
                    f"{self.path}: decoded with {key}={json.dumps(stored.get(key))}, now {key}={json.dumps(settings.get(key))}; "
                    "use another logger.log_dir, or delete the directory to evaluate afresh"
                )


def _leaves(settings: dict, prefix: str = "") -> dict:
    """Nested settings as dotted leaf keys, so a difference names the one setting that changed."""
    out = {}
    for key, value in settings.items():
        out.update(
            _leaves(value, f"{prefix}{key}.")
            if isinstance(value, dict) and value
            else {f"{prefix}{key}": value}
        )
    return out


def _complete_problems(records: Sequence[SampleRecord], n: int) -> list[int]:
    """Problems with exactly the samples 0..n-1."""
    seen: dict[int, list[int]] = {}
    for r in records:
        seen.setdefault(r.problem_index, []).append(r.sample)
    return [p for p, samples in seen.items() if sorted(samples) == list(range(n))]


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
