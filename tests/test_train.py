"""`softgrpo train` end to end on a tiny model: every algorithm, DP=2 and PP=2 on CPU ranks, exact
resume (with validation), preemption (also during start-up), early configuration errors, the
progress line and the strict-JSON metrics writer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest
import torch
from builders import TRAIN_DATA, write_recipe
from distributed_helpers import run_ranks
from tiny_models import make_hf_model

from megatron_softgrpo.cli import main
from megatron_softgrpo.soft import Scorer
from megatron_softgrpo.train.metrics_log import (
    OPTIONAL_KEYS,
    STEP_KEYS,
    ProgressLine,
    format_progress,
    json_line,
)
from megatron_softgrpo.train.plots import held_out_points
from megatron_softgrpo.train.preemption import REQUEUE_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
# measurements of wall time differ from run to run; everything else must be identical on resume
TIMING_KEYS = {"tokens_per_second"} | {k for k in STEP_KEYS if k.startswith("time/")}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_hf_model("llama", path, vocab_size=49152)
    return path


# a small held-out set, disjoint from the training problems (another generator seed)
VALIDATION = {"validation": {**TRAIN_DATA, "size": 3, "seed": 2}}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model tensors of the latest checkpoint, read back through a TP=1 model."""
    from megatron_softgrpo.config.schema import MegatronCfg
    from megatron_softgrpo.distributed import ParallelLayout, destroy_distributed, init_distributed
    from megatron_softgrpo.models.loading import load_model
    from megatron_softgrpo.models.source import resolve_model_source
    from megatron_softgrpo.train.checkpointing import latest_checkpoint

    parallel = init_distributed(ParallelLayout(1, 1))
    source = resolve_model_source(str(latest_checkpoint(run_dir / "ckpt")))
    model, _ = load_model(source, MegatronCfg(), parallel)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    destroy_distributed()
    return weights


