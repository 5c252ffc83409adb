"""Rules that relate several recipe keys, or a recipe and its model. Each error names one dotted key.

`check_recipe` holds the rules that need no model (`load_recipe` runs it); `validate` holds the
rest, and is what `check`, `plan`, `train`, `eval` and the study driver call for a job, before any
model or data is loaded.
"""

from __future__ import annotations

from pathlib import Path

from megatron_softgrpo.algorithms.registry import decoding_algorithm, training_algorithm
from megatron_softgrpo.config.recipe import LoadedRecipe
from megatron_softgrpo.config.schema import ClusterCfg
from megatron_softgrpo.errors import UserError
from megatron_softgrpo.models.arch import ModelArch
from megatron_softgrpo.models.known import KNOWN_HF_CONFIGS, known_arch
from megatron_softgrpo.models.source import SMOLLM2, SMOLLM2_ARCH, resolve_model_source


def check_recipe(loaded: LoadedRecipe) -> None:
    cfg = loaded.cfg
    mcfg = cfg.policy.megatron_cfg
    if mcfg.sequence_parallel:
        # the rollout decodes one position per step on the training model, which SP cannot split
        raise loaded.error(
            "policy.megatron_cfg.sequence_parallel",
            "not supported yet: rollouts decode on the training model",
        )
    if mcfg.fp8_cfg.enabled and mcfg.transformer_impl != "transformer_engine":
        raise loaded.error(
            "policy.megatron_cfg.fp8_cfg.enabled",
            "needs policy.megatron_cfg.transformer_impl=transformer_engine",
        )
    if (
        mcfg.fp8_cfg.enabled
        and mcfg.fp8_cfg.first_last_layers_bf16
        and mcfg.fp8_cfg.fp8_recipe == "delayed"
    ):
        raise loaded.error(
            "policy.megatron_cfg.fp8_cfg.first_last_layers_bf16",
            "Megatron cannot keep layers in bf16 under fp8_recipe=delayed; use tensorwise, blockwise or mxfp8",
        )
    gen = cfg.policy.generation
    if not gen.colocated.enabled and gen.colocated.resources.gpus_per_node is None:
        raise loaded.error(
            "policy.generation.colocated.resources.gpus_per_node",
            "required when policy.generation.colocated.enabled is false (generation ranks per node)",
        )
    if gen.colocated.enabled and gen.tensor_model_parallel_size is not None:
        raise loaded.error(
            "policy.generation.tensor_model_parallel_size",
            "only for dedicated generation ranks (policy.generation.colocated.enabled: false)",
        )
    asynchronous = cfg.grpo.async_grpo
    if asynchronous.enabled and gen.colocated.enabled:
        raise loaded.error(
            "grpo.async_grpo.enabled",
            "needs dedicated generation ranks (policy.generation.colocated.enabled: false)",
        )
    if asynchronous.enabled and not cfg.loss_fn.use_importance_sampling_correction:
        raise loaded.error(
            "grpo.async_grpo.enabled",
            "needs loss_fn.use_importance_sampling_correction: true (the rows come from an older "
            "policy; the loss weighs them by the density their decoder recorded)",
        )
    if gen.engine == "static" and mcfg.fp8_cfg.enabled:
        raise loaded.error(
            "policy.generation.engine",
            "static decodes in bf16, but the FP8 trainer scores in FP8; set it to eager",
        )
    arch_name = cfg.policy.model_arch
    if arch_name is not None and arch_name not in KNOWN_HF_CONFIGS:
        raise loaded.error(
            "policy.model_arch", f"unknown; known: {', '.join(sorted(KNOWN_HF_CONFIGS))}"
        )
    if cfg.policy.max_total_sequence_length <= cfg.data.max_input_seq_length:
        raise loaded.error(
            "policy.max_total_sequence_length",
            f"must exceed data.max_input_seq_length ({cfg.data.max_input_seq_length})",
        )
    for split in ("train", "validation"):
        ds = getattr(cfg.data, split)
        if ds is None:
            continue
        if ds.kind == "json" and not ds.path and ds.builtin is None:
            raise loaded.error(
                f"data.{split}.path",
                "required when kind=json (a JSON, JSONL or parquet file), "
                f"unless data.{split}.builtin names a file shipped with the package",
            )
        if ds.path and ds.builtin is not None:
            raise loaded.error(
                f"data.{split}.builtin", f"set either it or data.{split}.path, not both"
            )
        if ds.kind == "reasoning_gym" and not ds.task:
            raise loaded.error(
                f"data.{split}.task", "required when kind=reasoning_gym (a reasoning-gym task name)"
            )
    responses = cfg.grpo.num_prompts_per_step * cfg.grpo.num_generations_per_prompt
    if responses % cfg.policy.train_global_batch_size:
        raise loaded.error(
            "policy.train_global_batch_size",
            f"must divide the {responses} responses of a step (grpo.num_prompts_per_step x num_generations_per_prompt)",
        )
    if not cfg.softgrpo.think_end:
        raise loaded.error("softgrpo.think_end", "must be a non-empty marker string")
    _check_filtering(loaded)
    _check_eval(loaded)


