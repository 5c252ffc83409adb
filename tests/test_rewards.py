"""Rewards: answer extraction (boxed, last number), math-verify grading on real answer pairs, the hard timeout, the registry."""

import json
import math
import os
import subprocess
import sys
import threading
import time
from typing import get_args

import pytest

from megatron_softgrpo.config.schema import EnvCfg
from megatron_softgrpo.errors import UserError
from megatron_softgrpo.rewards import get_reward, last_boxed
from megatron_softgrpo.rewards.answers import ANSWER_FORMATS, extract_answer, last_number
from megatron_softgrpo.rewards.math import MathGrader, answer_classes, exact_answer_classes
from megatron_softgrpo.rewards.pool import TimeoutPool

# A power tower that math-verify's comparison does not finish (measured: > 60 s); signal.alarm
# would interrupt it on the main thread only.
PATHOLOGICAL = r"The answer is \boxed{9^{9^{9^{9}}}}"


@pytest.fixture(scope="module")
def grader():
    """Generous timeout: the answer tables must not depend on how busy the machine is."""
    g = MathGrader(num_workers=2, timeout_s=60.0)
    yield g
    assert g.pool.timeouts == 0
    g.close()


@pytest.fixture(scope="module")
def impatient_grader():
    g = MathGrader(num_workers=2, timeout_s=2.0)
    yield g
    g.close()


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}} and more text", r"\frac{\sqrt{3}}{2}"),
        (r"first \boxed{1} then \boxed{2}", "2"),  # the right-most box wins
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not close the group
        (r"$\boxed 5$.", "5"),
        (r"answer: \boxed 7.", "7"),
        (r"\fbox{3}", "3"),
        (r"\boxed{1} but then \fbox{x+1}", "x+1"),
        (r"\boxed{ 12 }", "12"),
        (r"\boxed{a}\boxed{b", None),  # the right-most box is truncated: no answer
        (r"\boxed{}", None),
        (r"\boxedtext{3}", None),  # not the \boxed command
        ("no box at all: 42", None),
        ("", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        # phrasings like SmolLM2-135M-Instruct's answers to the embedded default's prompts
        ("7 + 5 = 12", "12"),
        ("The result of 3 - 8 is -5.", "-5"),
        ("9 - 4 = 5\n\nSo, the answer is 5.", "5"),
        ("To find the answer, subtract 6 from 2: 2 - 6 = -4", "-4"),
        (r"8 + 1 = \boxed{9}", "9"),
        ("The answer is 14.", "14"),
        # separators, decimals and signs
        ("about 1,000 apples", "1000"),
        ("1,234,567.25 in total", "1234567.25"),
        ("1,2", "2"),  # not a thousands group: two numbers
        ("12,3456", "3456"),
        ("3.14 and then 2.5.", "2.5"),  # a sentence's period is not a decimal point
        ("10-3", "3"),  # subtraction, not a negative number
        ("x-5", "5"),
        ("(2)-7", "7"),
        ("5 - -2", "-2"),
        ("x = -0.5", "-0.5"),
        ("(-4)", "-4"),
        ("-7", "-7"),
        ("no number here", None),
        ("", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected
    assert extract_answer(text, "last_number") == expected


def test_extract_answer_dispatches_on_the_format():
    text = r"\boxed{result} so 7 + 5 = 12"
    assert extract_answer(text, "boxed") == "result" == last_boxed(text)
    assert extract_answer(text) == "result"  # boxed is the default
    assert extract_answer(text, "last_number") == "12"
    with pytest.raises(ValueError, match="unknown answer format 'last_word'"):
        extract_answer(text, "last_word")
    # the recipe key offers exactly the formats the extractor knows
    assert get_args(EnvCfg.model_fields["answer_format"].annotation) == ANSWER_FORMATS


# (response, reference, correct): references as they appear in the built-in evaluation files
ANSWER_PAIRS = [
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"\boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{\dfrac12}", r"\frac{1}{2}", True),
    (r"\boxed{1.5}", r"\frac{3}{2}", True),
    (r"\boxed{0.3333}", r"\frac13", False),
    (r"\boxed{3.14}", r"\pi", False),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
    (r"\boxed{(x+1)^2}", "x^2+2x+1", True),
    (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"\boxed{[1, 2)}", "[1,2)", True),
    (r"\boxed{(1, 2]}", "[1,2)", False),
    (r"\boxed{\{2, 1\}}", r"\{1,2\}", True),
    (r"\boxed{1,000}", "1000", True),
    (r"\boxed{1{,}000}", "1000", True),
    (r"\boxed{18 \text{ dollars}}", "18", True),
    (r"\boxed{\$18}", "18", True),
    (r"\boxed{10\text{ cm}}", "10", True),
    (r"\boxed{x = 5}", "5", True),
    (r"\boxed{-4}", "-4", True),
    (r"\boxed{17}", "18", False),
    (r"\boxed{4} no wait, \boxed{18}", "18", True),  # several boxes: the last one counts
    (r"\boxed{18} no wait, \boxed{4}", "18", False),
    ("The answer is 18.", "18", False),  # no box: wrong even when the number is right
    ("", "18", False),
    (r"\boxed{}", "18", False),
]


def test_math_grading_table(grader):
    responses, references, expected = zip(*ANSWER_PAIRS)
    assert grader.grade(responses, references) == list(expected)


def test_reference_answers_of_every_math_benchmark_grade_as_correct(grader, builtin_data):
    references = []
    for name in ("aime2024", "aime2025", "amc23", "math500", "gsm8k_test"):
        references += [
            row["final_answer"]
            for row in json.loads((builtin_data / "eval" / f"{name}.json").read_text())
        ]
    assert all(grader.grade([rf"so \boxed{{{r}}}" for r in references], references))
    # and another problem's answer is wrong (the grader does not accept everything)
    sample = references[::10]
    shifted = sample[1:] + sample[:1]
    assert sum(grader.grade([rf"\boxed{{{r}}}" for r in shifted], sample)) <= 0.05 * len(sample)


@pytest.mark.timeout(120)
def test_pathological_answer_times_out_as_wrong_off_the_main_thread(impatient_grader):
    """The pool's own deadline (not signal.alarm, which fails off the main thread) stops the parser."""
    results = {}
    timeouts_before = impatient_grader.pool.timeouts

    def grade_in_thread():
        responses = [r"\boxed{0.5}", PATHOLOGICAL, r"\boxed{6}"]
        results["rewards"] = impatient_grader.grade(responses, [r"\frac12", "5", "6"])

    thread = threading.Thread(target=grade_in_thread)
    thread.start()
    thread.join()
    assert results["rewards"] == [True, False, True]
    assert impatient_grader.pool.timeouts == timeouts_before + 1
    # the killed worker was replaced: the pool keeps grading
    assert impatient_grader.grade([r"\boxed{\frac{2}{4}}"], ["0.5"]) == [True]


def test_answer_classes_group_equivalent_answers():
    answers = [r"\frac{1}{2}", "0.5", None, "3", "1/2", "3.0", "", "x"]
    assert answer_classes(answers) == [0, 0, None, 3, 0, 3, None, 7]
    assert exact_answer_classes(["a", "b", " a", None]) == [0, 1, 0, None]


@pytest.mark.timeout(120)
def test_grader_classes_fall_back_to_exact_text_on_timeout(impatient_grader):
    hanging = ["9^{9^{9^{9}}}", "5", "5.0", "5"]  # comparing "5" with the tower does not finish
    assert impatient_grader.classes([hanging, ["0.5", r"\frac12", "2"]]) == [
        [0, 1, 2, 1],
        [0, 0, 2],
    ]


# ---------------------------------------------------------------- the pool itself


@pytest.mark.timeout(120)
def test_pool_returns_results_in_order_with_defaults_for_failures_and_timeouts():
    with TimeoutPool(num_workers=2, timeout_s=2.0) as pool:
        assert pool.map(math.sqrt, [4.0, -1.0, 9.0, 16.0], default=-1.0) == [2.0, -1.0, 3.0, 4.0]
        assert pool.failures == 1
        first_pids = set(pool.worker_pids())
        assert pool.map(time.sleep, [0, 3600, 0], default="timeout") == [None, "timeout", None]
        assert pool.timeouts == 1
        killed = first_pids - set(pool.worker_pids())
        assert len(killed) == 1 and len(pool.worker_pids()) == 2
        assert not _process_exists(killed.pop())
        assert pool.map(os._exit, [3], default="died") == [
            "died"
        ]  # a worker that dies is replaced too
        assert pool.map(abs, [-2, 3], default=None) == [2, 3]
        # an interrupted map (here: an item that cannot be sent) must not leave a stale answer behind
        with pytest.raises(TypeError):
            pool.map(time.sleep, [0.5, threading.Lock()], default=None)
        assert pool.map(abs, [-1, -2], default=None) == [1, 2]
        pids = pool.worker_pids()
    assert not any(_process_exists(pid) for pid in pids)


def test_pool_reports_workers_that_cannot_start():
    pool = TimeoutPool(num_workers=1, preload=["no_such_module_for_the_pool_test"])
    with pytest.raises(RuntimeError, match="did not start"):
        pool.map(abs, [1], default=None)
    assert pool.worker_pids() == []


@pytest.mark.timeout(120)
def test_a_busy_worker_exits_when_its_caller_dies():
    caller = (
        "import os, sys, threading, time\n"
        "from megatron_softgrpo.rewards.pool import TimeoutPool\n"
        "pool = TimeoutPool(num_workers=1, timeout_s=3600.0)\n"
        "pool.map(abs, [1], default=None)\n"
        "print(pool.worker_pids()[0], flush=True)\n"
        "threading.Thread(target=pool.map, args=(time.sleep, [3600], None), daemon=True).start()\n"
        "time.sleep(1.0)\n"
        "os._exit(0)  # dies without closing the pool\n"
    )
    run = subprocess.run([sys.executable, "-c", caller], capture_output=True, text=True, check=True)
    worker = int(run.stdout.split()[0])
    for _ in range(100):  # the worker checks for its parent once a second
        if not _process_exists(worker):
            break
        time.sleep(0.1)
    assert not _process_exists(worker)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------- the registry


def test_registry_rewards():
    responses = [r"\boxed{0.5}", r"\boxed{1/2}", "1/2"]
    math_reward = get_reward("math_verify", num_workers=1)
    assert math_reward(responses, [r"\frac{1}{2}"] * 3) == [1.0, 1.0, 0.0]
    math_reward.grader.close()
    assert get_reward("exact_match")(responses, ["0.5"] * 3) == [1.0, 0.0, 0.0]
    with pytest.raises(UserError, match="unknown reward 'nope'.*math_verify"):
        get_reward("nope")


def test_every_reward_reads_the_configured_answer_format():
    import reasoning_gym

    entries = list(reasoning_gym.create_dataset("basic_arithmetic", size=2, seed=5))
    answers = [e["answer"] for e in entries]
    # response 0: correct as its last number, boxed placeholder; response 1: correct only when boxed
    responses = [rf"\boxed{{result}} It is {answers[0]}.", rf"\boxed{{{answers[1]}}} not 123456789"]
    metadata = [e["metadata"] for e in entries]
    expected = {"boxed": [0.0, 1.0], "last_number": [1.0, 0.0]}
    for answer_format, scores in expected.items():
        math_reward = get_reward("math_verify", answer_format=answer_format, num_workers=1)
        gym_reward = get_reward("reasoning_gym", answer_format=answer_format, num_workers=1)
        try:
            assert math_reward(responses, answers) == scores
            assert gym_reward(responses, answers, metadata) == scores
        finally:
            math_reward.grader.close()
            gym_reward.pool.close()
        assert get_reward("exact_match", answer_format=answer_format)(responses, answers) == scores


def test_reasoning_gym_reward_uses_the_task_scorer():
    import reasoning_gym

    entries = list(reasoning_gym.create_dataset("basic_arithmetic", size=3, seed=5))
    responses = [rf"\boxed{{{entries[0]['answer']}}}", r"\boxed{123456789}", "no box"]
    reward = get_reward("reasoning_gym", num_workers=1)
    with pytest.raises(UserError, match="response 0 has no 'source_dataset'"):
        reward(responses[:1], ["1"], [{}])
    scores = reward(responses, [e["answer"] for e in entries], [e["metadata"] for e in entries])
    reward.pool.close()
    scorer = reasoning_gym.get_score_answer_fn("basic_arithmetic")
    assert scores[0] == 1.0
    assert scores == [
        scorer(entries[0]["answer"], entries[0]),
        scorer("123456789", entries[1]),
        0.0,
    ]
    assert scores[1] < 1.0


def test_format_bonus_needs_a_boxed_answer_and_a_finished_response():
    import torch

    from megatron_softgrpo.rewards.shaping import with_format_bonus

    correct = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])
    answered = torch.tensor([True, True, False, True, True])
    truncated = torch.tensor([False, False, False, True, True])
    assert with_format_bonus(correct, answered, truncated, 0.5).tolist() == [
        1.5,
        0.5,
        0.0,
        1.0,
        0.0,
    ]
    assert torch.equal(with_format_bonus(correct, answered, truncated, 0.0), correct)
