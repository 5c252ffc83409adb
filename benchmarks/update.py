"""Policy-update cost, measured side by side in one run on the same model and batch shapes.

- one SofT-GRPO update step (soft Gumbel rows scored by the Gumbel density) vs one discrete
  GRPO update step (every row scored by log_softmax): target ratio <= 1.15 (the reference
  implementation's soft trainer was about 3x slower than its discrete one);
- training forward+backward throughput (tokens/s) and model FLOPs utilisation on GPU;
- `--loss-variants`: SofT-GRPO's update step with each loss option of issue 28 (rollout
  correction tis / icepop / seq-mask-tis, GSPO, CISPO, Dr. GRPO's aggregation) against plain
  SofT-GRPO, on one worker and batch, the losses alternating within each round (medians):
  target ratio <= 1.05;
- `--vs-hf`: our GRPO update step against the same step in plain `transformers` + torch AdamW
  on the CPU (same weights, rows, lengths, loss and optimizer settings; each side in its own
  process, steps alternating), micro-batch 1 and the embedded recipe's 8: target ratio >= 1.0
  (ours at least as fast); `--profile` adds the top CPU operators of each;
- `--rl-step`: where the time of one RL step of the embedded default goes (rollout, reward,
  old/ref log-probs, update), from a short `softgrpo train` of that recipe.

    .venv/bin/python benchmarks/update.py [--quick] [--model tiny|smollm2-shaped|qwen2-1.5b-shaped] [--seq-len N] [--loss-variants]
    .venv/bin/python benchmarks/update.py --rl-step [--steps 3]
    .venv/bin/python benchmarks/update.py --vs-hf [--rounds 5] [--profile]

Random weights (written once to a temporary Hugging Face directory): only timing matters.
MFU counts 6 * N_params * tokens + 12 * layers * hidden * seq * tokens (causal attention,
forward + backward) FLOPs per update, against the measured bf16 matmul peak of the device.
Prints `name: value` lines; ratios are `ratio/<what>`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from megatron_softgrpo.algorithms.loss import PolicyLoss

warnings.filterwarnings("ignore")

SHAPES = {
    "tiny": dict(
        vocab_size=49152,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "smollm2-shaped": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
    ),
    "qwen2-1.5b-shaped": dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
    ),
}


def write_random_model(shape: dict, path: Path) -> None:
    """A Qwen2 HF directory with N(0, 0.02) weights, generated on the fastest device."""
    from safetensors.torch import save_file

    from megatron_softgrpo.models.arch import ModelArch

    config = dict(
        model_type="qwen2",
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        architectures=["Qwen2ForCausalLM"],
        **shape,
    )
    arch = ModelArch.from_hf_config(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    h, f, hd = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * hd, arch.num_key_value_heads * hd
    shapes = {
        "model.embed_tokens.weight": (arch.vocab_size, h),
        "lm_head.weight": (arch.vocab_size, h),
        "model.norm.weight": (h,),
    }
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
    gen = torch.Generator(device=device).manual_seed(0)
    tensors = {
        name: (
            torch.ones(s)
            if name.endswith("norm.weight")
            else torch.randn(s, generator=gen, device=device) * 0.02
        )
        .to(torch.bfloat16)
        .cpu()
        for name, s in shapes.items()
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))


# loss_fn options timed against plain SofT-GRPO (--loss-variants), by the name in the results
LOSS_VARIANTS = {
    "tis": {"use_importance_sampling_correction": True, "truncated_importance_sampling_ratio": 2.0},
    "icepop": {
        "use_importance_sampling_correction": True,
        "truncated_importance_sampling_type": "icepop",
        "truncated_importance_sampling_ratio": 5.0,
        "truncated_importance_sampling_ratio_min": 0.5,
    },
    "seq_mask_tis": {
        "use_importance_sampling_correction": True,
        "truncated_importance_sampling_type": "seq-mask-tis",
        "truncated_importance_sampling_ratio": 1.002,
        "truncated_importance_sampling_ratio_min": 0.999,
    },
    "cispo": {"use_cispo": True, "ratio_clip_c": None},
    "dr_grpo": {"aggregation": "seq_mean_token_sum_norm"},
    # GSPO's ratio couples a response's positions: the autograd path, not the fused pass
    "gspo": {"sequence_level_importance_ratios": True, "aggregation": "seq_mean_token_mean"},
}


def recipe(
    model_dir: Path,
    rows: int,
    micro: int,
    precision: str,
    algorithm: str,
    megatron: dict,
    loss_fn: dict | None = None,
):
    from megatron_softgrpo.config.schema import RecipeCfg

    return RecipeCfg.model_validate(
        {
            "policy": {
                "model_name": str(model_dir),
                "precision": precision,
                "train_global_batch_size": rows,
                "train_micro_batch_size": micro,
                "logprob_batch_size": micro,
                "max_total_sequence_length": 65536,
                "megatron_cfg": megatron,
            },
            "grpo": {"num_prompts_per_step": rows, "num_generations_per_prompt": 1},
            "loss_fn": {"reference_policy_kl_penalty": 0.0, **(loss_fn or {})},
            "softgrpo": {"algorithm": algorithm},
        }
    )


def synthetic_batch(rows: int, seq: int, vocab: int, soft: bool, k: int = 5, prompt: int = 64):
    """Trajectory-shaped records: a one-hot prompt, then generated rows (soft thinking or discrete)."""
    from megatron_softgrpo.batch import Batch
    from megatron_softgrpo.soft import MixtureRecord

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (rows, seq), generator=g)
    recs = MixtureRecord.discrete(tokens, k)
    if soft:
        generated = torch.zeros(rows, seq, dtype=torch.bool)
        generated[:, prompt:] = True
        ids = torch.randint(0, vocab, (rows, seq, k), generator=g)
        ids[..., 0] = tokens
        weights = (
            torch.softmax(torch.randn(rows, seq, k, generator=g) * 3, -1)
            .sort(-1, descending=True)
            .values
        )
        recs = MixtureRecord(
            tokens=tokens,
            mix_ids=torch.where(generated[..., None], ids, recs.mix_ids),
            mix_weights=torch.where(generated[..., None], weights, recs.mix_weights),
            noise=torch.where(
                generated[..., None], torch.randn(rows, seq, k, generator=g), recs.noise
            ),
            support=torch.where(generated[..., None], torch.ones_like(recs.support), recs.support),
            is_soft=generated,
            noise_seed=recs.noise_seed,
            thinking=generated,
        )
    mask = torch.zeros(rows, seq, dtype=torch.bool)
    mask[:, prompt:] = True
    return Batch(
        recs,
        mask,
        advantages=torch.randn(rows, 1, generator=g).expand(rows, seq) * mask,
        old_logp=torch.zeros(rows, seq),
    )


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_updates(worker, batch, repeats: int, losses: dict[str, PolicyLoss]) -> dict[str, float]:
    """Median seconds of one update step with each loss, the losses alternating within a round
    (one worker and batch: the worker is handed its loss and knows no other)."""
    batch.old_logp = worker.compute_logprobs(batch)  # ratio 1 at the first step, as in training
    # a rollout that scored slightly differently, for the rollout correction's weights
    noise = torch.randn(batch.old_logp.shape, generator=torch.Generator().manual_seed(1))
    batch.rollout_logp = batch.old_logp - 0.01 * noise.to(batch.old_logp.device)
    samples: dict[str, list[float]] = {name: [] for name in losses}
    for loss in losses.values():
        worker.train_step(batch, loss)  # warm-up
    for _ in range(repeats):
        for name, loss in losses.items():
            sync()
            t = time.perf_counter()
            worker.train_step(batch, loss)
            sync()
            samples[name].append(time.perf_counter() - t)
    return {name: statistics.median(values) for name, values in samples.items()}


def timed_worker_updates(
    model_dir: Path, rows, seq, precision, algorithm, megatron, reps, profile, variants=None
) -> dict[str, float]:
    """Seconds of one update step of a new PolicyWorker (run in its own process): with the
    algorithm's loss (key `algorithm`), and with each of `variants` ({name: loss_fn options},
    key `algorithm+name`) on the same worker, alternating."""
    from megatron_softgrpo.distributed import ParallelLayout, init_distributed
    from megatron_softgrpo.models.arch import ModelArch
    from megatron_softgrpo.train.setup import build_worker

    warnings.filterwarnings("ignore")
    parallel = init_distributed(ParallelLayout(1, 1), seed=0)
    cfg = recipe(model_dir, rows, 1, precision, algorithm, megatron, None)
    worker = build_worker(cfg, parallel)
    batch = synthetic_batch(
        rows, seq, ModelArch.from_hf_dir(model_dir).vocab_size, soft=algorithm == "softgrpo"
    )
    losses = {algorithm: PolicyLoss(cfg.loss_fn)}
    for name, options in (variants or {}).items():
        variant = recipe(model_dir, rows, 1, precision, algorithm, megatron, options)
        losses[f"{algorithm}+{name}"] = PolicyLoss(variant.loss_fn)
    seconds = timed_updates(worker, batch, reps, losses)
    if profile and torch.cuda.is_available():
        print_top_kernels(worker, batch, losses[algorithm])
    return seconds


def print_top_kernels(worker, batch, loss: PolicyLoss, count: int = 15) -> None:
    """The GPU kernels taking most of one update step (torch.profiler), to show what limits MFU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        worker.train_step(batch, loss)
        sync()
    print(
        prof.key_averages().table(
            sort_by="cuda_time_total", row_limit=count, max_name_column_width=70
        )
    )


