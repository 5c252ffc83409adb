"""Problem datasets (files, reasoning-gym), prompt-length filtering, the resumable prompt sampler."""

import json
from typing import get_args

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_softgrpo.config.schema import BuiltinDataset, DataCfg, DatasetCfg
from megatron_softgrpo.data.datasets import (
    Problem,
    filter_by_prompt_length,
    load_split,
    read_problems,
)
from megatron_softgrpo.data.sampler import PromptSampler
from megatron_softgrpo.errors import UserError

ROWS = [
    {"problem": "What is 1+1?", "answer": "2", "level": 1},
    {"problem": "What is 6*7?", "answer": 42, "level": 2},  # a number answer is read as its text
    {
        "problem": "Write f.",
        "answer": {"test": "assert f() == 1"},
        "level": 3,
    },  # a structured answer is kept
]


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def read(path, **cfg):
    return read_problems(DatasetCfg(path=str(path), **cfg), key="data.train")


def one_line_error(path, skip=False, **cfg):
    with pytest.raises(UserError) as info:
        read_problems(DatasetCfg(path=str(path), **cfg), key="data.train", skip_malformed_rows=skip)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "writer,name", [(write_json, "p.json"), (write_jsonl, "p.jsonl"), (write_jsonl, "lines.json")]
)
def test_json_and_jsonl_read_the_same_problems(tmp_path, writer, name):
    result = read(writer(tmp_path / name, ROWS))
    assert [p.problem for p in result.problems] == [r["problem"] for r in ROWS]
    assert [p.answer for p in result.problems] == ["2", "42", {"test": "assert f() == 1"}]
    assert [p.metadata for p in result.problems] == [{"level": 1}, {"level": 2}, {"level": 3}]
    assert len({p.id for p in result.problems}) == 3 and result.skipped_malformed == 0


def test_parquet(tmp_path):
    rows = [
        {"problem": r["problem"], "answer": str(r["answer"]), "level": r["level"]} for r in ROWS[:2]
    ]
    result = read(write_parquet(tmp_path / "p.parquet", rows))
    assert result.problems == [
        Problem("p.parquet:0", "What is 1+1?", "2", {"level": 1}),
        Problem("p.parquet:1", "What is 6*7?", "42", {"level": 2}),
    ]


def test_nested_fields_by_dotted_path(tmp_path):
    rows = [
        {
            "messages": [{"role": "user", "content": "Q1"}],
            "reward_model": {"ground_truth": "7"},
            "src": "x",
        }
    ]
    path = write_parquet(tmp_path / "verl.parquet", rows)
    result = read(path, problem_key="messages.0.content", answer_key="reward_model.ground_truth")
    assert result.problems == [Problem("verl.parquet:0", "Q1", "7", {"src": "x"})]


def test_eval_format_is_detected(tmp_path):
    rows = [{"prompt": [{"from": "user", "value": "Find x."}], "final_answer": "3"}]
    assert read(write_json(tmp_path / "e.json", rows)).problems == [
        Problem("e.json:0", "Find x.", "3", {})
    ]


# ---------------------------------------------------------------- the real files shipped in data/builtin


@pytest.mark.parametrize(
    "name,count",
    [
        ("aime2024", 30),
        ("aime2025", 30),
        ("amc23", 40),
        ("math500", 500),
        ("gsm8k_test", 1319),
        ("humaneval", 164),
        ("mbpp", 257),
    ],
)
def test_builtin_eval_files(builtin_data, name, count):
    result = read(builtin_data / "eval" / f"{name}.json")
    assert len(result.problems) == count
    raw = json.loads((builtin_data / "eval" / f"{name}.json").read_text())
    assert result.problems[-1].problem == raw[-1]["prompt"][0]["value"]
    assert result.problems[-1].answer == raw[-1]["final_answer"]


def test_builtin_gsm8k_first_problem(builtin_data):
    first = read(builtin_data / "eval" / "gsm8k_test.json").problems[0]
    assert first.problem.startswith("Janet\u2019s ducks lay 16 eggs") and first.answer == "18"


