"""Checkpoints: Megatron dist_checkpointing (any TP/PP layout reloads at any other) plus metadata.

Layout of a checkpoint directory:

    softgrpo_checkpoint.json   format version, model architecture, padded vocabulary, step, saved layout
    model/                     dist_checkpointing of the model's sharded state dict
    tokenizer/                 tokenizer files (transformers' save_pretrained)
    <extra>/                   other sharded states a caller adds (optimizer, ...)

Saves are atomic: everything is written to `<dir>.partial` and renamed into place only when
complete, so a crash during a save leaves the previous checkpoint untouched and loadable. A crash
between moving an existing `<dir>` aside to `<dir>.old` and moving the new one in leaves only
`<dir>.old`; readers move it back.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_softgrpo.distributed import ParallelState, barrier
from megatron_softgrpo.errors import UserError
from megatron_softgrpo.models.arch import ModelArch

META_FILE = "softgrpo_checkpoint.json"
FORMAT_VERSION = 1


@dataclass
class CheckpointMeta:
    arch: dict
    padded_vocab_size: int
    hf_config: dict = field(default_factory=dict)  # the source config.json, written back on export
    step: int = 0
    saved_layout: dict = field(
        default_factory=dict
    )  # {"tensor_parallel", "pipeline_parallel", "world_size"}
    precision: str = "float32"
    extra: dict = field(default_factory=dict)  # caller's JSON-able state (data position, RNG, ...)
    format_version: int = FORMAT_VERSION
    created_unix: float = 0.0

    @property
    def model_arch(self) -> ModelArch:
        return ModelArch.from_dict(self.arch)


def _restore_interrupted_replace(path: Path) -> None:
    old = path.with_name(path.name + ".old")
    if not path.exists() and (old / META_FILE).is_file():
        try:
            os.replace(old, path)
        except FileNotFoundError:
            pass  # another rank restored it first


def is_checkpoint(path: str | Path) -> bool:
    _restore_interrupted_replace(Path(path))
    return (Path(path) / META_FILE).is_file()


def read_meta(path: str | Path) -> CheckpointMeta:
    _restore_interrupted_replace(Path(path))
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise UserError(f"{path}: not a megatron-softgrpo checkpoint ({META_FILE} missing)")
    try:
        data = json.loads(meta_path.read_text())
        meta = CheckpointMeta(**data)
    except (json.JSONDecodeError, TypeError) as e:
        raise UserError(f"{meta_path}: unreadable checkpoint metadata ({e})") from None
    if meta.format_version != FORMAT_VERSION:
        raise UserError(
            f"{meta_path}: format_version={meta.format_version}; this version reads {FORMAT_VERSION}"
        )
    return meta


def save_checkpoint(
    out_dir: str | Path,
    sharded_states: dict[str, dict],
    meta: CheckpointMeta,
    parallel: ParallelState,
    tokenizer=None,
    files: dict[str, bytes] | None = None,
) -> Path:
    """Collectively save `{"model": model.sharded_state_dict(), ...}` with metadata, atomically.

    Every rank calls this; the main rank writes the files around the shards (and `files`, by
    name). An existing `out_dir` is replaced only after the new one is complete.
    """
    from megatron.core import dist_checkpointing

    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    if parallel.main:
        shutil.rmtree(partial, ignore_errors=True)  # leftovers of a crashed save
        partial.mkdir(parents=True)
    barrier(parallel)
    for name, sharded in sharded_states.items():
        sub = partial / name
        if parallel.main:
            sub.mkdir()
        barrier(parallel)
        dist_checkpointing.save(sharded, str(sub))
    if parallel.main:
        meta.created_unix = time.time()
        meta.saved_layout = parallel.layout()
        if tokenizer is not None:
            tokenizer.save_pretrained(str(partial / "tokenizer"))
        for name, data in (files or {}).items():
            (partial / name).write_bytes(data)
        (partial / META_FILE).write_text(json.dumps(asdict(meta), indent=2, sort_keys=True))
        _fsync_tree(partial)
        if out_dir.exists():
            trash = out_dir.with_name(out_dir.name + ".old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(out_dir, trash)
            os.replace(partial, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(partial, out_dir)
    barrier(parallel)
    return out_dir


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())


def load_sharded(path: str | Path, name: str, sharded_state_dict: dict) -> dict:
    """Load the sub-checkpoint `name` into the given sharded state dict (any saved layout)."""
    from megatron.core import dist_checkpointing

    sub = Path(path) / name
    if not sub.is_dir():
        raise UserError(f"{path}: checkpoint has no '{name}' state")
    return dist_checkpointing.load(sharded_state_dict, str(sub))


def load_model_weights(model, path: str | Path) -> CheckpointMeta:
    """Fill this rank's model shard from a checkpoint saved at any TP/PP layout."""
    meta = read_meta(path)
    state = load_sharded(path, "model", model.sharded_state_dict())
    model.load_state_dict(state, strict=False)
    return meta
