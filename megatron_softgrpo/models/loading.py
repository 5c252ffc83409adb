"""Build this rank's model shard and fill it from any ModelSource."""

from __future__ import annotations

from megatron_softgrpo.config.schema import MegatronCfg
from megatron_softgrpo.distributed import ParallelState
from megatron_softgrpo.models.build import build_gpt_model
from megatron_softgrpo.models.checkpoint import load_model_weights
from megatron_softgrpo.models.hf_mapping import HFCheckpointReader, load_hf_weights
from megatron_softgrpo.models.source import ModelSource


def padded_vocab_for(source: ModelSource, mcfg: MegatronCfg) -> int:
    """A checkpoint's own padding, else the recipe's (TP divides either: config/checks.py)."""
    return source.padded_vocab_size or source.arch.padded_vocab_size(
        mcfg.make_vocab_size_divisible_by
    )


def load_model(
    source: ModelSource, mcfg: MegatronCfg, parallel: ParallelState, precision: str = "float32"
):
    """(this rank's model shard, padded vocabulary size)."""
    padded = padded_vocab_for(source, mcfg)
    model = build_gpt_model(source.arch, mcfg, parallel, precision, padded)
    if source.kind == "hf":
        load_hf_weights(model, HFCheckpointReader(source.path), source.arch, padded)
    else:
        load_model_weights(model, source.path)
    return model, padded
