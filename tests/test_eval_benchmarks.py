"""Benchmark loaders (the built-in evaluation files and users' files), their graders, and data-parallel sharding."""

import json

import pytest

from megatron_softgrpo.errors import UserError
from megatron_softgrpo.eval.benchmarks import (
    BENCHMARKS,
    Grade,
    get_benchmark,
    grade_responses,
    load_problems,
    merge_shards,
    shard,
)
from megatron_softgrpo.eval.code_grading import HumanEvalTests, MbppTests, last_python_block
from megatron_softgrpo.rewards.math import MathGrader

COUNTS = {
    "aime2024": 30,
    "aime2025": 30,
    "amc23": 40,
    "math500": 500,
    "gsm8k": 1319,
    "humaneval": 164,
    "mbpp": 257,
}


@pytest.mark.parametrize("name, count", COUNTS.items())
def test_each_loader_reads_its_file(builtin_data, name, count):
    benchmark = get_benchmark(name)
    problems = load_problems(name, builtin_data / "eval" / benchmark.filename)
    assert len(problems) == count
    assert len({p.id for p in problems}) == count
    assert all(p.prompt.strip() for p in problems)
    expected_reference = {
        "math": str,
        "code": HumanEvalTests if name == "humaneval" else MbppTests,
    }[benchmark.kind]
    assert all(isinstance(p.reference, expected_reference) for p in problems)
    if benchmark.prompt_template is not None:
        assert (
            benchmark.prompt_template.format(problem=problems[0].prompt).count(problems[0].prompt)
            == 1
        )


def test_loaded_fields_match_the_file(builtin_data):
    raw = json.loads((builtin_data / "eval" / "mbpp.json").read_text())[0]
    problem = load_problems("mbpp", builtin_data / "eval" / "mbpp.json")[0]
    assert problem.id == f"mbpp/{raw['final_answer']['task_id']}"
    assert problem.prompt.startswith(raw["prompt"][0]["value"])
    assert raw["final_answer"]["test_list"][0] in problem.prompt  # the tests name the function
    assert problem.reference.test_list == tuple(raw["final_answer"]["test_list"])
    gsm = load_problems("gsm8k", builtin_data / "eval" / "gsm8k_test.json")[3]
    raw = json.loads((builtin_data / "eval" / "gsm8k_test.json").read_text())[3]
    assert (gsm.prompt, gsm.reference) == (raw["prompt"][0]["value"], raw["final_answer"])


def test_a_users_own_jsonl_file_in_plain_keys(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"problem": "1+1?", "answer": 2}, {"question": "2+2?", "answer": "4", "id": "q2"}]
    path.write_text(
        json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n"
    )  # blank lines are skipped
    problems = load_problems("gsm8k", path)
    assert [(p.id, p.prompt, p.reference) for p in problems] == [
        ("gsm8k/0", "1+1?", "2"),
        ("q2", "2+2?", "4"),
    ]


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "math500",
            '[{"prompt": "x", "final_answer": "1"}, {"prompt": "y"}]',
            r"bad\.json: row 1: no answer",
        ),
        (
            "math500",
            '[{"prompt": "x", "final_answer": "1"}, 7]',
            r"bad\.json: row 1: expected a JSON object",
        ),
        (
            "math500",
            '[{"prompt": [{"from": "assistant", "value": "x"}], "final_answer": "1"}]',
            r"row 0: no problem text",
        ),
        (
            "math500",
            '[{"prompt": "x", "final_answer": ""}]',
            r"row 0: the answer must be a non-empty string",
        ),
        (
            "math500",
            '[{"prompt": "x", "final_answer": "1"},\n {"prompt": ',
            r"bad\.json: line 2: invalid JSON",
        ),
        ("math500", '{"prompt": "x"}', r"bad\.json: expected a JSON list"),
        ("math500", "[]", r"bad\.json: no problems"),
        (
            "math500",
            '[{"id": 7, "problem": "x", "answer": "1"}, {"id": "7", "problem": "y", "answer": "2"}]',
            r"row 1: problem id '7' repeats row 0",
        ),
        (
            "humaneval",
            '[{"prompt": "def f():", "final_answer": {"task_id": "H/0", "test": "", "entry_point": "f"}}]',
            r"row 0: 'final_answer.canonical_solution' must be a str",
        ),
        (
            "mbpp",
            '[{"prompt": "x", "final_answer": "assert f()"}]',
            r"row 0: 'final_answer' must be an object",
        ),
        (
            "mbpp",
            '[{"prompt": "x", "final_answer": {"task_id": 1, "code": "", "test_list": [1]}}]',
            r"row 0: 'final_answer.test_list' must be a list of strings",
        ),
    ],
)
def test_malformed_files_name_the_file_and_row(tmp_path, name, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_problems(name, path)


def test_bad_names_and_missing_files(tmp_path):
    with pytest.raises(UserError, match="unknown benchmark 'gpqa'.*aime2024"):
        get_benchmark("gpqa")
    with pytest.raises(UserError, match="nothere.json: cannot read"):
        load_problems("amc23", tmp_path / "nothere.json")
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"problem": "a", "answer": "1"}\nnot json\n')
    with pytest.raises(UserError, match=r"bad\.jsonl: line 2: invalid JSON"):
        load_problems("amc23", bad_line)


