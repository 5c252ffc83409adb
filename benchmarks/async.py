"""Synchronous colocated training vs asynchronous training on a dedicated generation rank, side by
side on the same cores; and a projection of the 7B recipe's step time on GPUs.

Measured (the embedded default, `recipes/softgrpo-smollm2-135m-cpu.yaml`, two cores):
- colocated: one process, two threads, decodes and trains in turn (`grpo.async_grpo` off);
- async: `torchrun --nproc-per-node 2`, one thread each: one training process, one generation
  process decoding the next step's prompts while the trainer trains (age 1).
Every other setting is the recipe's (sampling temperature, top-k, top-p, mixture size, batch,
length, learning rate); validation and checkpoints are off, so the steps are all there is. The
arms alternate (`--rounds`), and each run's first step (warm-up: the reward pool, the first
compile of nothing, page faults) is left out of its mean step time.

    .venv/bin/python benchmarks/async.py [--steps 5] [--rounds 2]
    .venv/bin/python benchmarks/async.py --project-only

Prints `name: value` lines; ratios are `ratio/<what>`.

The projection (`project`) has no GPU cluster behind it: it is a model anyone can rerun, from
throughputs measured on one GPU in benchmarks/RESULTS.md, with its assumptions in `PROJECTION`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "softgrpo-smollm2-135m-cpu.yaml"
BIN = Path(sys.executable).parent
ASYNC = [
    "policy.generation.colocated.enabled=false",
    "policy.generation.colocated.resources.gpus_per_node=1",
    "grpo.async_grpo.enabled=true",
    "loss_fn.use_importance_sampling_correction=true",
]


def run_arm(name: str, steps: int, out: Path) -> list[dict]:
    """One `softgrpo train` run of `steps` steps; its metrics.jsonl lines."""
    run = out / name
    common = [
        str(RECIPE),
        f"grpo.max_num_steps={steps}",
        "grpo.val_at_start=false",
        "grpo.val_period=0",
        "data.validation=null",
        "checkpointing.enabled=false",
        f"logger.log_dir={run}",
        "logger.tensorboard_enabled=false",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    if name == "colocated":
        env["OMP_NUM_THREADS"] = "2"
        cmd = [sys.executable, "-m", "megatron_softgrpo", "train", *common]
    else:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2"]
        cmd += ["-m", "megatron_softgrpo"]
        cmd += ["train", *common, *ASYNC]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{name}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def summary(rows: list[dict]) -> dict:
    later = rows[1:]  # without the warm-up step
    step = statistics.mean(r["time/step"] for r in later)
    out = {"step_s": step, "steps_per_hour": 3600 / step}
    for key in ("async/training_idle_fraction", "async/generation_idle_fraction"):
        if key in later[0]:
            out[key.split("/")[1]] = statistics.mean(r[key] for r in later)
    out["rollout_fraction"] = statistics.mean(r["time/rollout"] / r["time/step"] for r in later)
    return out


# ------------------------------------------------------------------ the projection

PROJECTION = {
    # R1-Distill-Qwen-7B recipe (recipes/softgrpo-r1-distill-qwen-7b-2n8g.yaml): 2 nodes x 8 GPUs,
    # 64 prompts x 8 responses, up to 8,192 new tokens; the reference's 7B runs average about
    # half the limit (an assumption: the mean response length is a parameter)
    "gpus": 16,
    "rows": 512,
    "max_new_tokens": 8192,
    "mean_new_tokens": 4096,
    "prompt_tokens": 512,
    # decode: one batch-64 step of the 1.5B shape took 64 / 1,240 s = 52 ms on an H200
    # (RESULTS.md "Rollout at batch 64", the engine without CUDA graphs), which is host-bound
    # (the 1.5B weights stream in under 1 ms). Qwen2-7B has the same 28 layers, so the same
    # launches: assumed the same step time per replica of one GPU at batch 64. A pass is as long
    # as its longest row (max_new_tokens); rows beyond 64 per GPU take further passes.
    "decode_step_s": 64 / 1240,
    "rows_per_gpu_pass": 64,
    # the "graphs" scenario: issue 32's goal for the whole-step CUDA graph, 4x the bandwidth
    # roofline of a 7B decode step at batch 64 (15.2 GB of weights at 4.8 TB/s: 3.2 ms)
    "graphs_decode_step_s": 4 * 15.2e9 / 4.8e12,
    # update: 22,380 tokens/s for the 1.5B shape on an H100 (RESULTS.md, MFU 36.6%); the 7B
    # model has 7.6e9 / 1.78e9 = 4.3x the parameters, so 4.3x the FLOPs per token at the same
    # MFU; the old log-probs cost one forward (1/3 of an update's FLOPs)
    "update_tokens_per_s_per_gpu": 22380 / (7.6 / 1.78),
    "logprob_share": 1 / 3,
    # refit: 15.2 GB of bf16 weights; assumed 2 GB/s, as through host memory (the refit's NCCL
    # path, device to device, has not run)
    "refit_bytes": 15.2e9,
    "refit_bytes_per_s": 2e9,
}


def project(p: dict = PROJECTION) -> dict:
    """Seconds per RL step of the 7B recipe: colocated (all GPUs decode, then all train) and
    asynchronous at age 1 for each split of the GPUs (a step then takes the longer side; the
    refit is the trainer's: the generation ranks receive it while they decode)."""
    tokens = p["rows"] * (p["prompt_tokens"] + p["mean_new_tokens"])

    def decode_s(gpus: int) -> float:
        passes = -(-p["rows"] // (gpus * p["rows_per_gpu_pass"]))
        return passes * p["max_new_tokens"] * p["decode_step_s"]

    def train_s(gpus: int) -> float:
        return tokens * (1 + p["logprob_share"]) / (gpus * p["update_tokens_per_s_per_gpu"])

    refit = p["refit_bytes"] / p["refit_bytes_per_s"]
    out = {"colocated_s": decode_s(p["gpus"]) + train_s(p["gpus"])}
    for generating in (p["gpus"] // 4, p["gpus"] // 2, 3 * p["gpus"] // 4):
        training = p["gpus"] - generating
        gen, train = decode_s(generating), train_s(training)
        out[f"async_{training}t_{generating}g_s"] = max(gen, train + refit)
    return out


def print_projection() -> None:
    for scenario, step in (("measured", None), ("graphs", PROJECTION["graphs_decode_step_s"])):
        p = PROJECTION if step is None else {**PROJECTION, "decode_step_s": step}
        projection = project(p)
        for key, value in projection.items():
            print(f"project/{scenario}/{key}: {value:.0f}")
        best = min(v for k, v in projection.items() if k.startswith("async"))
        ratio = projection["colocated_s"] / best
        print(f"ratio/project/{scenario}/colocated_over_best_async: {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=5, help="RL steps per run (the first is warm-up)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each arm")
    parser.add_argument("--project-only", action="store_true")
    args = parser.parse_args()
    print_projection()
    if args.project_only:
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = {"colocated": [], "async": []}
        for r in range(args.rounds):
            for arm in results:
                s = summary(run_arm(arm, args.steps, Path(tmp) / f"{arm}{r}"))
                results[arm].append(s)
                line = ", ".join(f"{k} {v:.3g}" for k, v in s.items())
                print(f"round {r + 1} {arm}: {line}", flush=True)
    for arm, runs in results.items():
        print(f"{arm}/steps_per_hour: {statistics.mean(s['steps_per_hour'] for s in runs):.1f}")
    for r, (c, a) in enumerate(zip(results["colocated"], results["async"], strict=True)):
        print(
            f"ratio/async_over_colocated_steps_per_hour/round{r + 1}: "
            f"{a['steps_per_hour'] / c['steps_per_hour']:.2f}"
        )


if __name__ == "__main__":
    main()
