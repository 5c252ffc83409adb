"""scripts/study.py and megatron_softgrpo/study.py: the jobs, resuming, Slurm submission, the report."""

import importlib.util
import json
import os
import statistics
from pathlib import Path

import pytest
from tiny_models import make_hf_model

from megatron_softgrpo.config.loader import load_recipe
from megatron_softgrpo.data.datasets import read_problems
from megatron_softgrpo.errors import UserError
from megatron_softgrpo.eval.metrics import BenchmarkMetrics
from megatron_softgrpo.eval.report import EvalSummary, write_summary
from megatron_softgrpo.eval.runner import plan_eval
from megatron_softgrpo.study import (
    StudySpec,
    check_manifest,
    moving_average,
    plan_jobs,
    submit_slurm,
    train_dir,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "softgrpo-smollm2-135m-cpu.yaml")
SPEC = StudySpec(RECIPE, ("grpo", "softgrpo"), (1, 2), ("discrete", "gumbel"), ("eval.n=4",))


def _study_main():
    spec = importlib.util.spec_from_file_location("study_script", ROOT / "scripts" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_jobs_train_each_algorithm_and_seed_then_evaluate_base_and_every_checkpoint(tmp_path):
    jobs = plan_jobs(SPEC, tmp_path, ["validation"])
    train = [j for j in jobs if j.command == "train"]
    evals = [j for j in jobs if j.command == "eval"]
    assert [j.name for j in train] == [
        "train-grpo-seed1", "train-grpo-seed2", "train-softgrpo-seed1", "train-softgrpo-seed2"
    ]  # fmt: skip
    assert len(evals) == (1 + 4) * 2 and len({j.name for j in jobs}) == len(jobs)
    first = train[0]
    assert "softgrpo.algorithm=grpo" in first.args and "grpo.seed=1" in first.args
    assert f"logger.log_dir={train_dir(tmp_path, 'grpo', 1)}" in first.args
    assert first.args[-1] == "eval.n=4"  # the study's overrides come last: they win
    soft_eval = next(j for j in evals if j.name == "eval-softgrpo-seed2-discrete")
    assert soft_eval.after == ("train-softgrpo-seed2",)
    assert f"checkpoint={train_dir(tmp_path, 'softgrpo', 2) / 'checkpoints'}" in soft_eval.args
    assert "softgrpo.sampler=discrete" in soft_eval.args
    base = [j for j in evals if j.name.startswith("eval-base-")]
    assert len(base) == 2 and all(
        j.after == () and "checkpoint=" not in " ".join(j.args) for j in base
    )


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    check_manifest(SPEC, tmp_path)
    check_manifest(SPEC, tmp_path)  # the same settings continue the study
    other = StudySpec(RECIPE, SPEC.algorithms, (1, 2, 3), SPEC.decodings, SPEC.overrides)
    with pytest.raises(UserError, match=r"study.json: this study ran with seeds=\[1, 2\]"):
        check_manifest(other, tmp_path)


def test_bad_study_arguments_exit_2_with_one_line(tmp_path, capsys):
    main = _study_main()
    assert main([RECIPE, "--out", str(tmp_path), "--seeds", "1,1"]) == 2
    assert "--seeds must be distinct" in capsys.readouterr().err
    assert main([RECIPE, "--out", str(tmp_path / "b"), "eval.n=0"]) == 2
    assert "eval.n" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # nothing ran, and a corrected rerun is not refused


def _metrics(mean: float, length: float) -> BenchmarkMetrics:
    passes = {k: min(1.0, mean * (1 + k) / 2) for k in (1, 2, 4)}
    return BenchmarkMetrics(4, 8, mean, passes, passes, {1: mean, 4: mean + 0.1}, length, 0.0)


def _fake_study(out: Path, spec: StudySpec) -> dict:
    """Summaries and metrics as the jobs would write them; returns pass@1 per (model, decoding)."""
    pass1 = {}
    models = ["base"] + [f"{a}-seed{s}" for a in spec.algorithms for s in spec.seeds]
    for i, model in enumerate(models):
        for j, decoding in enumerate(spec.decodings):
            pass1[model, decoding] = 0.1 + 0.03 * i + 0.01 * j
            summary = EvalSummary(
                model, decoding, 4, 32, 0, {"validation": _metrics(pass1[model, decoding], 10 + i)}
            )
            write_summary(out / "eval" / model / decoding / "eval", summary)
    for a in spec.algorithms:
        for s in spec.seeds:
            run = train_dir(out, a, s)
            run.mkdir(parents=True)
            rows = [
                {"step": t, "reward/mean": 0.1 * t + s, "time/step": 2.0 * t}
                | ({"val_at_start/accuracy": 0.2} if t == 1 else {})
                | ({"val/accuracy": 0.3 + 0.01 * s} if t == 4 else {})
                for t in range(1, 5)
            ]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (run / "final_validation.json").write_text("{}")
    return pass1


def test_report_gives_the_mean_and_spread_over_seeds_and_its_plots(tmp_path):
    pass1 = _fake_study(tmp_path, SPEC)
    write_report(SPEC, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {(r["training"], r["decoding"]): r["values"] for r in report["rows"]}
    assert set(rows) == {(t, d) for t in ("base", "grpo", "softgrpo") for d in SPEC.decodings}
    seeds = [pass1[f"softgrpo-seed{s}", "gumbel"] for s in SPEC.seeds]
    assert rows["softgrpo", "gumbel"]["pass@1"] == pytest.approx(seeds)
    assert rows["base", "discrete"]["pass@1"] == pytest.approx([pass1["base", "discrete"]])
    md = (tmp_path / "report.md").read_text()
    mean, sd = statistics.fmean(seeds), statistics.stdev(seeds)
    assert f"| softgrpo | soft | 2 | {100 * mean:.1f} ± {100 * sd:.1f} |" in md
    assert "| base | hard | 1 | 10.0 |" in md  # one model: no spread
    training = report["training"]["grpo"]
    assert training["val_accuracy"] == {"0": [0.2, 0.2], "4": pytest.approx([0.31, 0.32])}
    assert training["seconds_per_step"] == 6.0  # median of steps 2-4 (step 1 warms up)
    for png in ("pass_at_k.png", "training.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    plan = plan_jobs(SPEC, tmp_path, ["validation"])
    assert all(job.done() for job in plan)  # a rerun has nothing left to do
    assert not plan_jobs(SPEC, tmp_path, ["validation", "gsm8k"])[-1].done()


def test_moving_average_is_trailing():
    assert moving_average([1, 2, 3, 4, 5], 2) == [1, 1.5, 2.5, 3.5, 4.5]


def test_slurm_evaluations_wait_for_their_training_job(tmp_path, monkeypatch):
    """A stand-in sbatch records its arguments and answers job ids as --parsable does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\nwc -l < {calls} | tr -d " "\n'
    )
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "study"
    spec = StudySpec(RECIPE, ("grpo",), (1,), ("discrete", "gumbel"))
    jobs = plan_jobs(spec, out, ["validation"])
    submit_slurm(spec, jobs, ["--time=01:00:00"])
    lines = calls.read_text().splitlines()
    assert len(lines) == 5  # train, base x 2, checkpoint x 2
    assert lines[0].startswith("--parsable --job-name=train-grpo-seed1 --time=01:00:00 ")
    assert "SOFTGRPO_COMMAND=train slurm/softgrpo.sbatch" in lines[0]
    assert "--dependency" not in lines[1] and "SOFTGRPO_COMMAND=eval" in lines[1]
    assert "--dependency=afterok:1 " in lines[3] and "--dependency=afterok:1 " in lines[4]
    # a finished training job is not resubmitted, and its evaluations do not wait for it
    (train_dir(out, "grpo", 1)).mkdir(parents=True)
    (train_dir(out, "grpo", 1) / "final_validation.json").write_text("{}")
    calls.unlink()
    submit_slurm(spec, jobs)
    lines = calls.read_text().splitlines()
    assert len(lines) == 4 and not any("--dependency" in line for line in lines)


def test_validation_benchmark_is_the_recipes_held_out_split(tmp_path):
    loaded = load_recipe(RECIPE, ["eval.benchmarks=[validation]", f"logger.log_dir={tmp_path}"])
    (plan,) = plan_eval(loaded)
    expected = read_problems(loaded.cfg.data.validation, key="data.validation").problems
    assert [(p.id, p.prompt, p.reference) for p in plan.problems] == [
        (p.id, p.problem, p.answer) for p in expected
    ]
    assert plan.template == loaded.cfg.data.prompt_template
    loaded = load_recipe(
        RECIPE,
        ["eval.benchmarks=[validation]", "data.validation=null", f"logger.log_dir={tmp_path}"],
    )
    with pytest.raises(UserError, match="'validation' needs data.validation"):
        plan_eval(loaded)


@pytest.mark.slow
def test_a_whole_study_on_a_tiny_model_runs_resumes_and_reports(tmp_path, smollm2_hf_dir, capsys):
    model = tmp_path / "tiny-llama"
    make_hf_model("llama", model, vocab_size=49152)
    overrides = [
        f"policy.model_name={model}",
        f"policy.tokenizer.name={smollm2_hf_dir}",
        "policy.generation.max_new_tokens=4",
        "grpo.max_num_steps=2",
        "grpo.val_period=1",
        "data.validation.size=4",
        "eval.benchmarks=[validation]",
        "eval.n=2",
        "eval.ks=[1,2]",
        "eval.batch_size=2",
        "env.num_workers=1",
    ]
    out = tmp_path / "study"
    main = _study_main()
    args = [RECIPE, "--out", str(out), "--seeds", "1", *overrides]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert {(r["training"], r["decoding"]) for r in report["rows"]} == {
        (t, d) for t in ("base", "grpo", "softgrpo") for d in ("discrete", "gumbel")
    }
    for row in report["rows"]:
        assert 0 <= row["values"]["pass@1"][0] <= row["values"]["pass@2"][0] <= 1
    assert set(report["training"]["softgrpo"]["val_accuracy"]) == {"0", "1", "2"}
    summary = json.loads(
        (out / "eval" / "grpo-seed1" / "gumbel" / "eval" / "summary.json").read_text()
    )
    assert summary["decoding"] == "gumbel" and "seed1/checkpoints" in summary["model"]
    assert len(list((out / "logs").iterdir())) == 8  # 2 trainings, 3 models x 2 decodings
    capsys.readouterr()
    assert main(args) == 0  # a rerun finds every job done and only rewrites the report
    assert "8 of 8 jobs done; 0 to run" in capsys.readouterr().out
