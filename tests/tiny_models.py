"""Tiny random Qwen2 / Llama models written as Hugging Face directories, for exact comparisons."""

from __future__ import annotations

from pathlib import Path

import torch

VARIANTS = {
    # GQA, q/k/v biases, untied output layer, a vocabulary that needs padding (1000 -> 1024)
    "qwen2": dict(
        model_type="qwen2",
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_theta=1_000_000.0,
    ),
    # tied embeddings and llama3 RoPE scaling with non-default constants (Megatron hard-codes others)
    "llama": dict(
        model_type="llama",
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500_000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
}


def make_hf_model(kind: str, path: Path, seed: int = 0, **overrides):
    """Create, save and return a random transformers model of the given kind."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = {**VARIANTS[kind], **overrides}
    spec.pop("model_type")
    torch.manual_seed(seed)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(max_position_embeddings=256, **spec))
    else:
        model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=256, **spec))
    # default init is tiny (std 0.02); widen it so logits differ visibly between positions
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.eval()
    model.save_pretrained(str(path))
    return model
