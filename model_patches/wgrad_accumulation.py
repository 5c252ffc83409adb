"""Linear layers accumulate their weight gradient into Megatron's main-grad buffer in the GEMM.

Megatron's `gradient_accumulation_fusion` has each tensor-parallel linear layer's backward add
grad_output^T @ input straight into `weight.main_grad` (DDP's fp32 buffer) with Apex's CUDA
kernel `fused_weight_gradient_mlp_cuda`; without it autograd allocates each weight gradient and
DDP's hook adds it to the buffer, a full pass per weight and micro-batch (about 6% of a CPU
update step). `enable` turns the fusion on for a DDP-wrapped model's layers, with `addmm_` where
the kernel is absent (the CPU). The product is accumulated by the GEMM instead of summed after
it, so gradients change in the last bits, not in value. `add_to_main_grad` does the same for the
output weight's gradient of the chunked training objective (`soft.objective_from_hidden`).
"""

from __future__ import annotations

import torch


class _AddmmWgrad:
    """The two entry points of `fused_weight_gradient_mlp_cuda` Megatron calls, as `addmm_`:
    main_grad [out, in] += grad_output [n, out]^T @ input [n, in]."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad):
        main_grad.addmm_(grad_output.t().to(main_grad.dtype), total_input.to(main_grad.dtype))

    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


def enable(model) -> None:
    """Fuse the weight-gradient accumulation of every trained linear layer of `model` (wrapped by
    Megatron's DDP, which gives each weight its `main_grad`)."""
    from megatron.core.tensor_parallel import layers

    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = _AddmmWgrad
    for module in model.modules():
        if isinstance(module, (layers.ColumnParallelLinear, layers.RowParallelLinear)):
            weight = module.weight
            if weight is not None and weight.requires_grad and hasattr(weight, "main_grad"):
                module.gradient_accumulation_fusion = True


def add_to_main_grad(weight: torch.Tensor, total: torch.Tensor, scale: torch.Tensor) -> bool:
    """`soft.objective_from_hidden`'s weight-gradient sink under Megatron's DDP: total * scale
    into the weight's fp32 `main_grad` in one pass, flagged so that DDP's hook skips the
    placeholder autograd then gets. Not for a weight tied to the input embedding on the same
    stage (`zero_out_wgrad`): DDP's hook adds its `.grad`, which another path may feed, so the
    gradient goes there as usual (False)."""
    if (
        getattr(weight, "main_grad", None) is None
        or not hasattr(weight, "grad_added_to_main_grad")
        or getattr(weight, "zero_out_wgrad", False)
    ):
        return False
    weight.main_grad.addcmul_(total, scale)  # scale: 0-dim, no host sync
    weight.grad_added_to_main_grad = True
    return True


def available() -> bool:
    """Whether the fusion has a kernel here: Apex's on a GPU, `addmm_` on the CPU."""
    from megatron.core.tensor_parallel import layers

    return layers._grad_accum_fusion_available or not torch.cuda.is_available()
