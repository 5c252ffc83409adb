"""Dedicated generation ranks (policy.generation.colocated.enabled: false): a synchronous run
writes the colocated run's metrics; an asynchronous one (bounds 1 and 2) resumes exactly with
requests in flight; requests and refits queue on a busy generation rank; a dead or silent
generation rank ends the run with one line; `check`'s rules."""

from __future__ import annotations

import json

import pytest
import torch
from builders import ROOT, TRAIN_DATA, write_recipe
from distributed_helpers import run_ranks
from tiny_models import make_hf_model

from megatron_softgrpo.cli import main
from megatron_softgrpo.train.metrics_log import OPTIONAL_KEYS, STEP_KEYS

DEDICATED = [
    "policy.generation.colocated.enabled=false",
    "policy.generation.colocated.resources.gpus_per_node=1",
]
VALIDATION = {"validation": {**TRAIN_DATA, "size": 3, "seed": 2}}
# wall times differ from run to run; everything else must be equal
TIMING_KEYS = {"tokens_per_second", *(k for k in STEP_KEYS if k.startswith("time/"))}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2")
    make_hf_model("qwen2", path, vocab_size=49152)
    return path


def _train(rank, recipe, overrides):
    return main(["train", recipe, *overrides])


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize(
    "trainers,training",
    [(2, []), (2, ["policy.megatron_cfg.pipeline_model_parallel_size=2"])],
    ids=["dp2", "pp2"],  # each DP=2 block is the one-training-rank case, with its own stream
)
def test_dedicated_generation_at_age_0_writes_the_colocated_runs_metrics(
    trainers, training, tmp_path, tiny_model, smollm2_hf_dir
):
    """One generation rank decodes for 2 training ranks (DP=2: both blocks, each with its
    rank's noise stream; PP=2: weights from both stages). Every metric but the wall times equals
    the colocated run's exactly: same kernels, same thread count (one), and weights refit bit
    for bit, so no value may differ even in rounding."""
    runs = {}
    for name, ranks, extra in [("colocated", trainers, []), ("dedicated", trainers + 1, DEDICATED)]:
        recipe = write_recipe(
            tmp_path / name,
            tiny_model,
            smollm2_hf_dir,
            data=VALIDATION,
            grpo={"max_num_steps": 2, "val_period": 2, "val_at_start": True},
        )
        assert run_ranks(ranks, _train, str(recipe), [*training, *extra]) == [0] * ranks
        runs[name] = _metrics(tmp_path / name / "run")
    colocated, dedicated = runs["colocated"], runs["dedicated"]
    refit = set(OPTIONAL_KEYS["policy.generation.colocated.enabled"])
    assert [r["step"] for r in dedicated] == [1, 2]
    for a, b in zip(colocated, dedicated, strict=True):
        assert refit <= set(b) and not refit & set(a)
        assert {k: v for k, v in a.items() if k not in TIMING_KEYS} == {
            k: v for k, v in b.items() if k not in TIMING_KEYS | refit
        }
    # a refit whenever the policy changed before a decode: the first validation's (as loaded),
    # then step 2's rollout and validation
    sent = [r["refit/bytes"] for r in dedicated]
    assert sent[0] > 0 and sent[1] == 2 * sent[0]


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_generation_replicas_split_one_training_block_in_order(
    tmp_path, tiny_model, smollm2_hf_dir
):
    """One training rank, two generation ranks: each decodes one of the block's two prompts.
    Greedy decoding does not depend on the noise streams, so the rows, rewards and lengths are
    the colocated run's; the floats agree to rounding (the parts decode as smaller batches)."""
    greedy = ["softgrpo.algorithm=grpo", "policy.generation.top_k=1"]
    runs = {}
    for name, ranks, extra in [("colocated", 1, []), ("split", 3, DEDICATED_2)]:
        recipe = write_recipe(
            tmp_path / name, tiny_model, smollm2_hf_dir, grpo={"max_num_steps": 2}
        )
        assert run_ranks(ranks, _train, str(recipe), [*greedy, *extra]) == [0] * ranks
        runs[name] = _metrics(tmp_path / name / "run")
    refit = set(OPTIONAL_KEYS["policy.generation.colocated.enabled"])
    for a, b in zip(runs["colocated"], runs["split"], strict=True):
        assert set(a) == set(b) - refit
        for key in set(a) - TIMING_KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


