"""`softgrpo train` end to end on a tiny model: every algorithm, exact resume, preemption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import make_hf_model

from megatron_softgrpo.cli import main
from megatron_softgrpo.train.metrics_log import STEP_KEYS
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
            "model_name": str(model), "tokenizer": {"name": str(tokenizer)}, "precision": "float32",
            "train_global_batch_size": 4, "train_micro_batch_size": 2, "logprob_batch_size": 2,
            "max_total_sequence_length": 256, "generation": {"max_new_tokens": 8},
            "megatron_cfg": {"optimizer": {"lr": 1e-4}},
        },
        "grpo": {"num_prompts_per_step": 2, "num_generations_per_prompt": 4, "max_num_steps": 4, "seed": 3},
        "loss_fn": {"reference_policy_kl_penalty": 0.01},
        "data": {
            "max_input_seq_length": 128,
            "train": {"kind": "reasoning_gym", "task": "basic_arithmetic", "size": 40, "seed": 1,
                      "task_config": {"min_terms": 2, "max_terms": 2, "max_digits": 1}},
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
    model, _ = load_model(resolve_model_source(str(latest_checkpoint(run_dir / "ckpt"))), MegatronCfg())
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    destroy_distributed()
    return weights


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["softgrpo", "grpo", "gaussian", "dirichlet", "embedding_noise"])
def test_every_algorithm_trains_and_logs_the_documented_keys(algorithm, tmp_path, tiny_model, smollm2_hf_dir):
    recipe = write_recipe(tmp_path, tiny_model, smollm2_hf_dir, grpo={"max_num_steps": 2})
    assert main(["train", str(recipe), f"softgrpo.algorithm={algorithm}", "loss_fn.entropy_coef=0.001"]) == 0
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
def test_grpo_and_softgrpo_share_data_and_differ_in_the_thinking_phase(tmp_path, tiny_model, smollm2_hf_dir):
    runs = {}
    for algorithm in ("softgrpo", "grpo"):
        recipe = write_recipe(tmp_path / algorithm, tiny_model, smollm2_hf_dir, grpo={"max_num_steps": 1})
        assert main(["train", str(recipe), f"softgrpo.algorithm={algorithm}"]) == 0
        runs[algorithm] = metrics(tmp_path / algorithm / "run")[0]
    soft, grpo = runs["softgrpo"], runs["grpo"]
    assert set(soft) == set(grpo)  # one metrics schema for every algorithm
    assert soft["epoch"] == grpo["epoch"] and soft["optimizer_steps"] == grpo["optimizer_steps"]
    assert soft["soft_fraction"] > 0 and grpo["soft_fraction"] == 0
    assert soft["think_length/mean"] > 0 and grpo["think_length/mean"] == 0


@pytest.mark.slow
def test_exact_resume_gives_the_same_metrics_and_weights(tmp_path, tiny_model, smollm2_hf_dir):
    straight = write_recipe(tmp_path / "straight", tiny_model, smollm2_hf_dir)
    assert main(["train", str(straight)]) == 0
    resumed = write_recipe(tmp_path / "resumed", tiny_model, smollm2_hf_dir)
    assert main(["train", str(resumed), "grpo.max_num_steps=2"]) == 0
    assert main(["train", str(resumed)]) == 0  # resumes from step 2's checkpoint, runs 3 and 4
    a, b = metrics(tmp_path / "straight" / "run"), metrics(tmp_path / "resumed" / "run")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in TIMING_KEYS} == {k: v for k, v in y.items() if k not in TIMING_KEYS}
    wa, wb = final_weights(tmp_path / "straight" / "run"), final_weights(tmp_path / "resumed" / "run")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert a[-1]["reward/mean"] == b[-1]["reward/mean"]


@pytest.mark.slow
def test_sigterm_checkpoints_exits_for_requeue_and_resumes(tmp_path, tiny_model, smollm2_hf_dir):
    recipe = write_recipe(tmp_path, tiny_model, smollm2_hf_dir, grpo={"max_num_steps": 50},
                          checkpointing={"save_period": 100})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "megatron_softgrpo", "train", str(recipe)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
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
    done = subprocess.run(cmd + ["grpo.max_num_steps=" + str(step + 1)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {ckpt / saved}" in done.stdout
    assert [r["step"] for r in metrics(tmp_path / "run")] == list(range(1, step + 2))


def test_training_refuses_a_sampler_that_contradicts_the_algorithm(tmp_path, tiny_model, smollm2_hf_dir, capsys):
    recipe = write_recipe(tmp_path, tiny_model, smollm2_hf_dir)
    assert main(["train", str(recipe), "softgrpo.sampler=discrete"]) == 2
    err = capsys.readouterr().err
    assert "softgrpo.sampler=discrete" in err and "set null" in err
