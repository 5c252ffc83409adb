"""`softgrpo plan` and the GPU recipes: parameter counts, per-GPU shards and memory items checked
against transformers, Megatron and autograd, layouts that do not fit or do not divide."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from distributed_helpers import run_ranks

from megatron_softgrpo.cli import main
from megatron_softgrpo.config.checks import recipe_model
from megatron_softgrpo.config.loader import load_recipe
from megatron_softgrpo.config.schema import MegatronCfg, RecipeCfg
from megatron_softgrpo.distributed import ParallelLayout, init_distributed
from megatron_softgrpo.models.arch import ModelArch
from megatron_softgrpo.models.known import KNOWN_HF_CONFIGS, known_arch
from megatron_softgrpo.plan import (
    GIB,
    Layout,
    Workload,
    kv_cache_bytes,
    plan_memory,
    rollout_rows_per_pass,
    stage_parameters,
    stored_activation_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if p.name != "base.yaml")
GPU_RECIPES = [p for p in RECIPES if load_recipe(p).cfg.cluster.gpus_per_node > 0]

# parameter counts published on the models' Hugging Face pages (safetensors "Model size")
PUBLISHED_PARAMETERS = {
    "deepseek-r1-distill-qwen-1.5b": 1.78e9,
    "deepseek-r1-distill-qwen-7b": 7.62e9,
    "llama-3.2-3b-instruct": 3.21e9,
    "qwen2.5-32b-instruct": 32.8e9,
    "llama-3.1-70b-instruct": 70.6e9,
}

TINY = {  # GQA, q/k/v biases, untied; and tied embeddings; 4 layers so PP=2 leaves 2 per stage
    "qwen2": dict(
        model_type="qwen2",
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
    "llama": dict(
        model_type="llama",
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}


def plan_cli(capsys, recipe, *overrides, gpus=None, mem=None) -> tuple[int, str, str]:
    flags = [
        *(["--gpus", str(gpus)] if gpus is not None else []),
        *(["--gpu-mem-gib", str(mem)] if mem is not None else []),
    ]
    code = main(["plan", *flags, str(recipe), *overrides])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def workload(**overrides) -> Workload:
    base = dict(
        dtype_bytes=2,
        micro_batch=1,
        seq_len=9216,
        micro_batches=32,
        logprob_batch=4,
        rollout_rows=64,
        generation_rows=64,
        rollout_prompt_len=1024,
        rollout_len=9216,
        batch_rows=512,
        mixture_size=5,
        padded_vocab=152064,
        sequence_parallel=False,
        te_spec=True,
        fused_swiglu=False,
        recompute=False,
        reference_model=True,
        distributed_optimizer=True,
        master_weights=True,
    )
    return Workload(**{**base, **overrides})


def items(arch: ModelArch, w: Workload, layout: Layout, stage: int = 0) -> dict[str, int]:
    plan = plan_memory(arch, w, layout, 80)
    return {item.name: item.bytes for item in plan.stages[stage].items}


# ------------------------------------------------------------------ parameter counts


def test_every_registry_entry_has_a_published_size():
    assert set(KNOWN_HF_CONFIGS) == set(PUBLISHED_PARAMETERS)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_parameter_counts_match_transformers_and_the_published_sizes(name):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    hf = {k: v for k, v in KNOWN_HF_CONFIGS[name].items() if k != "model_type"}
    config = (Qwen2Config if KNOWN_HF_CONFIGS[name]["model_type"] == "qwen2" else LlamaConfig)(**hf)
    with torch.device("meta"):  # shapes only
        model = AutoModelForCausalLM.from_config(config)
    counted = sum(p.numel() for p in model.parameters())  # tied weights are one parameter
    planned = known_arch(name).num_parameters()
    assert planned == counted
    assert abs(planned / PUBLISHED_PARAMETERS[name] - 1) < 0.01


def _rank_parameters(rank, tp, pp):
    from megatron_softgrpo.models.build import build_gpt_model

    parallel = init_distributed(ParallelLayout(tp, pp))
    counts = {}
    for kind, hf in TINY.items():
        arch = ModelArch.from_hf_config(hf)
        mcfg = MegatronCfg(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        model = build_gpt_model(arch, mcfg, parallel)
        counts[kind] = sum(p.numel() for p in model.parameters())
    return parallel.pp_rank, counts


@pytest.mark.slow
@pytest.mark.multiproc
def test_per_gpu_parameters_match_megatron_shards():
    tp, pp = 2, 2
    for stage, counts in run_ranks(tp * pp, _rank_parameters, tp, pp):
        for kind, hf in TINY.items():
            arch = ModelArch.from_hf_config(hf)
            assert counts[kind] == stage_parameters(
                arch, tp, pp, stage, arch.padded_vocab_size()
            ), (kind, stage)


def test_one_gpu_holds_every_parameter_once_with_the_padded_vocabulary():
    for hf in TINY.values():
        arch = ModelArch.from_hf_config(hf)
        padded = arch.padded_vocab_size()
        embeddings = (
            (padded - arch.vocab_size) * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
        )
        assert stage_parameters(arch, 1, 1, 0, padded) == arch.num_parameters() + embeddings


# ------------------------------------------------------------------ memory items against measurements


@pytest.fixture
def tiny_model():
    from megatron_softgrpo.models.build import build_gpt_model

    parallel = init_distributed(ParallelLayout(1, 1))
    arch = ModelArch.from_hf_config({**TINY["qwen2"], "num_hidden_layers": 3})

    def build(**mcfg):
        return arch, build_gpt_model(arch, MegatronCfg(**mcfg), parallel), parallel

    return build


def test_kv_cache_matches_megatron_allocation(tiny_model):
    from megatron_softgrpo.rollout.megatron_backend import MegatronBackend
    from megatron_softgrpo.soft import MixtureRecord

    arch, model, parallel = tiny_model()
    model.eval()
    rows, prompt, length = 3, 5, 20
    runner = MegatronBackend(model, parallel)
    runner.start(rows, length)
    runner.prefill(
        MixtureRecord.discrete(torch.randint(0, 1000, (rows, prompt)), 5),
        torch.zeros(rows, dtype=torch.long),
        None,
    )
    allocated = runner.cache.nbytes()
    assert allocated == kv_cache_bytes(arch, 1, arch.num_layers, rows, length, 4)


def test_gradient_buffer_is_fp32_and_as_large_as_the_parameters(tiny_model):
    from megatron_softgrpo.train.optimizer import wrap_ddp

    arch, model, parallel = tiny_model()
    ddp = wrap_ddp(model, MegatronCfg(), parallel)
    grads = [buffer.grad_data for buffer in ddp.buffers]
    assert {g.dtype for g in grads} == {torch.float32}
    params = stage_parameters(arch, 1, 1, 0, arch.padded_vocab_size())
    assert (
        params <= sum(g.numel() for g in grads) <= 1.02 * params
    )  # Megatron pads each parameter's start


@pytest.mark.parametrize("recompute", [False, True])
def test_stored_activations_match_what_autograd_keeps(tiny_model, recompute):
    """Local spec, fp32: every tensor the forward saves for the backward, by storage, minus weights."""
    from megatron_softgrpo.models.forward import CAUSAL, position_ids
    from model_patches.output_layer import final_hidden_states

    arch, model, _ = tiny_model(activation_checkpointing=recompute)
    model.train()
    b, s = 4, 48
    x = torch.randn(s, b, arch.hidden_size, requires_grad=True)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), final_hidden_states(model):
        model(None, position_ids(b, s, "cpu"), CAUSAL, decoder_input=x)
    w = workload(
        dtype_bytes=4,
        micro_batch=b,
        seq_len=s,
        te_spec=False,
        recompute=recompute,
        master_weights=False,
    )
    expected = stored_activation_bytes(arch, w, 1, arch.num_layers, 1, last=True)
    # what the formula leaves out: RoPE tables, the mask and the norms' 1/rms (s or s x b sized)
    assert expected <= sum(saved.values()) <= 1.05 * expected


# ------------------------------------------------------------------ how the items scale


ARCH_7B = known_arch("deepseek-r1-distill-qwen-7b")


def test_weights_gradients_and_reference_halve_with_twice_the_tensor_parallelism():
    one, two = (
        items(ARCH_7B, workload(), Layout(2, 1, 4)),
        items(ARCH_7B, workload(), Layout(4, 1, 4)),
    )
    for name in ("weights", "gradients", "reference model"):
        assert two[name] / one[name] == pytest.approx(0.5, rel=0.01)  # norm weights are replicated
    assert one["gradients"] == 2 * one["weights"]  # fp32 gradients of bf16 weights


def test_optimizer_state_halves_with_twice_the_data_parallelism():
    one, two = (
        items(ARCH_7B, workload(), Layout(2, 1, 4)),
        items(ARCH_7B, workload(), Layout(2, 1, 8)),
    )
    assert two["optimizer state"] == pytest.approx(one["optimizer state"] / 2, abs=1)
    assert two["weights"] == one["weights"]


@pytest.mark.parametrize("dtype_bytes, master, per_param", [(2, True, 6), (4, False, 8)])
def test_resident_bytes_per_parameter_are_megatrons_distributed_optimizer_table(
    dtype_bytes, master, per_param
):
    """Megatron's distributed-optimizer docs: bf16 params + fp32 grads 6 + 12/d B, fp32 8 + 8/d B."""
    for dp in (1, 2, 8):
        w = workload(dtype_bytes=dtype_bytes, master_weights=master)
        got = items(ARCH_7B, w, Layout(1, 1, dp))
        params = stage_parameters(ARCH_7B, 1, 1, 0, w.padded_vocab)
        total = got["weights"] + got["gradients"] + got["optimizer state"]
        assert total / params == pytest.approx(per_param + (12 if master else 8) / dp, rel=1e-9)


