"""Chunked log-densities from hidden states vs the naive full-logits computation, side by side.

V = 151,936 (padded to 152,064), one response of 1,024 / 4,096 / 8,192 tokens, all rows
discrete (log_softmax over the vocabulary) or all soft (Gumbel density, K = 5); the loss is the
sum of the log-densities.
- naive: logits = hidden @ W^T materialised [L, V] in fp32, then `log_density_from_logits`,
  autograd for the gradient;
- chunked: `log_density_from_hidden` (chunks of 1,024 positions; soft rows need only their K
  logits), autograd for the gradient, which recomputes each chunk's logits: forward only is
  what the old/reference log-prob passes run;
- fused: `objective_from_hidden`, the policy update's path: the loss's gradient is taken from
  each chunk's logits in the forward, so nothing is recomputed.
Reports forward-only time (chunked vs naive), forward+backward time (fused, and chunked, vs
naive) and peak extra memory of forward+backward (CUDA: allocator peak; CPU: resident-set peak
sampled every millisecond). Targets: chunked forward and fused forward+backward <= 1.1x naive;
peak memory flat in the response length.

The hidden size is small on the CPU (64) so the vocabulary-sized work dominates as it
does on a GPU; CUDA runs use 1,536 (Qwen2-1.5B) in bf16. Naive sizes that would not fit
in half the available memory are skipped.

    .venv/bin/python benchmarks/logprob.py [--quick] [--hidden H] [--chunk-size C]

Prints `name: value` lines; ratios are `ratio/<what>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
import warnings

import torch

warnings.filterwarnings("ignore")

VOCAB, PADDED, K = 151_936, 152_064, 5
CUDA = torch.cuda.is_available()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def available_bytes() -> int:
    if CUDA:
        free, _ = torch.cuda.mem_get_info()
        return free
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


class PeakMemory:
    """Peak bytes above the level at entry: the CUDA allocator's peak, or the sampled CPU resident set."""

    def __enter__(self):
        if CUDA:
            sync()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak_rss = self._rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if CUDA:
            sync()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = self.peak_rss - self.base

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while self.running:
            self.peak_rss = max(self.peak_rss, self._rss())
            time.sleep(0.001)


def timed_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def make_rows(kind: str, length: int, device, gen):
    from megatron_softgrpo.soft import MixtureRecord

    tokens = torch.randint(0, VOCAB, (1, length), device=device, generator=gen)
    records = MixtureRecord.discrete(tokens, K)
    if kind == "soft":
        records.mix_ids = torch.randint(0, VOCAB, (1, length, K), device=device, generator=gen)
        records.noise = torch.randn(1, length, K, device=device, generator=gen) - 2.0
        records.support = torch.ones(1, length, K, dtype=torch.bool, device=device)
        records.is_soft = torch.ones(1, length, dtype=torch.bool, device=device)
        records.tokens = records.mix_ids[..., 0]
    return records


