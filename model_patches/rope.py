"""A model's exact RoPE inverse frequencies in Megatron-Core's `RotaryEmbedding`.

Megatron's llama3 scaling hard-codes Llama 3.1's constants (factor 8, original length 8192);
Llama 3.2 uses others (factor 32), so the frequencies computed from the model's own config
replace the ones Megatron built.
"""

from __future__ import annotations

import torch


def set_rope_frequencies(model, inv_freq: torch.Tensor) -> None:
    """`model`: a GPTModel with rotary position embeddings; `inv_freq`: [head_dim / 2]."""
    model.rotary_pos_emb.inv_freq = inv_freq.to(model.rotary_pos_emb.inv_freq.device)