def test_kv_cache_per_gpu_shrinks_with_each_kind_of_parallelism():
    def kv(layout, rows):
        return items(ARCH_7B, workload(rollout_rows=rows), layout)["rollout KV cache"]

    base = kv(Layout(1, 1, 2), 256)
    assert kv(Layout(2, 1, 2), 256) == base // 2  # heads split over TP
    assert kv(Layout(1, 2, 2), 256) == base // 2  # layers split over PP
    assert kv(Layout(1, 1, 4), 128) == base // 2  # rows split over DP


def test_the_first_pipeline_stage_holds_one_micro_batch_per_stage_in_flight():
    w = workload(recompute=True)
    layers = ARCH_7B.num_layers // 4
    one = stored_activation_bytes(ARCH_7B, w, 1, layers, 1, last=False)
    assert stored_activation_bytes(ARCH_7B, w, 1, layers, 4, last=False) == 4 * one
    first, last = (
        items(ARCH_7B, w, Layout(1, 4, 2), stage=0),
        items(ARCH_7B, w, Layout(1, 4, 2), stage=3),
    )
    final_norm = (
        ARCH_7B.hidden_size * 9216 * 2
    )  # under Transformer Engine: its input, on the last stage
    assert first["activations"] - last["activations"] == pytest.approx(
        3 * one - final_norm, rel=1e-9
    )  # 4 vs 1 in flight
    assert "log-prob chunk (fwd+bwd)" not in first and "log-prob chunk (fwd+bwd)" in last