def matmul_peak_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    sync()
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    sync()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12


# ------------------------------------------------------------------ --vs-hf


def hf_grpo_step(model, optimizer, tokens, mask, advantages, old_logp, micro, cfg) -> tuple:
    """One GRPO update in plain PyTorch on a `transformers` model, written from the loss's
    definition (docs/algorithm.md section 3) rather than from our code: per micro-batch the
    clipped surrogate with dual clip, token mean over the micro-batch's scored positions, divided
    by the number of micro-batches; grad-norm clipping and torch AdamW. (loss, grad norm before
    clipping)."""
    loss_cfg, opt_cfg = cfg.loss_fn, cfg.policy.megatron_cfg.optimizer
    temperature = cfg.policy.generation.temperature
    optimizer.zero_grad(set_to_none=True)
    starts = range(0, tokens.shape[0], micro)
    total = 0.0
    for i in starts:
        rows = slice(i, i + micro)
        logits = model(tokens[rows]).logits[:, :-1].float() / temperature
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[rows, 1:, None]).squeeze(-1)
        m, a = mask[rows, 1:], advantages[rows, 1:]
        ratio = torch.exp(logp - old_logp[rows, 1:])
        low, high = 1 - loss_cfg.ratio_clip_min, 1 + loss_cfg.ratio_clip_max
        term = torch.maximum(-a * ratio, -a * ratio.clamp(low, high))
        if loss_cfg.ratio_clip_c is not None:
            term = torch.where(a < 0, torch.minimum(term, -a * loss_cfg.ratio_clip_c), term)
        loss = (term * m).sum() / m.sum() / len(starts)
        loss.backward()
        total += float(loss)
    # the trainer reads its inputs as detached mixtures (docs/algorithm.md section 2): the input
    # table gets no gradient through the lookup, but stays in the optimizer (weight decay)
    if not model.config.tie_word_embeddings:  # (tied, it is the output layer's and trained)
        model.get_input_embeddings().weight.grad.zero_()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.clip_grad)
    optimizer.step()
    return total, float(norm)