DEDICATED_2 = [DEDICATED[0], "policy.generation.colocated.resources.gpus_per_node=2"]


ASYNC = [
    *DEDICATED,
    "grpo.async_grpo.enabled=true",
    "loss_fn.use_importance_sampling_correction=true",
]


def _train_preempted_after_step_2(rank, recipe, overrides):
    """`softgrpo train`, with a SIGTERM noticed after step 2 (the next request is in flight)."""
    import signal

    from megatron_softgrpo.train.loop import Trainer

    rl_step = Trainer._rl_step

    def step_then_signal(self, times=None):
        metrics = rl_step(self, times)
        if self.step == 1:  # step 2 ran (the loop counts it after this returns)
            self.watcher.received = signal.SIGTERM
        return metrics

    Trainer._rl_step = step_then_signal
    return main(["train", recipe, *overrides])


def _data_position(run) -> dict:
    latest = (run / "ckpt" / "latest").read_text().strip()
    meta = json.loads((run / "ckpt" / latest / "softgrpo_checkpoint.json").read_text())
    return meta["extra"]["loop"]["data"]


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("bound", [1, 2])
def test_async_generation_resumes_exactly_with_requests_in_flight(
    bound, tmp_path, tiny_model, smollm2_hf_dir
):
    """Step n's rows were decoded by the policy of step n - `bound` (the first steps': as
    loaded) while the trainer trained the steps between; at bound 2 two requests and a refit
    wait on the generation rank. Stopped with the next `bound` steps' rows in flight (bound 1:
    SIGTERM after step 2; bound 2: SIGKILL of both processes after step 3, back to step 2's
    checkpoint) and resumed, the run writes the uninterrupted run's metrics and draws no prompt
    twice or never."""
    runs, overrides = {}, [*ASYNC, f"grpo.async_grpo.max_trajectory_age_steps={bound}"]
    for name in ("straight", "resumed"):
        recipe = str(write_recipe(tmp_path / name, tiny_model, smollm2_hf_dir, data=VALIDATION))
        if name == "resumed" and bound == 1:
            assert run_ranks(2, _train_preempted_after_step_2, recipe, overrides) == [75, 0]
        elif name == "resumed":
            _killed_after_step_3(recipe, overrides)
            assert [r["step"] for r in _metrics(tmp_path / name / "run")] == [1, 2, 3]
        if name == "resumed":
            # the rows decoded ahead cannot be resumed without the generation ranks
            assert run_ranks(1, _train, recipe, []) == [2]
        assert run_ranks(2, _train, recipe, overrides) == [0, 0]
        runs[name] = _metrics(tmp_path / name / "run")
    straight, resumed = runs["straight"], runs["resumed"]
    ages = [min(step, bound) for step in range(4)]
    assert [r["async/trajectory_age_max"] for r in straight] == ages
    assert [r["async/trajectory_age_mean"] for r in straight] == ages
    # rows of an older policy: their recorded densities differ from the trained policy's by far
    # more than the engine and the trainer disagree on the same weights (<= 1e-5, step 1's case)
    mismatch = [r["rollout_logp_mismatch"] for r in straight]
    assert mismatch[0] < 1e-5 < min(mismatch[1:])
    unequal = (
        TIMING_KEYS
        | set(OPTIONAL_KEYS["policy.generation.colocated.enabled"])
        | {"async/training_idle_fraction"}
    )
    for a, b in zip(straight, resumed, strict=True):
        assert {k: v for k, v in a.items() if k not in unequal} == {
            k: v for k, v in b.items() if k not in unequal
        }
    # 4 steps of 2 prompts: every prompt drawn once, none ahead of the last step
    position = _data_position(tmp_path / "straight" / "run")
    assert position == _data_position(tmp_path / "resumed" / "run") and position["index"] == 8


GPU_RECIPE = ROOT / "recipes" / "softgrpo-r1-distill-qwen-1.5b-1n8g.yaml"  # 12 heads, 2 KV heads


