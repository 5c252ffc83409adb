"""GRPO vs SofT-GRPO side by side: train each algorithm with the same recipe and seeds, evaluate the
base model and every final checkpoint under hard and soft decoding, write one report.

    python scripts/study.py RECIPE --out DIR [--algorithms grpo,softgrpo] [--seeds 1,2,3]
        [--decodings discrete,gumbel] [--slurm [--sbatch-arg=ARG ...]] [--report-only] [key=value ...]

The jobs are `softgrpo train` and `softgrpo eval` commands (megatron_softgrpo/study.py has the
layout); key=value overrides go to every one of them. Locally they run one after another and the
report is written at the end; with --slurm each is submitted through slurm/softgrpo.sbatch (the
evaluations of a checkpoint wait for its training job), and --report-only writes the report
once they have finished. Rerunning the same command continues an interrupted study.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_softgrpo.config.checks import cluster_world_size, validate
from megatron_softgrpo.config.loader import load_recipe
from megatron_softgrpo.errors import UserError
from megatron_softgrpo.study import (
    StudySpec,
    check_manifest,
    plan_jobs,
    run_local,
    submit_slurm,
    write_report,
)


def _names(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _seeds(text: str) -> list[int]:
    try:
        return [int(t) for t in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipe")
    p.add_argument("--out", required=True, help="the study's directory")
    p.add_argument(
        "--algorithms", type=_names, default=["grpo", "softgrpo"], help="comma-separated"
    )
    p.add_argument("--seeds", type=_seeds, default=[1, 2, 3], help="comma-separated")
    p.add_argument(
        "--decodings",
        type=_names,
        default=["discrete", "gumbel"],
        help="comma-separated softgrpo.sampler values: discrete (hard), gumbel (soft), ...",
    )
    p.add_argument("--slurm", action="store_true", help="submit the jobs with sbatch")
    p.add_argument("--sbatch-arg", action="append", default=[], help="passed to every sbatch")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report")
    p.add_argument("overrides", nargs="*", help="dotted.key=value for every job")
    ns = p.parse_intermixed_args(argv)
    spec = StudySpec(
        ns.recipe,
        tuple(ns.algorithms),
        tuple(ns.seeds),
        tuple(ns.decodings),
        tuple(ns.overrides),
    )
    out = Path(ns.out)
    try:
        spec.check()
        benchmarks = None
        recipes = [([f"softgrpo.algorithm={a}", *ns.overrides], True) for a in ns.algorithms]
        recipes += [([f"softgrpo.sampler={d}", *ns.overrides], False) for d in ns.decodings]
        for overrides, training in recipes:  # every job's recipe is valid before any job starts
            loaded = load_recipe(ns.recipe, overrides)
            validate(loaded, cluster_world_size(loaded.cfg.cluster), training)
            benchmarks = loaded.cfg.eval.benchmarks
        check_manifest(spec, out)  # after the checks: a refused command leaves no settings behind
        jobs = plan_jobs(spec, out, benchmarks)
        if not ns.report_only:
            if ns.slurm:
                submit_slurm(spec, jobs, ns.sbatch_arg)
                return 0
            run_local(spec, jobs, out)
        print(f"[study] wrote {write_report(spec, out)}", flush=True)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