def _check_filtering(loaded: LoadedRecipe) -> None:
    """Dynamic sampling and the overlong penalty (algorithms/filtering.py)."""
    cfg = loaded.cfg
    if cfg.grpo.dynamic_sampling.enabled and cfg.grpo.num_generations_per_prompt < 2:
        raise loaded.error(
            "grpo.dynamic_sampling.enabled",
            "needs grpo.num_generations_per_prompt >= 2: a group of one response has no reward "
            "spread, so every group would be dropped",
        )
    penalty = cfg.env.overlong_penalty
    max_new = cfg.policy.generation.max_new_tokens
    if penalty is not None and penalty.buffer > max_new:
        raise loaded.error(
            "env.overlong_penalty.buffer",
            f"must not exceed the response length limit policy.generation.max_new_tokens ({max_new})",
        )


def _check_eval(loaded: LoadedRecipe) -> None:
    ev = loaded.cfg.eval
    for key, values in (("eval.benchmarks", ev.benchmarks), ("eval.ks", ev.ks)):
        if not values:
            raise loaded.error(key, "must list at least one entry")
        if len(set(values)) != len(values):
            raise loaded.error(key, "lists an entry twice")
    if min(ev.ks) > ev.n:
        raise loaded.error(
            "eval.ks", f"needs a k <= eval.n ({ev.n}): larger ks are left out of the metrics"
        )


def recipe_model(loaded: LoadedRecipe) -> tuple[ModelArch, int | None]:
    """(the policy's architecture, the padded vocabulary a megatron-softgrpo checkpoint was saved
    with; None for other models). Read from `policy.model_name` when it is readable here (a
    directory, a checkpoint or a built-in model), else the `policy.model_arch` registry entry."""
    policy = loaded.cfg.policy
    if policy.model_name == SMOLLM2:
        return SMOLLM2_ARCH, None  # without materialising its weights
    if not Path(policy.model_name).expanduser().exists() and policy.model_arch is not None:
        return known_arch(policy.model_arch), None
    try:
        source = resolve_model_source(policy.model_name)
    except UserError as e:
        raise loaded.error("policy.model_name", str(e)) from None
    return source.arch, source.padded_vocab_size


def cluster_world_size(cluster: ClusterCfg) -> int | None:
    """Processes of the job the recipe describes; None for CPU recipes (gpus_per_node: 0)."""
    return cluster.num_nodes * cluster.gpus_per_node or None


def _check_model_fit(
    loaded: LoadedRecipe, arch: ModelArch, padded: int | None, world_size: int | None
) -> None:
    """Refuse parallel layouts that the model or the world size cannot support."""
    mcfg = loaded.cfg.policy.megatron_cfg
    tp, pp = mcfg.tensor_model_parallel_size, mcfg.pipeline_model_parallel_size
    tp_key = "policy.megatron_cfg.tensor_model_parallel_size"
    pp_key = "policy.megatron_cfg.pipeline_model_parallel_size"
    problem = arch.layout_problem(tp, pp)  # first: heads that TP cannot split are the real cause
    if problem:
        raise loaded.error(tp_key if problem[0] == "tp" else pp_key, problem[1])
    if mcfg.make_vocab_size_divisible_by % tp:
        raise loaded.error(
            "policy.megatron_cfg.make_vocab_size_divisible_by",
            f"must be a multiple of tensor_model_parallel_size ({tp})",
        )
    if padded is not None and padded % tp:  # a checkpoint fixes its padding; an HF model's is ours
        raise loaded.error(
            tp_key, f"must divide the checkpoint's padded vocabulary ({padded}, policy.model_name)"
        )
    fp8 = mcfg.fp8_cfg
    if fp8.enabled and fp8.first_last_layers_bf16:
        per_stage = arch.num_layers // pp
        for end in ("start", "end"):
            if getattr(fp8, f"num_layers_at_{end}_in_bf16") > per_stage:
                raise loaded.error(
                    f"policy.megatron_cfg.fp8_cfg.num_layers_at_{end}_in_bf16",
                    f"must not exceed the {per_stage} layers of a pipeline stage",
                )
    if world_size is not None and world_size % (tp * pp):
        raise loaded.error(
            tp_key, f"TP*PP={tp * pp} must divide the number of processes ({world_size})"
        )


