"""Rules that relate several recipe keys, or a recipe and its model. Each error names one dotted key."""

from __future__ import annotations

from megatron_softgrpo.config.loader import LoadedRecipe
from megatron_softgrpo.models.arch import ModelArch


def check_recipe(loaded: LoadedRecipe) -> None:
    cfg = loaded.cfg
    mcfg = cfg.policy.megatron_cfg
    tp = mcfg.tensor_model_parallel_size
    if mcfg.make_vocab_size_divisible_by % tp:
        raise loaded.error(
            "policy.megatron_cfg.make_vocab_size_divisible_by",
            f"must be a multiple of tensor_model_parallel_size ({tp})",
        )
    if mcfg.sequence_parallel and tp == 1:
        raise loaded.error("policy.megatron_cfg.sequence_parallel", "needs tensor_model_parallel_size > 1")
    if mcfg.fp8_cfg.enabled and mcfg.transformer_impl != "transformer_engine":
        raise loaded.error("policy.megatron_cfg.fp8_cfg.enabled", "needs policy.megatron_cfg.transformer_impl=transformer_engine")
    if cfg.policy.max_total_sequence_length <= cfg.data.max_input_seq_length:
        raise loaded.error(
            "policy.max_total_sequence_length", f"must exceed data.max_input_seq_length ({cfg.data.max_input_seq_length})"
        )
    for split in ("train", "validation"):
        ds = getattr(cfg.data, split)
        if ds is None:
            continue
        if ds.kind == "json" and not ds.path:
            raise loaded.error(f"data.{split}.path", "required when kind=json (a JSON, JSONL or parquet file)")
        if ds.kind == "reasoning_gym" and not ds.task:
            raise loaded.error(f"data.{split}.task", "required when kind=reasoning_gym (a reasoning-gym task name)")
    responses = cfg.grpo.num_prompts_per_step * cfg.grpo.num_generations_per_prompt
    if responses % cfg.policy.train_global_batch_size:
        raise loaded.error(
            "policy.train_global_batch_size",
            f"must divide the {responses} responses of a step (grpo.num_prompts_per_step x num_generations_per_prompt)",
        )
    if not cfg.softgrpo.think_end:
        raise loaded.error("softgrpo.think_end", "must be a non-empty marker string")
    _check_eval(loaded)


def _check_eval(loaded: LoadedRecipe) -> None:
    ev = loaded.cfg.eval
    for key, values in (("eval.benchmarks", ev.benchmarks), ("eval.ks", ev.ks)):
        if not values:
            raise loaded.error(key, "must list at least one entry")
        if len(set(values)) != len(values):
            raise loaded.error(key, "lists an entry twice")
    if min(ev.ks) > ev.n:
        raise loaded.error("eval.ks", f"needs a k <= eval.n ({ev.n}): larger ks are left out of the metrics")


def check_model_fit(loaded: LoadedRecipe, arch: ModelArch, world_size: int | None = None) -> None:
    """Refuse parallel layouts that the model or the world size cannot support."""
    mcfg = loaded.cfg.policy.megatron_cfg
    tp, pp = mcfg.tensor_model_parallel_size, mcfg.pipeline_model_parallel_size
    tp_key = "policy.megatron_cfg.tensor_model_parallel_size"
    pp_key = "policy.megatron_cfg.pipeline_model_parallel_size"
    problem = arch.layout_problem(tp, pp)
    if problem:
        raise loaded.error(tp_key if problem[0] == "tp" else pp_key, problem[1])
    if world_size is not None and world_size % (tp * pp):
        raise loaded.error(tp_key, f"TP*PP={tp * pp} must divide the number of processes ({world_size})")
