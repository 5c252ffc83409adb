"""scripts/study.py and megatron_softgrpo/study/: the arms and decodings, the jobs, resuming, Slurm
submission, the paired statistics and the report."""

import importlib.util
import json
import os
import random
import statistics
import subprocess
from pathlib import Path

import pytest
from tiny_models import make_hf_model

from megatron_softgrpo.config.loader import load_recipe
from megatron_softgrpo.data.datasets import read_problems
from megatron_softgrpo.errors import UserError
from megatron_softgrpo.eval.metrics import summarize
from megatron_softgrpo.eval.report import EvalSummary, write_summary
from megatron_softgrpo.eval.runner import plan_eval
from megatron_softgrpo.eval.samples import SampleFile, SampleRecord, sample_table
from megatron_softgrpo.study.jobs import (
    CODE_LINE,
    code_version,
    eval_dir,
    job_code,
    plan_jobs,
    submit_slurm,
    train_dir,
)
from megatron_softgrpo.study.report import moving_average, write_report
from megatron_softgrpo.study.spec import BUILTIN_DECODINGS, StudySpec, check_manifest
from megatron_softgrpo.study.stats import estimate

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "softgrpo-smollm2-135m-cpu.yaml")
SPEC = StudySpec(RECIPE, ("grpo", "softgrpo"), (1, 2), overrides=("eval.n=4",))


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
    soft_eval = next(j for j in evals if j.name == "eval-softgrpo-seed2-hard")
    assert soft_eval.after == ("train-softgrpo-seed2",)
    assert f"checkpoint={train_dir(tmp_path, 'softgrpo', 2) / 'checkpoints'}" in soft_eval.args
    assert "softgrpo.sampler=discrete" in soft_eval.args
    base = [j for j in evals if j.name.startswith("eval-base-")]
    assert len(base) == 2 and all(
        j.after == () and "checkpoint=" not in " ".join(j.args) for j in base
    )


def test_a_rerun_may_grow_the_study_but_not_change_it(tmp_path):
    check_manifest(SPEC, tmp_path)
    check_manifest(SPEC, tmp_path)  # the same settings continue the study
    # a third arm and a seed join it (issue 30's Multiplex Thinking beside GRPO and SofT-GRPO)
    grown = StudySpec(
        RECIPE, (*SPEC.algorithms, "multiplex"), (1, 2, 3), SPEC.decodings, SPEC.overrides
    )
    check_manifest(grown, tmp_path)
    stored = json.loads((tmp_path / "study.json").read_text())
    assert stored["algorithms"] == ["grpo", "softgrpo", "multiplex"] and stored["seeds"] == [
        1,
        2,
        3,
    ]
    check_manifest(grown, tmp_path)
    with pytest.raises(
        UserError, match=r"ran with seeds=\[1, 2, 3\], now \[1, 2\]; a rerun may add"
    ):
        # dropping a seed
        check_manifest(
            StudySpec(RECIPE, grown.algorithms, (1, 2), overrides=SPEC.overrides), tmp_path
        )
    changed = dict(SPEC.decodings, soft=BUILTIN_DECODINGS["hard"])
    with pytest.raises(UserError, match="ran with decodings="):
        check_manifest(
            StudySpec(RECIPE, grown.algorithms, (1, 2, 3), changed, SPEC.overrides), tmp_path
        )
    with pytest.raises(UserError, match="ran with overrides=.*use another --out"):
        check_manifest(
            StudySpec(RECIPE, grown.algorithms, (1, 2, 3), SPEC.decodings, ("a=1",)), tmp_path
        )


def test_bad_study_arguments_exit_2_with_one_line(tmp_path, capsys):
    main = _study_main()
    assert main([RECIPE, "--out", str(tmp_path), "--seeds", "1,1"]) == 2
    assert "--seeds must be distinct" in capsys.readouterr().err
    assert main([RECIPE, "--out", str(tmp_path / "b"), "eval.n=0"]) == 2
    assert "eval.n" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # nothing ran, and a corrected rerun is not refused


