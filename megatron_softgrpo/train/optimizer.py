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

The step that skips a non-finite gradient and the optimizer's checkpoint state reach into
Megatron's optimizer internals, so they live in `model_patches/optimizer_step.py`.
"""

from __future__ import annotations

from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_softgrpo.config.schema import MegatronCfg
from megatron_softgrpo.distributed import ParallelState
from megatron_softgrpo.models.build import DTYPES
from model_patches import wgrad_accumulation


def wrap_ddp(model, mcfg: MegatronCfg, parallel: ParallelState):
    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=mcfg.optimizer.use_distributed_optimizer,
        ),
        model,
        pg_collection=parallel.groups,
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    if wgrad_accumulation.available():  # weight gradients straight into DDP's buffers
        wgrad_accumulation.enable(model)
    return ddp


def build_optimizer(ddp, mcfg: MegatronCfg, precision: str):
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
    # Megatron's default groups: 0.16 refuses gloo groups beside a pg_collection, and the
    # distributed optimizer gathers its reshardable checkpoint state over them
    optimizer = get_megatron_optimizer(config, [ddp])
    ddp.config.grad_scale_func = (
        optimizer.scale_loss
    )  # a no-op factor 1 except with fp16 loss scaling
    return optimizer


def build_scheduler(optimizer, mcfg: MegatronCfg, total_steps: int):
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
