"""`softgrpo convert`: Hugging Face <-> megatron-softgrpo checkpoints.

hf-to-megatron runs on TP x PP processes (or one), each reading only its own slices of the
HF tensors, and writes a dist_checkpointing checkpoint that loads at any layout.
megatron-to-hf runs in one process: dist_checkpointing reshards any saved layout into TP=1/PP=1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_softgrpo.config.schema import MegatronCfg
from megatron_softgrpo.distributed import ParallelLayout, init_distributed
from megatron_softgrpo.errors import UserError
from megatron_softgrpo.models.build import DTYPES
from megatron_softgrpo.models.checkpoint import CheckpointMeta, read_meta, save_checkpoint
from megatron_softgrpo.models.hf_mapping import full_state_dict, hf_state_from_full_megatron
from megatron_softgrpo.models.loading import load_model
from megatron_softgrpo.models.source import (
    ModelSource,
    has_tokenizer,
    load_tokenizer,
    resolve_model_source,
)

SHARD_BYTES = 4 * 1024**3
HF_CLASSES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


def _layout_mcfg(source: ModelSource, tp: int, pp: int) -> MegatronCfg:
    problem = source.arch.layout_problem(tp, pp)
    if problem:
        flag = "--tp" if problem[0] == "tp" else "--pp"
        raise UserError(f"{flag} {tp if flag == '--tp' else pp}: {problem[1]}")
    mcfg = MegatronCfg(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    padded = source.arch.padded_vocab_size(mcfg.make_vocab_size_divisible_by)
    if padded % tp:
        raise UserError(f"--tp {tp}: must divide the padded vocabulary ({padded})")
    return mcfg


def hf_to_megatron(hf: str, out: str, tp: int = 1, pp: int = 1, precision: str = "float32") -> Path:
    source = resolve_model_source(hf)
    if source.kind != "hf":
        raise UserError(
            f"--hf {hf}: expected a Hugging Face model directory (config.json + safetensors)"
        )
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"--out {out}: directory exists and is not empty; choose a new directory")
    mcfg = _layout_mcfg(source, tp, pp)
    parallel = init_distributed(ParallelLayout(tp, pp))
    model, padded = load_model(source, mcfg, parallel, precision)
    meta = CheckpointMeta(
        arch=source.arch.to_dict(),
        padded_vocab_size=padded,
        hf_config=json.loads((source.path / "config.json").read_text()),
        precision=precision,
    )
    tokenizer = load_tokenizer(source) if parallel.main and has_tokenizer(source.path) else None
    states = {"model": model.sharded_state_dict()}
    save_checkpoint(out_dir, states, meta, parallel, tokenizer=tokenizer)
    if parallel.main:
        print(
            f"[softgrpo] wrote {out_dir} (saved at TP={tp} PP={pp}; loads at any layout)",
            flush=True,
        )
    return out_dir


def _write_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes

    def save(shard: dict[str, torch.Tensor], fname: str) -> None:
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        os.chmod(out_dir / fname, 0o644)  # safetensors writes 0600; exports are shared files

    if len(shards) == 1:
        save(shards[0], "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save(shard, fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def megatron_to_hf(ckpt: str, out: str, dtype: str | None = None) -> Path:
    meta = read_meta(ckpt)
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"--out {out}: directory exists and is not empty; choose a new directory")
    source = resolve_model_source(ckpt)
    parallel = init_distributed(ParallelLayout(1, 1))
    model, _ = load_model(source, MegatronCfg(), parallel, meta.precision)
    hf_state = hf_state_from_full_megatron(full_state_dict(model), source.arch)
    if dtype is not None:
        hf_state = {k: v.to(DTYPES[dtype]) for k, v in hf_state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_safetensors(hf_state, out_dir)
    config = dict(meta.hf_config)
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)  # a path on the machine that converted it
    config["architectures"] = config.get("architectures") or [HF_CLASSES[source.arch.model_type]]
    config["dtype"] = str(next(iter(hf_state.values())).dtype).replace("torch.", "")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if has_tokenizer(source.tokenizer_path):
        load_tokenizer(source).save_pretrained(str(out_dir))
    print(f"[softgrpo] wrote {out_dir} ({len(hf_state)} tensors)", flush=True)
    return out_dir