def print_agreement(tag, hidden, weight, rows, scorer, shard, chunk_size) -> None:
    """How far chunked and fused are from naive: values, and gradients relative to their largest entry."""
    from megatron_softgrpo.soft import (
        log_density_from_hidden,
        log_density_from_logits,
        objective_from_hidden,
    )

    outputs = {}
    for name in ("naive", "chunked", "fused"):
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        if name == "fused":
            scored = objective_from_hidden(
                h, w, rows, scorer, shard, lambda logp, _, __: logp, chunk_size=chunk_size
            )
            logp, loss = scored.logp, scored.value
        else:
            if name == "chunked":
                logp = log_density_from_hidden(h, w, rows, scorer, shard, chunk_size=chunk_size)
            else:
                logp = log_density_from_logits(
                    (h.transpose(0, 1) @ w.t()).float(), rows, scorer, shard
                )
            loss = logp.sum()
        loss.backward()
        outputs[name] = (logp.detach(), h.grad.float(), w.grad.float())
    ell_n, gh_n, gw_n = outputs["naive"]
    for name in ("chunked", "fused"):
        logp, gh, gw = outputs[name]
        print(f"{tag}/{name}_max_abs_diff_vs_naive: {(ell_n - logp).abs().max().item():.2e}")
        print(
            f"{tag}/{name}_max_rel_diff_grad_hidden: {((gh_n - gh).abs().max() / gh_n.abs().max()).item():.2e}"
        )
        print(
            f"{tag}/{name}_max_rel_diff_grad_weight: {((gw_n - gw).abs().max() / gw_n.abs().max()).item():.2e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="shorter responses (under a minute on 2 CPU cores)"
    )
    parser.add_argument("--hidden", type=int, default=1536 if CUDA else 64)
    parser.add_argument("--chunk-size", type=int, default=1024)
    args = parser.parse_args()

    from megatron_softgrpo.soft import (
        GumbelNoise,
        Scorer,
        VocabShard,
        log_density_from_hidden,
        log_density_from_logits,
        objective_from_hidden,
    )

    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    lengths = (256, 1024) if args.quick else (1024, 4096, 8192)
    repeats = 1 if args.quick or not CUDA else 5
    shard = VocabShard.whole(PADDED, VOCAB)
    scorer = Scorer(GumbelNoise(tau=0.1), soft_temperature=1.0, discrete_temperature=1.0)
    gen = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(PADDED, args.hidden, device=device, generator=gen) / args.hidden**0.5).to(
        dtype
    )

    print(f"device: {torch.cuda.get_device_name() if CUDA else 'cpu'}")
    print(f"hidden: {args.hidden}")
    print(f"chunk_size: {args.chunk_size}")
    peaks: dict[tuple[str, str, int], float] = {}
    for kind in ("discrete", "soft"):
        for length in lengths:
            rows = make_rows(kind, length, device, gen)
            hidden = torch.randn(length, 1, args.hidden, device=device, generator=gen).to(dtype)

            def naive(grad: bool):
                h, w = hidden.detach().requires_grad_(grad), weight.detach().requires_grad_(grad)
                with torch.set_grad_enabled(grad):
                    logits = (h.transpose(0, 1) @ w.t()).float()
                    logp = log_density_from_logits(logits, rows, scorer, shard)
                    if grad:
                        logp.sum().backward()

            def chunked(grad: bool):
                h, w = hidden.detach().requires_grad_(grad), weight.detach().requires_grad_(grad)
                with torch.set_grad_enabled(grad):
                    logp = log_density_from_hidden(
                        h, w, rows, scorer, shard, chunk_size=args.chunk_size
                    )
                    if grad:
                        logp.sum().backward()

            def fused(grad: bool):
                assert grad, "the fused path is the training (forward + backward) path"
                h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
                objective_from_hidden(
                    h, w, rows, scorer, shard, lambda logp, _, __: logp, chunk_size=args.chunk_size
                ).value.backward()

            naive_fits = (
                6 * length * PADDED * 4 < available_bytes() / 2
            )  # logits, softmax, grads (fp32)
            results = {}  # name -> (forward ms or None, forward+backward ms, peak bytes of forward+backward)
            for name, fn in (("naive", naive), ("chunked", chunked), ("fused", fused)):
                tag = f"{kind}/L{length}/{name}"
                if name == "naive" and not naive_fits:
                    print(f"{tag}: skipped (needs more memory than half of what is free)")
                    continue
                with PeakMemory() as mem:
                    fn(True)
                fwd = None if name == "fused" else timed_ms(lambda: fn(False), repeats)
                results[name] = (fwd, timed_ms(lambda: fn(True), repeats), mem.peak)
                peaks[(kind, name, length)] = mem.peak
                if fwd is not None:
                    print(f"{tag}_fwd_ms: {fwd:.1f}")
                print(f"{tag}_fwd_bwd_ms: {results[name][1]:.1f}")
                print(f"{tag}_peak_extra_mib: {mem.peak / 2**20:.1f}")
            if "naive" in results:
                print_agreement(
                    f"{kind}/L{length}", hidden, weight, rows, scorer, shard, args.chunk_size
                )
                naive_fwd, naive_fwd_bwd, naive_peak = results["naive"]
                print(
                    f"ratio/{kind}_L{length}_chunked_over_naive_fwd: {results['chunked'][0] / naive_fwd:.3f}"
                )
                for name in ("fused", "chunked"):
                    _, fwd_bwd, peak = results[name]
                    print(
                        f"ratio/{kind}_L{length}_{name}_over_naive_fwd_bwd: {fwd_bwd / naive_fwd_bwd:.3f}"
                    )
                    print(
                        f"ratio/{kind}_L{length}_{name}_over_naive_peak_memory: {peak / max(naive_peak, 1):.3f}"
                    )
        for name in ("naive", "chunked", "fused"):
            first, last = (kind, name, lengths[0]), (kind, name, lengths[-1])
            if first in peaks and last in peaks:
                growth = peaks[last] / max(peaks[first], 1)
                print(f"ratio/{kind}_{name}_peak_L{lengths[-1]}_over_L{lengths[0]}: {growth:.3f}")


if __name__ == "__main__":
    main()