def test_decodings_apply_to_their_models_and_the_reference_protocol_is_as_written(tmp_path):
    names = ("hard", "ref-soft", "ref-hard", "ref-soft-k30")
    spec = StudySpec(RECIPE, ("grpo", "softgrpo"), (1,), {n: BUILTIN_DECODINGS[n] for n in names})
    assert spec.evaluations() == [
        ("base", "hard"), ("base", "ref-hard"), ("base", "ref-soft-k30"),
        ("grpo-seed1", "hard"), ("grpo-seed1", "ref-hard"), ("grpo-seed1", "ref-soft-k30"),
        ("softgrpo-seed1", "hard"), ("softgrpo-seed1", "ref-soft"),
    ]  # fmt: skip
    evals = spec.eval_decodings()
    # the reference's evaluation scripts (docs/algorithm.md, "Comparing algorithms")
    phase = lambda t, k: {"temperature": t, "top_k": k, "top_p": 0.95, "min_p": 0.0}  # noqa: E731
    for name, sampler, t, k, mixture, tau in (
        ("ref-soft", "gumbel", 1.0, 5, 5, 0.1),
        ("ref-soft-k30", "gumbel", 0.6, 30, 30, 0.5),
        ("ref-hard", "discrete", 0.6, 30, None, None),
    ):
        got = evals[name]
        assert got["sampler"] == sampler and got["mixture_size"] == mixture
        assert got["gumbel_tau"] == tau and {k: got[k] for k in phase(t, k)} == phase(t, k)
        answer = got["answer"] or got  # a discrete decoding is one phase
        assert {k: answer[k] for k in phase(t, k)} == phase(t, k)
    assert evals["ref-soft-k30"]["noise_scale"] == 1.0 and evals["ref-hard"]["answer"] is None
    jobs = plan_jobs(spec, tmp_path, ["validation"])
    soft = next(j for j in jobs if j.name == "eval-softgrpo-seed1-ref-soft")
    assert "softgrpo.gumbel_tau=0.1" in soft.args and soft.after == ("train-softgrpo-seed1",)


@pytest.mark.parametrize(
    "recipe", sorted((ROOT / "recipes").glob("softgrpo-*.yaml")), ids=lambda p: p.stem
)
def test_every_shipped_recipe_explores_alike_in_both_arms(recipe):
    arms = StudySpec(str(recipe)).arm_decodings()
    assert arms["grpo"]["sampler"] == "discrete" and arms["softgrpo"]["sampler"] == "gumbel"
    for key in ("temperature", "top_k", "top_p"):
        assert arms["grpo"][key] == arms["softgrpo"][key], key
    assert StudySpec(str(recipe)).exploration_mismatches() == []