def test_peak_is_resident_plus_the_largest_phase_and_no_reference_without_kl():
    plan = plan_memory(ARCH_7B, workload(), Layout(4, 1, 2), 80)
    stage = plan.stages[0]
    by_phase = {
        p: sum(i.bytes for i in stage.items if p in i.phases)
        for p in ("resident", "rollout", "logprob", "update")
    }
    assert stage.peak == by_phase["resident"] + max(
        by_phase["rollout"], by_phase["logprob"], by_phase["update"]
    )
    assert plan.fits == (stage.peak <= 80 * GIB)
    assert "reference model" not in items(
        ARCH_7B, replace(workload(), reference_model=False), Layout(4, 1, 2)
    )


def test_dedicated_generation_ranks_decode_and_the_training_ranks_send_weights():
    """The training stage loses its rollout items and gains a refit bucket; a generation rank
    holds its model copy (no gradients, no optimizer), one block's KV cache and, while it
    decodes, the refits received ahead (one per step of the trajectory-age bound); the plan fits
    only when both kinds of rank do."""
    w = workload()
    plan = plan_memory(ARCH_7B, w, Layout(4, 1, 2), 80, generation_ranks=8, generation_tp=2)
    training = {i.name: i.bytes for i in plan.stages[0].items}
    assert "rollout KV cache" not in training and training["refit bucket (send)"] == 512 << 20
    big = workload(rollout_rows=512, generation_rows=512)  # a rollout larger than the update
    assert (
        plan_memory(ARCH_7B, big, Layout(4, 1, 2), 80, 8, 2).stages[0].peak
        == (plan.stages[0].peak)
        < plan_memory(ARCH_7B, big, Layout(4, 1, 2), 80).stages[0].peak
    )
    generating = {i.name: i.bytes for i in plan.generation.items}
    assert set(generating) == {
        "weights",
        "overhead",
        "rollout KV cache",
        "rollout step tensors",
        "rollout working memory",
        "refit bucket (receive)",
        "refits waiting",
    }
    assert generating["weights"] == stage_parameters(ARCH_7B, 2, 1, 0, 152064) * 2
    assert generating["rollout KV cache"] == kv_cache_bytes(ARCH_7B, 2, 28, 64, 9216, 2)
    assert generating["refits waiting"] == generating["weights"]
    assert plan.generation.peak == sum(generating.values())
    bound_2 = plan_memory(ARCH_7B, replace(w, refits_waiting=2), Layout(4, 1, 2), 80, 8, 2)
    assert bound_2.generation.peak == plan.generation.peak + generating["weights"]
    halves = plan_memory(ARCH_7B, replace(w, generation_rows=32), Layout(4, 1, 2), 80, 8, 2)
    assert {i.name: i.bytes for i in halves.generation.items}["rollout KV cache"] == (
        kv_cache_bytes(ARCH_7B, 2, 28, 32, 9216, 2)
    )
    # 512 rows at a time: the training ranks fit in 80 GB, a generation rank does not
    tight = plan_memory(ARCH_7B, big, Layout(4, 1, 2), 80, generation_ranks=8, generation_tp=2)
    assert tight.stages[0].peak <= 80 * GIB < tight.generation.peak and not tight.fits