def _check(capsys, *overrides) -> tuple[int, str]:
    code = main(["check", str(GPU_RECIPE), *overrides])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["policy.generation.colocated.enabled=false"],
            "policy.generation.colocated.resources.gpus_per_node=null (the default): required when",
        ),
        (
            ["policy.generation.tensor_model_parallel_size=2"],
            "policy.generation.tensor_model_parallel_size=2: only for dedicated generation ranks",
        ),
        (
            [*DEDICATED[:1], "policy.generation.colocated.resources.gpus_per_node=8"],
            "8 generation ranks leave none of the job's 8 processes to train",
        ),
        (
            [*DEDICATED, "policy.generation.tensor_model_parallel_size=4"],
            "policy.generation.tensor_model_parallel_size=4: must divide the model's 2 key/value heads",
        ),
        (
            [*DEDICATED[:1], "policy.generation.colocated.resources.gpus_per_node=3"],
            "base.yaml: grpo.num_prompts_per_step=64: must be divisible by the 5 data-parallel ranks",
        ),
        (
            ["grpo.async_grpo.enabled=true", "loss_fn.use_importance_sampling_correction=true"],
            "grpo.async_grpo.enabled=true: needs dedicated generation ranks",
        ),
        (
            [*DEDICATED, "grpo.async_grpo.enabled=true"],
            "grpo.async_grpo.enabled=true: needs loss_fn.use_importance_sampling_correction: true",
        ),
        (
            [*DEDICATED[:1], "policy.generation.colocated.resources.gpus_per_node=5"],
            "5 generation replicas (ranks / TP 1) for 3 training data-parallel ranks: expected at "
            "most as many, or a multiple",
        ),
    ],
    ids=[
        "no-resources",
        "tp-colocated",
        "no-training-rank",
        "tp-heads",
        "training-dp",
        "async-colocated",
        "async-uncorrected",
        "uneven-replicas",
    ],
)
def test_check_refuses_a_generation_split_the_job_cannot_hold(capsys, overrides, expected):
    code, err = _check(capsys, *overrides)
    assert code == 2 and expected in err and "\n" not in err


def test_only_training_splits_off_the_generation_ranks():
    """`softgrpo eval` of a recipe whose training would leave no rank to train runs on them all."""
    from megatron_softgrpo.config.checks import validate
    from megatron_softgrpo.config.loader import load_recipe
    from megatron_softgrpo.errors import UserError

    every_gpu = [*DEDICATED[:1], "policy.generation.colocated.resources.gpus_per_node=8"]
    loaded = load_recipe(GPU_RECIPE, every_gpu)
    assert validate(loaded, 8, training=False).num_layers == 28
    with pytest.raises(UserError, match="leave none of the job's 8 processes to train"):
        validate(loaded, 8, training=True)


def test_check_accepts_half_the_gpus_generating_at_their_own_tp(capsys):
    split = [
        *ASYNC,
        "policy.generation.colocated.resources.gpus_per_node=4",
        "policy.generation.tensor_model_parallel_size=2",
    ]
    assert _check(capsys, *split)[0] == 0


def _bridge_of_two(rank: int, name: str, timeout_s: float):
    """A bridge between two processes on a store of their own (no default world needed)."""
    import os

    from megatron_softgrpo.bridge import Bridge

    port = int(os.environ["MASTER_PORT"])
    store = torch.distributed.TCPStore("127.0.0.1", port, 2, is_master=rank == 0)
    return Bridge(store, name, [0, 1], rank, timeout_s)


def _queued(rank, release):
    """Rank 0: a trainer's `Dedicated` with a one-weight model, which submits three requests,
    stepping the weights to 0, 1, 2 before each; it releases the decoding only once all three
    were sent. Rank 1: a `GenerationServer` whose decode waits for the release and returns the
    weight it ends with."""
    import os
    import time
    from types import SimpleNamespace as NS

    from megatron_softgrpo.bridge import Bridge
    from megatron_softgrpo.distributed import Bridges
    from megatron_softgrpo.soft.rng import seed_noise_rng
    from megatron_softgrpo.train.generation import Dedicated, GenerationServer

    seed_noise_rng(0)
    store = torch.distributed.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), 2, rank == 0)
    bridges = Bridges(
        *(Bridge(store, name, members, rank, 60) for name, members in BRIDGES), stages=1
    )
    model = torch.nn.Linear(1, 1, bias=False).requires_grad_(False)
    model.pg_collection = NS(tp=NS(rank=lambda: 0, size=lambda: 1))
    one = NS(world_size=1)
    parallel = NS(main=True, replica_lead=True, last_stage=True, launch=one, groups=NS(tp=None))
    parallel.__dict__.update(dp=1, dp_rank=0, pp_rank=0, bridges=bridges)
    if rank == 1:

        def generate(prompts, num_generations, progress):
            deadline = time.monotonic() + 60
            while not release.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError("the trainer waited for a decode before it sent")
                time.sleep(0.05)
            return model.weight.clone()

        engine = NS(model=model, generate=generate, joined=lambda parts: parts[0])
        engine.settings = NS(max_new_tokens=1)
        return GenerationServer(engine, parallel).run(), _threads()
    worker = NS(optimizer_steps=0, model=model, device="cpu")
    dedicated = Dedicated(worker, parallel)
    for version in range(3):
        worker.optimizer_steps = version
        model.weight.fill_(version)
        dedicated.submit([[[version]]], 1)
    release.touch()
    decoded = [dedicated.collect().item() for _ in range(3)]
    dedicated.close()
    return decoded, _threads()