def hf_old_logp(model, tokens, temperature, micro) -> torch.Tensor:
    out = torch.zeros(tokens.shape, dtype=torch.float32)
    with torch.no_grad():
        for i in range(0, tokens.shape[0], micro):
            logits = model(tokens[i : i + micro]).logits[:, :-1].float() / temperature
            logp = torch.log_softmax(logits, -1).gather(-1, tokens[i : i + micro, 1:, None])
            out[i : i + micro, 1:] = logp.squeeze(-1)
    return out


def versus_hf_side(conn, side: str, model_dir: Path, rows: int, seq: int, micro: int) -> None:
    """One side of `--vs-hf` in its own process, as a trainer runs (no other model beside it):
    our GRPO update step (PolicyWorker, Megatron-Core, distributed AdamW), or the same step in
    plain `transformers` + torch AdamW; same weights, rows, lengths, loss and optimizer
    settings. Sends (first step's loss, grad norm, scored old log-probs), then answers each "step"
    with its seconds and "profile" with a profiled step."""
    from megatron_softgrpo.models.arch import ModelArch

    cfg = recipe(model_dir, rows, micro, "float32", "grpo", {}, None)
    batch = synthetic_batch(rows, seq, ModelArch.from_hf_dir(model_dir).vocab_size, soft=False)
    if side == "ours":
        from megatron_softgrpo.distributed import ParallelLayout, init_distributed
        from megatron_softgrpo.train.setup import build_worker

        worker = build_worker(cfg, init_distributed(ParallelLayout(1, 1), seed=0))
        loss = PolicyLoss(cfg.loss_fn)
        batch.old_logp = old = worker.compute_logprobs(batch)

        def step():
            metrics = worker.train_step(batch, loss).metrics
            return metrics["loss"], metrics["grad_norm"]
    else:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
        o = cfg.policy.megatron_cfg.optimizer
        adam = torch.optim.AdamW(
            hf.parameters(),
            lr=o.lr,
            betas=(o.adam_beta1, o.adam_beta2),
            eps=o.adam_eps,
            weight_decay=o.weight_decay,
        )
        tokens, mask = batch.records.tokens, batch.loss_mask
        old = hf_old_logp(hf, tokens, cfg.policy.generation.temperature, micro)

        def step():
            return hf_grpo_step(hf, adam, tokens, mask, batch.advantages.float(), old, micro, cfg)

    conn.send((*step(), old[batch.loss_mask]))
    while (command := conn.recv()) != "stop":
        if command == "profile":
            print_top_cpu_ops(side, step)
            conn.send(None)
        else:
            t = time.perf_counter()
            step()
            conn.send(time.perf_counter() - t)


