"""A static-shape decode step on a GPTModel's own weights: the fast path of the rollout.

Megatron's eager forward with `StaticInferenceContext` slices its KV cache at Python-int
offsets and launches dozens of small kernels per layer; a decode step there is bound by
launches and host work (docs/architecture.md, "Measured Megatron facts"). This module runs the
same math as a pure tensor function whose shapes depend only on the bucket (batch rows, cache
columns), so it can be compiled whole or captured as one CUDA graph:

- one preallocated KV cache per layer, [B, groups, L, head_dim]; a step writes its keys and
  values in place at the columns held in a device tensor (`index_copy_`); a step of b <= B
  rows uses the cache's first b rows, and fewer rows move there in place (`keep_rows`), so
  the cache, and a graph captured on it, outlive a shrink;
- the attention mask (left padding, future columns) and the RoPE angles are derived on the
  device from each row's pad length and the current column;
- linears are `F.linear` on the Megatron modules' weights (the same tensors the trainer
  updates in place, so nothing needs refreshing after an update); the two row-parallel
  outputs of a layer are all-reduced over the TP group passed in. On an x86 CPU in fp32 they
  run instead on oneDNN copies of the weights packed for its GEMM (`pack=True`, steps of >=
  PACKED_MIN_ROWS rows; repacked by `pack_weights()` before every pass): MKL's GEMM packs the
  weight again on every call, which at a decode step's few rows costs ~1.5x the pass over the
  weights (benchmarks/RESULTS.md);
- the last stage returns this TP rank's vocabulary shard of the logits (the samplers select
  across shards themselves). The pipeline hand-off stays outside the step.

Positions are padded columns, as in `rollout/megatron_backend.py`: every row ends at the same
column, the prompt is left-padded, and RoPE sees shifted positions, which leaves attention
unchanged (it depends only on relative positions).

Supported: the local (and, untested here, Transformer Engine) spec of Qwen2 / Llama / SmolLM2
models: RMSNorm, SwiGLU, RoPE, grouped-query attention, optional QKV bias, tied or untied
output. Not supported (the Megatron backend serves them): FP8 GEMMs, sequence parallelism, QK
layernorm, interleaved RoPE.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from megatron_softgrpo.distributed import sum_tensor_parallel_
from model_patches.mixture_embedding import local_mixture
from model_patches.sdpa_attention import MASKED_SCORE

MIN_LENGTH_BUCKET = 64  # attention reads the cache up to a power of two >= this
PACKED_MIN_ROWS = 4  # below, the packed GEMM is slower than MKL's (a pass's last rows)


def length_bucket(columns: int, max_len: int) -> int:
    """The cache columns attention reads when `columns` are filled: few shapes, few compiles."""
    size = MIN_LENGTH_BUCKET
    while size < columns:
        size *= 2
    return min(size, max_len)


@dataclass(frozen=True)
class _Layer:
    """One transformer layer's weights (views of the module parameters, never copies)."""

    attn_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    proj: torch.Tensor
    proj_bias: torch.Tensor | None
    mlp_norm: torch.Tensor
    fc1: torch.Tensor
    fc1_bias: torch.Tensor | None
    fc2: torch.Tensor
    fc2_bias: torch.Tensor | None

    @classmethod
    def of(cls, layer) -> _Layer:
        attn, mlp = layer.self_attention, layer.mlp
        return cls(
            attn_norm=_norm_weight(attn.linear_qkv, layer.input_layernorm),
            qkv=attn.linear_qkv.weight,
            qkv_bias=_bias(attn.linear_qkv),
            proj=attn.linear_proj.weight,
            proj_bias=_bias(attn.linear_proj),
            mlp_norm=_norm_weight(mlp.linear_fc1, layer.pre_mlp_layernorm),
            fc1=mlp.linear_fc1.weight,
            fc1_bias=_bias(mlp.linear_fc1),
            fc2=mlp.linear_fc2.weight,
            fc2_bias=_bias(mlp.linear_fc2),
        )

    def packed(self, rows: int) -> _Layer:
        """The layer with its GEMM weights packed for `rows` rows (copies)."""
        return replace(
            self,
            qkv=_pack(self.qkv, rows),
            proj=_pack(self.proj, rows),
            fc1=_pack(self.fc1, rows),
            fc2=_pack(self.fc2, rows),
        )


