"""Forward passes of a (TP/PP-sharded) GPTModel through Megatron's pipeline schedule."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def causal_mask(seq_len: int, device: str = "cpu") -> torch.Tensor:
    """[1, 1, s, s] boolean mask, True where attention is NOT allowed (Megatron's convention).

    Passed explicitly: Megatron's default causal mask path needs CUDA kernels.
    """
    return torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device).triu(1)


def position_ids(batch: int, seq_len: int, device) -> torch.Tensor:
    return torch.arange(seq_len, device=device).unsqueeze(0).expand(batch, -1)


@torch.no_grad()
def forward_logits(model, tokens: torch.Tensor, gather_tp: bool = True) -> torch.Tensor | None:
    """Logits [b, s, V_padded] (or this TP rank's vocab shard if not `gather_tp`).

    Every rank of the model-parallel group calls this; the logits are returned on the last
    pipeline stage and None elsewhere.
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = tokens.shape
    mask = causal_mask(s, str(tokens.device))
    pos = position_ids(b, s, tokens.device)

    def step(data_iterator, m):
        return m(next(data_iterator), pos, mask), None

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        # hidden states travel between stages inside Megatron's schedule
        outputs = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter([tokens]),
            model=[model],
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
        )
    else:
        outputs = [model(tokens, pos, mask)]
    if not parallel_state.is_pipeline_last_stage():
        return None
    logits = outputs[0]
    if gather_tp and parallel_state.get_tensor_model_parallel_world_size() > 1:
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return logits