def test_builtin_names_are_the_shipped_math_files(builtin_data):
    shipped = {p.stem for p in builtin_data.glob("*/*.json")}
    assert set(get_args(BuiltinDataset)) == shipped - {
        "humaneval",
        "mbpp",
    }  # code rows are not problem/answer pairs
    assert (builtin_data / "README.md").is_file()


def test_a_recipe_reads_a_builtin_file_without_a_path(builtin_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no relative path involved
    aime = read_problems(DatasetCfg(builtin="aime_1983_2023"), key="data.train")
    assert aime.problems == read(builtin_data / "train" / "aime_1983_2023.json").problems
    gsm = read_problems(
        DatasetCfg(builtin="gsm8k_test"), key="data.validation"
    )  # an evaluation file's layout
    assert len(gsm.problems) == 1319 and gsm.problems[0].answer == "18"


def test_builtin_train_files(builtin_data):
    aime = read(builtin_data / "train" / "aime_1983_2023.json")
    assert len(aime.problems) == 975 and {"solution", "year"} <= set(aime.problems[0].metadata)
    # math_train has two rows whose answer is null: an error naming the first, or two counted skips
    message = one_line_error(builtin_data / "train" / "math_train.json")
    assert "math_train.json row 886: field 'answer'" in message and "got null" in message
    math = read_problems(
        DatasetCfg(path=str(builtin_data / "train" / "math_train.json")),
        key="data.train",
        skip_malformed_rows=True,
    )
    assert (len(math.problems), math.skipped_malformed) == (7472, 2)
    assert math.first_skip.startswith("row 886:")
    assert "math_train.json:886" not in {p.id for p in math.problems} and "math_train.json:887" in {
        p.id for p in math.problems
    }


# ---------------------------------------------------------------- reasoning-gym


def gym(task="basic_arithmetic", size=20, seed=0, **task_config):
    return read_problems(
        DatasetCfg(kind="reasoning_gym", task=task, size=size, seed=seed, task_config=task_config),
        key="data.train",
    )


def test_reasoning_gym_is_deterministic_by_seed():
    first, again, other = gym(seed=3), gym(seed=3), gym(seed=4)
    assert first.problems == again.problems and len(first.problems) == 20
    # seeds give disjoint streams (reasoning-gym itself would shift seed 3 onto seed 4 by one problem)
    assert not {p.problem for p in first.problems} & {p.problem for p in other.problems}


def test_reasoning_gym_keeps_what_its_scorer_needs():
    import reasoning_gym

    problems = gym(task="gsm_symbolic", size=4, seed=1).problems
    for p in problems:
        assert p.metadata["source_dataset"] == "gsm_symbolic"
        score = reasoning_gym.get_score_answer_fn(p.metadata["source_dataset"])
        entry = {"question": p.problem, "answer": p.answer, "metadata": p.metadata}
        assert score(p.answer, entry) == 1.0
        assert score("definitely wrong", entry) < 1.0


def test_reasoning_gym_config_is_applied_and_errors_name_the_key():
    small = gym(size=10, min_terms=2, max_terms=2, min_digits=1, max_digits=1)
    assert all(
        p.metadata["num_terms"] == 2 and p.metadata["num_digits"] == 1 for p in small.problems
    )
    with pytest.raises(
        UserError, match=r"data\.train\.task=no_such_task: not a reasoning-gym task"
    ):
        gym(task="no_such_task")
    with pytest.raises(
        UserError,
        match=r"data\.train\.task_config=.*rejected by reasoning-gym task basic_arithmetic",
    ):
        gym(no_such_option=1)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "row,why",
    [
        (["a list"], "row 1: expected an object, got list"),
        ({"question": "q", "answer": "1"}, "row 1: no field 'problem'"),
        ({"problem": "q"}, "row 1: no field 'answer'"),
        (
            {"problem": "", "answer": "1"},
            "row 1: field 'problem' must be a non-empty string, got string",
        ),
        (
            {"problem": 5, "answer": "1"},
            "row 1: field 'problem' must be a non-empty string, got int",
        ),
        (
            {"problem": "q", "answer": None},
            "row 1: field 'answer' must be a string, a number or an object, got null",
        ),
        (
            {"problem": "q", "answer": [1, 2]},
            "row 1: field 'answer' must be a string, a number or an object, got list",
        ),
        (
            {"problem": "q", "answer": True},
            "row 1: field 'answer' must be a string, a number or an object, got boolean",
        ),
    ],
)
def test_malformed_row_is_one_line_naming_file_and_row_or_a_counted_skip(tmp_path, row, why):
    path = write_json(tmp_path / "bad.json", [ROWS[0], row, ROWS[0]])
    assert one_line_error(path) == f"{path} {why} (data.skip_malformed_rows=true skips such rows)"
    skipped = read_problems(DatasetCfg(path=str(path)), key="data.train", skip_malformed_rows=True)
    assert (len(skipped.problems), skipped.skipped_malformed, skipped.first_skip) == (2, 1, why)


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps({"problem": "q"}) + "\n")
    assert one_line_error(path).startswith(f"{path} line 3: no field 'answer'")
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    assert one_line_error(path).startswith(f"{path} line 2: invalid JSON")


