"""`softgrpo eval` and `softgrpo plot`: grading records, the sample file and resuming, summaries, plots, end to end."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from math import comb
from pathlib import Path
from types import SimpleNamespace
from typing import get_args

import pytest
import torch
from builders import TRAIN_DATA, write_recipe
from distributed_helpers import run_ranks
from tiny_models import make_hf_model

from megatron_softgrpo import cli
from megatron_softgrpo.config.loader import load_recipe
from megatron_softgrpo.config.schema import BenchmarkName
from megatron_softgrpo.data import builtin
from megatron_softgrpo.distributed import ParallelLayout, init_distributed
from megatron_softgrpo.errors import UserError
from megatron_softgrpo.eval.benchmarks import BENCHMARKS, get_benchmark, load_problems
from megatron_softgrpo.eval.metrics import BenchmarkMetrics
from megatron_softgrpo.eval.plots import plot_kind
from megatron_softgrpo.eval.report import EvalSummary, average_metrics, read_summary, write_summary
from megatron_softgrpo.eval.runner import (
    Responses,
    batch_seed,
    checkpoint_model_name,
    grade_batch,
    plan_eval,
    progress,
    run_eval,
)
from megatron_softgrpo.eval.samples import SampleFile, SampleRecord, batches
from megatron_softgrpo.rewards.answers import ANSWER_FORMATS, extract_answer
from megatron_softgrpo.rewards.math import MathGrader, is_correct
from megatron_softgrpo.soft import noise_rng

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "softgrpo-smollm2-135m-cpu.yaml")
ANSWER_FORMAT = load_recipe(RECIPE).cfg.env.answer_format  # what the evaluation grades with
FIELDS = {
    "problem_id",
    "problem_index",
    "sample",
    "text",
    "answer",
    "correct",
    "answer_class",
    "length",
    "thinking_length",
    "finish_reason",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def flat(metrics: dict) -> dict:
    """{"pass_at_k": {"1": x}} -> {"pass_at_k.1": x}, for pytest.approx."""
    out = {}
    for key, value in metrics.items():
        out.update(
            {f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value}
        )
    return out


# ---------------------------------------------------------------- configuration


def test_schema_benchmark_names_are_the_registry():
    assert set(get_args(BenchmarkName)) == set(BENCHMARKS)


def test_eval_section_defaults_and_bad_values():
    ev = load_recipe(RECIPE).cfg.eval
    assert (ev.benchmarks, ev.n, ev.ks) == (
        ["aime2024", "aime2025", "amc23", "math500", "gsm8k"],
        32,
        [1, 2, 4, 8, 16, 32],
    )
    for overrides, message in [
        (["eval.benchmarks=[]"], "eval.benchmarks=[]: must list at least one entry"),
        (
            ["eval.benchmarks=[gsm8k,gsm8k]"],
            "eval.benchmarks=['gsm8k', 'gsm8k']: lists an entry twice",
        ),
        (["eval.benchmarks=[gsm9k]"], "eval.benchmarks.0: expected one of"),
        (["eval.ks=[8,16]", "eval.n=4"], "eval.ks=[8, 16]: needs a k <= eval.n (4)"),
        (["eval.files.gsm9k=x.json"], "eval.files.gsm9k"),
        (["eval.n=0"], "eval.n=0: expected greater than or equal to 1"),
        (["eval.bacth_size=2"], "eval.bacth_size: unknown key"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            load_recipe(RECIPE, overrides)


def test_the_default_data_dir_is_the_built_in_benchmark_files(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # found from anywhere: the files ship inside the package
    loaded = load_recipe(
        RECIPE, ["eval.benchmarks=[gsm8k,humaneval]", f"logger.log_dir={tmp_path}"]
    )
    assert loaded.cfg.eval.data_dir is None
    plans = plan_eval(loaded)
    assert [len(p.problems) for p in plans] == [1319, 164]
    assert plans[0].source == str((builtin.EVAL_DIR / "gsm8k_test.json").resolve())


def test_a_users_data_dir_and_file_win_over_the_built_in_ones(tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    rows = json.loads((builtin.EVAL_DIR / "gsm8k_test.json").read_text())[:3]
    (own / "gsm8k_test.json").write_text(json.dumps(rows))
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    log = f"logger.log_dir={tmp_path / 'log'}"
    by_dir = plan_eval(
        load_recipe(RECIPE, ["eval.benchmarks=[gsm8k]", f"eval.data_dir={own}", log])
    )
    assert (
        by_dir[0].source == str((own / "gsm8k_test.json").resolve())
        and len(by_dir[0].problems) == 3
    )
    by_file = plan_eval(
        load_recipe(
            RECIPE,
            ["eval.benchmarks=[gsm8k,amc23]", f"eval.files.gsm8k={tmp_path / 'mine.jsonl'}", log],
        )
    )
    assert [len(p.problems) for p in by_file] == [2, 40]  # amc23 still from the built-in files
    assert by_file[1].source == str((builtin.EVAL_DIR / "amc23.json").resolve())


def test_cli_names_a_missing_data_dir_before_loading_any_model(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["eval", RECIPE, "eval.benchmarks=[gsm8k]", "eval.data_dir=benchmarks"]) == 2
    err = capsys.readouterr().err
    assert (
        "command line: eval.data_dir=benchmarks: no such directory" in err and str(tmp_path) in err
    )
    assert len(err.strip().splitlines()) == 1


def test_batch_seeds():
    seeds = {batch_seed(s, b, i) for s in (0, 1) for b in ("gsm8k", "math500") for i in range(50)}
    assert len(seeds) == 200 and all(0 <= x < 2**63 for x in seeds)
    assert batch_seed(0, "gsm8k", 3) == batch_seed(0, "gsm8k", 3)


def test_checkpoint_argument_takes_a_checkpoint_or_a_checkpoint_dir(tmp_path):
    step = tmp_path / "ckpts" / "step_0000004"
    step.mkdir(parents=True)
    (step / "softgrpo_checkpoint.json").write_text("{}")
    (tmp_path / "ckpts" / "latest").write_text("step_0000004\n")
    assert checkpoint_model_name(str(step)) == str(step)
    assert checkpoint_model_name(str(tmp_path / "ckpts")) == str(step)
    with pytest.raises(UserError, match="checkpoint=.*nope: not a megatron-softgrpo checkpoint"):
        checkpoint_model_name(str(tmp_path / "nope"))


# ---------------------------------------------------------------- grading one batch


def test_grade_batch_records_answers_correctness_and_votes(builtin_data):
    problems = load_problems("gsm8k", builtin_data / "eval" / "gsm8k_test.json")[
        :2
    ]  # answers 18 and 3
    assert [p.reference for p in problems] == ["18", "3"]
    texts = [
        "so \\boxed{18}",
        "I think \\boxed{17}",
        "it is \\boxed{18.0}",
        "no box at all",
        "\\boxed{2} wait, \\boxed{3}",
        "\\boxed{2}",
        "\\boxed{\\frac{6}{2}}",
        "\\boxed{2}",
    ]
    responses = Responses(texts, list(range(10, 18)), [0] * 8, ["eos"] * 7 + ["length"])
    grader = MathGrader(num_workers=1, timeout_s=60.0)
    try:
        records = grade_batch(get_benchmark("gsm8k"), range(5, 7), problems, responses, 4, grader)
    finally:
        grader.close()
    assert [(r.problem_id, r.problem_index, r.sample) for r in records] == [
        (problems[p].id, 5 + p, s) for p in range(2) for s in range(4)
    ]
    assert [r.answer for r in records] == ["18", "17", "18.0", None, "3", "2", "\\frac{6}{2}", "2"]
    assert [r.correct for r in records] == [True, False, True, False, True, False, True, False]
    # classes are the first sample index of each equivalent answer, within the problem
    assert [r.answer_class for r in records] == [0, 1, 0, None, 0, 1, 0, 1]
    assert [r.length for r in records] == list(range(10, 18))
    assert [r.finish_reason for r in records][-2:] == ["eos", "length"]
    assert records[-1].graded().truncated and not records[0].graded().truncated


def test_grade_batch_runs_code_in_the_sandbox_without_votes(builtin_data):
    problem = load_problems("mbpp", builtin_data / "eval" / "mbpp.json")[0]
    good = f"Here it is:\n```python\n{problem.reference.reference_code}\n```"
    texts = [good, "```python\ndef nothing():\n    pass\n```", "no code"]
    records = grade_batch(
        get_benchmark("mbpp"),
        [0],
        [problem],
        Responses(texts, [5] * 3, [0] * 3, ["eos"] * 3),
        3,
        None,
    )
    assert [r.correct for r in records] == [True, False, False]
    assert [r.answer_class for r in records] == [None] * 3
    assert (
        records[0].answer.strip() == problem.reference.reference_code.strip()
        and records[2].answer is None
    )


# ---------------------------------------------------------------- the sample file


def _record(problem: int, sample: int) -> SampleRecord:
    return SampleRecord(
        f"p{problem}", problem, sample, f"text {problem}/{sample}", "1", sample == 0, 0, 7, 3, "eos"
    )


def test_sample_file_resume_keeps_only_finished_batches(tmp_path):
    settings = {"eval.n": 2, "decoding": "gumbel"}
    problem_batches = batches(5, 2)
    assert problem_batches == [range(0, 2), range(2, 4), range(4, 5)]
    store = SampleFile(tmp_path / "gsm8k")
    assert store.resume(settings, problem_batches, 2) == set()  # fresh: writes the settings
    assert json.loads(store.settings_path.read_text()) == settings
    store.append([_record(p, s) for p in (0, 1) for s in (0, 1)])  # batch 0
    store.append([_record(p, s) for p in (4,) for s in (0, 1)])  # batch 2
    store.append([_record(2, 0), _record(2, 1), _record(3, 0)])  # batch 1 without its last sample
    with store.path.open("a") as f:
        f.write(_record(3, 1).to_json()[:25])  # a torn write
    assert store.resume(settings, problem_batches, 2) == {0, 2}
    kept = read_jsonl(store.path)
    assert [(r["problem_index"], r["sample"]) for r in kept] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (4, 0),
        (4, 1),
    ]
    assert set(kept[0]) == FIELDS and store.path.read_text().endswith("\n")
    # more problems later: batch 2 grows to rows 4-5 and is decoded again
    assert SampleFile(tmp_path / "gsm8k").resume(settings, batches(6, 2), 2) == {0}
    assert len(store.records()) == 4


def test_sample_file_resume_with_fewer_problems_keeps_the_later_samples(tmp_path):
    store = SampleFile(tmp_path / "gsm8k")
    store.resume({"eval.n": 2}, batches(6, 2), 2)
    everything = [_record(p, s) for p in range(6) for s in (0, 1)]
    store.append(everything)
    assert store.resume({"eval.n": 2}, batches(2, 2), 2) == {0}
    assert store.records() == everything  # the file keeps all six problems
    assert store.records(2) == everything[:4]


def test_sample_file_refuses_samples_of_other_settings(tmp_path):
    store = SampleFile(tmp_path)
    store.resume({"eval.n": 2, "decoding": "gumbel"}, batches(1, 1), 2)
    store.append([_record(0, 0), _record(0, 1)])
    with pytest.raises(
        UserError,
        match=r'decoded with decoding="gumbel", now decoding="discrete"; use another logger.log_dir',
    ):
        store.resume({"eval.n": 2, "decoding": "discrete"}, batches(1, 1), 2)
    store.settings_path.unlink()
    with pytest.raises(UserError, match="settings.json: missing or unreadable"):
        store.check_settings({"eval.n": 2})
    store.path.write_text("{not json}\n" + _record(0, 0).to_json() + "\n")
    with pytest.raises(UserError, match=r"samples.jsonl: line 1: .*delete the file"):
        store.records()


# ---------------------------------------------------------------- summary and plots


def _metrics(mean: float, ks=(1, 2, 4), maj=True, problems=10) -> BenchmarkMetrics:
    values = {k: min(1.0, mean * k) for k in ks}
    return BenchmarkMetrics(
        4,
        problems,
        mean,
        values,
        {k: v / 2 for k, v in values.items()},
        dict(values) if maj else {},
        100.0 * (1 + mean),
        mean / 4,
    )


def test_average_is_the_unweighted_mean_and_maj_averages_the_voting_benchmarks():
    avg = average_metrics(
        [
            _metrics(0.1, problems=30),
            _metrics(0.3, problems=500),
            _metrics(0.2, maj=False, problems=164),
        ]
    )
    assert avg.problems == 694 and avg.n == 4
    assert avg.mean_at_n == pytest.approx(0.2)
    assert avg.pass_at_k == pytest.approx({1: 0.2, 2: 0.4, 4: (0.4 + 1.0 + 0.8) / 3})
    assert avg.maj_at_k == pytest.approx(
        {1: 0.2, 2: 0.4, 4: 0.7}
    )  # (0.4 + 1.0) / 2: the code benchmark has no votes
    assert avg.mean_length == pytest.approx(120.0)


def _write_eval(directory: Path, decoding: str, scale: float) -> EvalSummary:
    summary = EvalSummary(
        "model",
        decoding,
        4,
        48,
        0,
        {"gsm8k": _metrics(0.2 * scale), "math500": _metrics(0.1 * scale)},
    )
    write_summary(directory / "eval", summary)
    return summary


def test_summary_files_round_trip_and_table(tmp_path):
    summary = _write_eval(tmp_path, "gumbel", 1.0)
    assert read_summary(tmp_path) == summary == read_summary(tmp_path / "eval")
    data = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert data["average"]["pass_at_k"] == {
        "1": pytest.approx(0.15),
        "2": pytest.approx(0.3),
        "4": pytest.approx(0.6),
    }
    table = (tmp_path / "eval" / "summary.md").read_text().splitlines()
    assert "| metric | gsm8k | math500 | average |" in table
    assert "| mean@4 (Pass@1) | 20.00 | 10.00 | 15.00 |" in table
    assert "| pass@4 | 80.00 | 40.00 | 60.00 |" in table
    assert "| pass@4 (first k) | 40.00 | 20.00 | 30.00 |" in table
    with pytest.raises(UserError, match="no evaluation summary"):
        read_summary(tmp_path / "elsewhere")


def test_plot_command_draws_pass_at_k_and_training_curves(tmp_path, capsys):
    _write_eval(tmp_path / "soft", "gumbel", 1.0)
    _write_eval(tmp_path / "discrete", "discrete", 0.5)
    train = tmp_path / "train"
    train.mkdir()
    (train / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "reward/mean": s / 10}) + "\n" for s in (1, 2, 3))
    )
    assert plot_kind([tmp_path / "soft", tmp_path / "discrete"], "auto") == "passk"
    assert plot_kind([train], "auto") == "train"
    with pytest.raises(UserError, match="neither a training run"):
        plot_kind([train, tmp_path / "soft", tmp_path], "auto")

    out = tmp_path / "plots" / "passk.png"
    assert (
        cli.main(
            ["plot", str(tmp_path / "soft"), str(tmp_path / "discrete" / "eval"), "--out", str(out)]
        )
        == 0
    )
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    out_maj = tmp_path / "maj.png"
    assert (
        cli.main(
            [
                "plot",
                str(tmp_path / "soft"),
                "--metric",
                "maj_at_k",
                "--labels",
                "SofT",
                "--out",
                str(out_maj),
            ]
        )
        == 0
    )
    assert out_maj.read_bytes().startswith(PNG_SIGNATURE)
    curves = tmp_path / "train.png"
    assert cli.main(["plot", str(train), "--out", str(curves)]) == 0
    assert curves.read_bytes().startswith(PNG_SIGNATURE)
    assert cli.main(["plot", str(train), "--labels", "a", "b", "--out", str(curves)]) == 2
    assert "2 --labels for 1 directories" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["passk", "train"])
def test_plot_command_refuses_an_output_it_cannot_write(kind, tmp_path, capsys):
    run = tmp_path / "run"
    if kind == "passk":
        _write_eval(run, "gumbel", 1.0)
    else:
        run.mkdir()
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for out, message in [
        (tmp_path / "plot.txt", f"--out {tmp_path / 'plot.txt'}: expected a .png file name"),
        (blocker / "plot.png", f"--out {blocker / 'plot.png'}: cannot write it"),
    ]:
        assert cli.main(["plot", str(run), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


# ---------------------------------------------------------------- the runner, with a stand-in engine


class FakeEngine:
    """Stands in for RolloutEngine: every response is drawn from the sampling-noise RNG, as real sampling is."""

    RESPONSES = [
        "so \\boxed{18}",
        "\\boxed{18.0}",
        "\\boxed{3}",
        "\\boxed{\\frac{6}{2}}",
        "\\boxed{540}",
        "no answer",
    ]

    def __init__(self, interrupt_on_call: int | None = None):
        self.calls = 0
        self.interrupt_on_call = interrupt_on_call

    def generate(self, prompts, n):
        self.calls += 1
        if self.calls == self.interrupt_on_call:
            raise KeyboardInterrupt
        rows = len(prompts) * n
        with noise_rng():  # raises unless the runner seeded it
            picks = torch.randint(0, len(self.RESPONSES), (rows,)).tolist()
            lengths = torch.randint(1, 49, (rows,))
        return SimpleNamespace(
            texts=[self.RESPONSES[i] for i in picks],
            response_lengths=lengths,
            think_lengths=lengths // 2,
            finish_reasons=["length" if length == 48 else "eos" for length in lengths.tolist()],
        )


def _fake_eval(log_dir: Path, data_dir: Path, tokenizer, engine: FakeEngine, *extra: str):
    overrides = [
        "eval.benchmarks=[gsm8k,amc23]",
        "eval.num_problems=7",
        "eval.n=4",
        "eval.batch_size=2",
        "eval.max_new_tokens=48",
        f"eval.data_dir={data_dir}",
        f"logger.log_dir={log_dir}",
        *extra,
    ]
    loaded = load_recipe(RECIPE, overrides)
    parallel = init_distributed(ParallelLayout(1, 1))
    return run_eval(loaded.cfg, plan_eval(loaded), engine, tokenizer, parallel)


def test_runner_writes_samples_and_a_summary_that_recomputes(tmp_path, builtin_data, tokenizer):
    summary = _fake_eval(tmp_path, builtin_data / "eval", tokenizer, FakeEngine())
    eval_dir = tmp_path / "eval"
    assert read_summary(tmp_path) == summary
    data = json.loads((eval_dir / "summary.json").read_text())
    for name in ("gsm8k", "amc23"):
        samples = read_jsonl(eval_dir / name / "samples.jsonl")
        assert len(samples) == 28 and all(set(s) == FIELDS for s in samples)
        expected = _recomputed(samples, 4, [1, 2, 4, 8, 16, 32])
        assert flat(data["benchmarks"][name]) == pytest.approx(flat(expected))
    gsm8k = data["benchmarks"]["gsm8k"]
    assert (
        0 < gsm8k["mean_at_n"] < gsm8k["pass_at_k"]["4"] < 1
    )  # some right, some wrong: the metrics are not trivial
    assert gsm8k["maj_at_k"]["4"] > 0
    average = {
        k: (data["benchmarks"]["gsm8k"][k] + data["benchmarks"]["amc23"][k]) / 2
        for k in ("mean_at_n", "mean_length")
    }
    assert data["average"]["mean_at_n"] == pytest.approx(average["mean_at_n"])
    assert data["average"]["mean_length"] == pytest.approx(average["mean_length"])
    assert "| mean@4 (Pass@1) |" in (eval_dir / "summary.md").read_text()


def test_runner_resumes_an_interrupted_eval_to_the_same_result(tmp_path, builtin_data, tokenizer):
    data_dir = builtin_data / "eval"
    _fake_eval(tmp_path / "whole", data_dir, tokenizer, FakeEngine())
    # gsm8k takes 4 calls (7 problems, 2 per call); stop during amc23's second batch
    with pytest.raises(KeyboardInterrupt):
        _fake_eval(tmp_path / "cut", data_dir, tokenizer, FakeEngine(interrupt_on_call=6))
    assert (
        len(read_jsonl(tmp_path / "cut" / "eval" / "amc23" / "samples.jsonl")) == 8
    )  # its first batch only
    resumed = FakeEngine()
    _fake_eval(tmp_path / "cut", data_dir, tokenizer, resumed)
    assert resumed.calls == 3  # amc23's batches 1-3; gsm8k was finished
    for name in ("gsm8k/samples.jsonl", "amc23/samples.jsonl", "summary.json", "summary.md"):
        assert (tmp_path / "cut" / "eval" / name).read_text() == (
            tmp_path / "whole" / "eval" / name
        ).read_text(), name


def test_runner_samples_do_not_depend_on_the_batch_history(tmp_path, builtin_data, tokenizer):
    """Each batch is seeded from its identity: evaluating more problems keeps the samples of the earlier batches."""
    data_dir = builtin_data / "eval"
    _fake_eval(
        tmp_path / "few",
        data_dir,
        tokenizer,
        FakeEngine(),
        "eval.benchmarks=[gsm8k]",
        "eval.num_problems=4",
    )
    _fake_eval(
        tmp_path / "more",
        data_dir,
        tokenizer,
        FakeEngine(),
        "eval.benchmarks=[gsm8k]",
        "eval.num_problems=7",
    )
    few = (tmp_path / "few" / "eval" / "gsm8k" / "samples.jsonl").read_text().splitlines()
    more = (tmp_path / "more" / "eval" / "gsm8k" / "samples.jsonl").read_text().splitlines()
    assert more[: len(few)] == few and len(more) == 28
    _fake_eval(
        tmp_path / "seed1",
        data_dir,
        tokenizer,
        FakeEngine(),
        "eval.benchmarks=[gsm8k]",
        "eval.num_problems=4",
        "eval.seed=1",
    )
    assert (tmp_path / "seed1" / "eval" / "gsm8k" / "samples.jsonl").read_text().splitlines() != few


def test_progress_line_shows_problems_rate_and_time_left():
    # 8 samples in 4 s: 2 samples/s; 5 problems x 4 samples left: 10 s
    assert progress(2, 7, 4, 8, 4.0) == "2/7 problems, 2.00 samples/s, ETA 0:00:10"
    assert (
        progress(10, 1000, 32, 320, 100.0) == "10/1000 problems, 3.20 samples/s, ETA 2:45:00"
    )  # 9900 s
    assert progress(7, 7, 4, 28, 2.0).endswith("ETA 0:00:00")
    assert progress(0, 7, 4, 0, 1.0).endswith("0.00 samples/s, ETA unknown")


def test_runner_logs_progress_each_round(tmp_path, builtin_data, tokenizer, capsys):
    _fake_eval(tmp_path, builtin_data / "eval", tokenizer, FakeEngine(), "eval.benchmarks=[gsm8k]")
    lines = re.findall(
        r"\[eval\] gsm8k: (\d+)/7 problems, \d+\.\d\d samples/s, ETA \d+:\d\d:\d\d",
        capsys.readouterr().err,
    )
    assert [int(done) for done in lines] == [2, 4, 6, 7]  # one line per batch of 2 problems


def test_runner_with_fewer_problems_keeps_the_samples_and_summarises_the_current_problems(
    tmp_path, builtin_data, tokenizer
):
    data_dir, args = builtin_data / "eval", ("eval.benchmarks=[gsm8k]", "eval.n=2")
    _fake_eval(tmp_path, data_dir, tokenizer, FakeEngine(), *args, "eval.num_problems=6")
    path = tmp_path / "eval" / "gsm8k" / "samples.jsonl"
    six = path.read_text()
    engine = FakeEngine()
    summary = _fake_eval(tmp_path, data_dir, tokenizer, engine, *args, "eval.num_problems=2")
    assert engine.calls == 0 and path.read_text() == six  # nothing decoded, nothing deleted
    samples = read_jsonl(path)
    assert len(samples) == 12
    first_two = [r for r in samples if r["problem_index"] < 2]
    data = json.loads((tmp_path / "eval" / "summary.json").read_text())["benchmarks"]["gsm8k"]
    assert summary.benchmarks["gsm8k"].problems == data["problems"] == 2
    assert flat(data) == pytest.approx(flat(_recomputed(first_two, 2, [1, 2, 4, 8, 16, 32])))


# ---------------------------------------------------------------- end to end on SmolLM2-135M-Instruct

E2E_OVERRIDES = [
    "eval.benchmarks=[gsm8k]",
    "eval.num_problems=8",
    "eval.n=4",
    "eval.batch_size=4",
    "eval.max_new_tokens=48",
]


def _eval(log_dir: Path, data_dir: Path, *extra: str) -> int:
    return cli.main(
        [
            "eval",
            RECIPE,
            *E2E_OVERRIDES,
            f"eval.data_dir={data_dir}",
            f"logger.log_dir={log_dir}",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def e2e_runs(tmp_path_factory, smollm2_hf_dir):
    data_dir = builtin.EVAL_DIR
    runs = {}
    for mode in ("gumbel", "discrete"):
        log_dir = tmp_path_factory.mktemp(mode)
        assert _eval(log_dir, data_dir, f"softgrpo.sampler={mode}") == 0
        runs[mode] = log_dir
    return data_dir, runs


def _recomputed(samples: list[dict], n: int, ks: list[int]) -> dict:
    """The summary's metrics from samples.jsonl, computed independently of eval/metrics.py."""
    problems: dict[int, list[dict]] = {}
    for s in samples:
        problems.setdefault(s["problem_index"], []).append(s)
    rows = [sorted(problems[p], key=lambda s: s["sample"]) for p in sorted(problems)]
    assert all([s["sample"] for s in row] == list(range(n)) for row in rows)

    def unbiased(c: int, k: int) -> float:
        return 1.0 - comb(n - c, k) / comb(n, k)

    def majority_correct(row: list[dict]) -> bool:
        votes = Counter(s["answer_class"] for s in row if s["answer_class"] is not None)
        if not votes:
            return False
        first_vote = {}
        for s in row:
            if s["answer_class"] is not None:
                first_vote.setdefault(s["answer_class"], s)
        top = max(votes.values())
        # a tie goes to the answer voted first; the winner's first sample says whether it is right
        return min((first_vote[c] for c in votes if votes[c] == top), key=lambda s: s["sample"])[
            "correct"
        ]

    counts = [sum(s["correct"] for s in row) for row in rows]
    ks = [k for k in ks if k <= n]
    return {
        "n": n,
        "problems": len(rows),
        "mean_at_n": sum(counts) / (n * len(rows)),
        "pass_at_k": {str(k): sum(unbiased(c, k) for c in counts) / len(rows) for k in ks},
        "pass_at_k_first": {
            str(k): sum(any(s["correct"] for s in row[:k]) for row in rows) / len(rows) for k in ks
        },
        "maj_at_k": {
            str(k): sum(majority_correct(row[:k]) for row in rows) / len(rows) for k in ks
        },
        "mean_length": sum(s["length"] for s in samples) / len(samples),
        "truncated_fraction": sum(s["finish_reason"] == "length" for s in samples) / len(samples),
    }


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["gumbel", "discrete"])
def test_eval_writes_every_artefact(e2e_runs, mode):
    data_dir, runs = e2e_runs
    eval_dir = runs[mode] / "eval"
    assert sorted(p.name for p in eval_dir.iterdir()) == ["gsm8k", "summary.json", "summary.md"]
    problems = load_problems("gsm8k", data_dir / "gsm8k_test.json")[:8]
    samples = read_jsonl(eval_dir / "gsm8k" / "samples.jsonl")
    assert len(samples) == 32 and all(set(s) == FIELDS for s in samples)
    assert sorted((s["problem_index"], s["sample"]) for s in samples) == [
        (p, s) for p in range(8) for s in range(4)
    ]
    for s in samples:
        problem = problems[s["problem_index"]]
        assert s["problem_id"] == problem.id
        assert 1 <= s["length"] <= 48 and s["finish_reason"] in ("eos", "stop", "length")
        assert (
            s["length"] == 48
            if s["finish_reason"] == "length"
            else s["finish_reason"] in ("eos", "stop")
        )
        assert s["answer"] == extract_answer(s["text"], ANSWER_FORMAT)
        assert s["correct"] == is_correct(s["answer"], problem.reference)
    # soft decoding starts in the thinking phase; discrete decoding has none
    if mode == "gumbel":
        assert all(1 <= s["thinking_length"] <= s["length"] for s in samples)
    else:
        assert all(s["thinking_length"] == 0 for s in samples)
    assert len({s["text"] for s in samples}) > 16  # sampled, not one greedy answer repeated

    settings = json.loads((eval_dir / "gsm8k" / "settings.json").read_text())
    assert (settings["decoding"], settings["eval.n"], settings["max_new_tokens"]) == (mode, 4, 48)
    summary = json.loads((eval_dir / "summary.json").read_text())
    header = (summary["decoding"], summary["n"], summary["max_new_tokens"], summary["model"])
    assert header == (mode, 4, 48, "smollm2-135m-instruct")
    assert set(summary["benchmarks"]) == {"gsm8k"}
    expected = _recomputed(samples, 4, [1, 2, 4, 8, 16, 32])
    assert flat(summary["benchmarks"]["gsm8k"]) == pytest.approx(flat(expected))
    assert flat(summary["average"]) == pytest.approx(
        flat(expected)
    )  # one benchmark: the average is itself
    table = (eval_dir / "summary.md").read_text()
    assert (
        f"| mean@4 (Pass@1) | {100 * expected['mean_at_n']:.2f} | {100 * expected['mean_at_n']:.2f} |"
        in table
    )
    assert f"| truncated (%) | {100 * expected['truncated_fraction']:.2f} |" in table


