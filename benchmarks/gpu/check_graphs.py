"""CUDA-graph replay of the whole token step gives the records of no graphs and of Megatron's
forward (issue 32).

A tiny random Qwen2 on SmolLM2's vocabulary (seconds on a GPU). Rows end at staggered steps, by
EOS ids found on this device from a run without them, and the engine reads its count of
rows still decoding GPU_FLAG_LAG steps late (as on a GPU, also on the CPU), so it shrinks and
recaptures:

- staggered: 4 prompts x 8 rows, one prompt 60 tokens long (the pass crosses from the 64-column
  length bucket to the 128 one), the groups ending about 7 steps apart: 32 -> 24 -> 16 -> 8 rows;
- within_lag: 2 prompts x 8 rows, the last ones ending within the lag (the shrink finds none).

Greedy and seeded soft (Gumbel) decoding, each in
- float64: graphs on = graphs off = the Megatron backend (the reference), every record (ids
  exact, weights to 1e-6): in float64 the two backends' summation orders flip no token;
- float32: graphs on = graphs off, every record (the same kernels, replayed; soft thinking would
  amplify fp32 rounding between the two backends, so no reference there).

On the CPU `cuda_graphs` is ignored and the check still runs (tests/test_check_graphs.py).

    python3 benchmarks/gpu/check_graphs.py [--tokenizer DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from dataclasses import fields
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' tiny models and EOS schedules

SAMPLER_NAMES = ("greedy", "gumbel")
DTYPES = ("float64", "float32")
# name: (prompt indices into builders.PROMPTS or a token list, copies per prompt,
#        EOS windows per prompt (tried in turn), max new tokens)
CASES = {
    "staggered": (
        [0, 1, 2, list(range(9, 69))],
        8,
        [
            [(2, 3), (7, 9), (14, 16), (21, 23)],
            [(2, 4), (8, 11), (15, 18), (22, 24)],
            [(3, 5), (9, 12), (16, 19), (22, 24)],
        ],
        24,
    ),
    "within_lag": ([0, 1], 8, [[(2, 3), (4, 6)], [(2, 4), (5, 7)], [(3, 4), (5, 8)]], 12),
}


def differences(a, b, atol: float = 1e-6) -> list[str]:
    """What differs between two generate results: ids, flags and texts exactly, floats within
    atol (rtol 1e-5); the first differing position of each id field."""
    pairs = []
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "records":
            pairs += [
                (f"records.{g.name}", getattr(x, g.name), getattr(y, g.name)) for g in fields(x)
            ]
        else:
            pairs.append((f.name, x, y))
    out = []
    for name, x, y in pairs:
        if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            at = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None)
            if at is not None:
                out.append(f"{name} first differ at [{at}]: {x[at]!r} vs {y[at]!r}")
        elif not isinstance(x, torch.Tensor):
            if x != y:
                out.append(f"{name}: {x!r} vs {y!r}")
        elif x.shape != y.shape:
            out.append(f"{name}: shapes {tuple(x.shape)} vs {tuple(y.shape)}")
        elif x.is_floating_point():
            if not torch.allclose(x, y, atol=atol, rtol=1e-5, equal_nan=True):
                out.append(f"{name}: max |diff| {(x - y).abs().nan_to_num().max().item():.3g}")
        elif not torch.equal(x, y):
            at = (x != y).nonzero()[0].tolist()
            out.append(
                f"{name} first differ at {at}: {x[tuple(at)].item()} vs {y[tuple(at)].item()}"
            )
    return out


def run_case(case: str, sampler: str, dtype: str, tokenizer, model_dir) -> dict:
    from builders import PROMPTS, SAMPLERS, build, eos_ending_within, settings

    from megatron_softgrpo.rollout import static_backend
    from megatron_softgrpo.rollout.engine import GPU_FLAG_LAG, RolloutEngine
    from megatron_softgrpo.soft import seed_noise_rng

    spec, g, choices, max_new = CASES[case]
    prompts = [PROMPTS[p] if isinstance(p, int) else p for p in spec]
    model, shard, parallel = build(model_dir)
    model = model.to(getattr(torch, dtype))
    # the reference's one compiled op (bias-dropout-add, on a GPU) would recompile for each batch
    # size it drops to, seconds each; eager it is the same sum
    model.config.bias_dropout_fusion = False
    exact = dtype == "float64"  # float32: graphs on vs off only (see the module docstring)
    shrinks, captures = [], []

    def decode(kind, s):
        seed_noise_rng(7)
        if kind == "reference":
            return RolloutEngine(model, tokenizer, shard, s, parallel).generate(prompts, g)
        backend = static_backend.StaticBackend(  # a GPU's row buckets, also on the CPU
            model, parallel, cuda_graphs=kind == "graphs_on", row_bucket=static_backend.BATCH_BUCKET
        )
        engine = RolloutEngine(model, tokenizer, shard, s, parallel, backend, flag_lag=GPU_FLAG_LAG)
        shrink = engine._shrink

        def counted(*args):
            size = shrink(*args)
            if kind == "graphs_on":
                shrinks.append(size)
            return size

        engine._shrink = counted
        out = engine.generate(prompts, g)
        replays = engine._live.replays
        if replays.mode == "graph":  # the token steps captured, by (rows, length bucket)
            captures.extend(replays.steps)
        return out

    base = "reference" if exact else "graphs_off"
    free = decode(base, settings(max_new_tokens=max_new, **SAMPLERS[sampler]))
    rows = range(len(prompts) * g)
    found = [(w, eos_ending_within(free, [w[i // g] for i in rows])) for w in choices]
    windows, eos = next(((w, e) for w, e in found if e is not None), (None, None))
    result = {"check": f"{case}/{sampler}/{dtype}", "ok": False, "differences": []}
    if eos is None:
        return result | {"setup": "no EOS ids end the rows within any of the windows"}
    s = settings(max_new_tokens=max_new, eos_ids=eos, **SAMPLERS[sampler])
    kinds = (["reference"] if exact else []) + ["graphs_off", "graphs_on"]
    runs = {kind: decode(kind, s) for kind in kinds}
    lengths = runs[base].response_lengths.tolist()
    ended = all(lo <= n <= hi for n, (lo, hi) in zip(lengths, (windows[i // g] for i in rows)))
    for kind in kinds[1:]:
        result["differences"] += [
            f"{kind} vs {base}: {d}" for d in differences(runs[base], runs[kind])
        ]
    return result | {
        "ok": not result["differences"],
        "compared": " = ".join(kinds),
        "rows_end_in_windows": ended,  # else the schedule drifted: shrinks below say what ran
        "lengths": sorted(set(lengths)),
        "shrinks_to": shrinks,  # 0: a late count, every row finished
        "graphs_captured": captures,  # (rows, length bucket); none on the CPU
    }


def run(tokenizer, model_dir, cases=tuple(CASES), samplers=SAMPLER_NAMES, dtypes=DTYPES, emit=None):
    """Every (case, sampler, dtype); each result is printed (and passed to `emit`) when done."""
    results = []
    for case in cases:
        for sampler in samplers:
            for dtype in dtypes:
                t = time.perf_counter()
                r = run_case(case, sampler, dtype, tokenizer, model_dir)
                r["seconds"] = round(time.perf_counter() - t, 2)
                results.append(r)
                info = {
                    k: r[k]
                    for k in (
                        "lengths",
                        "rows_end_in_windows",
                        "shrinks_to",
                        "graphs_captured",
                        "setup",
                    )
                    if k in r
                }
                print(
                    f"{'PASS' if r['ok'] else 'FAIL'} {r['check']} ({r['seconds']} s): {info}",
                    flush=True,
                )
                for d in r["differences"][:8]:
                    print(f"    {d}", flush=True)
                if emit:
                    emit(results)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--tokenizer",
        help="SmolLM2's tokenizer directory (default: .gpu_assets/tokenizer, else the package's)",
    )
    p.add_argument("--json", help="write the results here, rewritten after each check")
    args = p.parse_args()
    from tiny_models import make_hf_model
    from transformers import AutoTokenizer

    from megatron_softgrpo.models.source import SMOLLM2, load_tokenizer, resolve_model_source

    path = args.tokenizer or (ROOT / ".gpu_assets" / "tokenizer")
    if Path(path).is_dir():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    else:
        tokenizer = load_tokenizer(resolve_model_source(SMOLLM2))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {device}", flush=True)

    def emit(results):
        if args.json:
            Path(args.json).write_text(json.dumps({"device": device, "checks": results}, indent=2))

    with tempfile.TemporaryDirectory() as model_dir:
        make_hf_model("qwen2", Path(model_dir), vocab_size=49152)  # the tests' tiny model
        results = run(tokenizer, model_dir, emit=emit)
    failed = [r["check"] for r in results if not r["ok"]]
    print(
        f"{len(results) - len(failed)}/{len(results)} graph checks passed"
        + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
