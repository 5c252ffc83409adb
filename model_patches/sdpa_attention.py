"""Core attention of the local layer spec on `torch.nn.functional.scaled_dot_product_attention`.

Megatron-Core's local `DotProductAttention` materialises the [b, heads, s, s] scores and runs an
unfused softmax (its fused kernel needs apex). On a GPU that caps training MFU; SDPA dispatches to
flash / memory-efficient attention (and to a fused CPU kernel here), never storing the scores.

Masks follow Megatron's convention (True = not allowed):
- `attention_mask=None` with as many queries as keys is plain causal attention (training and
  log-prob passes), so SDPA may pick its flash kernel;
- an explicit mask (decoding: future keys and left padding) is used as an additive float mask.
  Callers that run many layers pass one already (`additive_mask`, built once per forward: the
  rollout does); a boolean mask is converted here, in every layer. A finite fill keeps rows
  that are entirely masked (left-padding queries) finite, as Megatron's `masked_fill(-10000)`
  does: their outputs are never read, but a NaN there would reach real rows through the next
  layer's values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention

MASKED_SCORE = -10000.0  # Megatron's attention_mask_func fill


def additive_mask(blocked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Megatron's boolean mask (True = not allowed) as the float mask SDPA adds to the scores."""
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill_(
        blocked, MASKED_SCORE
    )


class SdpaDotProductAttention(DotProductAttention):
    """Drop-in `core_attention` for the local spec: same inputs and output layout."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        unsupported = {
            "softmax_type": config.softmax_type != "vanilla",
            "window_size": config.window_size is not None,
            "apply_query_key_layer_scaling": config.apply_query_key_layer_scaling,
            "attention_dropout": self.attention_dropout.p > 0,  # RL recipes train without it
        }
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise NotImplementedError(f"SDPA core attention does not support {', '.join(bad)}")

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np * hn]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError(
                "SDPA core attention: packed sequences and attention bias are not supported"
            )
        sq, b, heads, head_dim = query.shape
        groups = heads // key.shape[2]
        if groups > 1:  # grouped-query attention: every backend accepts repeated heads
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, np, s, hn]
        mask, causal = None, False
        if attention_mask is None:
            causal = sq == k.shape[2]  # one decode query (no mask given) sees every cached key
        else:
            mask = (
                attention_mask.to(q.dtype)
                if attention_mask.is_floating_point()
                else additive_mask(attention_mask, q.dtype)
            )
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale
        )
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * head_dim)
