"""Weights between Hugging Face Qwen2/Llama checkpoints and Megatron GPTModel shards.

Every Megatron tensor is first expressed in its full (TP=1) layout, then cut to this rank's
tensor-parallel slice; a refit sends the same layout (`tp_gather`, `full_to_shards`). Import
therefore needs one HF tensor at a time per rank (no full model in memory), and export works on
a TP=1/PP=1 model, into which dist_checkpointing reshards any saved layout.

Full-layout conventions (Megatron local spec names):
- linear_qkv rows are grouped per key/value head: [q (heads_per_group*hd), k (hd), v (hd)] x groups;
- linear_fc1 is [gate; up];
- vocabulary rows are padded with zeros up to the padded vocabulary size.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from megatron_softgrpo.errors import UserError
from megatron_softgrpo.models.arch import ModelArch

# Transformer Engine fuses the pre-norms into the following linear; map to local-spec names.
_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


class HFCheckpointReader:
    """Lazy access to the tensors of a Hugging Face safetensors checkpoint (single file or sharded)."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise UserError(
                f"{self.dir}: no *.safetensors weights found (PyTorch .bin checkpoints are not supported)"
            )
        self._handles = {f: safe_open(str(self.dir / f), framework="pt") for f in files}
        self._where = weight_map or {k: f for f, h in self._handles.items() for k in h.keys()}

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise UserError(f"{self.dir}: tensor {name!r} missing from the checkpoint")
        return self._handles[self._where[name]].get_tensor(name)


def _pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])])


