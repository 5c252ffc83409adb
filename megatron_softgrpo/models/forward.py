"""Forward passes of a (TP/PP-sharded) GPTModel through Megatron's pipeline schedule."""

from __future__ import annotations

import torch

# Full-sequence passes give no attention mask: both layer specs then attend causally (the local
# spec's SDPA core attention with is_causal, TE by its causal mask type), which lets the GPU use
# flash attention instead of materialising an [s, s] mask and scores.
CAUSAL = None


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
    pos = position_ids(b, s, tokens.device)

    def step(data_iterator, m):
        return m(next(data_iterator), pos, CAUSAL), None

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
        outputs = [model(tokens, pos, CAUSAL)]
    if not parallel_state.is_pipeline_last_stage():
        return None
    logits = outputs[0]
    if gather_tp and parallel_state.get_tensor_model_parallel_world_size() > 1:
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return logits
