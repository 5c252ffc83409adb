"""One tensor-parallel rank's slice of the vocabulary, and the collectives over it.

Logits, the output weight and the input embedding table are sharded along the
vocabulary: TP rank r holds the global ids [start, end). Ids >= `vocab_size` are
padding (Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by
x TP): they are -inf before every softmax, top-k or noise and never enter a mixture.

The reductions over the vocabulary run the tensor-parallel collectives of `distributed.py` on
the shard's `group`; with `group=None` (one process, torch.distributed not needed) each is
the identity, and a loss computed identically on every TP rank gives each rank exactly the
gradient of the logits it owns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_softgrpo.distributed import max_tensor_parallel, sum_tensor_parallel

NEG_INF = float("-inf")


@dataclass(frozen=True)
class VocabShard:
    start: int  # first global id held by this rank
    end: int  # one past the last global id held by this rank (padding included)
    vocab_size: int  # real vocabulary size; ids >= vocab_size are padding
    group: Any = None  # the tensor-parallel torch.distributed ProcessGroup; None: one process

    @classmethod
    def whole(cls, padded_vocab_size: int, vocab_size: int) -> VocabShard:
        """The entire (padded) vocabulary on one process."""
        return cls(0, padded_vocab_size, vocab_size)

    @classmethod
    def of_rank(
        cls, padded_vocab_size: int, vocab_size: int, rank: int, world_size: int, group=None
    ) -> VocabShard:
        """Megatron's partition: equal contiguous slices in rank order."""
        if padded_vocab_size % world_size:
            raise ValueError(
                f"padded vocabulary {padded_vocab_size} is not divisible by TP={world_size}"
            )
        width = padded_vocab_size // world_size
        return cls(rank * width, (rank + 1) * width, vocab_size, group)

    @classmethod
    def of_group(cls, padded_vocab_size: int, vocab_size: int, group) -> VocabShard:
        """This rank's shard of the tensor-parallel process group `group`."""
        return cls.of_rank(padded_vocab_size, vocab_size, group.rank(), group.size(), group)

    @property
    def width(self) -> int:
        return self.end - self.start

    @property
    def real_width(self) -> int:
        """Columns of this shard that are real tokens (the rest are padding)."""
        return max(0, min(self.vocab_size, self.end) - self.start)

    @property
    def world_size(self) -> int:
        return 1 if self.group is None else self.group.size()

    @property
    def rank(self) -> int:
        return 0 if self.group is None else self.group.rank()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def check(self, logits: torch.Tensor) -> None:
        if logits.shape[-1] != self.width:
            raise ValueError(
                f"logits have {logits.shape[-1]} vocabulary columns; this shard holds {self.width}"
            )

    def owns(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.start) & (ids < self.end)

    def local_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Column of each id in this shard (0 for ids another rank owns; mask them with `owns`)."""
        return torch.where(self.owns(ids), ids - self.start, torch.zeros_like(ids))

    def masked(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits in the compute dtype (fp32, or fp64 when given) with padding columns at -inf."""
        self.check(logits)
        x = compute_dtype(logits)
        if self.real_width == self.width:
            return x
        pad = torch.arange(self.width, device=x.device) >= self.real_width
        return x.masked_fill(pad, NEG_INF)

    def scaled(self, logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
        """masked(logits) / temperature, as one new tensor (the form every softmax here starts from).
        `temperature`: one for all rows, or a tensor of one per row of logits [..., W]."""
        self.check(logits)
        dtype = compute_dtype_of(logits.dtype)
        if isinstance(temperature, torch.Tensor):
            temperature = temperature.to(dtype).unsqueeze(-1)
        # one pass: a half-precision input is divided in place in its fresh fp32 copy
        x = logits / temperature if logits.dtype == dtype else logits.to(dtype).div_(temperature)
        x[..., self.real_width :] = (
            NEG_INF  # in place on a fresh tensor (neither op keeps its output)
        )
        return x


def compute_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """Half precision computes in fp32; fp32 and fp64 are kept (fp64 serves gradcheck)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def compute_dtype(x: torch.Tensor) -> torch.Tensor:
    return x.to(compute_dtype_of(x.dtype))


# ------------------------------------------------------------------ vocabulary-wide reductions


def log_normalizer(scaled: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """logsumexp over the whole (sharded) vocabulary of padding-masked scaled logits [..., W] -> [...]."""
    if not shard.distributed:
        return torch.logsumexp(scaled, dim=-1)
    peak = max_tensor_parallel(scaled.detach().amax(dim=-1), shard.group)  # a shift: no gradient
    mass = sum_tensor_parallel(torch.exp(scaled - peak.unsqueeze(-1)).sum(dim=-1), shard.group)
    return torch.log(mass) + peak


def gather_logits(logits: torch.Tensor, ids: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """logits[..., ids] for global ids [..., K] from the sharded logits [..., W] (autograd-aware)."""
    local = logits.gather(-1, shard.local_index(ids))
    return sum_tensor_parallel(
        torch.where(shard.owns(ids), local, torch.zeros_like(local)), shard.group
    )


def softmax_entropy(
    scaled: torch.Tensor, log_norm: torch.Tensor, shard: VocabShard
) -> torch.Tensor:
    """Entropy -sum_v p_v log p_v of p = softmax(scaled) over the whole (sharded) vocabulary [..., W] -> [...].

    `scaled` are padding-masked scaled logits (`VocabShard.scaled`) and `log_norm` their
    `log_normalizer`. Summing p log p (each term small) rather than logZ - E_p[scaled] avoids
    cancelling two large numbers when the logits are large. Autograd-aware.
    """
    log_p = scaled[..., : shard.real_width] - log_norm.unsqueeze(
        -1
    )  # padding columns: p = 0, left out
    return -sum_tensor_parallel(torch.linalg.vecdot(log_p.exp(), log_p), shard.group)