def assert_same_runs(straight, resumed) -> tuple[list[dict], list[dict]]:
    """An uninterrupted and a resumed run: one metrics line per step (1-4), equal except timings,
    and bit-identical final weights. Returns both runs' metrics."""
    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in TIMING_KEYS} == {
            k: v for k, v in y.items() if k not in TIMING_KEYS
        }
    wa, wb = final_weights(straight), final_weights(resumed)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    return a, b


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm", ["softgrpo", "grpo", "gaussian", "dirichlet", "embedding_noise", "multiplex"]
)
def test_every_algorithm_trains_and_logs_the_documented_keys(
    algorithm, tmp_path, tiny_model, smollm2_hf_dir
):
    recipe = write_recipe(tmp_path, tiny_model, smollm2_hf_dir, grpo={"max_num_steps": 2})
    args = ["train", str(recipe), f"softgrpo.algorithm={algorithm}", "loss_fn.entropy_coef=0.001"]
    assert main(args) == 0
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
@pytest.mark.parametrize(
    "validation,algorithm",
    [(False, "softgrpo"), (True, "softgrpo"), (False, "multiplex")],
    ids=["plain", "with-validation", "multiplex"],
)
def test_exact_resume_gives_the_same_metrics_and_weights(
    validation, algorithm, tmp_path, tiny_model, smollm2_hf_dir
):
    sections = (
        {"data": VALIDATION, "grpo": {"val_at_start": True, "val_period": 2}} if validation else {}
    )
    sections["softgrpo"] = {"algorithm": algorithm}
    straight = write_recipe(tmp_path / "straight", tiny_model, smollm2_hf_dir, **sections)
    assert main(["train", str(straight)]) == 0
    resumed = write_recipe(tmp_path / "resumed", tiny_model, smollm2_hf_dir, **sections)
    assert main(["train", str(resumed), "grpo.max_num_steps=2"]) == 0
    assert main(["train", str(resumed)]) == 0  # resumes from step 2's checkpoint, runs 3 and 4
    a, b = assert_same_runs(tmp_path / "straight" / "run", tmp_path / "resumed" / "run")
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
    import megatron_softgrpo.train.setup as setup

    received = []
    previous = signal.signal(
        sig, lambda signum, frame: received.append(signum)
    )  # stands in for "killed"
    try:
        build_worker = setup.build_worker

        def signalled_while_loading(cfg, parallel):
            os.kill(os.getpid(), sig)
            return build_worker(cfg, parallel)

        monkeypatch.setattr(setup, "build_worker", signalled_while_loading)
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

    def fake_gather(parallel, x):
        gathered.append(x.device)
        return torch.ones(x.shape)  # every problem correct, answered, length 1

    monkeypatch.setattr(loop, "gather_data_parallel", fake_gather)
    monkeypatch.setattr(loop, "encode_prompt", lambda tokenizer, problem, *a: [1, 2])
    problems = [Problem(f"p:{i}", f"{i}+1", str(i + 1), {}) for i in range(3)]
    trainer = object.__new__(loop.Trainer)
    trainer.cfg = SimpleNamespace(
        data=SimpleNamespace(prompt_template="{problem}", system_prompt=None),
        env=SimpleNamespace(answer_format="boxed"),
        logger=SimpleNamespace(num_val_samples_to_print=1),
        policy=SimpleNamespace(generation=SimpleNamespace(max_new_tokens=5)),
    )
    trainer.val_data = SimpleNamespace(problems=problems)
    trainer.parallel = SimpleNamespace(dp=2, dp_rank=1, main=True)
    trainer.step, trainer.tokenizer = 0, None
    trainer.worker = SimpleNamespace(device=torch.device("meta"))
    trainer.generation = SimpleNamespace(
        generate=lambda blocks, g, progress=None: SimpleNamespace(
            texts=["\\boxed{3}"] * len(blocks[1]),
            response_lengths=torch.full((len(blocks[1]),), 5),
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


# ------------------------------------------------------------------ dynamic sampling and overlong handling


class _RecordingWorker:
    """Stands in for PolicyWorker: records what the loop hands it (the loss is the worker's own)."""

    reference = None
    scorer = Scorer(None)  # one log-density per position

    def __init__(self):
        self.batches, self.logprob_calls = [], 0
        self.optimizer_steps = self.skipped_steps = 0

    def compute_logprobs(self, batch, reference=False):
        self.logprob_calls += 1
        return torch.zeros(batch.loss_mask.shape)

    def train_step(self, batch, loss):
        from megatron_softgrpo.train.policy import TrainStepResult

        self.batches.append(batch)
        self.optimizer_steps += 1
        metrics = {name: float(v) for name, v in loss.zero_metrics("cpu").items()}
        return TrainStepResult({**metrics, "grad_norm": 0.5, "lr": 1e-6}, updated=True)


def _scored_round(index: int, rewards: list[float], width: int, truncated=()):
    """One round's gathered batch: token 0 of row b is 100 * index + b; positions 1.. are scored."""
    from megatron_softgrpo.batch import Batch
    from megatron_softgrpo.soft import MixtureRecord

    b = len(rewards)
    tokens = torch.ones(b, width, dtype=torch.long)
    tokens[:, 0] = 100 * index + torch.arange(b)
    mask = torch.ones(b, width, dtype=torch.bool)
    mask[:, 0] = False
    rewards = torch.tensor(rewards, dtype=torch.float32)
    return Batch(
        records=MixtureRecord.discrete(tokens, 2),
        loss_mask=mask,
        rollout_logp=torch.zeros(b, width),
        response_lengths=torch.full((b,), width - 1),
        think_lengths=torch.zeros(b, dtype=torch.long),
        truncated=torch.tensor([i in truncated for i in range(b)]),
        correct=rewards,
        answered=torch.ones(b, dtype=torch.bool),
        rewards=rewards,
        penalty=torch.zeros(b),
    )


def _trainer_with_rounds(rounds, *, dp=1, items=100, **sections):
    """A Trainer whose rollouts return `rounds` in turn (the real sampler, a recording worker)."""
    from types import SimpleNamespace

    import megatron_softgrpo.train.loop as loop
    from megatron_softgrpo.config.schema import RecipeCfg
    from megatron_softgrpo.data.sampler import PromptSampler

    body = {"policy": {"model_name": "m"}, "loss_fn": {"reference_policy_kl_penalty": 0}}
    for section, values in sections.items():
        body[section] = {**body.get(section, {}), **values}
    trainer = object.__new__(loop.Trainer)
    trainer.cfg = RecipeCfg.model_validate(body)
    trainer.parallel = SimpleNamespace(dp=dp, dp_rank=0, main=True)
    trainer.worker = _RecordingWorker()
    trainer.loss = loop.PolicyLoss(trainer.cfg.loss_fn)
    trainer.sampler = PromptSampler(
        list(range(items)), trainer.cfg.grpo.num_prompts_per_step, seed=0
    )
    trainer.drawn = []
    queue = list(rounds)

    def rollout(problems, times):
        trainer.drawn.append(list(problems))
        return queue.pop(0)

    trainer._rollout = rollout
    # the step's first round as submitted ahead: decoded by `rollout`, with the sampler's epoch
    trainer._ahead = deque([loop.Ahead(None, 0, 0, 0)])
    trainer._graded = lambda problems, local, times, version: local
    trainer.generation = SimpleNamespace(
        collect=lambda: rollout(trainer.sampler.next_batch(), None)
    )
    return trainer


def test_dynamic_sampling_draws_until_the_step_has_enough_informative_groups():
    from megatron_softgrpo.algorithms.advantages import group_advantages

    rounds = [
        _scored_round(0, [1, 1, 1, 1] + [0, 1, 0, 0], width=5),  # group 1 informative
        _scored_round(1, [0, 0, 0, 0] + [1, 1, 1, 1], width=3),  # none
        _scored_round(2, [1, 0, 0, 0] + [0, 1, 1, 0], width=6, truncated={1}),  # both; one needed
    ]
    trainer = _trainer_with_rounds(
        rounds,
        grpo={
            "num_prompts_per_step": 2,
            "num_generations_per_prompt": 4,
            "dynamic_sampling": {"enabled": True, "max_gen_rounds": 3},
        },
        policy={"model_name": "m", "train_global_batch_size": 8},
        loss_fn={"overlong_filtering": True},
    )
    metrics = trainer._rl_step()
    assert metrics["dynamic_sampling/gen_rounds"] == 3
    assert metrics["dynamic_sampling/groups"] == 2 and metrics["dynamic_sampling/short_groups"] == 0
    assert metrics["dynamic_sampling/filtered_fraction"] == 0.5  # 3 of 6 groups had no spread
    # the data position counts every prompt drawn: three batches of two
    assert len(trainer.drawn) == 3 and trainer.sampler.state_dict()["index"] == 6
    # rollout statistics cover all 24 responses; 12 were rewarded
    assert metrics["reward/mean"] == 0.5 and metrics["accuracy"] == 0.5
    # one optimizer step on the two informative groups, in the order they were generated
    (batch,) = trainer.worker.batches
    assert batch.records.tokens[:, 0].tolist() == [4, 5, 6, 7, 200, 201, 202, 203]
    assert batch.seq_len == 6 and not batch.loss_mask[:4, 5].any()  # round 0 right-padded
    # overlong filtering: the truncated response leaves the loss but stays in its group's baseline
    assert not batch.loss_mask[5].any() and batch.loss_mask[4, 1:].all()
    expected = group_advantages(torch.tensor([0.0, 1, 0, 0, 1, 0, 0, 0]), 4)
    expected[5] = 0
    assert torch.equal(batch.advantages[:, 1], expected)
    assert metrics["overlong/filtered_fraction"] == 1 / 8
    assert format_progress(1, 4, metrics).startswith("step 1/4 | groups 2 in 3 rounds | reward")


def test_a_short_step_trains_on_what_there_is_in_whole_micro_batches():
    rounds = [
        _scored_round(0, [0, 0, 0] + [1, 0, 1], width=4),
        _scored_round(1, [1, 1, 1] + [2, 2, 2], width=4),
        _scored_round(2, [0, 1, 0] + [1, 0, 1], width=4),  # never drawn: the cap is 1 extra round
    ]
    trainer = _trainer_with_rounds(
        rounds,
        dp=2,
        grpo={
            "num_prompts_per_step": 2,
            "num_generations_per_prompt": 3,
            "dynamic_sampling": {"enabled": True, "max_gen_rounds": 1},
        },
        policy={"model_name": "m", "train_global_batch_size": 6, "train_micro_batch_size": 2},
    )
    metrics = trainer._rl_step()
    assert (metrics["dynamic_sampling/gen_rounds"], metrics["dynamic_sampling/groups"]) == (2, 1)
    assert metrics["dynamic_sampling/short_groups"] == 1
    assert metrics["dynamic_sampling/filtered_fraction"] == 0.75
    assert trainer.sampler.state_dict()["index"] == 4
    # 3 rows padded with an unscored row to a multiple of DP x micro-batch = 4
    (batch,) = trainer.worker.batches
    assert batch.num_rows == 4 and batch.records.tokens[:3, 0].tolist() == [3, 4, 5]
    assert not batch.loss_mask[3].any() and not batch.records.mix_weights[3].any()
    line = format_progress(1, 4, metrics)
    assert "groups 1 in 2 rounds (1 short of 2: training on what there is)" in line


def test_a_step_without_informative_groups_skips_the_update_and_stops_at_the_epoch_end():
    rounds = [_scored_round(i, [1, 1] + [0, 0], width=3) for i in range(3)]
    trainer = _trainer_with_rounds(
        rounds,
        items=4,  # two batches: the epoch ends before the cap of 5 extra rounds
        grpo={
            "num_prompts_per_step": 2,
            "num_generations_per_prompt": 2,
            "dynamic_sampling": {"enabled": True, "max_gen_rounds": 5},
        },
        policy={"model_name": "m", "train_global_batch_size": 4},
    )
    metrics = trainer._rl_step()
    assert metrics["dynamic_sampling/gen_rounds"] == 2 and trainer.sampler.epoch == 1
    assert metrics["dynamic_sampling/groups"] == 0 and metrics["dynamic_sampling/short_groups"] == 2
    assert metrics["dynamic_sampling/filtered_fraction"] == 1.0
    assert trainer.worker.batches == [] and trainer.worker.logprob_calls == 0
    assert "loss" not in metrics and "lr" not in metrics and metrics["optimizer_steps"] == 0
    assert "groups 0 in 2 rounds (2 short of 2" in format_progress(1, 1, metrics)


def test_without_dynamic_sampling_every_group_is_trained():
    trainer = _trainer_with_rounds(
        [_scored_round(0, [1, 1] + [0, 1], width=3)],
        grpo={"num_prompts_per_step": 2, "num_generations_per_prompt": 2},
        policy={"model_name": "m", "train_global_batch_size": 4},
    )
    metrics = trainer._rl_step()
    (batch,) = trainer.worker.batches
    assert batch.num_rows == 4 and batch.loss_mask[:, 1:].all()  # no overlong filtering either
    assert not any(k.startswith(("dynamic_sampling/", "overlong/")) for k in metrics)
    assert format_progress(1, 1, metrics).startswith("step 1/1 | reward")


def _spread_reward(texts, answers, metadata=None):
    """A deterministic reward that leaves some groups without spread: every response to a problem
    with an even answer scores 0, the others score the parity of their text's character sum."""
    return [0.0 if int(a) % 2 == 0 else float(sum(map(ord, t)) % 2) for t, a in zip(texts, answers)]


DYNAMIC_SAMPLING = {"enabled": True, "max_gen_rounds": 2}
# a stop string the tiny model's random text often writes: some responses end before the limit
STOP_EARLY = {"generation": {"max_new_tokens": 8, "stop_strings": ["e"]}}


@pytest.mark.slow
def test_dynamic_sampling_resumes_exactly_and_counts_every_prompt_drawn(
    tmp_path, tiny_model, smollm2_hf_dir, monkeypatch
):
    import megatron_softgrpo.train.setup as setup
    from megatron_softgrpo.models.checkpoint import read_meta

    monkeypatch.setattr(setup, "get_reward", lambda *args, **kwargs: _spread_reward)
    sections = {
        "policy": STOP_EARLY,
        "grpo": {"dynamic_sampling": DYNAMIC_SAMPLING},
        "env": {"overlong_penalty": {"buffer": 4, "factor": 0.5}},
    }
    straight = write_recipe(tmp_path / "straight", tiny_model, smollm2_hf_dir, **sections)
    assert main(["train", str(straight)]) == 0
    resumed = write_recipe(tmp_path / "resumed", tiny_model, smollm2_hf_dir, **sections)
    assert main(["train", str(resumed), "grpo.max_num_steps=2"]) == 0
    # the data position saved at step 2 counts every prompt drawn, in every round
    first = metrics(tmp_path / "resumed" / "run")
    saved = read_meta(tmp_path / "resumed" / "run" / "ckpt" / "step_0000002").extra["loop"]
    assert saved["data"]["index"] == 2 * sum(r["dynamic_sampling/gen_rounds"] for r in first)
    assert main(["train", str(resumed)]) == 0
    a, b = assert_same_runs(tmp_path / "straight" / "run", tmp_path / "resumed" / "run")
    # the run exercised extra rounds, and both features reported
    assert any(r["dynamic_sampling/gen_rounds"] > 1 for r in a)
    documented = OPTIONAL_KEYS["grpo.dynamic_sampling"] + OPTIONAL_KEYS["env.overlong_penalty"]
    for row in a:
        assert set(documented) <= set(row)
        assert row["dynamic_sampling/groups"] + row["dynamic_sampling/short_groups"] == 2
        assert 0 <= row["dynamic_sampling/filtered_fraction"] <= 1
        assert -0.5 <= row["overlong/penalty_mean"] <= 0


def _train_with_spread_reward(rank, recipe, overrides):
    import megatron_softgrpo.train.setup as setup

    setup.get_reward = lambda *args, **kwargs: _spread_reward
    return main(["train", recipe, *overrides])


@pytest.mark.slow
@pytest.mark.multiproc
def test_dynamic_sampling_on_two_data_parallel_ranks(tmp_path, tiny_model, smollm2_hf_dir):
    """Each rank decodes whole groups; the ranks keep the same groups, run the same rounds and the
    same optimizer steps (a disagreement would hang a collective)."""
    recipe = write_recipe(
        tmp_path,
        tiny_model,
        smollm2_hf_dir,
        policy=STOP_EARLY,
        grpo={"max_num_steps": 2, "dynamic_sampling": DYNAMIC_SAMPLING},
        loss_fn={"overlong_filtering": True},
    )
    assert run_ranks(2, _train_with_spread_reward, str(recipe), []) == [0, 0]
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    steps = 0
    for row in rows:
        assert set(OPTIONAL_KEYS["loss_fn.overlong_filtering"]) <= set(row)
        assert row["dynamic_sampling/groups"] + row["dynamic_sampling/short_groups"] == 2
        assert 0 <= row["overlong/filtered_fraction"] <= 1
        steps += row["dynamic_sampling/groups"]  # 4 responses per group = 1 optimizer step
        assert row["optimizer_steps"] == steps


def test_rollout_rewards_include_the_soft_overlong_penalty(monkeypatch):
    from types import SimpleNamespace

    import megatron_softgrpo.train.loop as loop
    from megatron_softgrpo.batch import Batch
    from megatron_softgrpo.config.schema import RecipeCfg
    from megatron_softgrpo.data.datasets import Problem
    from megatron_softgrpo.soft import MixtureRecord
    from megatron_softgrpo.train.metrics_log import Timings

    monkeypatch.setattr(loop, "encode_prompt", lambda tokenizer, problem, *a: [1, 2])
    trainer = object.__new__(loop.Trainer)
    trainer.cfg = RecipeCfg.model_validate(
        {
            "policy": {"model_name": "m", "generation": {"max_new_tokens": 8}},
            "env": {"overlong_penalty": {"buffer": 4, "factor": 0.5}},
            "grpo": {"num_generations_per_prompt": 4},
        }
    )
    trainer.parallel = SimpleNamespace(dp=1, dp_rank=0, main=True)
    trainer.tokenizer = None
    lengths = torch.tensor([2, 5, 7, 8])
    trainer.generation = SimpleNamespace(
        generate=lambda blocks, g: Batch(
            records=MixtureRecord.discrete(torch.ones(4, 10, dtype=torch.long), 2),
            loss_mask=torch.zeros(4, 10, dtype=torch.bool),
            rollout_logp=torch.zeros(4, 10),
            response_lengths=lengths,
            think_lengths=torch.zeros(4, dtype=torch.long),
            finish_reasons=["eos", "eos", "stop", "length"],
            truncated=torch.tensor([False, False, False, True]),
            texts=["\\boxed{1}"] * 4,
        )
    )
    trainer.worker = SimpleNamespace(optimizer_steps=3)
    trainer.reward = lambda texts, answers, metadata: [1.0] * len(texts)
    scored = trainer._rollout([Problem("p", "0+1", "1", {})], Timings())
    # no penalty up to Lmax - buffer = 4 tokens, then -(L - 4) / 4, times 0.5
    assert scored.penalty.tolist() == [0.0, -0.125, -0.375, -0.5]
    assert scored.rewards.tolist() == [1.0, 0.875, 0.625, 0.5]
    assert scored.truncated.tolist() == [False, False, False, True]
    assert scored.policy_version == 3  # tagged with the policy that decoded it


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
    rows[0]["val_at_start/accuracy"], rows[1]["val/accuracy"] = 0.3, 0.4
    assert held_out_points(rows) == [(0, 0.3), (2, 0.4)]  # drawn dashed on the accuracy panel
    final = {"step": 3, "num_problems": 8, "at_start": None, "final": {"accuracy": 0.5}}
    assert held_out_points(rows, final)[-1] == (3, 0.5)  # final_validation.json's
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(run)]) == 0
    assert (run / "training_curves.png").stat().st_size > 0
    assert main(["plot", str(run), str(run)]) == 2
    assert "--out FILE is required with 2 directories" in capsys.readouterr().err


