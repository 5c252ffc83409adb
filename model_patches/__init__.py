"""The only code that reaches into Megatron-Core internals.

- `cpu_compat`: run Megatron on machines without CUDA (gloo, CPU tensors).
- `grad_sync`: no gradient collective over a one-rank data-parallel group.
- `lifetime`: a dropped model is freed, and its process groups with it (DDP's hooks, RoPE's cache).
- `wgrad_accumulation`: linear layers add their weight gradient into DDP's buffer in the GEMM.
- `mixture_embedding`: sum_k w_k E[ids_k] on the vocabulary-parallel embedding table, fed as `decoder_input`.
- `output_layer`: vocab-sharded logits during decoding; final hidden states for the chunked log-densities.
- `sdpa_attention`: the core attention of both layer specs on torch SDPA (flash on GPU; honours the decoding mask).
- `static_decode`: the fixed-shape decode step on the modules' own weights (the static engine).
- `inference_cache`: Megatron's StaticInferenceContext as the Megatron decode backend uses it (reset, drop rows).
- `optimizer_step`: the step that skips a non-finite gradient; the optimizer's checkpoint state.
- `rope`: a model's exact RoPE frequencies (Megatron hard-codes Llama 3.1's llama3 scaling).
"""

from model_patches import cpu_compat, grad_sync, lifetime


def apply_all() -> None:
    """Apply every patch this machine needs; call before building a Megatron model."""
    cpu_compat.apply()
    grad_sync.apply()
    lifetime.apply()
