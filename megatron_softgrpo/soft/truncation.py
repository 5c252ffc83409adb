"""Truncation of the next-token distribution across vocabulary shards (docs/algorithm.md section 1, step 2).

Order of the reference: p = softmax(l / T); top-k, renormalise; top-p on the already
truncated distribution (the minimal nucleus: a token is kept while the mass before it
is < top_p); optional min-p (p >= min_p * p_max); renormalise.

Every rule keeps a prefix of the tokens sorted by logit, so the work is done on the
global top candidates only: each shard takes its local top candidates, they are
all-gathered, and the global selection is taken from the union. Ties are broken by the
lower token id, exactly and identically at every TP size: where a plain top-k could
choose among tied values, the choice is made on a unique 64-bit key (order-preserving
bits of the fp32 logit, then the complemented id).

On a GPU, and in a compiled step, nothing here waits for the device (a token step must be
capturable as a CUDA graph): the top-k is taken on the keys directly, and a support bounded
only by top-p or min-p is found among all tokens. On the CPU, where a host check costs nothing, a plain
top-k is redone on keys only for rows with a tie at the boundary, and the candidate count
grows adaptively: both several times faster there, with the same results. `_host_checks`
picks the branch; the tests patch it to run the GPU's branch on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_softgrpo.distributed import gather_tensor_parallel
from megatron_softgrpo.soft.vocab import NEG_INF, VocabShard, log_normalizer

_LOW32 = 0xFFFFFFFF
_ADAPTIVE_START = 128  # first candidate count when top-p/min-p alone bound the support
_ADAPTIVE_GROWTH = 8


@dataclass(frozen=True)
class Truncation:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")

    @classmethod
    def greedy(cls) -> Truncation:
        return cls(top_k=1)

    @property
    def truncates(self) -> bool:
        return self.top_k is not None or self.top_p < 1 or self.min_p > 0

    @property
    def needs_log_normalizer(self) -> bool:
        """Top-p without top-k measures mass against the whole vocabulary."""
        return self.top_k is None and self.top_p < 1


@dataclass
class Candidates:
    """The global top tokens of each row, sorted by logit descending (ties: lower id first)."""

    ids: torch.Tensor  # [N, C] int64 global ids
    scaled: torch.Tensor  # [N, C] fp32 logits / T
    support: torch.Tensor  # [N, C] bool, in the truncated support (a prefix of each row)


# ------------------------------------------------------------------ exact global top-k


def _order_keys(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Unique int64 keys ordered like (fp32 value ascending, id descending): topk keeps the lower id on ties."""
    bits = values.float().contiguous().view(torch.int32).to(torch.int64)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float value
    return (ordered << 32) | (_LOW32 - ids)


def _decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids = _LOW32 - (keys & _LOW32)
    ordered = keys >> 32
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(torch.int32)
    return ids, bits.view(torch.float32)


def _host_checks(x: torch.Tensor) -> bool:
    """Whether a data-dependent branch may read `x` on the host (free on the CPU only, and not
    in a compiled step, which reads nothing on the host either).

    The one switch between the two branches: patched to False, the CPU runs the GPU's."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _top_by_key(
    values: torch.Tensor, ids: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return _decode_keys(_order_keys(values, ids).topk(count, dim=-1).values)


def _local_top(x: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns, fp32 values) of the top `count` of x [N, W], ordered by (value desc, column asc).

    A plain topk, exact unless values tie at its boundary; such rows (rare with fp32
    logits) are redone on unique keys, which cost a few passes over the row.
    """
    if not _host_checks(x):
        columns = torch.arange(x.shape[-1], device=x.device).expand(x.shape[0], -1)
        return _top_by_key(x, columns, count)  # keys sort like (value desc, column asc)
    values, cols = x.topk(count, dim=-1)
    edge = values[:, -1:]
    ambiguous = (x >= edge).sum(dim=-1) > count  # some tied value at the boundary was left out
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero().squeeze(-1)
        columns = torch.arange(x.shape[-1], device=x.device).expand(rows.numel(), -1)
        redone_cols, redone_values = _top_by_key(x[rows], columns, count)
        cols, values = (
            cols.index_put((rows,), redone_cols),
            values.index_put((rows,), redone_values.to(values.dtype)),
        )
    cols, by_col = cols.sort(dim=-1)
    values, by_value = values.gather(-1, by_col).float().sort(dim=-1, descending=True, stable=True)
    return cols.gather(-1, by_value), values


