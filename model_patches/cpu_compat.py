"""Let Megatron-Core 0.16 run on a machine without CUDA (gloo backend, CPU tensors).

Megatron assumes a GPU in a handful of places. Each redirect below names the call
site it serves. Applied only when CUDA is absent, and idempotent; on a GPU
nothing here runs.
"""

from __future__ import annotations

import importlib
import types

import torch

_applied = False


class _CpuTorch(types.ModuleType):
    """A view of the `torch` module whose tensor factories map device='cuda' to the CPU.

    Installed as the module-global `torch` of the few Megatron modules that create
    scratch tensors with a hard-coded `device="cuda"` (see `_MODULES_WITH_CUDA_TENSORS`).
    """

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "empty_like", "zeros_like", "arange")

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self._FACTORIES:

            def factory(*args, **kwargs):
                if str(kwargs.get("device", "")).startswith("cuda"):
                    kwargs["device"] = "cpu"
                return attr(*args, **kwargs)

            return factory
        return attr


# module -> the lines that create tensors with device="cuda" (megatron-core 0.16.1)
_MODULES_WITH_CUDA_TENSORS = (
    "megatron.core.pipeline_parallel.schedules",  # total_num_tokens = torch.zeros(..., device="cuda")
    "megatron.core.distributed.param_and_grad_buffer",  # warm-up tensor for the grad buffer
    "megatron.core.optimizer.optimizer",  # found_inf / _scale_one / _dummy_overflow_buf
    "megatron.core.optimizer.clip_grads",  # total_norm_cuda, grad_norm, total_num_zeros
    "megatron.core.optimizer.grad_scaler",  # loss-scale tensors (fp16 only)
    "megatron.core.dist_checkpointing.exchange_utils",  # resharding exchange buffers
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # verify-reuse flag
    "megatron.core.utils",  # local_multi_tensor_l2_norm (grad-norm fallback without apex/TE)
)


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _cpu_rng_state(device=None, *args, **kwargs):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, device=None, *args, **kwargs):
    torch.set_rng_state(new_state)


def apply() -> None:
    """Install the CPU redirects (no-op when CUDA is available or already applied)."""
    global _applied
    if _applied or torch.cuda.is_available():
        return
    _applied = True

    # Tensor creation with device=torch.cuda.current_device(): p2p_communication (pipeline
    # send/recv buffers), attention/dot_product_attention masks, rotary embeddings.
    torch.cuda.current_device = lambda: "cpu"
    # p2p_communication and timers call torch.cuda.synchronize() after pipeline send/recv.
    torch.cuda.synchronize = lambda *a, **k: None
    # torch.cuda.empty_cache() after checkpoint loading and in the optimizer.
    torch.cuda.empty_cache = lambda: None

    # tensor_parallel.random: CudaRNGStatesTracker.add/fork and model_parallel_cuda_manual_seed
    # save/restore "the CUDA generator"; on CPU the tracker forks the CPU generator instead,
    # which keeps per-TP-rank noise streams reproducible and checkpointable.
    torch.cuda.get_rng_state = _cpu_rng_state
    torch.cuda.set_rng_state = _set_cpu_rng_state
    torch.cuda.random.get_rng_state = _cpu_rng_state
    torch.cuda.random.set_rng_state = _set_cpu_rng_state
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all, so seed the CPU generator directly)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
    random_mod._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    random_mod._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    # optimizer.py / exchange_utils move state with .cuda(); on CPU it stays where it is.
    torch.Tensor.cuda = lambda self, *a, **k: self
    # optimizer.py, distrib_optimizer.py and clip_grads.py dispatch on `param.type()` strings such
    # as 'torch.cuda.FloatTensor'; report CPU float tensors under their CUDA names (no-arg form only).
    original_type = torch.Tensor.type

    def tensor_type(self, *args, **kwargs):
        name = original_type(self, *args, **kwargs)
        if args or kwargs or name not in _CUDA_TYPE_NAMES:
            return name
        return _CUDA_TYPE_NAMES[name]

    torch.Tensor.type = tensor_type

    cpu_torch = _CpuTorch()
    for name in _MODULES_WITH_CUDA_TENSORS:
        importlib.import_module(name).torch = cpu_torch

    # clip_grads.py scales clipped gradients with Megatron's fallback for Apex's fused kernel
    # (no Apex or TE without CUDA), `dst.copy_(src * scale)` with src and dst the same tensors:
    # a full-size temporary and copy per gradient. The same product, in place.
    importlib.import_module(
        "megatron.core.optimizer.clip_grads"
    ).multi_tensor_scale_impl = _scale_in_place


def _scale_in_place(chunk_size, noop_flag, tensor_lists, scale):
    """megatron.core.utils.local_multi_tensor_scale, without the temporary where src is dst."""
    for src, dst in zip(tensor_lists[0], tensor_lists[1]):
        if src is dst:
            dst.mul_(scale)
        else:
            dst.copy_(src * scale)