def versus_hf(model_dir: Path, rows: int, seq: int, micro: int, reps: int, profile: bool) -> dict:
    """Our update step against HF's, each side in its own process, steps alternating within
    each round (medians); the first step's loss and grad norm of both, as a check that they do
    the same work."""
    spawn = multiprocessing.get_context("spawn")
    sides = {}
    for side in ("ours", "hf"):
        conn, child = spawn.Pipe()
        proc = spawn.Process(target=versus_hf_side, args=(child, side, model_dir, rows, seq, micro))
        proc.start()
        sides[side] = (conn, proc)
    (loss, norm, old), (hf_loss, hf_norm, hf_old) = (sides[n][0].recv() for n in ("ours", "hf"))
    results = {
        f"vs_hf/mb{micro}/first_loss": loss,
        f"vs_hf/mb{micro}/first_loss_hf": hf_loss,
        f"vs_hf/mb{micro}/first_grad_norm": norm,
        f"vs_hf/mb{micro}/first_grad_norm_hf": hf_norm,
        f"vs_hf/mb{micro}/old_logp_max_abs_diff": float((old - hf_old).abs().max()),
    }
    samples = {"ours": [], "hf": []}
    for _ in range(reps):
        for name, (conn, _) in sides.items():  # one side steps while the other waits
            conn.send("step")
            samples[name].append(conn.recv())
    ours_s, hf_s = (statistics.median(samples[n]) for n in ("ours", "hf"))
    results |= {
        f"vs_hf/mb{micro}/ours_step_s": ours_s,
        f"vs_hf/mb{micro}/hf_step_s": hf_s,
        f"ratio/mb{micro}/hf_over_ours_update_step": hf_s / ours_s,  # >= 1: ours is faster
    }
    for conn, proc in sides.values():
        if profile:
            conn.send("profile")
            conn.recv()
        conn.send("stop")
        proc.join()
    return results