@pytest.mark.parametrize(
    "name,content,expected",
    [
        (
            "broken.json",
            '[{"problem": "q", "answer": "1"},\n {"problem": ',
            "invalid JSON at line 2",
        ),
        ("broken.parquet", "not parquet at all", "not a readable parquet file"),
        (
            "data.csv",
            "problem,answer\n",
            "unsupported file type '.csv'; expected .json, .jsonl or .parquet",
        ),
        ("empty.json", "[]", "no problems"),
        ("empty.jsonl", "\n", "no problems"),
    ],
)
def test_invalid_or_empty_files(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    message = one_line_error(path)
    assert message.startswith(str(path)) and expected in message


def test_missing_file_unknown_layout_and_all_rows_skipped(tmp_path):
    assert (
        one_line_error(tmp_path / "nope.json")
        == f"data.train.path={tmp_path / 'nope.json'}: no such file"
    )
    odd = write_json(tmp_path / "odd.json", [{"q": "x", "a": "1"}])
    message = one_line_error(odd)
    assert (
        message.startswith(f"{odd}: none of the known fields (problem, prompt.0.value)")
        and "set data.train.problem_key" in message
    )
    all_bad = write_json(tmp_path / "all_bad.json", [1, 2, 3])
    assert (
        one_line_error(all_bad, skip=True)
        == f"{all_bad}: no problems (3 malformed rows skipped, first: row 0: expected an object, got int)"
    )


# ---------------------------------------------------------------- prompt-length filtering


@pytest.fixture(scope="module")
def tokenizer(smollm2_hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_hf_dir))


TEMPLATE = "{problem} Answer within \\boxed{{}}."


def rendered_length(tokenizer, problem):
    """Independent count: the chat template tokenised by transformers itself."""
    messages = [{"role": "user", "content": TEMPLATE.format(problem=problem)}]
    return len(
        tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)[
            "input_ids"
        ]
    )


