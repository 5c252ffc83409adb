"""`softgrpo train` end to end on a tiny model: every algorithm, DP=2 and PP=2 on CPU ranks, exact
resume (with validation), preemption (also during start-up), early configuration errors, the
progress line and the strict-JSON metrics writer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_helpers import run_ranks
from tiny_models import make_hf_model

from megatron_softgrpo.cli import main
from megatron_softgrpo.train.metrics_log import STEP_KEYS, format_progress, json_line
from megatron_softgrpo.train.preemption import REQUEUE_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
# measurements of wall time differ from run to run; everything else must be identical on resume
TIMING_KEYS = {"tokens_per_second"} | {k for k in STEP_KEYS if k.startswith("time/")}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_hf_model("llama", path, vocab_size=49152)
    return path


def write_recipe(tmp_path: Path, model: Path, tokenizer: Path, **sections) -> Path:
    run = tmp_path / "run"
    body = {
        "defaults": str(ROOT / "recipes" / "base.yaml"),
        "policy": {
            "model_name": str(model),
            "tokenizer": {"name": str(tokenizer)},
            "precision": "float32",
            "train_global_batch_size": 4,
            "train_micro_batch_size": 2,
            "logprob_batch_size": 2,
            "max_total_sequence_length": 256,
            "generation": {"max_new_tokens": 8},
            "megatron_cfg": {"optimizer": {"lr": 1e-4}},
        },
        "grpo": {
            "num_prompts_per_step": 2,
            "num_generations_per_prompt": 4,
            "max_num_steps": 4,
            "seed": 3,
        },
        "loss_fn": {"reference_policy_kl_penalty": 0.01},
        "data": {
            "max_input_seq_length": 128,
            "train": {
                "kind": "reasoning_gym",
                "task": "basic_arithmetic",
                "size": 40,
                "seed": 1,
                "task_config": {"min_terms": 2, "max_terms": 2, "max_digits": 1},
            },
        },
        "env": {"reward": "reasoning_gym", "num_workers": 1},
        "softgrpo": {"thinking": {"max_thinking_tokens": 4}},
        "logger": {"log_dir": str(run), "tensorboard_enabled": True},
        "checkpointing": {"checkpoint_dir": str(run / "ckpt"), "save_period": 2, "keep_top_k": 2},
        "cluster": {"gpus_per_node": 0},
    }
    for section, values in sections.items():
        body[section] = {**body.get(section, {}), **values}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


# a small held-out set, disjoint from the training problems (another generator seed)
VALIDATION = {
    "validation": {
        "kind": "reasoning_gym",
        "task": "basic_arithmetic",
        "size": 3,
        "seed": 2,
        "task_config": {"min_terms": 2, "max_terms": 2, "max_digits": 1},
    }
}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model tensors of the latest checkpoint, read back through a TP=1 model."""
    from megatron_softgrpo.config.schema import MegatronCfg
    from megatron_softgrpo.distributed import ParallelLayout, destroy_distributed, init_distributed
    from megatron_softgrpo.models.loading import load_model
    from megatron_softgrpo.models.source import resolve_model_source
    from megatron_softgrpo.train.checkpointing import latest_checkpoint

    init_distributed(ParallelLayout(1, 1))
    model, _ = load_model(
        resolve_model_source(str(latest_checkpoint(run_dir / "ckpt"))), MegatronCfg()
    )
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    destroy_distributed()
    return weights


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm", ["softgrpo", "grpo", "gaussian", "dirichlet", "embedding_noise"]
)
def test_every_algorithm_trains_and_logs_the_documented_keys(
    algorithm, tmp_path, tiny_model, smollm2_hf_dir
):
    recipe = write_recipe(tmp_path, tiny_model, smollm2_hf_dir, grpo={"max_num_steps": 2})
    assert (
        main(
            ["train", str(recipe), f"softgrpo.algorithm={algorithm}", "loss_fn.entropy_coef=0.001"]
        )
        == 0
    )
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert set(STEP_KEYS) <= set(row), set(STEP_KEYS) - set(row)
        assert row["optimizer_steps"] == 2 * row["step"]  # 8 responses / 4 per optimizer step
        assert row["entropy/mean"] > 0
    # only the thinking phase differs: GRPO has no soft rows, every soft algorithm has some
    assert (rows[0]["soft_fraction"] == 0) == (algorithm == "grpo")
    assert rows[0]["ratio/mean"] != 0 and rows[0]["kl/mean"] >= 0
    assert (tmp_path / "run" / "training_curves.png").stat().st_size > 0
    assert list((tmp_path / "run" / "tensorboard").glob("events.*"))


