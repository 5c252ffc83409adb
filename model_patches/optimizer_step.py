"""Megatron-Core's optimizer beyond its public API: the guarded step and the checkpoint state.

- `guarded_step`: Megatron's optimizer step (unscale, grad norm, clip, update) that skips the
  update when the gradient norm is not finite. Megatron itself only skips when a loss scaler
  finds an overflow (fp16); in fp32/bf16 it would write NaN into the weights.
- `optimizer_sharded_state` / `load_optimizer_state`: the optimizer's checkpoint state in a
  format that reloads at any TP/PP/DP, with the gaps of Megatron 0.16's distributed optimizer
  over torch's AdamW bridged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer


@dataclass(frozen=True)
class StepOutcome:
    updated: bool  # False: the gradient norm was not finite and the weights were left unchanged
    grad_norm: float  # before clipping, identical on every rank
    lr: float  # the learning rate this step used (or would have used)


OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}  # reloads at any TP/PP/DP


def _sub_optimizers(optimizer) -> list:
    return getattr(optimizer, "chained_optimizers", [optimizer])


def optimizer_sharded_state(optimizer, model_sharded_state: dict) -> dict:
    """What a checkpoint stores of the optimizer (collective: gathers the distributed state)."""
    return optimizer.sharded_state_dict(model_sharded_state, metadata=OPTIMIZER_FORMAT)


def load_optimizer_state(optimizer, model_sharded_state: dict, load) -> None:
    """Fill `optimizer` from a checkpoint saved at any layout; `load(sharded) -> state dict` reads it.

    Megatron 0.16's distributed optimizer cannot load its "fully_reshardable" state into torch's
    AdamW (the optimizer used without apex / Transformer Engine, e.g. on CPU); three gaps are
    bridged here. Building the state dict to load into reads the step count from the optimizer's
    per-parameter state, which a fresh optimizer lacks: it is allocated first, as AdamW's first
    step would. Loading the parameter state copies every per-parameter state entry, including
    the step count, which the checkpoint keeps elsewhere: the step is set aside meanwhile. And
    the loaded step count is one tensor shared by all parameters, which AdamW would increment
    once per parameter: each parameter gets its own copy.
    """
    subs = _sub_optimizers(optimizer)
    distributed = [sub for sub in subs if isinstance(sub, DistributedOptimizer)]
    for sub in distributed:
        _allocate_adam_state(sub.optimizer)
    state = load(
        optimizer.sharded_state_dict(
            model_sharded_state, is_loading=True, metadata=OPTIMIZER_FORMAT
        )
    )
    for sub, sub_state in zip(
        subs, [state] if len(subs) == 1 else [state[i] for i in range(len(subs))]
    ):
        if sub not in distributed:
            sub.load_state_dict(sub_state)
            continue
        param_state = sub_state.pop("param_state")
        sub.load_state_dict(sub_state)  # hyper-parameters, step count
        steps = _pop_adam_steps(sub.optimizer)
        sub.load_parameter_state_from_fully_reshardable(param_state)
        for state_of_param, step in steps:
            state_of_param["step"] = step.clone()


def _allocate_adam_state(inner) -> None:
    if not isinstance(inner, torch.optim.Adam):
        return
    for group in inner.param_groups:
        for p in group["params"]:
            if not inner.state[p]:
                inner.state[p] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }


def _pop_adam_steps(inner) -> list[tuple[dict, torch.Tensor]]:
    return [(s, s.pop("step")) for s in inner.state.values() if "step" in s]


def current_lr(optimizer) -> float:
    return optimizer.param_groups[0]["lr"]


@torch.no_grad()
def guarded_step(optimizer, scheduler) -> StepOutcome:
    """Megatron's `ChainedOptimizer.step` with one more exit: a non-finite gradient norm.

    The norm is all-reduced over the model-parallel (and, for the distributed optimizer, the
    data-parallel) ranks, so every rank takes the same branch. The schedule advances only on
    an update, as in Megatron's training loop.
    """
    lr = current_lr(optimizer)
    found_inf = optimizer.prepare_grads()  # copies gradients to the main (fp32) grads
    grad_norm = math.inf if found_inf else float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return StepOutcome(False, grad_norm, lr)
    for sub in _sub_optimizers(optimizer):
        params = [] if getattr(sub, "is_stub_optimizer", False) else sub.get_parameters()
        if params and sub.config.clip_grad > 0:
            clip_grad_by_total_norm_fp32(
                params,
                sub.config.clip_grad,
                grad_norm,
                sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    optimizer.step_with_ready_grads()
    scheduler.step(increment=1)
    return StepOutcome(True, grad_norm, lr)
