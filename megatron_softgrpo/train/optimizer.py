"""The policy's Megatron training machinery: DDP wrapper, AdamW, lr schedule, and the guarded step.

- `wrap_ddp`: Megatron `DistributedDataParallel` (contiguous fp32 gradient buffers, gradients
  averaged over data-parallel ranks by `finalize_model_grads` at the end of each
  forward/backward schedule).
- `build_optimizer`: `get_megatron_optimizer` with AdamW (decoupled weight decay; as in Megatron,
  biases and norm weights are not decayed), optionally the distributed optimizer.
- `build_scheduler`: Megatron's `OptimizerParamScheduler`, counting **optimizer steps**:
  linear warm-up from `lr_warmup_init` over `lr_warmup_iters` steps, then constant / linear /
  cosine decay to `min_lr` at `lr_decay_iters` (default: the run's planned number of steps).
  On resume the recipe's values are used and only the step count comes from the checkpoint.
- `guarded_step`: Megatron's optimizer step (unscale, grad norm, clip, update) that skips the
  update when the gradient norm is not finite. Megatron itself only skips when a loss scaler
  finds an overflow (fp16); in fp32/bf16 it would write NaN into the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_softgrpo.config.schema import MegatronCfg
from megatron_softgrpo.models.build import DTYPES


@dataclass(frozen=True)
class StepOutcome:
    updated: bool  # False: the gradient norm was not finite and the weights were left unchanged
    grad_norm: float  # before clipping, identical on every rank
    lr: float  # the learning rate this step used (or would have used)


def wrap_ddp(model, mcfg: MegatronCfg):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=mcfg.optimizer.use_distributed_optimizer,
        ),
        model,
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    return ddp


def build_optimizer(ddp, mcfg: MegatronCfg, precision: str):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = mcfg.optimizer
    config = OptimizerConfig(
        optimizer=o.optimizer,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        use_distributed_optimizer=o.use_distributed_optimizer,
        bf16=precision == "bfloat16",
        fp16=precision == "float16",
        params_dtype=DTYPES[precision],
    )
    optimizer = get_megatron_optimizer(config, [ddp])
    ddp.config.grad_scale_func = (
        optimizer.scale_loss
    )  # a no-op factor 1 except with fp16 loss scaling
    return optimizer


def build_scheduler(optimizer, mcfg: MegatronCfg, total_steps: int):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, s = mcfg.optimizer, mcfg.scheduler  # their rules: config/checks.py, before any model loads
    decay_steps = s.lr_decay_iters or total_steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=s.lr_warmup_init,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=s.lr_warmup_iters,
        lr_decay_steps=max(decay_steps, s.lr_warmup_iters + 1),  # Megatron asserts warm-up < decay
        lr_decay_style=s.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


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
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

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
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

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
