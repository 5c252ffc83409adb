"""Estimates for a paired study design, with standard errors that count training seeds and problems.

Every model of a study is scored on the same problems, so a comparison is paired by problem. A
model's scores are per benchmark, per problem (`Scores`: benchmark -> one value per problem, in
problem order; the same problems for every model). Its metric is the mean over benchmarks of the
mean over problems (as `eval/summary.json` averages); an arm's is the mean over its seeds' models.

For a difference D between two arms A and B (B may be the base model, one "seed"), with seeds s
and problems p of benchmark b (B_n benchmarks, P_b problems each):

    SE(D)^2 = sum over arms of var_s(model metric) / S        (training seeds; S = 1: no term)
            + sum_b var_p(mean_s A[s,p] - mean_s B[s,p]) / (P_b B_n^2)   (the choice of problems)

the two-way crossed random-effects variance with its interaction counted in both terms, so it is
slightly conservative (tests/test_study.py checks it against simulated studies). Sample variances
(n - 1). An arm alone is the difference against no arm.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

Scores = dict[str, list[float]]  # benchmark -> per-problem values


@dataclass(frozen=True)
class Estimate:
    value: float
    se: float | None  # None: nothing to estimate it from (one model and one problem)


def metric(scores: Scores) -> float:
    return statistics.fmean(statistics.fmean(v) for v in scores.values())


def estimate(a: Sequence[Scores], b: Sequence[Scores] = ()) -> Estimate:
    """mean(A) - mean(B) over seeds, paired by problem; B empty: A's mean."""
    arms = [arm for arm in (a, b) if arm]
    shapes = {tuple((k, len(v)) for k, v in sorted(s.items())) for arm in arms for s in arm}
    if len(shapes) != 1:
        raise ValueError(f"the models were scored on different problems: {sorted(shapes)}")
    value = statistics.fmean(metric(s) for s in a) - (
        statistics.fmean(metric(s) for s in b) if b else 0.0
    )
    terms = [
        statistics.variance([metric(s) for s in arm]) / len(arm) for arm in arms if len(arm) > 1
    ]
    benchmarks = list(a[0])
    for bench in benchmarks:
        per_problem = [
            _seed_mean(a, bench, p) - (_seed_mean(b, bench, p) if b else 0.0)
            for p in range(len(a[0][bench]))
        ]
        if len(per_problem) > 1:
            terms.append(statistics.variance(per_problem) / len(per_problem) / len(benchmarks) ** 2)
    return Estimate(value, math.sqrt(sum(terms)) if terms else None)


def _seed_mean(arm: Sequence[Scores], bench: str, problem: int) -> float:
    return statistics.fmean(s[bench][problem] for s in arm)