def print_top_cpu_ops(name: str, step, count: int = 25) -> None:
    """The operators taking most of one update step on the CPU (self time), to see where it goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"--- {name}: one update step, top operators by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=count))


RL_PHASES = ("time/rollout", "time/reward", "time/logprob", "time/update")


def rl_step_breakdown(steps: int) -> dict:
    """Mean seconds per phase (and share of the step) over `steps` RL steps of the embedded default,
    without validation or checkpoints; the first step (start-up effects) is left out of the mean."""
    from megatron_softgrpo.cli import main as softgrpo
    from megatron_softgrpo.train.metrics_log import read_metrics

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "softgrpo-smollm2-135m-cpu.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"grpo.max_num_steps={steps}",
            "grpo.val_at_start=false",
            "data.validation=null",
            "checkpointing.enabled=false",
            f"logger.log_dir={tmp}",
            "logger.tensorboard_enabled=false",
        ]
        if softgrpo(["train", str(recipe), *overrides]) != 0:
            raise SystemExit("the training run failed")
        rows = read_metrics(tmp)[1:]
    step = sum(r["time/step"] for r in rows) / len(rows)
    results = {"rl_step/steps_averaged": len(rows), "rl_step/step_s": step}
    for key in RL_PHASES:
        mean = sum(r[key] for r in rows) / len(rows)
        results[f"rl_step/{key.split('/')[1]}_s"] = mean
        results[f"ratio/{key.split('/')[1]}_share_of_step"] = mean / step
    return results


def vs_hf(args) -> dict:
    """`--vs-hf`: each micro-batch size in its own process (Megatron's state is per process)."""
    model = args.model or "smollm2-shaped"
    seq, reps = args.seq_len or 128, args.rounds or 3
    results: dict = {"device": "cpu", "model": model, "seq_len": seq}
    with tempfile.TemporaryDirectory() as tmp:
        write_random_model(SHAPES[model], Path(tmp) / "model")
        # the case (4 rows, micro-batch 1) and the embedded recipe's micro-batch of 8
        for rows, micro in ((args.rows or 4, 1), (max(args.rows or 8, 8), 8)):
            results[f"vs_hf/mb{micro}/rows"] = rows
            results |= versus_hf(Path(tmp) / "model", rows, seq, micro, reps, args.profile)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced sizes (< 1 min on 2 CPU cores)")
    p.add_argument("--model", default=None, choices=sorted(SHAPES))
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument(
        "--rl-step",
        action="store_true",
        help="time the phases of the embedded default's RL step instead",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=3,
        help="--rl-step: RL steps to run (the first is not averaged)",
    )
    p.add_argument(
        "--megatron",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a policy.megatron_cfg setting (YAML value), e.g. bias_activation_fusion=true; repeatable",
    )
    p.add_argument(
        "--loss-variants",
        action="store_true",
        help="also time SofT-GRPO's update with each loss option (LOSS_VARIANTS)",
    )
    p.add_argument(
        "--vs-hf",
        action="store_true",
        help="our GRPO update step against transformers + torch AdamW (CPU, fp32), micro-batch 1 "
        "and 8; with --profile, the top CPU operators of each",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timed steps per loss, alternating (default 5; 1 with --quick): medians",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also print the GPU kernels taking most of one GRPO update step",
    )
    args = p.parse_args()
    if args.rl_step:
        return report(rl_step_breakdown(max(2, args.steps)), args.json)
    if args.vs_hf:
        return report(vs_hf(args), args.json)

    from megatron_softgrpo.config.loader import apply_overrides
    from megatron_softgrpo.errors import ConfigError
    from megatron_softgrpo.models.arch import ModelArch

    gpu = torch.cuda.is_available()
    model = args.model or ("qwen2-1.5b-shaped" if gpu else "tiny")
    seq = args.seq_len or (4096 if gpu else (256 if args.quick else 512))
    rows = args.rows or (8 if gpu else 4)
    precision = "bfloat16" if gpu else "float32"
    reps = args.rounds or (1 if args.quick else 5)
    try:  # the recipe loader's own KEY=VALUE parsing
        megatron = apply_overrides({}, args.megatron, {})
    except ConfigError as err:
        p.error(f"--megatron: {err}")
    results: dict = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "model": model,
        "seq_len": seq,
        "rows": rows,
        "megatron_cfg": json.dumps(megatron),
    }
    with tempfile.TemporaryDirectory() as tmp:
        write_random_model(SHAPES[model], Path(tmp) / "model")
        arch = ModelArch.from_hf_dir(Path(tmp) / "model")
        # one fresh process per algorithm: Megatron's DDP outlives `del` (its gradient hooks close a
        # reference cycle through C++), and two 1.5B workers with optimizer states do not fit in 80 GB
        spawn = multiprocessing.get_context("spawn")
        times = {}
        variants = LOSS_VARIANTS if args.loss_variants else None
        for algorithm in ("grpo", "softgrpo"):
            with spawn.Pool(1) as pool:
                times |= pool.apply(
                    timed_worker_updates,
                    (
                        Path(tmp) / "model",
                        rows,
                        seq,
                        precision,
                        algorithm,
                        megatron,
                        reps,
                        args.profile and algorithm == "grpo",
                        variants if algorithm == "softgrpo" else None,
                    ),
                )
    tokens = rows * seq
    results["update/grpo_step_s"] = times["grpo"]
    results["update/softgrpo_step_s"] = times["softgrpo"]
    results["ratio/softgrpo_over_grpo_update_step"] = times["softgrpo"] / times["grpo"]
    for name in (n for n in times if n.startswith("softgrpo+")):
        results[f"update/{name}_step_s"] = times[name]
        results[f"ratio/{name}_over_softgrpo_update_step"] = times[name] / times["softgrpo"]
    results["update/train_tokens_per_s"] = tokens / times["grpo"]
    flops = (
        6 * arch.num_parameters() * tokens + 12 * arch.num_layers * arch.hidden_size * seq * tokens
    )
    results["update/model_tflops_per_s"] = flops / times["grpo"] / 1e12
    results["params"] = arch.num_parameters()
    if gpu:
        peak = matmul_peak_tflops()
        results["device/bf16_matmul_peak_tflops"] = peak
        results["update/mfu"] = results["update/model_tflops_per_s"] / peak
    report(results, args.json)


def report(results: dict, json_path: str | None) -> None:
    for key, value in results.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