# ------------------------------------------------------------------ the command and the recipes


@pytest.mark.parametrize("generation_tp,rows", [(4, 128), (2, 128), (1, 64)])
def test_more_generation_replicas_than_training_blocks_decode_fewer_rows_each(
    capsys, generation_tp, rows
):
    """The async 7B recipe trains at DP 2 with 8 generation ranks: 2, 4 or 8 replicas decode a
    block of 256 rows whole (in passes of max_rows_per_pass 128), in halves or in quarters. (At
    generation TP 1 a whole 7B model and its 64-row cache fill a GPU to within 0.1 GiB.)"""
    recipe = ROOT / "recipes" / "softgrpo-r1-distill-qwen-7b-2n8g-async.yaml"
    tp = f"policy.generation.tensor_model_parallel_size={generation_tp}"
    code, out, err = plan_cli(capsys, recipe, tp)
    fits = generation_tp > 1
    assert code == (0 if fits else 1) and f"fits: {'yes' if fits else 'no'}" in out, err
    assert f"({8} at TP {generation_tp}, PP 1; {rows} rows at a time)" in out


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_passes_its_own_plan(recipe, capsys):
    code, out, err = plan_cli(capsys, recipe)
    assert code == 0, err
    assert "fits: yes" in out.splitlines()
    arch = recipe_model(load_recipe(recipe))[0]
    assert f"params: {arch.num_parameters()}" in out.splitlines()