@pytest.mark.slow
def test_soft_and_discrete_decoding_differ(e2e_runs):
    _, runs = e2e_runs
    texts = {
        mode: [s["text"] for s in read_jsonl(d / "eval" / "gsm8k" / "samples.jsonl")]
        for mode, d in runs.items()
    }
    assert sum(a != b for a, b in zip(texts["gumbel"], texts["discrete"])) > 16


@pytest.mark.slow
def test_an_interrupted_eval_resumes_to_the_same_summary(e2e_runs, tmp_path, capsys):
    data_dir, runs = e2e_runs
    done = runs["gumbel"] / "eval" / "gsm8k"
    lines = (done / "samples.jsonl").read_text().splitlines(keepends=True)
    # interrupted during batch 1's write: batch 0 (problems 0-3), problem 4 whole, a torn line of problem 5
    part = tmp_path / "eval" / "gsm8k"
    part.mkdir(parents=True)
    shutil.copy(done / "settings.json", part / "settings.json")
    (part / "samples.jsonl").write_text("".join(lines[:20]) + lines[20][:40])
    assert _eval(tmp_path, data_dir, "softgrpo.sampler=gumbel") == 0
    err = capsys.readouterr().err
    assert "8 problems x 4 samples from" in err and "resuming with 4 done" in err
    assert (tmp_path / "eval" / "summary.json").read_text() == (
        runs["gumbel"] / "eval" / "summary.json"
    ).read_text()
    assert (part / "samples.jsonl").read_text() == "".join(lines)
    # other settings in the same directory are refused (before the model is loaded)
    assert _eval(tmp_path, data_dir, "softgrpo.sampler=discrete") == 2
    assert 'decoded with decoding="gumbel", now decoding="discrete"' in capsys.readouterr().err
    other = next(f for f in ANSWER_FORMATS if f != ANSWER_FORMAT)  # samples are stored graded
    assert _eval(tmp_path, data_dir, "softgrpo.sampler=gumbel", f"env.answer_format={other}") == 2
    err = capsys.readouterr().err
    assert f'env.answer_format="{ANSWER_FORMAT}", now env.answer_format="{other}"' in err


