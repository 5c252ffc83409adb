"""Architectures of the models the GPU recipes train, so recipes validate and plan without the weights.

Each entry holds the architecture keys of the model's Hugging Face `config.json` with their
published values (checked against the config.json files on the Hugging Face Hub). A recipe
names an entry with `policy.model_arch`; it is used only when `policy.model_name` cannot be
read on this machine (see `config/checks.py::recipe_model`).
"""

from __future__ import annotations

from megatron_softgrpo.errors import UserError
from megatron_softgrpo.models.arch import ModelArch

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

KNOWN_HF_CONFIGS: dict[str, dict] = {
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    "deepseek-r1-distill-qwen-1.5b": {
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000,
        "rope_scaling": None,
        "tie_word_embeddings": False,
    },
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-7B
    "deepseek-r1-distill-qwen-7b": {
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000,
        "rope_scaling": None,
        "tie_word_embeddings": False,
    },
    # meta-llama/Llama-3.2-3B-Instruct
    "llama-3.2-3b-instruct": {
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0},
        "attention_bias": False,
        "tie_word_embeddings": True,
    },
    # Qwen/Qwen2.5-32B-Instruct
    "qwen2.5-32b-instruct": {
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": 5120,
        "intermediate_size": 27648,
        "num_hidden_layers": 64,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
    },
    # meta-llama/Llama-3.1-70B-Instruct (Llama-3.3-70B-Instruct has the same architecture)
    "llama-3.1-70b-instruct": {
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE,
        "attention_bias": False,
        "tie_word_embeddings": False,
    },
}


def known_arch(name: str) -> ModelArch:
    """The architecture of a registry entry; UserError naming the known entries otherwise."""
    if name not in KNOWN_HF_CONFIGS:
        raise UserError(
            f"unknown model architecture {name!r}; known: {', '.join(sorted(KNOWN_HF_CONFIGS))}"
        )
    return ModelArch.from_hf_config(KNOWN_HF_CONFIGS[name], source=f"model architecture {name!r}")