def test_mismatched_exploration_is_refused_before_any_job(tmp_path, capsys):
    main = _study_main()
    out = tmp_path / "s"
    assert main([RECIPE, "--out", str(out), "policy.generation.temperature=1.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--allow-mismatched-exploration" in err
    assert "grpo policy.generation.temperature=1.0" in err
    assert "softgrpo softgrpo.thinking.temperature=0.7" in err
    assert not out.exists()
    other = ["softgrpo.thinking.top_k=4", "softgrpo.mixture_size=4"]  # top-k too
    assert main([RECIPE, "--out", str(out), *other]) == 2
    assert "policy.generation.top_k=5" in capsys.readouterr().err


def test_bad_decodings_exit_2_with_one_line(tmp_path, capsys):
    main = _study_main()
    out = str(tmp_path / "s")
    assert main([RECIPE, "--out", out, "--decodings", "hard,sofft"]) == 2
    assert "unknown decodings ['sofft']" in capsys.readouterr().err
    bad = tmp_path / "d.yaml"
    for text, message in (
        ("hard: {overrides: [softgrpo.sampler=gumbel]}", "d.yaml: hard: a built-in decoding"),
        ("t: {overrides: softgrpo.sampler=gumbel}", "d.yaml: t: overrides and models must be"),
        ("t: {override: []}", "d.yaml: t: expected {overrides"),
        ("t: {overrides: [], models: [bsae]}", "decoding 't' applies to unknown models ['bsae']"),
        ("t: {overrides: [], models: [dirichlet]}", "decoding 't' applies to ['dirichlet']: none"),
        ("t: {overrides: [softgrpo.gumbel_tau=0]}", "softgrpo.gumbel_tau"),
        ("[1, 2", "d.yaml: cannot read the decodings"),
    ):
        bad.write_text(text)
        assert main([RECIPE, "--out", out, "--decodings-file", str(bad), "--decodings", "t"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert not Path(out).exists()


def test_paired_estimate_on_a_hand_made_study():
    a = [{"b": [1.0, 0.0, 1.0]}, {"b": [0.0, 0.0, 1.0]}]  # two seeds, three problems
    base = [{"b": [0.0, 0.0, 0.0]}]
    e = estimate(a, base)
    # seeds: var(2/3, 1/3) / 2 = 1/36; problems: var(0.5, 0, 1) / 3 = 1/12
    assert e.value == pytest.approx(0.5) and e.se == pytest.approx(1 / 3)
    assert estimate([{"b": [0.5]}]).se is None  # one model, one problem: nothing to estimate from
    with pytest.raises(ValueError, match="different problems"):
        estimate(a, [{"b": [0.0, 0.0]}])


def _simulated_arm(rng, problem_effects, seeds, sd_seed, sd_noise):
    arm = []
    for _ in range(seeds):
        a = rng.gauss(0, sd_seed)
        arm.append({"b": [a + p + rng.gauss(0, sd_noise) for p in problem_effects]})
    return arm


def test_standard_errors_match_the_spread_of_simulated_studies():
    """Crossed seeds x problems: SE^2 averages to the estimate's variance over repeated studies
    (a little above it: the interaction is counted twice), and pairing by problem removes the
    problems' shared difficulty."""
    rng = random.Random(0)
    values, se2, diffs, diff_se2 = [], [], [], []
    for _ in range(1500):
        problems = [rng.gauss(0, 0.2) for _ in range(40)]  # a new draw of problems each study
        a = _simulated_arm(rng, problems, 3, 0.03, 0.05)
        b = _simulated_arm(rng, problems, 1, 0.0, 0.05)
        e, d = estimate(a), estimate(a, b)
        values.append(e.value)
        se2.append(e.se**2)
        diffs.append(d.value)
        diff_se2.append(d.se**2)
    for vals, ses in ((values, se2), (diffs, diff_se2)):
        ratio = statistics.fmean(ses) / statistics.variance(vals)
        assert 0.9 < ratio < 1.3, ratio
    assert statistics.fmean(diff_se2) < 0.5 * statistics.fmean(se2)  # paired << unpaired


ABILITY = {"base": 0.3, "grpo": 0.6, "softgrpo": 0.45}  # the fake models' accuracy


def _write_evaluation(directory: Path, model: str, decoding: str, problems: int, n: int) -> None:
    """Graded samples and their summary as `softgrpo eval` writes them."""
    rng = random.Random(f"{model}/{decoding}")
    ability = ABILITY[model.split("-seed")[0]] + (0.05 if decoding == "soft" else 0.0)
    records = [
        SampleRecord(f"p{p}", p, i, "", "1", ok, 0 if ok else 1, 10 + p % 3, 10, "eos")
        for p in range(problems)
        for i, ok in enumerate(rng.random() < ability * (0.5 + p / problems) for _ in range(n))
    ]
    samples = SampleFile(directory / "eval" / "validation")
    samples.directory.mkdir(parents=True)
    samples.append(records)
    metrics = summarize(sample_table(records), (1, 2, 4))
    write_summary(
        directory / "eval", EvalSummary(model, decoding, n, 32, 0, {"validation": metrics})
    )


def _fake_study(out: Path, spec: StudySpec, problems: int = 12, n: int = 4) -> None:
    for model, decoding in spec.evaluations():
        _write_evaluation(eval_dir(out, model, decoding), model, decoding, problems, n)
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
            final = {"step": 5, "num_problems": 8, "at_start": None, "final": {"accuracy": 0.5}}
            (run / "final_validation.json").write_text(json.dumps(final))


def test_report_rows_changes_and_differences_with_standard_errors(tmp_path):
    _fake_study(tmp_path, SPEC)
    write_report(SPEC, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {(r["training"], r["decoding"]): r for r in report["rows"]}
    assert set(rows) == {(t, d) for t in ("base", "grpo", "softgrpo") for d in ("hard", "soft")}
    summaries = {
        (m, d): json.loads((eval_dir(tmp_path, m, d) / "eval" / "summary.json").read_text())
        for m, d in SPEC.evaluations()
    }
    for (training, decoding), row in rows.items():
        models = [m for m, d in summaries if d == decoding and m.split("-seed")[0] == training]
        pass1 = [summaries[m, decoding]["average"]["mean_at_n"] for m in models]
        pass4 = [summaries[m, decoding]["average"]["pass_at_k"]["4"] for m in models]
        assert row["per_seed"]["pass@1"] == pytest.approx(pass1)  # = the evaluation's own numbers
        assert row["values"]["pass@1"]["value"] == pytest.approx(statistics.fmean(pass1))
        assert row["values"]["pass@4"]["value"] == pytest.approx(statistics.fmean(pass4))
        assert row["values"]["pass@1"]["se"] > 0 and row["seeds"] == len(models)
        assert row["problems"] == 12 and set(row["values"]) == {
            "pass@1",
            "pass@2",
            "pass@4",
            "maj@4",
        }
        if training != "base":
            change = row["change_from_base"]["pass@1"]["value"]
            base = rows["base", decoding]["values"]["pass@1"]["value"]
            assert change == pytest.approx(row["values"]["pass@1"]["value"] - base)
    (diff_hard, diff_soft) = report["differences"]
    assert (diff_hard["a"], diff_hard["b"], diff_soft["decoding"]) == ("grpo", "softgrpo", "soft")
    assert diff_hard["values"]["pass@1"]["value"] == pytest.approx(
        rows["grpo", "hard"]["values"]["pass@1"]["value"]
        - rows["softgrpo", "hard"]["values"]["pass@1"]["value"]
    )
    # every arm and decoding with its effective sampling, in the field names
    assert report["arms"]["grpo"]["decoding"]["temperature"] == 0.7
    assert report["arms"]["softgrpo"]["decoding"]["answer"]["sampler"] == "discrete"
    assert report["decodings"]["soft"]["decoding"]["gumbel_tau"] == 0.1
    assert report["decodings"]["hard"]["overrides"] == ["softgrpo.sampler=discrete"]
    md = (tmp_path / "report.md").read_text()
    assert "| train grpo | grpo | discrete | 0.7 | 5 | 0.95 | 0.0 | - | - | - |" in md
    assert "| eval soft | all | gumbel | 0.7 | 5 | 0.95 | 0.0 | 5 | 0.1 | noise_scale 1.0 |" in md
    assert "## Change from the base model under the same decoding" in md
    assert "| grpo - softgrpo | hard |" in md and "explore differently" not in md
    cell = rows["softgrpo", "soft"]["values"]["pass@1"]
    assert (
        f"| softgrpo | soft | 2 | 12 | {100 * cell['value']:.1f} ± {100 * cell['se']:.1f} |" in md
    )
    training = report["training"]["grpo"]
    assert training["val_accuracy"] == {
        "0": [0.2, 0.2],
        "4": pytest.approx([0.31, 0.32]),
        "5": [0.5, 0.5],  # final_validation.json's
    }
    assert training["seconds_per_step"] == 6.0  # median of steps 2-4 (step 1 warms up)
    for png in ("pass_at_k.png", "training.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    plan = plan_jobs(SPEC, tmp_path, ["validation"])
    assert all(job.done() for job in plan)  # a rerun has nothing left to do
    assert not plan_jobs(SPEC, tmp_path, ["validation", "gsm8k"])[-1].done()


def test_a_study_that_allows_mismatched_exploration_says_so_at_the_top(tmp_path):
    spec = StudySpec(
        RECIPE, ("grpo", "softgrpo"), (1,), overrides=("policy.generation.temperature=1.0",),
        allow_mismatched_exploration=True,
    )  # fmt: skip
    _fake_study(tmp_path, spec)
    write_report(spec, tmp_path)
    first = (tmp_path / "report.md").read_text().splitlines()[0]
    assert first.startswith("**The training arms explore differently**")
    assert "grpo policy.generation.temperature=1.0" in first


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
    spec = StudySpec(RECIPE, ("grpo",), (1,))
    jobs = plan_jobs(spec, out, ["validation"])
    submit_slurm(spec, jobs, ["--time=01:00:00"])
    lines = calls.read_text().splitlines()
    assert len(lines) == 5  # base x 2, train, checkpoint x 2
    assert lines[2].startswith("--parsable --job-name=train-grpo-seed1 --time=01:00:00 ")
    assert "SOFTGRPO_COMMAND=train slurm/softgrpo.sbatch" in lines[2]
    assert "--dependency" not in lines[0] and "SOFTGRPO_COMMAND=eval" in lines[0]
    assert "--dependency=afterok:3 " in lines[3] and "--dependency=afterok:3 " in lines[4]
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
        (t, d) for t in ("base", "grpo", "softgrpo") for d in ("hard", "soft")
    }
    for row in report["rows"]:
        assert 0 <= row["values"]["pass@1"]["value"] <= row["values"]["pass@2"]["value"] <= 1
    assert set(report["training"]["softgrpo"]["val_accuracy"]) == {"0", "1", "2"}
    summary = json.loads(
        (eval_dir(out, "grpo-seed1", "soft") / "eval" / "summary.json").read_text()
    )
    assert summary["decoding"] == "gumbel" and "seed1/checkpoints" in summary["model"]
    assert len(list((out / "logs").iterdir())) == 8  # 2 trainings, 3 models x 2 decodings
    assert list(report["code"]) == sorted(p.stem for p in (out / "logs").iterdir())
    assert set(report["code"].values()) == {code_version()}  # every job says what it ran
    assert f"| {code_version()} |" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(args) == 0  # a rerun finds every job done and only rewrites the report
    assert "8 of 8 jobs done; 0 to run" in capsys.readouterr().out


def test_code_version_names_the_package_a_job_imports_and_its_commit(tmp_path):
    """`python -m` imports the working directory's package first: a snapshot's, by its commit,
    with '+' for uncommitted changes to tracked files."""
    package = tmp_path / "megatron_softgrpo"
    package.mkdir()
    (package / "__init__.py").write_text("")

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    assert code_version(tmp_path) == f"{tmp_path} at no git commit"
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "snapshot")
    head = subprocess.run(
        ["git", "-C", str(tmp_path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert code_version(tmp_path) == f"{tmp_path} at {head}"
    (package / "__init__.py").write_text("x = 1\n")
    assert code_version(tmp_path) == f"{tmp_path} at {head}+"
    log = tmp_path / "job.log"
    log.write_text(f"# softgrpo train\n{CODE_LINE}first\n# again\n{CODE_LINE}second\n")
    assert job_code(log) == "second" and job_code(tmp_path / "none.log") is None