@functools.cache
def _gpu_recipes() -> dict[tuple[str, int, bool], RecipeCfg]:
    """(model_arch, nodes, FP8) -> SofT-GRPO recipe."""
    found = {}
    for path in GPU_RECIPES:
        cfg = load_recipe(path).cfg
        if cfg.softgrpo.algorithm != "softgrpo":
            continue
        found[
            (cfg.policy.model_arch, cfg.cluster.num_nodes, cfg.policy.megatron_cfg.fp8_cfg.enabled)
        ] = cfg
    return found


@pytest.mark.parametrize(
    "model, nodes",
    [
        ("deepseek-r1-distill-qwen-1.5b", 1),
        ("llama-3.2-3b-instruct", 1),
        ("deepseek-r1-distill-qwen-7b", 1),
        ("deepseek-r1-distill-qwen-7b", 2),
        ("qwen2.5-32b-instruct", 4),
        ("llama-3.1-70b-instruct", 8),
    ],
)
def test_gpu_recipes_exist_in_bf16_and_fp8(model, nodes):
    recipes = _gpu_recipes()
    bf16 = recipes[(model, nodes, False)].policy.megatron_cfg
    for fp8 in (False, True):
        cfg = recipes[(model, nodes, fp8)]
        m = cfg.policy.megatron_cfg
        assert (
            m.tensor_model_parallel_size == bf16.tensor_model_parallel_size
        )  # FP8 changes the precision only
        assert m.pipeline_model_parallel_size == bf16.pipeline_model_parallel_size
        assert cfg.cluster.gpus_per_node == 8 and cfg.policy.precision == "bfloat16"
        assert m.transformer_impl == "transformer_engine"
        if fp8:
            assert m.fp8_cfg.first_last_layers_bf16 and m.fp8_cfg.num_layers_at_start_in_bf16 >= 1
        if model == "qwen2.5-32b-instruct":
            assert m.tensor_model_parallel_size > 1 and m.pipeline_model_parallel_size > 1
        if model == "llama-3.1-70b-instruct":
            assert m.tensor_model_parallel_size == 8 and m.pipeline_model_parallel_size >= 2


@pytest.mark.parametrize(
    "model",
    ["deepseek-r1-distill-qwen-1.5b", "llama-3.2-3b-instruct", "deepseek-r1-distill-qwen-7b"],
)
def test_reference_models_keep_the_reference_hyperparameters(model):
    """docs/algorithm.md section 4 (Llama-3.2-3B decodes a step in two passes to keep 8,192 new tokens)."""
    recipes = [cfg for (name, _, _), cfg in _gpu_recipes().items() if name == model]
    assert recipes
    # rows per micro-batch: token_mean_microbatch weights tokens by it
    micro = {"deepseek-r1-distill-qwen-1.5b": 2, "llama-3.2-3b-instruct": 2}.get(model, 1)
    for cfg in recipes:
        assert cfg.policy.train_micro_batch_size == micro
        assert cfg.loss_fn.aggregation == "token_mean_microbatch"
        batch = (
            cfg.grpo.num_prompts_per_step,
            cfg.grpo.num_generations_per_prompt,
            cfg.policy.train_global_batch_size,
        )
        assert batch == (64, 8, 256)
        assert cfg.data.max_input_seq_length == 1024
        assert cfg.policy.generation.max_new_tokens == 8192
        s = cfg.softgrpo
        assert (
            s.mixture_size,
            s.gumbel_tau,
            s.noise_scale,
            s.thinking.top_p,
            s.thinking.temperature,
        ) == (5, 0.1, 1.0, 0.95, 1.0)
        assert (
            cfg.policy.megatron_cfg.optimizer.lr == 1e-6
            and cfg.loss_fn.reference_policy_kl_penalty == 0.001
        )


