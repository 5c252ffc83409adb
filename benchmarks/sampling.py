"""One soft (Gumbel) sampling step vs one discrete step, measured side by side.

V = 151,936 (Qwen2; padded to 152,064), batch 64, K = 5 and K = 30, on random logits
with the reference's truncation (T 1, top-k = K, top-p 0.95); the discrete step uses the
same truncation, and also the untruncated answer-phase default (T 1, top-p 1).
Target: soft / discrete <= 1.2. Runs on CUDA when available, else on the CPU.

    .venv/bin/python benchmarks/sampling.py [--quick]

Prints `name: value` lines; ratios are `ratio/<what>`.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")

VOCAB, PADDED, BATCH = 151_936, 152_064, 64


def timed_ms(fn, repeats: int) -> float:
    """Median wall time of fn() in milliseconds, after two warm-up calls."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats (under a minute on 2 CPU cores)"
    )
    args = parser.parse_args()

    from megatron_softgrpo.soft import (
        DiscreteSampler,
        GumbelNoise,
        SoftSampler,
        Truncation,
        VocabShard,
        seed_noise_rng,
    )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    repeats = 5 if args.quick else 30
    seed_noise_rng(0)
    shard = VocabShard.whole(PADDED, VOCAB)
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(BATCH, PADDED, device=device, generator=gen) * 3

    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    print(f"vocab: {VOCAB}")
    print(f"batch: {BATCH}")
    untruncated = DiscreteSampler(Truncation(), 1)
    plain_ms = timed_ms(lambda: untruncated.sample(logits, shard), repeats)
    print(f"discrete_untruncated_ms: {plain_ms:.3f}")
    for k in (5, 30):
        truncation = Truncation(temperature=1.0, top_k=k, top_p=0.95)
        soft = SoftSampler(truncation, k, GumbelNoise(tau=0.1, scale=1.0))
        discrete = DiscreteSampler(truncation, k)
        soft_ms = timed_ms(lambda: soft.sample(logits, shard), repeats)
        discrete_ms = timed_ms(lambda: discrete.sample(logits, shard), repeats)
        print(f"soft_gumbel_k{k}_ms: {soft_ms:.3f}")
        print(f"discrete_top_k{k}_ms: {discrete_ms:.3f}")
        print(f"ratio/soft_over_discrete_k{k}: {soft_ms / discrete_ms:.3f}")
        print(f"ratio/soft_over_discrete_untruncated_k{k}: {soft_ms / plain_ms:.3f}")


if __name__ == "__main__":
    main()