# ---------------------------------------------------------------- data parallel


@pytest.mark.slow  # 14 s on an idle machine, 24 s on a busy one
def test_eval_of_a_training_checkpoint(tmp_path, smollm2_hf_dir, builtin_data):
    """`checkpoint=DIR` (a checkpoint_dir) evaluates its latest step, and the summary names that step."""
    model = tmp_path / "tiny-llama"
    make_hf_model("llama", model, vocab_size=49152)
    recipe = write_recipe(
        tmp_path,
        model,
        smollm2_hf_dir,
        policy={"max_total_sequence_length": 160, "generation": {"max_new_tokens": 4}},
        grpo={"num_generations_per_prompt": 2, "max_num_steps": 1},
        loss_fn={"reference_policy_kl_penalty": 0.0},
        data={"train": {**TRAIN_DATA, "size": 8}},
        logger={"tensorboard_enabled": False},
        checkpointing={"save_period": 1},
    )
    run = tmp_path / "run"
    assert cli.main(["train", str(recipe)]) == 0
    step = run / "ckpt" / "step_0000001"
    assert (step / "softgrpo_checkpoint.json").is_file()
    log_dir = tmp_path / "eval-run"
    assert (
        cli.main(
            [
                "eval",
                str(recipe),
                f"checkpoint={run / 'ckpt'}",
                "eval.benchmarks=[gsm8k]",
                "eval.num_problems=1",
                "eval.n=2",
                "eval.max_new_tokens=4",
                f"eval.data_dir={builtin_data / 'eval'}",
                f"logger.log_dir={log_dir}",
            ]
        )
        == 0
    )
    summary = json.loads((log_dir / "eval" / "summary.json").read_text())
    assert summary["model"] == str(step)
    assert summary["benchmarks"]["gsm8k"]["problems"] == 1 and summary["n"] == 2
    assert len(read_jsonl(log_dir / "eval" / "gsm8k" / "samples.jsonl")) == 2