def validate(loaded: LoadedRecipe, world_size: int | None, training: bool) -> ModelArch:
    """Every rule of a job of `world_size` processes (None: one CPU process) that `load_recipe` did
    not already check; `training`: also those of `softgrpo train`. Returns the model's architecture."""
    arch, padded = recipe_model(loaded)
    if training:  # only `train` splits off generation ranks; eval and generate use every rank
        world_size = _check_generation_ranks(loaded, arch, padded, world_size)
    _check_model_fit(loaded, arch, padded, world_size)
    if training:
        _check_data_parallel(loaded, world_size)
        _check_training(loaded, arch)
    return arch


def _check_generation_ranks(
    loaded: LoadedRecipe, arch: ModelArch, padded: int | None, world_size: int | None
) -> int | None:
    """The dedicated generation ranks' layout; returns the processes left to train."""
    gen = loaded.cfg.policy.generation
    ranks = gen.generation_ranks()
    if not ranks:
        return world_size
    key = "policy.generation.tensor_model_parallel_size"
    tp = loaded.cfg.policy.generation_tensor_parallel()
    problem = arch.layout_problem(tp, 1)
    if problem:
        raise loaded.error(key, problem[1])
    vocab = padded or arch.padded_vocab_size(
        loaded.cfg.policy.megatron_cfg.make_vocab_size_divisible_by
    )
    if ranks % tp or vocab % tp:
        raise loaded.error(
            key,
            f"TP={tp} must divide the {ranks} generation ranks and the padded vocabulary ({vocab})",
        )
    if world_size is None:
        return None
    if world_size <= ranks:
        raise loaded.error(
            "policy.generation.colocated.resources",
            f"{ranks} generation ranks leave none of the job's {world_size} processes to train",
        )
    mcfg = loaded.cfg.policy.megatron_cfg
    training_dp = (world_size - ranks) // (
        mcfg.tensor_model_parallel_size * mcfg.pipeline_model_parallel_size
    )
    replicas = loaded.cfg.policy.generation_replicas()
    if replicas > training_dp and replicas % training_dp:
        raise loaded.error(
            "policy.generation.colocated.resources",
            f"{replicas} generation replicas (ranks / TP {tp}) for {training_dp} training "
            "data-parallel ranks: expected at most as many, or a multiple (each training block "
            "is then cut into equal parts, one per replica)",
        )
    return world_size - ranks


def _check_training(loaded: LoadedRecipe, arch: ModelArch) -> None:
    """Rules of `softgrpo train` alone: data, reward, algorithm and optimizer."""
    cfg = loaded.cfg
    soft = cfg.softgrpo
    if soft.sampler is not None and decoding_algorithm(soft).name != soft.algorithm:
        raise loaded.error(
            "softgrpo.sampler",
            f"training samples as the algorithm does ({soft.algorithm}); set null",
        )
    pp = cfg.policy.megatron_cfg.pipeline_model_parallel_size
    if training_algorithm(soft).needs_input_table and pp > 1 and not arch.tie_word_embeddings:
        raise loaded.error(
            "softgrpo.algorithm",
            "needs tied embeddings at policy.megatron_cfg.pipeline_model_parallel_size > 1 (its "
            "density reads the input embedding table on the last stage)",
        )
    if cfg.data.train is None:
        raise loaded.error(
            "data.train", "training needs a dataset (a file or a reasoning-gym task)"
        )
    if cfg.env.reward == "reasoning_gym":
        # the task's own scorer needs the metadata of a reasoning-gym entry
        for split in ("train", "validation"):
            ds = getattr(cfg.data, split)
            if ds is not None and ds.kind != "reasoning_gym":
                raise loaded.error(
                    "env.reward",
                    f"needs reasoning_gym datasets; data.{split} has kind={ds.kind} (use math_verify or exact_match)",
                )
    if cfg.env.reward == "math_reference" and cfg.env.answer_format != "boxed":
        # the reference's grader reads the last box its own way (rewards/hendrycks.py)
        raise loaded.error(
            "env.answer_format",
            "env.reward=math_reference grades the last box as the reference does, so it needs "
            "answer_format boxed",
        )
    _check_loss(loaded)
    _check_optimizer(loaded)


