"""What keeps a dropped Megatron model alive, and with it its process groups (each gloo group
runs threads that poll: a process that builds models one after another, as the test suite does,
ran a thousand of them, and spent half its CPU time there).

- `DistributedDataParallel` (megatron-core 0.16.1) registers a backward hook on each parameter's
  gradient accumulator and keeps the accumulators in `self.grad_accs`; each hook closes over the
  DDP. The accumulator holds its hooks on the C++ side, where the garbage collector cannot see
  them, so the cycle DDP -> accumulator -> hook -> DDP is never collected (about 17 groups a
  model). `apply` builds Megatron's own hook on a weak proxy of the DDP.
- `RotaryEmbedding.forward` is an `lru_cache` of 32 entries keyed by the module itself (and so
  its context-parallel group), and `parallel_state.destroy_model_parallel` leaves its two
  intra-partial data-parallel groups set. `forget` empties and unsets them;
  `destroy_distributed` calls it.
"""

from __future__ import annotations

import sys
import weakref


def apply() -> None:
    from megatron.core.distributed.distributed_data_parallel import DistributedDataParallel

    original = DistributedDataParallel._make_backward_post_hook
    if getattr(original, "weak", False):
        return

    def _make_backward_post_hook(self, param):
        return original(weakref.proxy(self), param)  # Megatron's hook, built once, on a proxy

    _make_backward_post_hook.weak = True
    DistributedDataParallel._make_backward_post_hook = _make_backward_post_hook


def forget() -> None:
    """Drop what Megatron's globals still hold of the models and groups of the last layout."""
    rope = sys.modules.get("megatron.core.models.common.embeddings.rotary_pos_embedding")
    if rope is not None:
        rope.RotaryEmbedding.forward.cache_clear()
    state = sys.modules.get("megatron.core.parallel_state")
    if state is not None:
        state._INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP = None
        state._INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP_GLOO = None