@pytest.mark.parametrize("count", [0, 1, 5, 7, 16])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_then_merge_restores_the_order(count, world_size):
    items = [f"p{i}" for i in range(count)]
    shards = [shard(items, rank, world_size) for rank in range(world_size)]
    assert sorted(sum(shards, [])) == sorted(items)  # disjoint and complete
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
    assert merge_shards(shards) == items
    # results computed per shard come back in problem order
    assert merge_shards([[x.upper() for x in s] for s in shards]) == [x.upper() for x in items]
    with pytest.raises(ValueError):
        shard(items, world_size, world_size)


# ---------------------------------------------------------------- graders


def test_math_grader(builtin_data):
    problems = load_problems("math500", builtin_data / "eval" / "math500.json")[:3]
    # problem 0: (3, pi/2)
    responses = [
        r"In polar form this is \boxed{\left(3, \frac{\pi}{2}\right)}.",
        r"\boxed{" + problems[1].reference + "} wait, no: \\boxed{-12345}",
        "I give up.",
    ]
    grader = MathGrader(num_workers=1, timeout_s=60.0)
    try:
        grades = grade_responses("math500", problems, responses, math_grader=grader)
    finally:
        grader.close()
    assert grades == [
        Grade(True, r"\left(3, \frac{\pi}{2}\right)"),
        Grade(False, "-12345"),
        Grade(False, None),
    ]
    with pytest.raises(ValueError, match="needs a math_grader"):
        grade_responses("math500", problems, responses)


def test_math_grader_reads_the_recipes_answer_format(builtin_data):
    """With `env.answer_format: last_number` the last number is the answer, boxed or not."""
    problems = load_problems("gsm8k", builtin_data / "eval" / "gsm8k_test.json")[:2]
    reference = problems[0].reference
    responses = [
        f"So the total is {int(reference):,} dollars.",
        rf"\boxed{{{problems[1].reference}}} or maybe 1",
    ]
    grader = MathGrader(num_workers=1, timeout_s=60.0)
    try:
        last = grade_responses(
            "gsm8k", problems, responses, math_grader=grader, answer_format="last_number"
        )
        boxed = grade_responses(
            "gsm8k", problems, responses, math_grader=grader, answer_format="boxed"
        )
    finally:
        grader.close()
    assert last == [Grade(True, reference), Grade(False, "1")]
    assert boxed == [Grade(False, None), Grade(True, problems[1].reference)]


def test_last_python_block():
    text = (
        "First:\n```python\nx = 1\n```\nthen bash:\n```bash\nls\n```\nfinally\n```py\ny = 2\n```\n"
    )
    assert last_python_block(text) == "y = 2\n"
    assert last_python_block("```\nz = 3\n```") == "z = 3\n"  # untagged blocks count
    assert last_python_block("```python\nx = 1\n```\n```python\ntruncated") == "x = 1\n"
    assert last_python_block("```bash\nls\n```") is None
    assert last_python_block("no code") is None


def test_code_graders(builtin_data):
    humaneval = load_problems("humaneval", builtin_data / "eval" / "humaneval.json")[:2]
    mbpp = load_problems("mbpp", builtin_data / "eval" / "mbpp.json")[:2]
    he0, he1 = humaneval
    full_definition = (
        "Here it is:\n```python\nfrom typing import List\n\n"
        f"def {he0.reference.entry_point}(numbers: List[float], threshold: float) -> bool:\n"
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```"
    )
    body_only = f"```python\n{he1.reference.canonical_solution}```"
    wrong = (
        f"```python\ndef {he0.reference.entry_point}(numbers, threshold):\n    return False\n```"
    )
    grades = grade_responses(
        "humaneval", [he0, he1, he0, he1], [full_definition, body_only, wrong, "no code"]
    )
    assert [g.correct for g in grades] == [True, True, False, False]
    assert grades[3].answer is None and "def " in grades[0].answer

    mbpp_right = f"```python\n{mbpp[0].reference.reference_code}\n```"
    mbpp_wrong = "```python\ndef remove_Occ(s, ch):\n    return s\n```"
    grades = grade_responses(
        "mbpp", [mbpp[0], mbpp[0], mbpp[1]], [mbpp_right, mbpp_wrong, mbpp_right]
    )
    assert [g.correct for g in grades] == [True, False, False]


def test_every_benchmark_has_a_file_and_a_kind():
    # `validation` has no file: its problems are the recipe's data.validation (tests/test_study.py)
    assert set(BENCHMARKS) == set(COUNTS) | {"validation"}
    assert [n for n, b in BENCHMARKS.items() if b.filename is None] == ["validation"]
    assert {b.kind for b in BENCHMARKS.values()} == {"math", "code"}
