"""Evaluation metrics over per-problem sample tables (pure functions; docs/algorithm.md section 6).

A table holds, for each problem, its n graded samples in sample-index order. Reported:

- mean@n: mean accuracy over all samples (the paper's "Pass@1").
- pass@k (unbiased, Chen et al. 2021): 1 - C(n-c, k) / C(n, k) per problem, c correct of n.
- pass@k (first k): whether any of the first k samples is correct (the paper's definition).
- maj@k: whether the majority answer among the first k samples is correct. Samples vote with
  their `answer_class` (equivalent answers share a class; samples without an answer do not
  vote). Ties go to the class whose first vote comes earliest in sample order; the majority is
  correct when that earliest sample of the winning class is correct. No vote: wrong.
- mean response length, and the fraction of samples truncated at the length limit.

Every per-problem value is averaged over problems; k runs over `ks` with k <= n.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_KS = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class GradedSample:
    correct: bool
    answer_class: int | None  # equal for equivalent answers; None: no answer
    length: int  # response tokens
    truncated: bool  # stopped by the length limit


@dataclass(frozen=True)
class BenchmarkMetrics:
    n: int
    problems: int
    mean_at_n: float
    pass_at_k: dict[int, float]  # unbiased estimator
    pass_at_k_first: dict[int, float]  # any correct among the first k samples
    maj_at_k: dict[int, float]  # empty where answers do not vote (code)
    mean_length: float  # response tokens
    truncated_fraction: float


def pass_at_k_unbiased(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k), as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i) (no huge binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_first(correct: Sequence[bool], k: int) -> bool:
    return any(correct[:k])


def majority_sample(classes: Sequence[int | None]) -> int | None:
    """Index of the sample that represents the majority answer (see the module docstring); None: no votes."""
    votes: dict[int, int] = {}
    first_index: dict[int, int] = {}
    for index, answer_class in enumerate(classes):
        if answer_class is not None:
            votes[answer_class] = votes.get(answer_class, 0) + 1
            first_index.setdefault(answer_class, index)
    if not votes:
        return None
    winner = min(votes, key=lambda c: (-votes[c], first_index[c]))
    return first_index[winner]


def maj_at_k(samples: Sequence[GradedSample], k: int) -> bool:
    index = majority_sample([s.answer_class for s in samples[:k]])
    return index is not None and samples[index].correct


def summarize(
    table: Sequence[Sequence[GradedSample]], ks: Sequence[int] = DEFAULT_KS, vote: bool = True
) -> BenchmarkMetrics:
    """All metrics of one benchmark; `vote=False` leaves maj@k out (answers that cannot vote, e.g. code)."""
    if not table:
        raise ValueError("no problems to summarize")
    n = len(table[0])
    if n == 0 or any(len(samples) != n for samples in table):
        counts = sorted({len(samples) for samples in table})
        raise ValueError(f"every problem needs the same positive number of samples, got {counts}")
    ks = [k for k in ks if k <= n]
    correct = [[s.correct for s in samples] for samples in table]
    counts = [sum(row) for row in correct]
    all_samples = [s for samples in table for s in samples]
    return BenchmarkMetrics(
        n=n,
        problems=len(table),
        mean_at_n=_mean(c / n for c in counts),
        pass_at_k={k: _mean(pass_at_k_unbiased(n, c, k) for c in counts) for k in ks},
        pass_at_k_first={k: _mean(pass_at_k_first(row, k) for row in correct) for k in ks},
        maj_at_k={k: _mean(maj_at_k(samples, k) for samples in table) for k in ks} if vote else {},
        mean_length=_mean(s.length for s in all_samples),
        truncated_fraction=_mean(s.truncated for s in all_samples),
    )


def problem_scores(
    samples: Sequence[GradedSample], ks: Sequence[int] = DEFAULT_KS, vote: bool = True
) -> dict[str, float]:
    """One problem's share of the metrics, by the study report's names: `pass@1` (its mean@n),
    `pass@k` (unbiased) and `maj@k` for k in `ks` up to n; `summarize` averages the same values."""
    n, c = len(samples), sum(s.correct for s in samples)
    ks = [k for k in ks if k <= n]
    scores = {"pass@1": c / n} | {f"pass@{k}": pass_at_k_unbiased(n, c, k) for k in ks if k > 1}
    return scores | ({f"maj@{k}": float(maj_at_k(samples, k)) for k in ks} if vote else {})


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values)