def top_logits(
    logits: torch.Tensor, shard: VocabShard, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, count], fp32 logits [N, count]) of the global top `count` real tokens of the logit shard.

    Padding columns are never candidates (they are sliced off, not masked). Each rank
    offers its exact local top `count`; their union holds the global top `count`.
    """
    if count > shard.vocab_size:
        raise ValueError(
            f"asked for the top {count} tokens of a {shard.vocab_size}-token vocabulary"
        )
    shard.check(logits)
    real = logits[..., : shard.real_width]
    if real.shape[-1] < count:  # a shard with fewer real tokens than asked offers -inf for the rest
        real = torch.nn.functional.pad(real, (0, count - real.shape[-1]), value=NEG_INF)
    cols, values = _local_top(real, count)
    ids = cols + shard.start
    if not shard.distributed:
        return ids, values
    return _top_by_key(
        gather_tensor_parallel(values, shard.group), gather_tensor_parallel(ids, shard.group), count
    )


# ------------------------------------------------------------------ truncation rules


def support_mask(
    scaled: torch.Tensor, truncation: Truncation, log_norm: torch.Tensor | None = None
) -> torch.Tensor:
    """In-support mask [N, C] of candidates sorted descending; `log_norm` [N] for top-p without top-k.

    Probabilities are taken relative to the row maximum (r = p / p_max), so the rules need
    no normaliser except top-p over the whole vocabulary.
    """
    c = scaled.shape[-1]
    ratio = torch.exp(scaled - scaled[:, :1])
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if truncation.top_k is not None:
        keep &= torch.arange(c, device=scaled.device) < truncation.top_k
    if truncation.top_p < 1:
        if truncation.top_k is not None:
            mass = (ratio * keep).sum(dim=-1, keepdim=True)  # the top-k renormaliser
        else:
            mass = torch.exp(log_norm - scaled[:, 0]).unsqueeze(-1)  # 1 / p_max
        before = torch.cat(
            [torch.zeros_like(ratio[:, :1]), (ratio * keep).cumsum(dim=-1)[:, :-1]], dim=-1
        )
        keep &= before < truncation.top_p * mass
    if truncation.min_p > 0:
        keep &= ratio >= truncation.min_p
    return keep


def candidates(
    logits: torch.Tensor,
    shard: VocabShard,
    truncation: Truncation,
    count: int,
    log_norm: torch.Tensor | None = None,
) -> Candidates:
    """The global top `count` tokens of the logit shard, with their truncated-support mask.

    The support is exact on these `count` slots; it may extend past them (see `full_support`).
    `log_norm` (logsumexp of logits / T over the vocabulary) is computed when needed and not given.
    """
    ids, values = top_logits(logits, shard, count)
    scaled = values / truncation.temperature
    if truncation.needs_log_normalizer and log_norm is None:
        log_norm = log_normalizer(shard.scaled(logits, truncation.temperature), shard)
    return Candidates(ids, scaled, support_mask(scaled, truncation, log_norm))


def full_support(
    logits: torch.Tensor,
    shard: VocabShard,
    truncation: Truncation,
    log_norm: torch.Tensor | None = None,
) -> Candidates:
    """Enough candidates to hold the whole truncated support of every row (truncation must truncate).

    With top-k the support has at most top_k tokens; top-p or min-p alone can keep many,
    so the candidate count grows until no row's support reaches the last slot.
    """
    if truncation.top_k is not None:
        return candidates(
            logits, shard, truncation, min(truncation.top_k, shard.vocab_size), log_norm
        )
    if not _host_checks(logits):
        return candidates(logits, shard, truncation, shard.vocab_size, log_norm)
    count = min(_ADAPTIVE_START, shard.vocab_size)
    while True:
        found = candidates(logits, shard, truncation, count, log_norm)
        if count == shard.vocab_size or not bool(found.support[:, -1].any()):
            return found
        count = min(count * _ADAPTIVE_GROWTH, shard.vocab_size)