def test_length_filter_keeps_prompts_up_to_the_limit(tokenizer, tmp_path):
    texts = [" ".join(["seven"] * n) for n in (1, 5, 10, 20, 40)]
    lengths = [rendered_length(tokenizer, x) for x in texts]
    assert lengths == sorted(lengths) and len(set(lengths)) == 5
    problems = [Problem(str(i), x, "1", {}) for i, x in enumerate(texts)]
    kept = filter_by_prompt_length(
        problems, tokenizer, template=TEMPLATE, system_prompt=None, max_tokens=lengths[2]
    )
    assert [p.id for p in kept] == ["0", "1", "2"]  # a prompt of exactly the limit stays

    data = DataCfg(
        train=DatasetCfg(
            path=str(
                write_json(tmp_path / "p.json", [{"problem": x, "answer": "1"} for x in texts])
            )
        ),
        max_input_seq_length=lengths[3],
        prompt_template=TEMPLATE,
    )
    split = load_split(data, "train", tokenizer)
    assert len(split.problems) == 4 and split.dropped_too_long == 1
    assert (
        split.summary()
        == f"data.train: 4 problems from {tmp_path / 'p.json'}; dropped 1 prompts longer than {lengths[3]} tokens"
    )

    with pytest.raises(
        UserError, match=r"data\.max_input_seq_length=5: all 5 prompts of .*p\.json are longer"
    ):
        load_split(data.model_copy(update={"max_input_seq_length": 5}), "train", tokenizer)
    with pytest.raises(
        UserError, match=r"data\.prompt_template=.*cannot be filled \(KeyError: 'answer'\)"
    ):
        load_split(
            data.model_copy(update={"prompt_template": "{problem} {answer}"}), "train", tokenizer
        )
    with pytest.raises(UserError, match=r"data\.validation: not set"):
        load_split(data, "validation", tokenizer)


# ---------------------------------------------------------------- sampler


def epochs_of(sampler, n_batches):
    out = []
    for _ in range(n_batches):
        epoch = sampler.epoch
        out.append((epoch, sampler.next_batch()))
    return out


def test_sampler_is_deterministic_by_seed_and_reshuffles_each_epoch():
    items = list(range(10))
    a, b, c = (PromptSampler(items, 3, seed=s) for s in (7, 7, 8))
    run_a, run_b, run_c = epochs_of(a, 9), epochs_of(b, 9), epochs_of(c, 9)
    assert run_a == run_b and run_a != run_c
    assert a.batches_per_epoch == 3 and [e for e, _ in run_a] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for epoch in range(3):
        batches = [batch for e, batch in run_a if e == epoch]
        flat = [i for batch in batches for i in batch]
        assert (
            len(set(flat)) == 9 and flat == a.order(epoch)[:9].tolist()
        )  # disjoint, in the epoch's order
    assert a.order(0).tolist() != a.order(1).tolist() and sorted(a.order(1).tolist()) == items
    plain = PromptSampler(items, 5, seed=7, shuffle=False)
    assert [plain.next_batch() for _ in range(3)] == [
        [0, 1, 2, 3, 4],
        [5, 6, 7, 8, 9],
        [0, 1, 2, 3, 4],
    ]


def test_sampler_state_restores_the_identical_sequence():
    items = [f"p{i}" for i in range(11)]
    reference = PromptSampler(items, 4, seed=42)
    expected = [reference.next_batch() for _ in range(9)]
    for stop in (0, 1, 2, 3, 5):  # including the epoch boundaries (2 batches of 4 per epoch)
        first = PromptSampler(items, 4, seed=42)
        before = [first.next_batch() for _ in range(stop)]
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        resumed = PromptSampler(items, 4, seed=42)
        resumed.load_state_dict(state)
        assert before + [resumed.next_batch() for _ in range(9 - stop)] == expected


def test_sampler_refuses_mismatched_state_and_too_small_datasets():
    state = PromptSampler(list(range(10)), 2, seed=1).state_dict()
    with pytest.raises(
        UserError, match="saved for 10 problems with seed 1 .* this run has 9 problems with seed 1"
    ):
        PromptSampler(list(range(9)), 2, seed=1).load_state_dict(state)
    with pytest.raises(UserError, match="seed 2"):
        PromptSampler(list(range(10)), 2, seed=2).load_state_dict(state)
    with pytest.raises(UserError, match="expected the keys"):
        PromptSampler(list(range(10)), 2, seed=1).load_state_dict({"epoch": 0})
    with pytest.raises(
        UserError, match=r"grpo\.num_prompts_per_step=8: the dataset has only 5 problems"
    ):
        PromptSampler(list(range(5)), 8, seed=1)