def _group_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    groups, hd = arch.num_key_value_heads, arch.head_dim
    tail = q.shape[1:]
    q = q.reshape(groups, -1, *tail)
    k = k.reshape(groups, hd, *tail)
    v = v.reshape(groups, hd, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def _split_qkv(
    qkv: torch.Tensor, arch: ModelArch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, hd = arch.num_key_value_heads, arch.head_dim
    q_per_group = arch.num_attention_heads // groups * hd
    tail = qkv.shape[1:]
    grouped = qkv.reshape(groups, q_per_group + 2 * hd, *tail)
    q, k, v = grouped.split([q_per_group, hd, hd], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def full_megatron_tensor(
    name: str, arch: ModelArch, padded_vocab: int, hf: Callable[[str], torch.Tensor]
) -> torch.Tensor:
    """The full (TP=1) Megatron tensor `name` (local-spec name, global layer index) built from HF tensors."""
    if name == "embedding.word_embeddings.weight":
        return _pad_vocab(hf("model.embed_tokens.weight"), padded_vocab)
    if name == "output_layer.weight":
        # a tied model's last pipeline stage holds its own copy of the embedding
        return _pad_vocab(
            hf("model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"),
            padded_vocab,
        )
    if name == "decoder.final_layernorm.weight":
        return hf("model.norm.weight")
    m = _LAYER.match(name)
    if not m:
        raise KeyError(f"no Hugging Face source for Megatron tensor {name}")
    i, rest = m.group(1), m.group(2)
    p = f"model.layers.{i}."
    if rest == "input_layernorm.weight":
        return hf(p + "input_layernorm.weight")
    if rest == "pre_mlp_layernorm.weight":
        return hf(p + "post_attention_layernorm.weight")
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        a = p + "self_attn."
        return _group_qkv(
            hf(f"{a}q_proj.{kind}"), hf(f"{a}k_proj.{kind}"), hf(f"{a}v_proj.{kind}"), arch
        )
    if rest == "self_attention.linear_proj.weight":
        return hf(p + "self_attn.o_proj.weight")
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([hf(p + "mlp.gate_proj.weight"), hf(p + "mlp.up_proj.weight")])
    if rest == "mlp.linear_fc2.weight":
        return hf(p + "mlp.down_proj.weight")
    raise KeyError(f"no Hugging Face source for Megatron tensor {name}")


def hf_state_from_full_megatron(
    full: dict[str, torch.Tensor], arch: ModelArch
) -> dict[str, torch.Tensor]:
    """Inverse of `full_megatron_tensor` for a whole TP=1/PP=1 state dict (local-spec names)."""
    v = arch.vocab_size
    out = {
        "model.embed_tokens.weight": full["embedding.word_embeddings.weight"][:v],
        "model.norm.weight": full["decoder.final_layernorm.weight"],
    }
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = full["output_layer.weight"][:v]
    for i in range(arch.num_layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = full[m + "input_layernorm.weight"]
        out[p + "post_attention_layernorm.weight"] = full[m + "pre_mlp_layernorm.weight"]
        kinds = ("weight", "bias") if arch.qkv_bias else ("weight",)
        for kind in kinds:
            q, k, vv = _split_qkv(full[f"{m}self_attention.linear_qkv.{kind}"], arch)
            (
                out[f"{p}self_attn.q_proj.{kind}"],
                out[f"{p}self_attn.k_proj.{kind}"],
                out[f"{p}self_attn.v_proj.{kind}"],
            ) = q, k, vv
        out[p + "self_attn.o_proj.weight"] = full[m + "self_attention.linear_proj.weight"]
        gate, up = full[m + "mlp.linear_fc1.weight"].chunk(2)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        out[p + "mlp.down_proj.weight"] = full[m + "mlp.linear_fc2.weight"]
    return {k: t.contiguous() for k, t in out.items()}


def named_model_tensors(model) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
    """(canonical name with global layer index, local name, parameter) for this rank's shard."""
    for local_name, param in model.named_parameters():
        name = local_name
        m = _LAYER.match(name)
        if m:
            layer = model.decoder.layers[int(m.group(1))]
            rest = _TE_TO_LOCAL.get(m.group(2), m.group(2))
            name = f"decoder.layers.{layer.layer_number - 1}.{rest}"
        yield name, local_name, param


def tp_slice(
    full: torch.Tensor, param: torch.nn.Parameter, name: str, tp_rank: int, tp_size: int
) -> torch.Tensor:
    """This TP rank's slice of a full tensor, following Megatron's partitioning of `param`."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if name.endswith("mlp.linear_fc1.weight"):  # [gate; up] is split per half, then re-stacked
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]])
    return full.chunk(tp_size, dim=dim)[tp_rank]


def tp_gather(shard: torch.Tensor, param: torch.nn.Parameter, name: str, group) -> torch.Tensor:
    """The full tensor of this rank's TP slice `shard` (the inverse of `tp_slice`), gathered
    over the tensor-parallel `group` (every rank of it calls this): the layout a refit to
    another TP size re-slices (the vocabulary stays padded). A tensor TP does not split is
    returned as it is, not copied."""
    size = 1 if group is None else group.size()
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return shard
    parts = [torch.empty_like(shard) for _ in range(size)]
    torch.distributed.all_gather(parts, shard.contiguous(), group=group)
    if name.endswith("mlp.linear_fc1.weight"):  # each rank holds [gate_r; up_r]
        halves = [part.chunk(2) for part in parts]
        return torch.cat([gate for gate, _ in halves] + [up for _, up in halves])
    return torch.cat(parts, dim=param.partition_dim)


@torch.no_grad()
def load_hf_weights(model, reader: HFCheckpointReader, arch: ModelArch, padded_vocab: int) -> None:
    """Fill this rank's model shard from a Hugging Face checkpoint."""
    for name, _, param in named_model_tensors(model):
        full = full_megatron_tensor(name, arch, padded_vocab, reader.get)
        param.copy_(_shard(model, name, param, full, str(reader.dir)))


@torch.no_grad()
def full_to_shards(
    model, named: Iterable[tuple[str, torch.Tensor]], source: str
) -> dict[str, torch.Tensor]:
    """This rank's shards, at any TP size, of full-layout tensors (canonical names, as
    `tp_gather` builds them): what a refit receives, copied in the model's dtypes, for
    `load_shards`. The model is only read, so another thread may decode with it meanwhile.
    Tensors of layers this pipeline stage does not hold are skipped; every parameter it holds
    must arrive (else an error naming `source` and the parameter, after the stream has been read
    to its end)."""
    params = {name: param for name, _, param in named_model_tensors(model)}
    shards = {}
    for name, full in named:
        if name in params:
            param = params.pop(name)
            shards[name] = _shard(model, name, param, full, source).to(param.dtype, copy=True)
    if params:
        raise UserError(f"{source}: {next(iter(params))}: not sent ({len(params)} missing)")
    return shards


@torch.no_grad()
def load_shards(model, shards: dict[str, torch.Tensor]) -> None:
    """Copy `full_to_shards`' tensors into the model's parameters in place."""
    for name, _, param in named_model_tensors(model):
        param.copy_(shards[name])


def _shard(model, name: str, param, full: torch.Tensor, source: str) -> torch.Tensor:
    tp = model.pg_collection.tp  # the group the model was built on
    shard = tp_slice(full, param, name, tp.rank(), tp.size())
    if shard.shape != param.shape:
        raise UserError(
            f"{source}: {name}: shape {tuple(shard.shape)} does not fit the model's {tuple(param.shape)}"
        )
    return shard


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Canonical-named tensors of a TP=1/PP=1 model (as loaded for export)."""
    state = {name: p.detach() for name, _, p in named_model_tensors(model)}
    if "output_layer.weight" not in state and "embedding.word_embeddings.weight" in state:
        state["output_layer.weight"] = state["embedding.word_embeddings.weight"]
    return state
