"""Megatron's data-parallel collectives are skipped where their group has one rank.

`_ParamAndGradBucketGroup` (megatron-core 0.16.1) reduce-scatters (distributed optimizer) or
all-reduces every gradient bucket over the data-parallel group after the backward, and the
distributed optimizer all-gathers the updated parameters after its step, also when that group is
this rank alone: coalesced collectives that change nothing but cost passes over the buffers
(about 5% of a CPU update step at one data-parallel rank). With one rank a SUM or AVG and an
all-gather of the whole buffer are the identity, so only the gradient bucket's scaling is kept.
Anything else (several ranks or optimizer instances, overlapped communication, the NaN /
large-gradient checks) takes Megatron's own path.
"""

from __future__ import annotations


def apply() -> None:
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup

    original = _ParamAndGradBucketGroup.start_grad_sync
    if getattr(original, "one_rank_skip", False):
        return

    def start_grad_sync(self, force_all_reduce: bool = False):
        cfg = self.ddp_config
        group = (
            self.intra_distributed_optimizer_instance_group
            if cfg.use_distributed_optimizer
            else self.data_parallel_group
        )
        if (
            group is None
            or group.size() > 1
            or cfg.num_distributed_optimizer_instances > 1
            or cfg.overlap_grad_reduce
            or cfg.check_for_nan_in_grad
            or cfg.check_for_large_grads
        ):
            return original(self, force_all_reduce)
        for bucket in self.buckets:  # as Megatron scales before its collective
            if bucket.gradient_scaling_factor != 1.0:
                bucket.grad_data *= bucket.gradient_scaling_factor
        self.grad_reduce_handle = None

    original_param_sync = _ParamAndGradBucketGroup.start_param_sync

    def start_param_sync(self, force_sync: bool = False):
        cfg, group = self.ddp_config, self.intra_distributed_optimizer_instance_group
        if group is None or group.size() > 1 or cfg.overlap_param_gather:
            return original_param_sync(self, force_sync)
        self.param_gather_handle = None  # the shard is the whole buffer: already in place
        self.param_gather_dispatched = True

    start_grad_sync.one_rank_skip = True
    _ParamAndGradBucketGroup.start_grad_sync = start_grad_sync
    _ParamAndGradBucketGroup.start_param_sync = start_param_sync