def _threads() -> list[str]:
    """Threads left besides the main one: a thread still ending as the process exits aborts it."""
    import threading

    return [t.name for t in threading.enumerate() if t is not threading.main_thread()]


BRIDGES = [("control", [0, 1]), ("results", [1, 0]), ("refit", [0, 1])]


@pytest.mark.multiproc
def test_requests_and_refits_queue_on_a_busy_generation_rank_and_load_in_order(tmp_path):
    """The trainer sends three requests, each after a refit, while the generation rank is still
    decoding the first (its decode waits until all were sent); each request is decoded with the
    weights of the refit before it, not with the newest one received. Both sides' threads have
    ended when the trainer closes and the server returns."""
    (decoded, left_training), (served, left_generation) = run_ranks(2, _queued, tmp_path / "r")
    assert decoded == [0.0, 1.0, 2.0] and served == 0
    assert left_training == left_generation == []


@pytest.mark.parametrize(
    "sizes,replicas",
    [([3, 2], 1), ([3, 2], 2), ([3, 0, 2], 2), ([3, 2], 4), ([5], 4), ([1, 4], 6)],
)
def test_replicas_share_the_blocks_whole_or_in_ordered_parts(sizes, replicas):
    """Every prompt goes to one replica; joined in (block, part) order each block is itself; with
    more replicas than blocks each replica holds one part of one block."""
    from megatron_softgrpo.train.generation import replica_parts

    blocks = [[[b, p] for p in range(n)] for b, n in enumerate(sizes)]
    held = {r: list(replica_parts(blocks, replicas, r)) for r in range(replicas)}
    parts = sorted((i, j, tuple(map(tuple, prompts))) for r in held for i, j, _, prompts in held[r])
    for b, block in enumerate(blocks):
        assert [list(p) for i, _, ps in parts if i == b for p in ps] == block
    if replicas > len(blocks):
        assert all(len(h) == 1 for h in held.values()) and len(parts) == replicas
        assert {k for h in held.values() for _, _, k, _ in h} == {replicas // len(blocks)}


def test_a_block_split_into_parts_draws_their_seeds_from_its_stream():
    """Every replica holding a part of a block draws the same seeds and leaves the block's
    stream in the same state; the parts' streams differ from each other and from the block's."""
    from megatron_softgrpo.soft import (
        noise_rng,
        noise_state,
        seed_noise_rng,
        set_noise_state,
        split_noise,
    )

    seed_noise_rng(11)
    block = noise_state()
    seeds, after = [], []
    for _ in range(2):  # two replicas
        set_noise_state(block)
        seeds.append(split_noise(3, "cpu"))
        after.append(noise_state())
    assert seeds[0] == seeds[1] and len(set(seeds[0])) == 3
    assert torch.equal(after[0], after[1]) and not torch.equal(after[0], block)

    def first_draw():
        with noise_rng():
            return torch.rand(8)

    set_noise_state(block)
    draws = [first_draw()]
    for seed in seeds[0]:
        seed_noise_rng(seed)
        draws.append(first_draw())
    assert all(not torch.equal(a, b) for n, a in enumerate(draws) for b in draws[n + 1 :])


def test_a_blocks_parts_come_back_joined_in_order(monkeypatch):
    """Two replicas decode a block's two parts; the first replica joins them in part order,
    whatever order they were gathered in (here the second replica's first), and returns the
    block's advanced noise state, which both replicas agree on."""
    from types import SimpleNamespace as NS

    from megatron_softgrpo.soft import noise_state, seed_noise_rng
    from megatron_softgrpo.train import generation

    seed_noise_rng(5)
    gathered, sent = [], []

    def gather(parallel, items):
        gathered.extend(items)
        return list(gathered) if parallel.main else []

    monkeypatch.setattr(generation, "gather_to_main", gather)
    engine = NS(device="cpu", settings=NS(max_new_tokens=1), joined=torch.cat)
    engine.generate = lambda prompts, num_generations, progress: torch.tensor(prompts)
    blocks, state = [[[1], [2], [3]]], noise_state()
    for replica in (1, 0):
        parallel = NS(dp=2, dp_rank=replica, main=replica == 0, replica_lead=True)
        parallel.bridges = NS(results=NS(send_object=lambda obj, dst: sent.append(obj)))
        generation.GenerationServer(engine, parallel)._generate(1, blocks, {0: state}, None, 0.0)
    ((results, states, _),) = sent
    assert results[0].tolist() == [[1], [2], [3]]
    assert [i for i, *_ in gathered] == [0, 0] and torch.equal(gathered[0][3], states[0])
    assert torch.equal(gathered[1][3], states[0]) and not torch.equal(states[0], state)


def _rank_left_or_waiting(rank):
    import time

    from megatron_softgrpo.errors import PeerLost

    bridge = _bridge_of_two(rank, "control", timeout_s=600)
    if rank == 1:
        return None  # exits: its connections close
    start = time.monotonic()
    try:
        bridge.recv_object(1)
    except PeerLost as e:
        return str(e), time.monotonic() - start
    return "received", 0.0


@pytest.mark.multiproc
def test_a_peer_that_dies_is_named_in_one_line_long_before_the_timeout():
    (message, waited), _ = run_ranks(2, _rank_left_or_waiting)
    assert message.startswith("control bridge: global rank 1 died or did not answer within 600 s")
    assert "\n" not in message and "pair.cc" not in message and waited < 60


def _rank_silent_or_waiting(rank):
    import time

    from megatron_softgrpo.errors import PeerLost

    bridge = _bridge_of_two(rank, "refit", timeout_s=2)
    if rank == 1:
        time.sleep(8)  # alive, never answering
        return None
    try:
        bridge.broadcast(torch.zeros(3), src=1)
    except PeerLost as e:
        return str(e)
    return "received"


@pytest.mark.multiproc
def test_a_peer_that_stops_answering_fails_the_wait_at_the_timeout():
    message, _ = run_ranks(2, _rank_silent_or_waiting)
    assert message.startswith("refit bridge: global rank 1 died or did not answer within 2 s")


def _two_processes(recipe, overrides):
    """`softgrpo train` as two processes started as torchrun would, without its agent (which
    would stop the others itself): the trainer and the generation rank."""
    import os
    import subprocess
    import sys

    from distributed_helpers import _free_port

    port, procs = str(_free_port()), []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "megatron_softgrpo", "train", str(recipe), *overrides]
        procs.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return procs


def _killed_after_step_3(recipe, overrides) -> None:
    """Both processes SIGKILLed once the trainer reports step 3 (step 2's checkpoint holds the
    requests then in flight), as when a node is lost."""
    import signal

    trainer, generator = _two_processes(recipe, overrides)
    for line in trainer.stdout:
        if line.startswith("step 3/"):
            break
    for proc in (trainer, generator):
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["generation", "trainer"])
def test_killing_either_process_mid_run_ends_the_other_with_one_line(
    victim, tmp_path, tiny_model, smollm2_hf_dir
):
    """Two processes started as torchrun would, without its agent (which would stop the other
    itself): one is killed after step 1; the other's next wait on it fails at once, naming it,
    and it exits 1 (the generation rank's reader thread hands the error to its main thread), with
    the completed step's line kept."""
    import signal
    import time

    trainer, generator = _two_processes(
        write_recipe(tmp_path, tiny_model, smollm2_hf_dir), DEDICATED
    )
    killed, survivor = (generator, trainer) if victim == "generation" else (trainer, generator)
    seen = []
    for line in trainer.stdout:
        seen.append(line)
        if line.startswith("step 1/"):
            killed.send_signal(signal.SIGKILL)
            break
    start = time.monotonic()
    rest = survivor.communicate(timeout=120)[0]
    killed.wait()
    errors = [line for line in rest.splitlines() if "error" in line]
    assert survivor.returncode == 1, "".join(seen) + rest
    assert time.monotonic() - start < 60
    assert errors and errors[-1].startswith("softgrpo train: error: ")
    dead = 1 if victim == "generation" else 0
    assert f"bridge: global rank {dead} died or did not answer" in errors[-1]
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1]
