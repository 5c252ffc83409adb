"""Math answers: equivalence under math-verify, batch grading and answer clustering under a hard timeout.

The answer of a response is the right-most `\\boxed{}` of the whole response (`boxed.last_boxed`);
no box means wrong. math-verify's own timeouts use `signal.alarm`, which fails off the main
thread and cannot stop every slow sympy call, so they are disabled here
(`parsing_timeout=None, timeout_seconds=None`) and `MathGrader` runs each item in a
`TimeoutPool` worker process instead: an item that overruns counts as wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from math_verify import parse, verify

from megatron_softgrpo.rewards.boxed import last_boxed
from megatron_softgrpo.rewards.pool import TimeoutPool

# math-verify warns once per process that its timeout is disabled; the pool enforces it.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _parse_answer(answer: str) -> list:
    return parse("\\boxed{" + answer + "}", parsing_timeout=None)


def _parse_reference(reference: str) -> list:
    return parse("$" + reference + "$", parsing_timeout=None)


def is_correct(answer: str | None, reference: str) -> bool:
    """math-verify equivalence of an extracted answer to a reference answer (LaTeX or plain). No timeout."""
    if not answer:
        return False
    return bool(verify(_parse_reference(reference), _parse_answer(answer), timeout_seconds=None))


def answer_classes(answers: Sequence[str | None]) -> list[int | None]:
    """Cluster answers so that equivalent ones share a class id (for majority voting). No timeout.

    Greedy and deterministic: answers are visited in order; an answer joins the class of the
    first earlier representative it is equivalent to (identical text, or math-verify equal with the
    representative as the reference), otherwise it founds a class. A class id is the index of
    its representative (the class's first answer). No answer -> None.
    """
    classes: list[int | None] = []
    representatives: list[tuple[int, str, list]] = []  # (index, text, parsed)
    for index, answer in enumerate(answers):
        if not answer:
            classes.append(None)
            continue
        parsed = None
        for rep_index, rep_text, rep_parsed in representatives:
            if answer.strip() == rep_text.strip():
                classes.append(rep_index)
                break
            if parsed is None:
                parsed = _parse_answer(answer)
            if rep_parsed and parsed and verify(rep_parsed, parsed, timeout_seconds=None):
                classes.append(rep_index)
                break
        else:
            representatives.append(
                (index, answer, parsed if parsed is not None else _parse_answer(answer))
            )
            classes.append(index)
    return classes


def exact_answer_classes(answers: Sequence[str | None]) -> list[int | None]:
    """Classes by identical (stripped) text only: the fallback when clustering times out."""
    first_index: dict[str, int] = {}
    return [None if not a else first_index.setdefault(a.strip(), i) for i, a in enumerate(answers)]


def _is_correct_item(item: tuple[str | None, str]) -> bool:
    return is_correct(*item)


class MathGrader:
    """Batch math grading in worker processes; each item has a hard wall-clock timeout (then: wrong)."""

    def __init__(
        self, num_workers: int = 2, timeout_s: float = 10.0, memory_limit_mb: int | None = 4096
    ):
        self.pool = TimeoutPool(num_workers, timeout_s, memory_limit_mb, preload=[__name__])

    def grade_answers(self, answers: Sequence[str | None], references: Sequence[str]) -> list[bool]:
        """Correctness of already extracted answers (None: no answer), in order."""
        if len(answers) != len(references):
            raise ValueError(f"{len(answers)} answers but {len(references)} references")
        todo = [i for i, answer in enumerate(answers) if answer]
        graded = self.pool.map(
            _is_correct_item, [(answers[i], references[i]) for i in todo], default=False
        )
        correct = [False] * len(answers)
        for i, ok in zip(todo, graded):
            correct[i] = ok
        return correct

    def grade(self, responses: Sequence[str], references: Sequence[str]) -> list[bool]:
        """Correctness of the right-most `\\boxed{}` of each response, in order."""
        return self.grade_answers([last_boxed(r) for r in responses], references)

    def classes(self, answer_lists: Sequence[Sequence[str | None]]) -> list[list[int | None]]:
        """`answer_classes` of each problem's answers; a problem that times out falls back to exact text."""
        clustered = self.pool.map(answer_classes, [list(a) for a in answer_lists], default=None)
        return [
            c if c is not None else exact_answer_classes(a) for c, a in zip(clustered, answer_lists)
        ]

    def close(self) -> None:
        self.pool.close()
