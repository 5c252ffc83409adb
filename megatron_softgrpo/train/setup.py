"""`softgrpo train`: the parts of a training run built before its first step, then the loop.

Order matters for the user: the data is read first (a bad data file fails in seconds, before
the minutes of model loading), and the preemption watcher is installed before anything, so a
signal during start-up still ends in a requeue. With dedicated generation ranks
(policy.generation.colocated.enabled: false) those ranks build only their model and engine and
serve the trainer (`train/generation.py`).
"""

from __future__ import annotations

import sys

from megatron_softgrpo.algorithms.loss import PolicyLoss
from megatron_softgrpo.algorithms.registry import training_algorithm
from megatron_softgrpo.config.recipe import LoadedRecipe
from megatron_softgrpo.config.schema import RecipeCfg
from megatron_softgrpo.data.datasets import PromptDataset, load_split
from megatron_softgrpo.data.sampler import PromptSampler
from megatron_softgrpo.distributed import (
    GenerationLayout,
    ParallelLayout,
    ParallelState,
    init_distributed,
)
from megatron_softgrpo.models.loading import load_model
from megatron_softgrpo.models.source import load_tokenizer, resolve_model_source
from megatron_softgrpo.rewards.registry import get_reward
from megatron_softgrpo.rollout.engine import make_engine
from megatron_softgrpo.rollout.settings import RolloutSettings
from megatron_softgrpo.soft import VocabShard, noise_seed, seed_noise_rng
from megatron_softgrpo.train.generation import Colocated, Dedicated, GenerationServer
from megatron_softgrpo.train.loop import Trainer
from megatron_softgrpo.train.metrics_log import MetricsLog
from megatron_softgrpo.train.policy import PolicyWorker
from megatron_softgrpo.train.preemption import PreemptionWatcher


def train(loaded: LoadedRecipe) -> int:
    """Build and run; the exit code (REQUEUE_EXIT_CODE when a signal stopped the run)."""
    watcher = PreemptionWatcher()  # first: a signal during model loading must still requeue
    try:
        return setup(loaded, watcher).run()
    except KeyboardInterrupt:
        print("[softgrpo] interrupted", file=sys.stderr)
        return 130
    finally:
        watcher.restore()


def setup(loaded: LoadedRecipe, watcher: PreemptionWatcher) -> Trainer | GenerationServer:
    """Every part of the run on this rank (the recipe has passed `config.checks.validate`)."""
    cfg = loaded.cfg
    mcfg = cfg.policy.megatron_cfg
    parallel = init_distributed(
        ParallelLayout(mcfg.tensor_model_parallel_size, mcfg.pipeline_model_parallel_size),
        seed=cfg.grpo.seed,
        generation=generation_layout(cfg),
    )
    seed_noise_rng(noise_seed(cfg.grpo.seed, parallel.dp_rank))
    tokenizer = load_tokenizer(
        resolve_model_source(cfg.policy.model_name), cfg.policy.tokenizer.name
    )
    if parallel.role == "generation":
        return _generation_server(cfg, parallel, tokenizer)
    train_data = _load(cfg, "train", tokenizer, parallel)
    val_data = (
        _load(cfg, "validation", tokenizer, parallel) if cfg.data.validation is not None else None
    )
    worker = build_worker(cfg, parallel)
    if parallel.bridges is not None:
        generation = Dedicated(worker, parallel)
    else:
        settings = RolloutSettings.from_recipe(cfg, tokenizer, worker.source.arch.hidden_size)
        generation = Colocated(
            make_engine(
                cfg.policy.generation, worker.model, tokenizer, worker.vocab, settings, parallel
            )
        )
    if parallel.launch.launcher != "single" and parallel.main:
        dedicated, world = cfg.policy.generation.generation_ranks(), parallel.launch.world_size
        print(
            f"[softgrpo] {_ranks(world)}: TP={parallel.tp} PP={parallel.pp} DP={parallel.dp}"
            + (f", and {_ranks(dedicated)} generating" if dedicated else ""),
            flush=True,
        )
    return Trainer(
        cfg=cfg,
        parallel=parallel,
        tokenizer=tokenizer,
        val_data=val_data,
        worker=worker,
        loss=PolicyLoss(cfg.loss_fn),
        sampler=PromptSampler(
            train_data.problems,
            cfg.grpo.num_prompts_per_step,
            seed=cfg.grpo.seed,
            shuffle=cfg.data.shuffle,
        ),
        generation=generation,
        reward=get_reward(
            cfg.env.reward,
            answer_format=cfg.env.answer_format,
            num_workers=cfg.env.num_workers,
            timeout_s=cfg.env.timeout_s,
        ),
        log=MetricsLog(cfg.logger, loaded.raw, enabled=parallel.main),
        watcher=watcher,
    )


def _ranks(n: int) -> str:
    return f"{n} rank" + ("s" if n != 1 else "")


def generation_layout(cfg: RecipeCfg) -> GenerationLayout | None:
    """The dedicated generation ranks a recipe asks for (None: colocated)."""
    gen = cfg.policy.generation
    if gen.colocated.enabled:
        return None
    return GenerationLayout(gen.generation_ranks(), cfg.policy.generation_tensor_parallel())


def _generation_server(cfg: RecipeCfg, parallel: ParallelState, tokenizer) -> GenerationServer:
    """A generation rank: its own copy of the model (PP 1, its role's TP) and the one engine."""
    source = resolve_model_source(cfg.policy.model_name)
    mcfg = cfg.policy.megatron_cfg.model_copy(
        update={"tensor_model_parallel_size": parallel.tp, "pipeline_model_parallel_size": 1}
    )
    model, padded = load_model(source, mcfg, parallel, cfg.policy.precision)
    model.requires_grad_(False)
    vocab = VocabShard.of_group(padded, source.arch.vocab_size, parallel.groups.tp)
    settings = RolloutSettings.from_recipe(cfg, tokenizer, source.arch.hidden_size)
    engine = make_engine(cfg.policy.generation, model, tokenizer, vocab, settings, parallel)
    return GenerationServer(engine, parallel)


def build_worker(cfg: RecipeCfg, parallel: ParallelState) -> PolicyWorker:
    """The policy worker of a recipe: handed the training algorithm's scorer, never the recipe."""
    hidden_size = resolve_model_source(cfg.policy.model_name).arch.hidden_size
    scorer = training_algorithm(cfg.softgrpo).scorer(
        cfg.softgrpo, cfg.policy.generation, hidden_size
    )
    return PolicyWorker(
        cfg.policy,
        parallel,
        scorer,
        reference=cfg.loss_fn.reference_policy_kl_penalty > 0,
        planned_steps=cfg.planned_optimizer_steps(),
    )


def _load(cfg: RecipeCfg, split: str, tokenizer, parallel: ParallelState) -> PromptDataset:
    data = load_split(cfg.data, split, tokenizer)
    if parallel.main:
        print(f"[softgrpo] {split}: {data.summary()}", flush=True)
    return data