def test_the_multiplex_recipe_keeps_the_released_settings():
    """docs/algorithm.md section 8.4: Multiplex Thinking's settings (GMLR-Penn/Multiplex-Thinking
    scripts/train.sh) on the SofT-GRPO 7B recipe's layout."""
    recipes = {
        name: load_recipe(ROOT / "recipes" / f"{name}-r1-distill-qwen-7b-1n8g.yaml").cfg
        for name in ("softgrpo", "multiplex")
    }
    cfg, twin = recipes["multiplex"], recipes["softgrpo"]
    s = cfg.softgrpo
    assert (s.algorithm, s.multiplex_width, s.multiplex_weighting) == ("multiplex", 3, "weighted")
    for phase in (s.thinking, cfg.policy.generation):  # the released fast path: one sampler
        assert (phase.temperature, phase.top_k, phase.top_p, phase.min_p) == (1.0, None, 1.0, 0.0)
    assert (cfg.grpo.num_generations_per_prompt, cfg.loss_fn.reference_policy_kl_penalty) == (8, 0)
    assert cfg.policy.train_global_batch_size == 8 * cfg.grpo.num_prompts_per_step
    assert cfg.policy.megatron_cfg.optimizer.lr == 1e-6
    assert (cfg.loss_fn.ratio_clip_min, cfg.loss_fn.ratio_clip_max) == (0.2, 0.2)
    m, t = cfg.policy.megatron_cfg, twin.policy.megatron_cfg
    assert (m.tensor_model_parallel_size, m.pipeline_model_parallel_size) == (
        t.tensor_model_parallel_size,
        t.pipeline_model_parallel_size,
    )


def test_rows_per_pass_bounds_the_rollout_kv_cache_to_whole_groups():
    cfg = load_recipe(
        ROOT / "recipes" / "softgrpo-r1-distill-qwen-7b-1n8g.yaml"
    ).cfg  # 64 prompts x 8, DP 2
    assert rollout_rows_per_pass(cfg, 2) == 256
    cfg.policy.generation.max_rows_per_pass = 100  # 12 whole groups of 8
    assert rollout_rows_per_pass(cfg, 2) == 96
    cfg.policy.generation.max_rows_per_pass = 3  # less than a group: one group per pass
    assert rollout_rows_per_pass(cfg, 2) == 8


def test_a_layout_that_cannot_fit_exits_1(capsys):
    recipe = ROOT / "recipes" / "softgrpo-llama3.1-70b-instruct-8n8g.yaml"
    code, out, _ = plan_cli(
        capsys,
        recipe,
        "policy.megatron_cfg.tensor_model_parallel_size=1",
        "policy.megatron_cfg.pipeline_model_parallel_size=1",
        gpus=1,
    )
    assert code == 1 and "fits: no" in out.splitlines()
    code, out, _ = plan_cli(
        capsys, ROOT / "recipes" / "softgrpo-r1-distill-qwen-1.5b-1n8g.yaml", mem=16
    )
    assert code == 1 and "fits: no" in out.splitlines() and "gpu memory: 16.00 GiB" in out


@pytest.mark.parametrize(
    "recipe, overrides, gpus, expected",
    [
        (
            "softgrpo-r1-distill-qwen-7b-1n8g.yaml",
            ["policy.megatron_cfg.tensor_model_parallel_size=8"],
            None,
            "tensor_model_parallel_size=8: must divide the model's 28 attention heads",
        ),
        (
            "softgrpo-llama3.1-70b-instruct-8n8g.yaml",
            ["policy.megatron_cfg.tensor_model_parallel_size=16"],
            128,
            "must divide the model's 8 key/value heads",
        ),
        (
            "softgrpo-r1-distill-qwen-1.5b-1n8g.yaml",
            ["policy.megatron_cfg.pipeline_model_parallel_size=3"],
            None,
            "pipeline_model_parallel_size=3: must divide the model's 28 layers",
        ),
        (
            "softgrpo-llama3.1-70b-instruct-8n8g.yaml",
            [],
            8,
            "TP*PP=32 must divide the number of processes (8)",
        ),
        (
            "softgrpo-r1-distill-qwen-1.5b-1n8g.yaml",
            [],
            12,
            "grpo.num_prompts_per_step=64: must be divisible by the 12 data-parallel ranks",
        ),
        (
            "softgrpo-r1-distill-qwen-1.5b-1n8g.yaml",
            ["policy.train_micro_batch_size=3"],
            None,
            "train_global_batch_size=256: must be divisible by 8 data-parallel ranks x policy.train_micro_batch_size=3",
        ),
        ("softgrpo-r1-distill-qwen-1.5b-1n8g.yaml", [], 0, "--gpus 0: expected at least 1"),
        (
            "softgrpo-r1-distill-qwen-1.5b-1n8g.yaml",
            ["policy.model_arch=gpt-5"],
            None,
            "policy.model_arch=gpt-5: unknown; known: deepseek-r1",
        ),
    ],
)
def test_a_layout_that_cannot_divide_exits_2_with_one_line(
    capsys, recipe, overrides, gpus, expected
):
    code, out, err = plan_cli(capsys, ROOT / "recipes" / recipe, *overrides, gpus=gpus)
    assert code == 2 and "fits:" not in out
    assert "\n" not in err and "Traceback" not in err
    assert expected in err


