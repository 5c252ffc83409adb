"""Greedy decoding by full recomputation: the reference the KV-cached rollout engine is checked against."""

from __future__ import annotations

import torch

from megatron_softgrpo.models.forward import forward_logits


def _broadcast_from_last_stage(t: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return t
    src = parallel_state.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast(t, src, group=parallel_state.get_pipeline_model_parallel_group())
    return t


@torch.no_grad()
def greedy_generate(model, prompt: list[int], max_new_tokens: int, vocab_size: int, stop_ids: set[int] = frozenset()) -> list[int]:
    """Generated token ids (argmax over the real vocabulary, padding rows excluded)."""
    tokens = torch.tensor([prompt], dtype=torch.long)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = forward_logits(model, tokens)
        nxt = torch.zeros(1, dtype=torch.long)
        if logits is not None:
            nxt[0] = logits[0, -1, :vocab_size].argmax()
        nxt = _broadcast_from_last_stage(nxt)
        out.append(int(nxt))
        if int(nxt) in stop_ids:
            break
        tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
    return out
