"""The architecture of a supported decoder (Qwen2 or Llama family), read from a Hugging Face config.json."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megatron_softgrpo.errors import UserError

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


@dataclass(frozen=True)
class ModelArch:
    model_type: str  # "qwen2" | "llama"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    ffn_hidden_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    # llama3-style scaling: {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict | None = None

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> ModelArch:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"{source}: model_type={model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise UserError(
                f"{source}: hidden_act={cfg.get('hidden_act')!r}; only 'silu' (SwiGLU) is supported"
            )
        # transformers >= 5 nests RoPE settings under rope_parameters; older configs use rope_theta/rope_scaling.
        rope = dict(cfg.get("rope_parameters") or {})
        legacy_scaling = cfg.get("rope_scaling") or {}
        rope_type = (
            rope.get("rope_type")
            or legacy_scaling.get("rope_type")
            or legacy_scaling.get("type")
            or "default"
        )
        scaling = None
        if rope_type == "llama3":
            src = {**legacy_scaling, **rope}
            scaling = {
                "factor": float(src["factor"]),
                "low_freq_factor": float(src["low_freq_factor"]),
                "high_freq_factor": float(src["high_freq_factor"]),
                "original_max_position_embeddings": int(src["original_max_position_embeddings"]),
            }
        elif rope_type != "default":
            raise UserError(
                f"{source}: rope type {rope_type!r} is not supported; expected 'default' or 'llama3'"
            )
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            ffn_hidden_size=int(cfg["intermediate_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama has them only with attention_bias=True.
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            rope_scaling=scaling,
        )

    @classmethod
    def from_hf_dir(cls, hf_dir: str | Path) -> ModelArch:
        path = Path(hf_dir) / "config.json"
        if not path.is_file():
            raise UserError(
                f"{path}: not found; expected a Hugging Face model directory with config.json"
            )
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON ({e})") from None
        return cls.from_hf_config(cfg, source=str(path))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArch:
        return cls(**d)

    def padded_vocab_size(self, divisible_by: int = 128) -> int:
        """Vocabulary rounded up so that every TP size dividing `divisible_by` splits it evenly.

        Independent of TP on purpose: a checkpoint saved at one TP loads at another.
        """
        return int(math.ceil(self.vocab_size / divisible_by) * divisible_by)

    def rope_inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies (fp32), including llama3 scaling when configured."""
        inv_freq = 1.0 / (
            self.rope_theta
            ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim)
        )
        if self.rope_scaling is None:
            return inv_freq
        s = self.rope_scaling
        old_len = s["original_max_position_embeddings"]
        low_wavelen = old_len / s["low_freq_factor"]
        high_wavelen = old_len / s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
        smooth = (old_len / wavelen - s["low_freq_factor"]) / (
            s["high_freq_factor"] - s["low_freq_factor"]
        )
        smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)

    def layout_problem(self, tp: int, pp: int) -> tuple[str, str] | None:
        """Why this model cannot be split TP x PP, as ("tp" | "pp", reason); None when it can."""
        if self.num_attention_heads % tp:
            return "tp", f"must divide the model's {self.num_attention_heads} attention heads"
        if self.num_key_value_heads % tp:
            return "tp", f"must divide the model's {self.num_key_value_heads} key/value heads"
        if pp > self.num_layers or self.num_layers % pp:
            return "pp", f"must divide the model's {self.num_layers} layers"
        return None

    def num_parameters(self) -> int:
        """Unpadded parameter count, as Hugging Face reports it."""
        h, f, v, hd = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        per_layer = attn + 3 * h * f + 2 * h
        embeddings = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h