def _check_loss(loaded: LoadedRecipe) -> None:
    """The rollout correction, CISPO and the aggregation (algorithms/loss.py)."""
    loss = loaded.cfg.loss_fn
    key = "loss_fn.truncated_importance_sampling"
    hi, lo = loss.truncated_importance_sampling_ratio, loss.truncated_importance_sampling_ratio_min
    if hi is None:
        if loss.truncated_importance_sampling_type != "tis":
            raise loaded.error(
                f"{key}_type", f"truncates only with {key}_ratio set (the upper bound); it is null"
            )
        if lo:
            raise loaded.error(
                f"{key}_ratio_min",
                f"bounds only with {key}_ratio set (the upper bound); it is null",
            )
    elif not loss.use_importance_sampling_correction:
        raise loaded.error(
            f"{key}_ratio",
            "truncates the rollout correction, which is off: set "
            "loss_fn.use_importance_sampling_correction=true, or this null",
        )
    elif lo > hi:
        raise loaded.error(f"{key}_ratio_min", f"exceeds {key}_ratio={hi}")
    elif not lo <= 1 <= hi:
        # w = 1 where rollout and trainer agree: an interval without it truncates every position
        raise loaded.error(
            f"{key}_ratio" if hi < 1 else f"{key}_ratio_min",
            f"[{key}_ratio_min, {key}_ratio] = [{lo}, {hi}] must contain 1, the weight of a "
            "position whose rollout and trainer log-densities agree",
        )
    if loss.use_cispo and loss.ratio_clip_c is not None:
        raise loaded.error(
            "loss_fn.ratio_clip_c",
            "CISPO (loss_fn.use_cispo=true) clips the IS weight, and its term -A w logp has no "
            "surrogate for a dual clip to bound; set null",
        )
    if loss.sequence_level_importance_ratios:
        if loss.use_cispo:
            raise loaded.error(
                "loss_fn.sequence_level_importance_ratios",
                "GSPO's per-response ratio and CISPO's per-position weight are two policy terms; "
                "set one of it and loss_fn.use_cispo",
            )
        if loss.aggregation != "seq_mean_token_mean":
            raise loaded.error(
                "loss_fn.aggregation",
                f"{loss.aggregation}: GSPO (loss_fn.sequence_level_importance_ratios=true) "
                "averages one term per response; set seq_mean_token_mean",
            )
    if loss.loss_scale_factor is not None and loss.aggregation != "seq_mean_token_sum_norm":
        raise loaded.error(
            "loss_fn.loss_scale_factor",
            f"only divides with loss_fn.aggregation=seq_mean_token_sum_norm (it is {loss.aggregation})",
        )


def _check_optimizer(loaded: LoadedRecipe) -> None:
    cfg = loaded.cfg
    key = "policy.megatron_cfg"
    o, s = cfg.policy.megatron_cfg.optimizer, cfg.policy.megatron_cfg.scheduler
    if s.lr_warmup_init > o.lr:
        raise loaded.error(f"{key}.scheduler.lr_warmup_init", f"exceeds {key}.optimizer.lr={o.lr}")
    if o.min_lr > o.lr:
        raise loaded.error(f"{key}.optimizer.min_lr", f"exceeds {key}.optimizer.lr={o.lr}")
    decay_steps = s.lr_decay_iters or cfg.planned_optimizer_steps()
    if s.lr_decay_style != "constant" and decay_steps <= s.lr_warmup_iters:
        raise loaded.error(
            f"{key}.scheduler.lr_warmup_iters",
            f"must be below the {decay_steps} decay steps (lr_decay_iters, else the run's "
            f"optimizer steps) for lr_decay_style={s.lr_decay_style}",
        )


def _check_data_parallel(loaded: LoadedRecipe, world_size: int | None) -> None:
    """Refuse training batches that the data-parallel ranks cannot split (after _check_model_fit)."""
    if world_size is None:
        return
    cfg = loaded.cfg
    mcfg = cfg.policy.megatron_cfg
    dp = world_size // (mcfg.tensor_model_parallel_size * mcfg.pipeline_model_parallel_size)
    if cfg.grpo.num_prompts_per_step % dp:
        raise loaded.error(
            "grpo.num_prompts_per_step", f"must be divisible by the {dp} data-parallel ranks"
        )
    micro = cfg.policy.train_micro_batch_size
    if cfg.policy.train_global_batch_size % (dp * micro):
        raise loaded.error(
            "policy.train_global_batch_size",
            f"must be divisible by {dp} data-parallel ranks x policy.train_micro_batch_size={micro}",
        )
