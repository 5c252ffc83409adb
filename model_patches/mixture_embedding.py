"""Mixture input embeddings on Megatron's vocabulary-parallel embedding table.

At every position the model reads a sparse mixture (ids[K], weights[K]) instead of a
token id: x = sum_k w_k E[ids_k]. Each TP rank sums the rows of the table shard it owns,
then the partial sums are all-reduced over the TP group (reduce-scattered along the
sequence under sequence parallelism), which is how VocabParallelEmbedding itself
combines shards. The sum is taken in fp32 and cast to the table's dtype, so a one-hot
mixture reproduces the ordinary embedding exactly.

The lookup is detached (docs/algorithm.md section 2): no gradient reaches the weights or the
table through it. Pass the result as `GPTModel.forward(..., decoder_input=...)` on the
first pipeline stage. Not applied here: embedding dropout (0 in these recipes) and
`fp32_residual_connection` (cast the result if the model config sets it).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)


def local_mixture(
    table: torch.Tensor, start: int, end: int, mix_ids: torch.Tensor, mix_weights: torch.Tensor
) -> torch.Tensor:
    """fp32 [b, s, h]: sum_k w_k E[ids_k] over the ids this rank's table shard [start, end) owns."""
    table = table.detach()
    owned = (mix_ids >= start) & (mix_ids < end)
    local = torch.where(owned, mix_ids - start, torch.zeros_like(mix_ids))
    weights = torch.where(
        owned, mix_weights.float(), torch.zeros_like(mix_weights, dtype=torch.float32)
    )
    mixed = torch.zeros(
        (*mix_ids.shape[:2], table.shape[1]), dtype=torch.float32, device=table.device
    )
    for k in range(mix_ids.shape[-1]):  # K row gathers: no [b, s, K, h] intermediate
        mixed.addcmul_(weights[..., k, None], table[local[..., k]].float())
    return mixed


@torch.no_grad()
def mixture_embedding(
    word_embeddings,
    mix_ids: torch.Tensor,
    mix_weights: torch.Tensor,
    offset: torch.Tensor | None = None,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """decoder_input [s, b, h] (or this rank's [s / TP, b, h] under sequence parallelism).

    word_embeddings: GPTModel.embedding.word_embeddings (a VocabParallelEmbedding).
    mix_ids, mix_weights: [b, s, K] global ids and their weights (0 for unused slots).
    offset: [b, s, h] added after the mixture on every rank alike (embedding noise).
    """
    table = word_embeddings.weight
    mixed = local_mixture(
        table,
        word_embeddings.vocab_start_index,
        word_embeddings.vocab_end_index,
        mix_ids,
        mix_weights,
    )
    mixed = mixed.transpose(0, 1).contiguous()  # [s, b, h], Megatron's layout
    group = word_embeddings.tp_group
    if group.size() > 1:
        if sequence_parallel:
            mixed = reduce_scatter_to_sequence_parallel_region(mixed, group=group)
        else:
            mixed = reduce_from_tensor_model_parallel_region(mixed, group=group)
    if offset is not None:
        offset = offset.transpose(0, 1).float()
        if sequence_parallel and group.size() > 1:
            offset = offset.chunk(group.size(), dim=0)[group.rank()]
        mixed = mixed + offset
    return mixed.to(table.dtype)
