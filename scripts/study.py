"""GRPO vs SofT-GRPO side by side: train each algorithm with the same recipe and seeds, evaluate the
base model and every final checkpoint under named decodings, write one report.

    python scripts/study.py RECIPE --out DIR [--algorithms grpo,softgrpo] [--seeds 1,2,3]
        [--decodings hard,soft] [--decodings-file FILE.yaml] [--allow-mismatched-exploration]
        [--slurm [--sbatch-arg=ARG ...]] [--report-only] [key=value ...]

Decodings: the built-in `hard` and `soft` (the recipe's own sampling, discrete or Gumbel soft
thinking) and the reference's evaluation protocol `ref-soft`, `ref-hard`, `ref-soft-k30`
(docs/algorithm.md, "Comparing algorithms"), or a FILE.yaml's
`NAME: {overrides: [key=value, ...], models: [base, grpo, ...]}`.
The training arms must explore at the same temperature, top-k and top-p (policy.generation for
GRPO, softgrpo.thinking for soft thinking) unless --allow-mismatched-exploration is given.

The jobs are `softgrpo train` and `softgrpo eval` commands (megatron_softgrpo/study/jobs.py has the
layout); key=value overrides go to every one of them. Locally they run one after another and the
report is written at the end; with --slurm each is submitted through slurm/softgrpo.sbatch (the
evaluations of a checkpoint wait for its training job), and --report-only writes the report
once they have finished. Rerunning the same command continues an interrupted study.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_softgrpo.config.loader import load_recipe
from megatron_softgrpo.errors import UserError
from megatron_softgrpo.study.jobs import plan_jobs, run_local, submit_slurm
from megatron_softgrpo.study.report import write_report
from megatron_softgrpo.study.spec import StudySpec, check_manifest, read_decodings


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
        default=["hard", "soft"],
        help="comma-separated names: hard, soft, multiplex, ref-soft, ref-hard, ref-soft-k30, or --decodings-file's",
    )
    p.add_argument("--decodings-file", help="YAML: NAME: {overrides: [...], models: [...]}")
    p.add_argument(
        "--allow-mismatched-exploration",
        action="store_true",
        help="train arms that explore at different temperature / top-k / top-p (the report says so)",
    )
    p.add_argument("--slurm", action="store_true", help="submit the jobs with sbatch")
    p.add_argument("--sbatch-arg", action="append", default=[], help="passed to every sbatch")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report")
    p.add_argument("overrides", nargs="*", help="dotted.key=value for every job")
    ns = p.parse_intermixed_args(argv)
    out = Path(ns.out)
    try:
        known = read_decodings(ns.decodings_file)
        unknown = [n for n in ns.decodings if n not in known]
        if unknown:
            raise UserError(f"study: unknown decodings {unknown}; expected some of {sorted(known)}")
        spec = StudySpec(
            ns.recipe,
            tuple(ns.algorithms),
            tuple(ns.seeds),
            {n: known[n] for n in ns.decodings},
            tuple(ns.overrides),
            ns.allow_mismatched_exploration,
        )
        spec.check()
        spec.validate_jobs()  # every job's recipe is valid before any job starts
        spec.check_exploration()
        check_manifest(spec, out)  # after the checks: a refused command leaves no settings behind
        benchmarks = load_recipe(ns.recipe, list(ns.overrides)).cfg.eval.benchmarks
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