def _pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """A oneDNN copy of `weight` laid out for its GEMM at `rows` rows (an mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether oneDNN's packed GEMM serves this decoder (`StaticDecoder(pack=True)`)."""
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and platform.machine().lower() in ("x86_64", "amd64")
    )


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    if weight.is_mkldnn:  # a packed copy (StaticDecoder.pack_weights)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _norm_weight(linear, norm) -> torch.Tensor:
    # TE's spec fuses the norm into the next linear (layer_norm_weight); the local spec has a module
    fused = getattr(linear, "layer_norm_weight", None)
    return fused if fused is not None else norm.weight


def _bias(linear) -> torch.Tensor | None:
    bias = getattr(linear, "bias", None)
    return bias if isinstance(bias, torch.Tensor) and bias.numel() else None


def unsupported(config) -> list[str]:
    """The model settings this decoder does not implement (empty: supported)."""
    checks = {
        "fp8": bool(getattr(config, "fp8", None)),
        "sequence_parallel": config.sequence_parallel,
        "qk_layernorm": config.qk_layernorm,
        "rotary_interleaved": config.rotary_interleaved,
        "normalization != RMSNorm": config.normalization != "RMSNorm",
        "non-gated MLP": not config.gated_linear_unit,
        "activation != silu": config.activation_func is not F.silu,
        "softmax_scale": config.softmax_scale is not None,
    }
    return [name for name, bad in checks.items() if bad]