@pytest.mark.slow
def test_grpo_and_softgrpo_share_data_and_differ_in_the_thinking_phase(
    tmp_path, tiny_model, smollm2_hf_dir
):
    runs = {}
    for algorithm in ("softgrpo", "grpo"):
        recipe = write_recipe(
            tmp_path / algorithm, tiny_model, smollm2_hf_dir, grpo={"max_num_steps": 1}
        )
        assert main(["train", str(recipe), f"softgrpo.algorithm={algorithm}"]) == 0
        runs[algorithm] = metrics(tmp_path / algorithm / "run")[0]
    soft, grpo = runs["softgrpo"], runs["grpo"]
    assert set(soft) == set(grpo)  # one metrics schema for every algorithm
    assert soft["epoch"] == grpo["epoch"] and soft["optimizer_steps"] == grpo["optimizer_steps"]
    assert soft["soft_fraction"] > 0 and grpo["soft_fraction"] == 0
    assert soft["think_length/mean"] > 0 and grpo["think_length/mean"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("validation", [False, True], ids=["plain", "with-validation"])
def test_exact_resume_gives_the_same_metrics_and_weights(
    validation, tmp_path, tiny_model, smollm2_hf_dir
):
    sections = (
        {"data": VALIDATION, "grpo": {"val_at_start": True, "val_period": 2}} if validation else {}
    )
    straight = write_recipe(tmp_path / "straight", tiny_model, smollm2_hf_dir, **sections)
    assert main(["train", str(straight)]) == 0
    resumed = write_recipe(tmp_path / "resumed", tiny_model, smollm2_hf_dir, **sections)
    assert main(["train", str(resumed), "grpo.max_num_steps=2"]) == 0
    assert main(["train", str(resumed)]) == 0  # resumes from step 2's checkpoint, runs 3 and 4
    a, b = metrics(tmp_path / "straight" / "run"), metrics(tmp_path / "resumed" / "run")
    # exactly one line per step, in both
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in TIMING_KEYS} == {
            k: v for k, v in y.items() if k not in TIMING_KEYS
        }
    wa, wb = (
        final_weights(tmp_path / "straight" / "run"),
        final_weights(tmp_path / "resumed" / "run"),
    )
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert a[-1]["reward/mean"] == b[-1]["reward/mean"]
    if validation:
        assert (
            "val_at_start/accuracy" in a[0]
            and "val/accuracy" in a[1]
            and "val/accuracy" not in a[2]
        )
        summaries = [
            json.loads((tmp_path / run / "run" / "final_validation.json").read_text())
            for run in ("straight", "resumed")
        ]
        # the resumed run takes the before-training accuracy from step 1's line
        assert summaries[0] == summaries[1]
        assert summaries[0]["step"] == 4 and summaries[0]["num_problems"] == 3
        assert summaries[0]["at_start"]["accuracy"] == a[0]["val_at_start/accuracy"]
        assert (
            summaries[0]["final"]["accuracy"] == a[3]["val/accuracy"]
        )  # the last step's validation


@pytest.mark.slow
def test_sigterm_checkpoints_exits_for_requeue_and_resumes(tmp_path, tiny_model, smollm2_hf_dir):
    recipe = write_recipe(
        tmp_path,
        tiny_model,
        smollm2_hf_dir,
        grpo={"max_num_steps": 50},
        checkpointing={"save_period": 100},
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "megatron_softgrpo", "train", str(recipe)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines = []
    for line in proc.stdout:  # wait for the first completed step, then preempt
        lines.append(line)
        if line.startswith("step 1/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == REQUEUE_EXIT_CODE, "".join(lines) + rest
    ckpt = tmp_path / "run" / "ckpt"
    saved = (ckpt / "latest").read_text().strip()
    step = int(saved.split("_")[1])
    assert step >= 1 and (ckpt / saved / "softgrpo_checkpoint.json").is_file()
    # the requeued job resumes from it and finishes
    done = subprocess.run(
        cmd + ["grpo.max_num_steps=" + str(step + 1)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {ckpt / saved}" in done.stdout
    assert [r["step"] for r in metrics(tmp_path / "run")] == list(range(1, step + 2))


def test_training_refuses_a_sampler_that_contradicts_the_algorithm(
    tmp_path, tiny_model, smollm2_hf_dir, capsys
):
    recipe = write_recipe(tmp_path, tiny_model, smollm2_hf_dir)
    assert main(["train", str(recipe), "softgrpo.sampler=discrete"]) == 2
    err = capsys.readouterr().err
    assert "softgrpo.sampler=discrete" in err and "set null" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_signal_during_start_up_exits_for_requeue(
    sig, tmp_path, tiny_model, smollm2_hf_dir, monkeypatch, capsys
):
    """A preemption signal while the model loads: no step runs, nothing is saved, the requeue exit code."""
    import megatron_softgrpo.train.loop as loop

    received = []
    previous = signal.signal(
        sig, lambda signum, frame: received.append(signum)
    )  # stands in for "killed"
    try:
        build_worker = loop.PolicyWorker

        def signalled_while_loading(cfg):
            os.kill(os.getpid(), sig)
            return build_worker(cfg)

        monkeypatch.setattr(loop, "PolicyWorker", signalled_while_loading)
        recipe = write_recipe(tmp_path, tiny_model, smollm2_hf_dir)
        assert main(["train", str(recipe)]) == REQUEUE_EXIT_CODE
        assert received == []  # the trainer's handler took it
        handler_after = signal.getsignal(sig)
    finally:
        signal.signal(sig, previous)
    assert (
        handler_after is not None and handler_after.__name__ == "<lambda>"
    )  # ours again: restored
    assert "stopped by signal at step 0" in capsys.readouterr().out
    assert (
        not (tmp_path / "run" / "ckpt").exists()
        and not (tmp_path / "run" / "metrics.jsonl").exists()
    )


def test_reward_that_needs_reasoning_gym_data_is_refused_before_loading(
    tmp_path, tiny_model, smollm2_hf_dir, monkeypatch, capsys
):
    import megatron_softgrpo.train.policy as policy

    monkeypatch.setattr(policy, "load_model", _no_model_loading)
    data = tmp_path / "train.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n')
    recipe = write_recipe(
        tmp_path,
        tiny_model,
        smollm2_hf_dir,
        data={"validation": {"kind": "json", "path": str(data)}},
    )
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "\n" not in err
        and "env.reward=reasoning_gym" in err
        and "data.validation has kind=json" in err
    )


def test_malformed_data_file_fails_before_the_model_loads(
    tmp_path, tiny_model, smollm2_hf_dir, monkeypatch, capsys
):
    import megatron_softgrpo.train.policy as policy

    monkeypatch.setattr(policy, "load_model", _no_model_loading)
    data = tmp_path / "train.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\n')
    recipe = write_recipe(
        tmp_path,
        tiny_model,
        smollm2_hf_dir,
        env={"reward": "math_verify"},
        data={"train": {"kind": "json", "path": str(data)}},
    )
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "train.jsonl" in err and "line 2" in err
    # the preemption handlers installed at start-up are removed again on failure
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == handlers


def _no_model_loading(*args, **kwargs):
    raise AssertionError("the model was loaded before the configuration error was found")


# ------------------------------------------------------------------ several ranks


def _train_on_ranks(rank, recipe, overrides):
    return main(["train", recipe, *overrides])


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp,steps", [(1, 1, 2), (1, 2, 1)], ids=["dp2", "pp2"])
def test_train_command_on_two_ranks(tp, pp, steps, tmp_path, tiny_model, smollm2_hf_dir):
    recipe = write_recipe(
        tmp_path,
        tiny_model,
        smollm2_hf_dir,
        data=VALIDATION,
        grpo={"max_num_steps": steps, "val_period": 1},
    )
    layout = [
        f"policy.megatron_cfg.tensor_model_parallel_size={tp}",
        f"policy.megatron_cfg.pipeline_model_parallel_size={pp}",
    ]
    assert run_ranks(2, _train_on_ranks, str(recipe), layout) == [0, 0]
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for row in rows:
        assert set(STEP_KEYS) <= set(row), set(STEP_KEYS) - set(row)
        assert {"val/accuracy", "val/answer_rate", "val/response_length"} <= set(row)
        assert 0 <= row["val/accuracy"] <= 1 and row["val/response_length"] > 0
        assert row["optimizer_steps"] == 2 * row["step"]
    assert json.loads((tmp_path / "run" / "final_validation.json").read_text())["num_problems"] == 3


def test_validation_gathers_on_the_model_device_and_prints_samples(monkeypatch, capsys):
    """The data-parallel group is NCCL on GPU: every tensor gathered must be on the model's device
    ("meta" stands in for a GPU here)."""
    from types import SimpleNamespace

    import megatron_softgrpo.train.loop as loop
    from megatron_softgrpo.data.datasets import Problem

    gathered = []

    def fake_gather(x):
        gathered.append(x.device)
        return torch.ones(x.shape)  # every problem correct, answered, length 1

    monkeypatch.setattr(loop, "_gather_dp", fake_gather)
    monkeypatch.setattr(loop, "encode_prompt", lambda tokenizer, problem, *a: [1, 2])
    problems = [Problem(f"p:{i}", f"{i}+1", str(i + 1), {}) for i in range(3)]
    trainer = object.__new__(loop.Trainer)
    trainer.cfg = SimpleNamespace(
        data=SimpleNamespace(prompt_template="{problem}", system_prompt=None),
        env=SimpleNamespace(answer_format="boxed"),
        logger=SimpleNamespace(num_val_samples_to_print=1),
    )
    trainer.val_data = SimpleNamespace(problems=problems)
    trainer.dp, trainer.dp_rank, trainer.step, trainer.tokenizer = 2, 1, 0, None
    trainer.worker = SimpleNamespace(device=torch.device("meta"))
    trainer.engine = SimpleNamespace(
        generate=lambda prompts, g: SimpleNamespace(
            texts=["\\boxed{3}"] * len(prompts), response_lengths=torch.full((len(prompts),), 5)
        )
    )
    trainer.reward = lambda texts, answers, metadata: [1.0] * len(texts)
    assert trainer._validate() == {"accuracy": 1.0, "answer_rate": 1.0, "response_length": 1.0}
    assert gathered == [torch.device("meta")] * 4
    out = capsys.readouterr().out
    assert (
        "validation sample 1: p:2 | answer 3 | reward 1.00" in out and "response: \\boxed{3}" in out
    )
    assert "validation sample 2" not in out


# ------------------------------------------------------------------ progress line and metrics.jsonl


def test_progress_line_reports_a_skipped_optimizer_step():
    line = format_progress(
        3,
        10,
        {"reward/mean": 0.5, "loss": float("nan"), "grad_norm": float("nan"), "time/step": 2.0},
    )
    assert line == "step 3/10 | reward 0.500 | skipped (grad norm nan) | s 2.0"
    assert "skipped (grad norm inf)" in format_progress(1, 1, {"grad_norm": float("inf")})
    assert format_progress(1, 1, {"grad_norm": 0.25, "kl/mean": None}) == "step 1/1 | gnorm 0.250"


def test_metrics_lines_are_strict_json_with_null_for_non_finite_values():
    line = json_line(
        {
            "step": 2,
            "grad_norm": float("nan"),
            "loss": float("-inf"),
            "lr": 1e-4,
            "reward/mean": torch.tensor(0.5),
        }
    )
    assert "\n" not in line and "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {
        "step": 2,
        "grad_norm": None,
        "loss": None,
        "lr": 1e-4,
        "reward/mean": 0.5,
    }


def test_plot_without_out_writes_training_curves_into_the_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {
            "step": s,
            "reward/mean": 0.1 * s,
            "accuracy": 0.2,
            "answer_rate": 0.5,
            "response_length/mean": 7.0,
        }
        for s in (1, 2)
    ]
    rows[1]["grad_norm"] = None  # a skipped step's null
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(run)]) == 0
    assert (run / "training_curves.png").stat().st_size > 0
    assert main(["plot", str(run), str(run)]) == 2
    assert "--out FILE is required with 2 directories" in capsys.readouterr().err
