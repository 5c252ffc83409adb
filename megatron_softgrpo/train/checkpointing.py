"""Training checkpoints: what one holds, where it lives, which one a run resumes from.

Layout under `checkpointing.checkpoint_dir`:

    step_0000004/            one checkpoint (models/checkpoint.py format, saved atomically)
      softgrpo_checkpoint.json   model metadata, step, extra = {"loop": caller's dict, "trainer": worker state}
      model/                 the policy's weights (dist_checkpointing: reloads at any TP/PP; also a
                             valid `policy.model_name` for evaluation)
      optimizer/             DistributedOptimizer state, "fully_reshardable" (reloads at any TP/PP/DP)
      rng/                   per-rank RNG states: Python, numpy, torch CPU (+CUDA), Megatron's RNG tracker
      tokenizer/             when the caller passes one
      ahead.pt               the loop's requests submitted ahead of their steps (prompts, rows)
    latest                   the name of the newest complete checkpoint, replaced atomically

A save writes `step_N.partial/`, renames it into place, then rewrites `latest`, then deletes
all but the newest `checkpointing.keep_top_k`; a crash at any point leaves `latest` naming
a complete checkpoint. The learning-rate schedule's position and the worker's step counters
are in the metadata. RNG states are per rank and are restored only at the layout they were
saved at (TP, PP, world size); elsewhere they are left as seeded and a note is printed.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_softgrpo.config.schema import CheckpointingCfg
from megatron_softgrpo.distributed import ParallelState, barrier
from megatron_softgrpo.errors import UserError
from megatron_softgrpo.models.checkpoint import (
    CheckpointMeta,
    is_checkpoint,
    load_sharded,
    read_meta,
    save_checkpoint,
)
from megatron_softgrpo.models.source import ModelSource
from megatron_softgrpo.train.policy import PolicyWorker
from model_patches.optimizer_step import load_optimizer_state, optimizer_sharded_state

LATEST = "latest"
AHEAD_FILE = "ahead.pt"  # the loop's requests submitted ahead of their steps
_STEP_DIR = re.compile(r"step_(\d+)")


@dataclass(frozen=True)
class RestoredCheckpoint:
    path: Path
    step: int
    extra: dict  # the caller's `extra` of the save


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


# ------------------------------------------------------------------ save


def save_training_checkpoint(
    ckpt_cfg: CheckpointingCfg,
    worker: PolicyWorker,
    step: int,
    extra: dict,
    tokenizer=None,
    files: dict[str, bytes] | None = None,
) -> Path:
    """Collectively save the worker's full training state at `step`; every rank calls this
    (`files`: the main rank's further files, by name)."""
    meta = CheckpointMeta(
        arch=worker.source.arch.to_dict(),
        padded_vocab_size=worker.padded_vocab_size,
        hf_config=_hf_config(worker.source),
        step=step,
        precision=worker.policy.precision,
        extra={"loop": extra, "trainer": _trainer_state(worker)},
    )
    try:  # fail on every rank before any collective, not on rank 0 after them
        json.dumps(meta.extra)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint extra is not JSON-serialisable: {e}") from None
    root, parallel = Path(ckpt_cfg.checkpoint_dir), worker.parallel
    model_sd = worker.model.sharded_state_dict()
    states = {
        "model": model_sd,
        "optimizer": optimizer_sharded_state(worker.optimizer, model_sd),
        "rng": _rng_sharded(_rng_state(), parallel),
    }
    out = save_checkpoint(root / step_dir_name(step), states, meta, parallel, tokenizer, files)
    if parallel.main:
        _write_latest(root, out.name)
        _prune(root, ckpt_cfg.keep_top_k, keep=out.name)
    barrier(parallel)
    return out


def _hf_config(source: ModelSource) -> dict:
    if source.kind == "hf":
        return json.loads((source.path / "config.json").read_text())
    return read_meta(source.path).hf_config


def _trainer_state(worker: PolicyWorker) -> dict:
    return {
        "scheduler": worker.scheduler.state_dict(),
        "optimizer_steps": worker.optimizer_steps,
        "skipped_steps": worker.skipped_steps,
    }


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f"{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _prune(root: Path, keep_top_k: int | None, keep: str) -> None:
    """Delete leftovers of crashed saves and all complete checkpoints but the newest `keep_top_k`."""
    for leftover in root.glob("step_*.partial"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep_top_k is None:
        return
    complete = sorted(
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()
    )
    for _, path in complete[:-keep_top_k]:
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------ RNG


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(state: dict, parallel: ParallelState) -> dict:
    """One object per rank, addressed by (PP rank, TP rank, DP rank)."""
    shape = (parallel.pp, parallel.tp, parallel.dp)
    offset = (parallel.pp_rank, parallel.tp_rank, parallel.dp_rank)
    return {"rng_state": ShardedObject("rng_state", state, shape, offset, replica_id=0)}


# ------------------------------------------------------------------ load


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names; None when there is none yet."""
    pointer = Path(checkpoint_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(checkpoint_dir) / pointer.read_text().strip()
    if not is_checkpoint(path):
        raise UserError(
            f"{pointer}: names {path.name}, which is not a complete checkpoint; fix or delete the file"
        )
    return path


def restore_training_checkpoint(worker: PolicyWorker, path: str | Path) -> RestoredCheckpoint:
    """Load a checkpoint saved at any layout into a freshly built worker (collective)."""
    path = Path(path)
    if worker.scheduler.num_steps or worker.skipped_steps:
        raise ValueError(
            "restore a checkpoint into a freshly built worker (its schedule position is added, not set)"
        )
    meta = read_meta(path)
    if meta.arch != worker.source.arch.to_dict():
        raise UserError(
            f"{path}: saved for a different model than policy.model_name={worker.policy.model_name}"
        )
    model_sd = worker.model.sharded_state_dict()
    worker.model.load_state_dict(load_sharded(path, "model", model_sd), strict=False)
    load_optimizer_state(
        worker.optimizer,
        worker.model.sharded_state_dict(),
        lambda sd: load_sharded(path, "optimizer", sd),
    )
    trainer = meta.extra["trainer"]
    worker.scheduler.load_state_dict(trainer["scheduler"])
    worker.optimizer_steps = trainer["optimizer_steps"]
    worker.skipped_steps = trainer["skipped_steps"]
    parallel = worker.parallel
    if meta.saved_layout == parallel.layout():
        rng_state = load_sharded(path, "rng", _rng_sharded(_rng_state(), parallel))["rng_state"]
        _set_rng_state(rng_state)
    elif parallel.main:
        print(
            f"[softgrpo] {path.name}: saved at {meta.saved_layout}, running at {parallel.layout()}: "
            "model, optimizer and schedule restored; RNG states left as seeded",
            flush=True,
        )
    return RestoredCheckpoint(path, meta.step, meta.extra["loop"])


def resume(ckpt_cfg: CheckpointingCfg, worker: PolicyWorker) -> RestoredCheckpoint | None:
    """Restore the latest checkpoint when `checkpointing.resume` is set and one exists."""
    if not ckpt_cfg.resume:
        return None
    path = latest_checkpoint(ckpt_cfg.checkpoint_dir)
    return None if path is None else restore_training_checkpoint(worker, path)


# ------------------------------------------------------------------ the training loop's state


def save_run(
    ckpt_cfg: CheckpointingCfg, worker: PolicyWorker, step: int, sampler, tokenizer, ahead
) -> Path:
    """The loop's checkpoint: the worker's state, the prompt sampler's position and the
    requests submitted ahead of their steps (`ahead`, the main rank's, pickled: the prompts in
    flight and, decoded, their rows) (collective)."""
    extra = {"data": sampler.state_dict()}
    files = {}
    if worker.parallel.main:
        buffer = io.BytesIO()
        torch.save(ahead, buffer)
        files[AHEAD_FILE] = buffer.getvalue()
    return save_training_checkpoint(ckpt_cfg, worker, step, extra, tokenizer, files)


def resume_run(
    ckpt_cfg: CheckpointingCfg, worker: PolicyWorker, sampler, log
) -> tuple[int, object]:
    """(the step to continue from, the requests submitted ahead then): (0, None), or the latest
    checkpoint's, restored into the worker and the prompt sampler, with the metrics log cut back
    to it (collective)."""
    restored = resume(ckpt_cfg, worker) if ckpt_cfg.enabled else None
    if restored is None:
        return 0, None
    sampler.load_state_dict(restored.extra["data"])
    log.truncate_after(restored.step)
    ahead_file = restored.path / AHEAD_FILE
    ahead = torch.load(ahead_file, weights_only=False) if ahead_file.is_file() else None
    if worker.parallel.main:
        print(f"[softgrpo] resumed from {restored.path} (step {restored.step})", flush=True)
    return restored.step, ahead
