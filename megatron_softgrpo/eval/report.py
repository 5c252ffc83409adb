"""The evaluation's summary: `eval/summary.json` (every metric) and `eval/summary.md` (the paper-style table).

`summary.json`:

    {"model": ..., "decoding": "gumbel", "n": 32, "max_new_tokens": 8192, "seed": 0,
     "benchmarks": {"gsm8k": METRICS, ...}, "average": METRICS}

METRICS are the fields of `metrics.BenchmarkMetrics` (n, problems, mean_at_n, pass_at_k (unbiased),
pass_at_k_first, maj_at_k, mean_length, truncated_fraction); the k-keyed maps have string keys
in JSON. "average" is the unweighted mean over the benchmarks (as the paper averages), its
`problems` their total; maj@k averages the benchmarks that vote (math), pass@k the ks all share.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_softgrpo.errors import UserError
from megatron_softgrpo.eval.metrics import BenchmarkMetrics

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
_K_MAPS = ("pass_at_k", "pass_at_k_first", "maj_at_k")


@dataclass(frozen=True)
class EvalSummary:
    model: str  # policy.model_name (a checkpoint directory for checkpoint=DIR)
    decoding: (
        str  # the thinking-phase sampler: gumbel, discrete, gaussian, dirichlet, embedding_noise
    )
    n: int
    max_new_tokens: int
    seed: int
    benchmarks: dict[str, BenchmarkMetrics]

    @property
    def average(self) -> BenchmarkMetrics:
        return average_metrics(list(self.benchmarks.values()))

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "decoding": self.decoding,
            "n": self.n,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "benchmarks": {name: asdict(m) for name, m in self.benchmarks.items()},
            "average": asdict(self.average),
        }

    @classmethod
    def from_dict(cls, data: dict) -> EvalSummary:
        return cls(
            model=data["model"],
            decoding=data["decoding"],
            n=data["n"],
            max_new_tokens=data["max_new_tokens"],
            seed=data["seed"],
            benchmarks={name: _metrics_from_dict(m) for name, m in data["benchmarks"].items()},
        )


def average_metrics(metrics: Sequence[BenchmarkMetrics]) -> BenchmarkMetrics:
    if not metrics:
        raise ValueError("no benchmarks to average")

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    def mean_map(key: str) -> dict[int, float]:
        maps = [getattr(m, key) for m in metrics if getattr(m, key)]
        shared = set.intersection(*(set(d) for d in maps)) if maps else set()
        return {k: mean([d[k] for d in maps]) for k in sorted(shared)}

    return BenchmarkMetrics(
        n=metrics[0].n,
        problems=sum(m.problems for m in metrics),
        mean_at_n=mean([m.mean_at_n for m in metrics]),
        pass_at_k=mean_map("pass_at_k"),
        pass_at_k_first=mean_map("pass_at_k_first"),
        maj_at_k=mean_map("maj_at_k"),
        mean_length=mean([m.mean_length for m in metrics]),
        truncated_fraction=mean([m.truncated_fraction for m in metrics]),
    )


def _metrics_from_dict(data: dict) -> BenchmarkMetrics:
    maps = {key: {int(k): v for k, v in data[key].items()} for key in _K_MAPS}
    return BenchmarkMetrics(**{**data, **maps})


# ---------------------------------------------------------------- files


def write_summary(eval_dir: Path, summary: EvalSummary) -> None:
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / SUMMARY_JSON).write_text(
        json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8"
    )
    (eval_dir / SUMMARY_MD).write_text(markdown_table(summary), encoding="utf-8")


def summary_path(directory: str | Path) -> Path | None:
    """The summary of an evaluation directory: `DIR/eval/summary.json` (a run's log_dir) or `DIR/summary.json`."""
    for candidate in (Path(directory) / "eval" / SUMMARY_JSON, Path(directory) / SUMMARY_JSON):
        if candidate.is_file():
            return candidate
    return None


def read_summary(directory: str | Path) -> EvalSummary:
    path = summary_path(directory)
    if path is None:
        raise UserError(
            f"{directory}: no evaluation summary (eval/summary.json); run `softgrpo eval` first"
        )
    try:
        return EvalSummary.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not an evaluation summary ({exc})") from None


# ---------------------------------------------------------------- Markdown


def markdown_table(summary: EvalSummary) -> str:
    """Metrics as rows, benchmarks and their average as columns; accuracies in percent, as in the paper."""
    columns = {**summary.benchmarks, "average": summary.average}
    n = summary.n

    def percent(values: list[float | None]) -> list[str]:
        return ["" if v is None else f"{100 * v:.2f}" for v in values]

    rows: list[tuple[str, list[str]]] = [
        ("problems", [str(m.problems) for m in columns.values()]),
        (f"mean@{n} (Pass@1)", percent([m.mean_at_n for m in columns.values()])),
    ]
    for key, label in (
        ("pass_at_k", "pass@{k}"),
        ("pass_at_k_first", "pass@{k} (first k)"),
        ("maj_at_k", "maj@{k}"),
    ):
        ks = sorted({k for m in columns.values() for k in getattr(m, key)})
        rows += [
            (label.format(k=k), percent([getattr(m, key).get(k) for m in columns.values()]))
            for k in ks
        ]
    rows += [
        ("mean length (tokens)", [f"{m.mean_length:.1f}" for m in columns.values()]),
        ("truncated (%)", percent([m.truncated_fraction for m in columns.values()])),
    ]
    lines = [
        f"# Evaluation: {summary.model}",
        "",
        f"{summary.decoding} decoding, n = {n} samples per problem, up to {summary.max_new_tokens} new tokens, "
        f"seed {summary.seed}. Accuracies in percent; pass@k is the unbiased estimator, "
        '"first k" counts a problem when any of its first k samples is correct.',
        "",
        "| metric | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines) + "\n"
