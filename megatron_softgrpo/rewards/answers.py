"""Which part of a response is its final answer (`env.answer_format`), in one place for every reward.

- `boxed` (default, docs/algorithm.md section 6): the content of the right-most `\\boxed{}` (`boxed.last_boxed`).
- `last_number`: the last number written in the response, as lm-evaluation-harness's
  "flexible-extract" reads GSM8K answers: an optional minus sign, digits with optional
  thousands separators ("1,000" -> "1000") and an optional decimal part. A period not followed by
  a digit ends a sentence, not a decimal ("is 12." -> "12"); a minus sign must touch the digits,
  and a hyphen right after an operand is a subtraction ("10-3" and "10 - 3" -> "3", "= -3" -> "-3").
"""

from __future__ import annotations

import re
from typing import Literal

from megatron_softgrpo.rewards.boxed import last_boxed

AnswerFormat = Literal["boxed", "last_number"]
ANSWER_FORMATS: tuple[str, ...] = AnswerFormat.__args__

# A hyphen right after an operand (a digit, letter or closing bracket) is a subtraction, not a sign.
_NUMBER = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in text, without thousands separators; None when there is none."""
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def extract_answer(text: str, answer_format: AnswerFormat = "boxed") -> str | None:
    """The final answer of a response in the given format; None when it gives none."""
    if answer_format == "boxed":
        return last_boxed(text)
    if answer_format == "last_number":
        return last_number(text)
    raise ValueError(
        f"unknown answer format {answer_format!r}; expected one of {', '.join(ANSWER_FORMATS)}"
    )
