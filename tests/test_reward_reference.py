"""The reference's reward (rewards/hendrycks.py, env.reward=math_reference): Hendrycks-MATH string
equality with verl's quirks, against math-verify (the evaluation's grader) and on MATH-500 answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_softgrpo.cli import main
from megatron_softgrpo.errors import UserError
from megatron_softgrpo.rewards import get_reward, last_boxed
from megatron_softgrpo.rewards.hendrycks import (
    compute_score,
    is_equiv,
    last_boxed_only_string,
    remove_boxed,
    strip_string,
)
from megatron_softgrpo.rewards.math import is_correct

ROOT = Path(__file__).resolve().parents[1]

# (response, gold): math-verify accepts each (the same number), the reference's string match does not
LENIENT = [
    (r"so \boxed{0.75}", r"\frac{3}{4}"),
    (r"so \boxed{3.0}", "3"),
    (r"so \boxed{2\sqrt{2}}", r"\sqrt{8}"),
]


@pytest.mark.parametrize("response, gold", LENIENT)
def test_math_verify_is_more_lenient_than_the_reference(response, gold):
    assert compute_score(response, gold) == 0.0
    assert is_correct(last_boxed(response), gold)


def test_strip_string_normalises_spelling_only():
    # each pair is equal after normalisation, as in the MATH data
    for a, b in [
        (r"\dfrac{1}{2}", r"\frac12"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
        ("0.5", r"\frac{1}{2}"),
        ("3/4", r"\frac{3}{4}"),
        (r"90^\circ", "90"),
        (r"\$18", "18"),
        (r"18 \text{ dollars}", "18"),
        ("x = 5", "5"),
        (r"\sqrt3", r"\sqrt{3}"),
        (".5", "0.5"),
        (r"50\%", "50"),
    ]:
        assert strip_string(a) == strip_string(b), (a, b)
        assert is_equiv(a, b)
    for a, b in [("50%", "50"), ("0.25", r"\frac{1}{4}"), ("x+1=5", "5"), ("1,000", "1000")]:
        assert not is_equiv(a, b), (a, b)  # no number sense, "%" stays, long left sides stay
    assert strip_string(r"\frac1{72}") == r"\frac{1}{72}"
    assert strip_string("a/b") == "a/b" and strip_string("3 / 4") == r"\frac{3}{4}"


def test_normalisation_errors_fall_back_to_raw_equality():
    # a trailing \frac or \sqrt, or two "\text{ " units, make strip_string raise
    for broken in [r"1+\frac", r"2\sqrt", r"1 \text{ m} \text{ s}"]:
        with pytest.raises((IndexError, ValueError)):
            strip_string(broken)
        assert is_equiv(broken, broken)
        assert not is_equiv(broken, broken + " ")  # raw strings, not normalised ones
    assert is_equiv(None, None) and not is_equiv("1", None)


def test_boxed_with_a_space_takes_priority_over_every_braced_box():
    text = r"first \boxed 5$ and later \boxed{7}"
    assert last_boxed_only_string(text) == r"\boxed 5"
    assert compute_score(text, "5") == 1.0 and compute_score(text, "7") == 0.0
    # it runs to the next $ or the end: a trailing sentence is part of the answer
    assert remove_boxed(last_boxed_only_string(r"\boxed 5. Done")) == "5. Done"
    assert compute_score(r"so \boxed 5. Done", "5") == 0.0
    assert compute_score(r"so \boxed 5", "5") == 1.0
    # the last of several
    assert compute_score(r"\boxed 3 then \boxed 4", "4") == 1.0


def test_fbox_is_only_a_fallback_and_scores_zero():
    # found only when there is no \boxed at all ...
    assert last_boxed_only_string(r"\boxed{3} then \fbox{5}") == r"\boxed{3}"
    assert compute_score(r"\boxed{3} then \fbox{5}", "3") == 1.0
    assert compute_score(r"\boxed{3} then \fbox{5}", "5") == 0.0
    assert last_boxed_only_string(r"so \fbox{5}") == r"\fbox{5}"
    # ... and then remove_boxed refuses it: the reference scores it 0
    with pytest.raises(ValueError):
        remove_boxed(r"\fbox{5}")
    assert compute_score(r"so \fbox{5}", "5") == 0.0


def test_last_box_extraction():
    assert last_boxed_only_string("no box") is None
    assert last_boxed_only_string(r"\boxed{\frac{1}{2}} x") == r"\boxed{\frac{1}{2}}"
    assert last_boxed_only_string(r"\boxed{1} and \boxed{2}") == r"\boxed{2}"
    assert last_boxed_only_string(r"truncated \boxed{\frac{1}{2}") is None
    # braces are counted without escapes: "\{" opens a group too
    assert last_boxed_only_string(r"\boxed{\{1,2\}}") == r"\boxed{\{1,2\}}"
    assert compute_score(r"\boxed{\{1,2\}}", r"\{1,2\}") == 1.0
    assert compute_score(r"\boxed{4} no wait, \boxed{18}", "18") == 1.0
    assert compute_score(r"\boxed{18} no wait, \boxed{4}", "18") == 0.0
    assert compute_score("The answer is 18.", "18") == 0.0


def _math500_answers(count: int) -> list[str]:
    rows = json.loads((ROOT / "megatron_softgrpo/data/builtin/eval/math500.json").read_text())
    return [row["final_answer"] for row in rows[:count]]


def test_math500_gold_answers_score_one_and_perturbed_ones_zero():
    answers = _math500_answers(50)
    assert len(set(answers)) > 30
    assert all(compute_score(rf"Thus \boxed{{{a}}}.", a) == 1.0 for a in answers)
    # a changed last character (a digit moved by one, anything else gets an extra "1")
    perturbed = [
        a[:-1] + str((int(a[-1]) + 1) % 10) if a[-1].isdigit() else a + "1" for a in answers
    ]
    assert all(compute_score(rf"\boxed{{{p}}}", a) == 0.0 for p, a in zip(perturbed, answers))
    # another problem's answer is wrong unless the two are the same string
    shifted = answers[1:] + answers[:1]
    assert sum(compute_score(rf"\boxed{{{s}}}", a) for s, a in zip(shifted, answers)) <= 5


def test_registry_reward_math_reference():
    reward = get_reward("math_reference")
    responses = [r"\boxed{\frac{3}{4}}", r"\boxed{0.75}", r"\boxed 3/4", "3/4"]
    assert reward(responses, [r"\frac34"] * 4) == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(UserError, match="env.answer_format=last_number.*math_reference"):
        get_reward("math_reference", answer_format="last_number")


def test_check_refuses_math_reference_without_boxed_answers(capsys):
    recipe = ROOT / "recipes" / "softgrpo-smollm2-135m-cpu.yaml"  # answer_format: last_number
    code = main(["check", str(recipe), "env.reward=math_reference"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert f"{recipe}: env.answer_format=last_number" in err and "env.reward=math_reference" in err
    assert main(["check", str(recipe), "env.reward=math_reference", "env.answer_format=boxed"]) == 0
