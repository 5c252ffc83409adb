"""Named rewards a recipe can select: `math_verify` (default), `math_reference`, `exact_match`,
`reasoning_gym`.

Every reward is called as `reward(responses, references, metadata) -> list[float]` (one value per
response, in order) and reads the response's answer as `env.answer_format` says
(`answers.extract_answer`): by default its right-most `\\boxed{}`, the format the prompt template
asks for (docs/algorithm.md section 6). `math_reference` is the exception: it reads the last box
the reference's way (`hendrycks.last_boxed_only_string`), so it needs `answer_format: boxed`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from megatron_softgrpo.errors import UserError
from megatron_softgrpo.rewards.answers import AnswerFormat, extract_answer
from megatron_softgrpo.rewards.pool import TimeoutPool


class RewardFn(Protocol):
    def __call__(
        self,
        responses: Sequence[str],
        references: Sequence[str],
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[float]: ...


class MathVerifyReward:
    """1.0 when the answer is math-verify equivalent to the reference, else 0.0 (also on timeout)."""

    def __init__(
        self, answer_format: AnswerFormat = "boxed", num_workers: int = 2, timeout_s: float = 10.0
    ):
        from megatron_softgrpo.rewards.math import MathGrader  # imports sympy: only when selected

        self.answer_format = answer_format
        self.grader = MathGrader(num_workers, timeout_s)

    def __call__(self, responses, references, metadata=None) -> list[float]:
        answers = [extract_answer(r, self.answer_format) for r in responses]
        return [float(ok) for ok in self.grader.grade_answers(answers, references)]


class MathReferenceReward:
    """The reference's training reward (verl's Hendrycks-MATH grader, `rewards/hendrycks.py`): 1.0
    when the last box of the whole response equals the reference after string normalisation."""

    def __init__(self, answer_format: AnswerFormat = "boxed"):
        if answer_format != "boxed":
            raise UserError(
                f"env.answer_format={answer_format}: reward math_reference reads the last box as the "
                "reference does; it needs answer_format boxed"
            )

    def __call__(self, responses, references, metadata=None) -> list[float]:
        from megatron_softgrpo.rewards.hendrycks import compute_score

        _check_lengths(responses, references)
        return [compute_score(r, str(ref)) for r, ref in zip(responses, references)]


class ExactMatchReward:
    """1.0 when the answer equals the reference after stripping surrounding whitespace."""

    def __init__(self, answer_format: AnswerFormat = "boxed"):
        self.answer_format = answer_format

    def __call__(self, responses, references, metadata=None) -> list[float]:
        _check_lengths(responses, references)
        return [
            float(extract_answer(r, self.answer_format) == str(ref).strip())
            for r, ref in zip(responses, references)
        ]


@functools.cache
def _reasoning_gym_scorer(task: str) -> Callable[[str | None, dict], float]:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def _reasoning_gym_score(item: tuple[str | None, dict]) -> float:
    answer, entry = item
    return float(_reasoning_gym_scorer(entry["metadata"]["source_dataset"])(answer, entry))


class ReasoningGymReward:
    """The reasoning-gym task's own `score_answer(answer, entry)` on the extracted answer.

    Scores are the task's own (some tasks give partial credit). `metadata[i]` is the `metadata`
    dict of the reasoning-gym entry the prompt came from (it names the task in `source_dataset`);
    the entry's answer is `references[i]`. Scorers run in worker processes under a timeout
    (then: 0.0).
    """

    def __init__(
        self, answer_format: AnswerFormat = "boxed", num_workers: int = 2, timeout_s: float = 10.0
    ):
        self.answer_format = answer_format
        self.pool = TimeoutPool(num_workers, timeout_s, preload=["reasoning_gym"])

    def __call__(self, responses, references, metadata=None) -> list[float]:
        _check_lengths(responses, references)
        if metadata is None or len(metadata) != len(responses):
            raise UserError(
                "reward reasoning_gym: every response needs the metadata of its reasoning-gym entry "
                "(this reward needs problems from a reasoning_gym dataset)"
            )
        items = []
        for i, (response, reference, meta) in enumerate(zip(responses, references, metadata)):
            if "source_dataset" not in meta:
                raise UserError(
                    f"reward reasoning_gym: metadata of response {i} has no 'source_dataset' "
                    "(this reward needs problems from a reasoning_gym dataset)"
                )
            items.append(
                (
                    extract_answer(response, self.answer_format),
                    {"answer": reference, "metadata": dict(meta)},
                )
            )
        return self.pool.map(_reasoning_gym_score, items, default=0.0)


def _check_lengths(responses: Sequence[str], references: Sequence[str]) -> None:
    if len(responses) != len(references):
        raise ValueError(f"{len(responses)} responses but {len(references)} references")


# name -> factory(answer_format, num_workers, timeout_s)
REWARDS: dict[str, Callable[[AnswerFormat, int, float], RewardFn]] = {
    "math_verify": MathVerifyReward,
    "math_reference": lambda answer_format, num_workers, timeout_s: MathReferenceReward(
        answer_format
    ),
    "exact_match": lambda answer_format, num_workers, timeout_s: ExactMatchReward(answer_format),
    "reasoning_gym": ReasoningGymReward,
}


def get_reward(
    name: str = "math_verify",
    *,
    answer_format: AnswerFormat = "boxed",
    num_workers: int = 2,
    timeout_s: float = 10.0,
) -> RewardFn:
    """A new reward function by name, reading answers in `answer_format`; `num_workers` processes
    grade in parallel, each item within `timeout_s`."""
    if name not in REWARDS:
        raise UserError(f"unknown reward {name!r}; expected one of {', '.join(REWARDS)}")
    return REWARDS[name](answer_format, num_workers, timeout_s)
