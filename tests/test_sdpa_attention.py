"""The local spec's SDPA core attention against a float64 reference and Megatron's DotProductAttention."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_softgrpo.distributed import ParallelLayout, init_distributed

SQ_B_HEADS_DIM = (6, 2, 4, 8)
GROUPS = 2  # grouped-query attention: 4 query heads share 2 key/value heads


def make_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=8,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        use_cpu_initialization=True,
    )
    return TransformerConfig(**{**kwargs, **overrides})


def attention(cls, **config):
    from megatron.core.transformer.enums import AttnMaskType

    init_distributed(ParallelLayout(1, 1))
    return cls(
        make_config(**config),
        layer_number=1,
        attn_mask_type=AttnMaskType.causal,
        attention_type="self",
    )


def sdpa(**config):
    from model_patches.sdpa_attention import SdpaDotProductAttention

    return attention(SdpaDotProductAttention, **config)


def qkv(sq, sk, seed=0):
    g = torch.Generator().manual_seed(seed)
    _, b, heads, dim = SQ_B_HEADS_DIM
    q = torch.randn(sq, b, heads, dim, generator=g)
    k, v = (torch.randn(sk, b, heads // GROUPS, dim, generator=g) for _ in range(2))
    return q, k, v


def reference(q, k, v, allowed):
    """float64 softmax(q k^T / sqrt(d)) v over the allowed keys; allowed [b, 1|heads, sq, sk]."""
    q, k, v = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h, s, d]
    k, v = (t.repeat_interleave(GROUPS, dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    out = scores.masked_fill(~allowed, -math.inf).softmax(-1) @ v
    return out.permute(2, 0, 1, 3).reshape(q.shape[2], q.shape[0], -1)


def test_no_mask_is_causal_attention():
    sq = SQ_B_HEADS_DIM[0]
    q, k, v = qkv(sq, sq)
    causal = torch.ones(sq, sq, dtype=torch.bool).tril()[None, None]
    out = sdpa()(q, k, v, attention_mask=None)
    assert out.shape == (sq, 2, 32)
    assert (out.double() - reference(q, k, v, causal)).abs().max() <= 1e-5


def test_explicit_decode_mask_with_left_padding():
    """Two queries over five cached keys; row 1 has two left-padding keys."""
    q, k, v = qkv(2, 5, seed=1)
    pad = torch.tensor([[False] * 5, [True, True, False, False, False]])
    future = torch.ones(2, 5, dtype=torch.bool).triu(5 - 2 + 1)
    blocked = future[None, None] | pad[:, None, None, :]  # Megatron: True = not allowed
    out = sdpa()(q, k, v, attention_mask=blocked)
    assert (out.double() - reference(q, k, v, ~blocked)).abs().max() <= 1e-5
    # the additive form the rollout builds once for all layers gives the same result
    from model_patches.sdpa_attention import additive_mask

    assert torch.equal(sdpa()(q, k, v, attention_mask=additive_mask(blocked, q.dtype)), out)


def test_matches_megatron_dot_product_attention_and_fully_masked_rows_stay_finite():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    sq = SQ_B_HEADS_DIM[0]
    q, k, v = qkv(sq, sq, seed=2)
    # row 1 is left-padded by three: its first three queries see only padding keys
    pad = torch.tensor([[False] * sq, [True] * 3 + [False] * (sq - 3)])
    blocked = torch.ones(sq, sq, dtype=torch.bool).triu(1)[None, None] | pad[:, None, None, :]
    ours = sdpa()(q, k, v, attention_mask=blocked)
    megatron = attention(DotProductAttention)(q, k, v, attention_mask=blocked)
    assert torch.isfinite(ours).all()
    # rows with no allowed key are never read; Megatron fills them uniformly, SDPA need not
    seen = ~blocked.all(-1)[:, 0].T  # [sq, b]
    assert seen.sum() == 2 * sq - 3
    assert (ours - megatron)[seen].abs().max() <= 1e-5


def test_unsupported_settings_are_refused():
    with pytest.raises(NotImplementedError, match="attention_dropout"):
        sdpa(attention_dropout=0.1)