def test_fp8_layers_kept_in_bf16_must_fit_a_stage_and_need_a_stateless_recipe(capsys):
    recipe = ROOT / "recipes" / "softgrpo-llama3.1-70b-instruct-8n8g-fp8.yaml"
    code, _, err = plan_cli(
        capsys, recipe, "policy.megatron_cfg.fp8_cfg.num_layers_at_end_in_bf16=21"
    )
    assert (
        code == 2
        and "num_layers_at_end_in_bf16=21: must not exceed the 20 layers of a pipeline stage" in err
    )
    code, _, err = plan_cli(capsys, recipe, "policy.megatron_cfg.fp8_cfg.fp8_recipe=delayed")
    assert (
        code == 2
        and "first_last_layers_bf16=true: Megatron cannot keep layers in bf16 under fp8_recipe=delayed"
        in err
    )


def test_check_validates_a_gpu_recipe_against_its_cluster(capsys):
    recipe = ROOT / "recipes" / "softgrpo-llama3.1-70b-instruct-8n8g.yaml"
    assert main(["check", str(recipe)]) == 0
    assert main(["check", str(recipe), "cluster.num_nodes=1"]) == 2
    assert "TP*PP=32 must divide the number of processes (8)" in capsys.readouterr().err


def test_a_readable_model_wins_over_the_registry(tmp_path):
    from tiny_models import make_hf_model

    make_hf_model("qwen2", tmp_path / "tiny")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"policy: {{model_name: {tmp_path / 'tiny'}, model_arch: llama-3.1-70b-instruct}}\n"
    )
    assert recipe_model(load_recipe(recipe))[0].hidden_size == 64
    recipe.write_text(
        f"policy: {{model_name: {tmp_path / 'absent'}, model_arch: llama-3.1-70b-instruct}}\n"
    )
    assert recipe_model(load_recipe(recipe))[0] == known_arch("llama-3.1-70b-instruct")


def test_a_generation_rank_keeps_its_cache_and_a_training_rank_frees_it_for_the_update():
    """A dedicated generation rank keeps its KV cache and step tensors (and the CUDA graphs
    captured on them) from one rollout to the next; a training rank frees them after its
    rollout (RolloutEngine.release), so they count in the rollout phase only."""
    w = workload()
    colocated = plan_memory(ARCH_7B, w, Layout(4, 1, 2), 80).stages[0]
    dedicated = plan_memory(ARCH_7B, w, Layout(4, 1, 2), 80, 8, 2).generation
    for plan, phases in ((colocated, ("rollout",)), (dedicated, ("resident",))):
        items = {i.name: i for i in plan.items}
        for name in ("rollout KV cache", "rollout step tensors"):
            assert items[name].phases == phases, (name, plan)
        # records and tapes of 65 rows x 8192 new tokens: 27 + 21 K bytes each, K = 5
        assert items["rollout step tensors"].bytes == 65 * 8192 * (27 + 21 * 5)