def _eval_on_ranks(rank, recipe_overrides):
    from megatron_softgrpo import cli

    return cli.main(["eval", RECIPE, *recipe_overrides])


@pytest.mark.multiproc
@pytest.mark.slow
def test_data_parallel_eval_writes_what_one_rank_writes(tmp_path, smollm2_hf_dir):
    model_dir = tmp_path / "tiny"
    make_hf_model("qwen2", model_dir, vocab_size=49152)
    problems = tmp_path / "mine.jsonl"
    problems.write_text(
        "".join(
            json.dumps({"problem": f"What is {a} + {a}?", "answer": 2 * a}) + "\n" for a in range(7)
        )
    )
    common = [
        f"policy.model_name={model_dir}",
        f"policy.tokenizer.name={smollm2_hf_dir}",
        f"eval.files.gsm8k={problems}",
        "eval.benchmarks=[gsm8k]",
        "eval.n=3",
        "eval.batch_size=2",
        "eval.max_new_tokens=6",
    ]
    outputs = {}
    for world in (1, 2):
        log_dir = tmp_path / f"dp{world}"
        assert (
            run_ranks(world, _eval_on_ranks, [*common, f"logger.log_dir={log_dir}"]) == [0] * world
        )
        outputs[world] = [
            (log_dir / "eval" / name).read_text()
            for name in ("gsm8k/samples.jsonl", "summary.json")
        ]
    assert (
        len(outputs[2][0].splitlines()) == 21
    )  # 7 problems x 3; batches 0 and 2 on rank 0, 1 and 3 on rank 1
    assert outputs[2] == outputs[1]