def test_validation_progress_line_bounds_the_time_left_and_is_rate_limited(capsys):
    line = ProgressLine("validation", 128, 32, enabled=True, every_s=10.0)
    # steps 2-9 (8 steps: the clock starts after step 1, the prefill's) in 20 s: 23 more at 2.5 s
    assert (
        line.line(40, 9, 20.0)
        == "[softgrpo] validation: 40/128 problems, step 9/32, at most 0:58 left"
    )
    line(0, 1)  # step 1 only starts the clock
    line(40, 8)  # within every_s of the start: silent
    assert capsys.readouterr().out == ""
    line.last -= 11
    line(41, 9)
    assert capsys.readouterr().out.startswith("[softgrpo] validation: 41/128 problems, step 9/32")
    quiet = ProgressLine("validation", 128, 32, enabled=False, every_s=0.0)
    quiet(1, 1)  # not the main rank
    assert capsys.readouterr().out == ""


def test_a_step_reports_the_min_and_max_over_its_updates_and_means_the_rest():
    """With several optimizer steps per RL step, `is_weight/min` is the smallest of any update
    (not the mean of their minima); an update without positions to take it over is skipped."""
    import megatron_softgrpo.train.loop as loop

    assert loop._combined("is_weight/min", [0.5, None, 0.2]) == 0.2
    assert loop._combined("is_weight/soft/max", [1.5, 3.0]) == 3.0
    assert loop._combined("is_weight/max", [None, None]) is None
    assert loop._combined("loss/policy", [1.0, 2.0, 6.0]) == 3.0
