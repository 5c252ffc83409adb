"""Build a Megatron-Core GPTModel (this rank's TP/PP shard) for a Qwen2/Llama architecture."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.fp8_utils import get_fp8_align_size
from megatron.core.models.gpt import GPTModel, gpt_layer_specs
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_softgrpo.config.schema import MegatronCfg
from megatron_softgrpo.distributed import ParallelState
from megatron_softgrpo.errors import UserError
from megatron_softgrpo.models.arch import ModelArch
from model_patches.rope import set_rope_frequencies
from model_patches.sdpa_attention import SdpaDotProductAttention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def have_transformer_engine() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install
        return False
    return True


def transformer_config(arch: ModelArch, mcfg: MegatronCfg, precision: str = "float32"):
    """Megatron TransformerConfig for `arch` under the recipe's parallel/precision settings."""
    dtype = DTYPES[precision]
    on_gpu = torch.cuda.is_available()
    fp8 = mcfg.fp8_cfg
    kwargs = {}
    if fp8.enabled:
        kwargs = dict(
            fp8=fp8.fp8,
            fp8_recipe=fp8.fp8_recipe,
            fp8_margin=fp8.fp8_margin,
            fp8_amax_history_len=fp8.fp8_amax_history_len,
            fp8_amax_compute_algo=fp8.fp8_amax_compute_algo,
            fp8_param=fp8.fp8_param,
            first_last_layers_bf16=fp8.first_last_layers_bf16,
            num_layers_at_start_in_bf16=fp8.num_layers_at_start_in_bf16,
            num_layers_at_end_in_bf16=fp8.num_layers_at_end_in_bf16,
        )
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=mcfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=mcfg.pipeline_model_parallel_size,
        sequence_parallel=mcfg.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        # fused kernels need CUDA plus apex/TE extensions; rope/bias-act fusion also cost accuracy on R1-Distill
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,  # apex's scaled_masked_softmax_cuda; TE's attention has its own
        persist_layer_norm=False,
        apply_rope_fusion=on_gpu and mcfg.apply_rope_fusion,
        bias_activation_fusion=on_gpu and mcfg.bias_activation_fusion,
        recompute_granularity="full" if mcfg.activation_checkpointing else None,
        recompute_method="uniform" if mcfg.activation_checkpointing else None,
        recompute_num_layers=1 if mcfg.activation_checkpointing else None,
        **kwargs,
    )


def token_alignment(config) -> int:
    """Tokens per forward must be a multiple of this: Transformer Engine's FP8 GEMMs assert it
    (16; 32 for MXFP8). 1 without FP8."""
    if not config.fp8:
        return 1
    return get_fp8_align_size(config.fp8_recipe)


def layer_spec(mcfg: MegatronCfg):
    if mcfg.transformer_impl == "transformer_engine":
        if not have_transformer_engine():
            raise UserError(
                "policy.megatron_cfg.transformer_impl=transformer_engine: Transformer Engine is not importable "
                "here; install the 'gpu' extra on a CUDA machine or use transformer_impl=local"
            )
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    # One core attention for both specs: SDPA honours the decoding's explicit left-padding mask
    # (TE's attention follows its mask type and would ignore it) and runs flash attention for
    # full-sequence passes. TE keeps the fused norm + linear layers and their FP8 GEMMs.
    spec.submodules.self_attention.submodules.core_attention = SdpaDotProductAttention
    return spec


def build_gpt_model(
    arch: ModelArch,
    mcfg: MegatronCfg,
    parallel: ParallelState,
    precision: str = "float32",
    padded_vocab_size: int | None = None,
):
    """This rank's shard of the model: its pipeline stage's layers, on its process groups."""
    config = transformer_config(arch, mcfg, precision)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(mcfg),
        vocab_size=padded_vocab_size or arch.padded_vocab_size(mcfg.make_vocab_size_divisible_by),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel.first_stage,
        post_process=parallel.last_stage,
        pg_collection=parallel.groups,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
    )
    set_rope_frequencies(model, arch.rope_inv_freq())
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
