"""Forward passes of a (TP/PP-sharded) GPTModel through Megatron's pipeline schedule."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from megatron.core import tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.utils import get_model_config

from megatron_softgrpo.distributed import ParallelState

# Full-sequence passes give no attention mask: both layer specs then attend causally (the local
# spec's SDPA core attention with is_causal, TE by its causal mask type), which lets the GPU use
# flash attention instead of materialising an [s, s] mask and scores.
CAUSAL = None


def position_ids(batch: int, seq_len: int, device) -> torch.Tensor:
    return torch.arange(seq_len, device=device).unsqueeze(0).expand(batch, -1)


def run_schedule(
    parallel: ParallelState,
    model,
    forward_step: Callable,
    micro_batches: Sequence,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool,
) -> list:
    """Megatron's forward(/backward) schedule over `micro_batches` on this rank's process groups:
    `forward_step(data_iterator, model)` per micro-batch; its outputs on the last stage, []
    elsewhere."""
    config = get_model_config(model)
    return get_forward_backward_func(pp_size=parallel.pp)(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        p2p_communicator=P2PCommunicator(pp_group=parallel.groups.pp, config=config),
        pg_collection=parallel.groups,
    )


@torch.no_grad()
def forward_logits(
    model, tokens: torch.Tensor, parallel: ParallelState, gather_tp: bool = True
) -> torch.Tensor | None:
    """Logits [b, s, V_padded] (or this TP rank's vocab shard if not `gather_tp`).

    Every rank of the model-parallel group calls this; the logits are returned on the last
    pipeline stage and None elsewhere.
    """
    b, s = tokens.shape
    pos = position_ids(b, s, tokens.device)

    def step(data_iterator, m):
        return m(next(data_iterator), pos, CAUSAL), None

    # hidden states travel between stages inside Megatron's schedule
    outputs = run_schedule(parallel, model, step, [tokens], s, b, forward_only=True)
    if not parallel.last_stage:
        return None
    logits = outputs[0]
    if gather_tp and parallel.tp > 1:
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(
            logits, parallel.groups.tp
        )
    return logits