class StaticDecoder:
    """This pipeline stage's layers as a static-shape step over a preallocated KV cache.

    `forward(x, columns, pad)`: x is a MixtureRecord-like (mix_ids, mix_weights, offset) input on
    the first stage and hidden states [B, q, h] elsewhere; `columns` [q] int64 are the cache
    columns of the q new positions (contiguous, the same for every row); `pad` [B] int64 each
    row's left-padding length. Returns hidden states [B, q, h], or on the last stage the logit
    shard [B, V/TP] (fp32) of the last position.
    """

    def __init__(self, model, batch: int, max_len: int, tp_group=None, pack: bool = False):
        """`pack`: GEMMs on packed copies of the weights (`can_pack`); call `pack_weights()`
        after the weights change."""
        cfg = model.config
        bad = unsupported(cfg)
        if bad:
            raise NotImplementedError(
                f"static decoding does not support {', '.join(bad)}; set policy.generation.engine: eager"
            )
        self.tp_group = tp_group if tp_group is not None and tp_group.size() > 1 else None
        tp = 1 if self.tp_group is None else self.tp_group.size()
        self.heads = cfg.num_attention_heads // tp
        self.groups = (cfg.num_query_groups or cfg.num_attention_heads) // tp
        self.head_dim = cfg.kv_channels
        self.eps = cfg.layernorm_epsilon
        self.hidden = cfg.hidden_size
        self.dtype = next(model.parameters()).dtype
        self.softmax_dtype = torch.promote_types(self.dtype, torch.float32)  # bf16: in fp32
        self.device = next(model.parameters()).device
        self.first_stage, self.last_stage = model.pre_process, model.post_process
        self.params = [_Layer.of(layer) for layer in model.decoder.layers]
        self.layers = self.params  # what a step of >= PACKED_MIN_ROWS rows multiplies by
        self.pack = pack
        if self.first_stage:
            emb = model.embedding.word_embeddings
            self.table, self.vocab_start, self.vocab_end = (
                emb.weight,
                emb.vocab_start_index,
                emb.vocab_end_index,
            )
        if self.last_stage:
            self.final_norm = model.decoder.final_layernorm.weight
            self.output_param = (
                model.shared_embedding_or_output_weight()
                if model.share_embeddings_and_output_weights
                else model.output_layer.weight
            )
            self.output = self.output_param
        # the same angles as Megatron's RotaryEmbedding (fp32, cast to the activations' dtype)
        angles = model.rotary_pos_emb.get_freqs_non_repeated(max_len).to(self.device)
        angles = torch.cat([angles, angles], dim=-1)  # [L, head_dim], non-interleaved halves
        self.cos, self.sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)
        self.max_len = max_len
        shape = (batch, self.groups, max_len, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.pack_weights()

    def pack_weights(self) -> None:
        """Pack the GEMM weights again from the parameters (with `pack`; else nothing to do):
        the packed copies do not follow the trainer's in-place updates."""
        if not self.pack:
            return
        self.layers = [layer.packed(self.batch) for layer in self.params]
        if self.last_stage:
            self.output = _pack(self.output_param, self.batch)

    @property
    def batch(self) -> int:
        """The rows the cache holds (a step may use its first rows only)."""
        return self.keys[0].shape[0] if self.keys else 0

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Continue with the cache rows `rows` as rows 0..len(rows)-1, moved in place (the
        gather reads before it writes), so nothing is reallocated."""
        n = len(rows)
        for cache in (*self.keys, *self.values):
            cache[:n] = cache[rows]

    def embed(self, mix_ids, mix_weights, offset=None) -> torch.Tensor:
        """The mixture input [B, q, h] (first stage): sum_k w_k E[ids_k], all-reduced over TP."""
        mixed = self._all_reduce(
            local_mixture(self.table, self.vocab_start, self.vocab_end, mix_ids, mix_weights)
        )
        if offset is not None:
            mixed = mixed + offset.float()
        return mixed.to(self.dtype)

    def forward(self, x: torch.Tensor, columns: torch.Tensor, pad: torch.Tensor, length: int):
        """One pass over this stage's layers; `length` (a bucket, >= last column + 1) bounds the
        cache columns that attention reads, so it is a static shape per bucket."""
        key_cols = torch.arange(length, device=columns.device)
        # [B, 1, q, length]: a key is visible when it is not left padding and not in the future
        visible = (key_cols[None, None, :] >= pad[:, None, None]) & (
            key_cols[None, None, :] <= columns[None, :, None]
        )
        mask = torch.where(visible, 0.0, MASKED_SCORE).to(self.dtype)[:, None]
        cos, sin = self.cos[columns], self.sin[columns]  # [q, head_dim]
        packed = x.shape[0] >= PACKED_MIN_ROWS
        for i, layer in enumerate(self.layers if packed else self.params):
            x = x + self._attention(i, layer, x, columns, cos, sin, mask, length)
            x = x + self._mlp(layer, x)
        if not self.last_stage:
            return x
        x = F.rms_norm(x[:, -1], (self.hidden,), self.final_norm, self.eps)
        return _linear(x, self.output if packed else self.output_param).float()

    def _attention(self, i, layer: _Layer, x, columns, cos, sin, mask, length):
        b, q, _ = x.shape
        r = self.heads // self.groups
        h = F.rms_norm(x, (self.hidden,), layer.attn_norm, self.eps)
        qkv = _linear(h, layer.qkv, layer.qkv_bias)
        # Megatron's layout: per query group, its r query heads, then one key and one value head
        qkv = qkv.view(b, q, self.groups, r + 2, self.head_dim).permute(0, 2, 3, 1, 4)
        query, key, value = qkv[:, :, :r], qkv[:, :, r], qkv[:, :, r + 1]
        query, key = _rope(query, cos, sin), _rope(key, cos, sin)
        keys, values = self.keys[i][:b], self.values[i][:b]  # this step's rows
        keys.index_copy_(2, columns, key)
        values.index_copy_(2, columns, value)
        keys, values = keys[:, :, :length], values[:, :, :length]
        if q > 1:  # prefill: SDPA's fused kernels keep memory linear in the prompt length
            context = F.scaled_dot_product_attention(
                query.reshape(b, self.heads, q, self.head_dim), keys, values, mask, enable_gqa=True
            )  # query head g*r + j reads key group g, as in Megatron's layout
            context = context.view(b, self.groups, r, q, self.head_dim).permute(0, 3, 1, 2, 4)
        else:
            # [B, g, r, d] against [B, g, L, d]: grouped heads share the cache without repeating
            # it; the query scaled first, so fp16 scores do not overflow
            query = query.reshape(b, self.groups, r, self.head_dim) * self.head_dim**-0.5
            scores = query @ keys.transpose(-1, -2) + mask
            probs = torch.softmax(scores, dim=-1, dtype=self.softmax_dtype).to(self.dtype)
            context = (probs @ values).view(b, 1, self.groups, r, self.head_dim)
        out = _linear(context.reshape(b, q, self.heads * self.head_dim), layer.proj)
        out = self._all_reduce(out)
        return out if layer.proj_bias is None else out + layer.proj_bias

    def _mlp(self, layer: _Layer, x):
        h = F.rms_norm(x, (self.hidden,), layer.mlp_norm, self.eps)
        gate, up = _linear(h, layer.fc1, layer.fc1_bias).chunk(2, dim=-1)
        out = self._all_reduce(_linear(F.silu(gate) * up, layer.fc2))
        return out if layer.fc2_bias is None else out + layer.fc2_bias

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return sum_tensor_parallel_(x, self.tp_group)  # in place: a CUDA graph captures it


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Megatron's non-interleaved RoPE on [..., q, head_dim]: x cos + rotate_half(x) sin."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin
