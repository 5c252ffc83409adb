"""benchmarks/rollout.py's GPU figures (`--static-gpu`, the second step of benchmarks/gpu/run.sh)
at CPU sizes on a tiny model: every figure the GPU run records is produced and consistent."""

from __future__ import annotations

import importlib.util
import math

from builders import ROOT, build

spec = importlib.util.spec_from_file_location("rollout_bench", ROOT / "benchmarks" / "rollout.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_the_static_gpu_figures_at_cpu_sizes(tiny_dir, tokenizer, tmp_path):
    model, shard, parallel = build(tiny_dir)
    out = bench.Report(str(tmp_path / "rollout_static.json"))
    bench.static_gpu(
        out, model, tokenizer, shard, parallel, new=4, repeats=1, batch=3, plen=5, positions=(8, 70)
    )
    v = out.values
    for graphs in ("on", "off"):
        for name in ("discrete", "soft_k5"):
            assert v[f"static/graphs_{graphs}/{name}_tokens_per_s"] > 0
    for pos in (8, 70):
        for key in ("static/graphs_on", "static/graphs_off", "eager"):
            assert 0 < v[f"{key}/step_s_at_{pos}"] < 60
        ratio = v[f"ratio/ungraphed_over_graphed_step_at_{pos}"]
        assert math.isclose(
            ratio, v[f"static/graphs_off/step_s_at_{pos}"] / v[f"static/graphs_on/step_s_at_{pos}"]
        )
        assert v[f"roofline/bytes_at_{pos}"] > sum(p.numel() for p in model.parameters())
    # the longer cache costs the roofline more bytes
    assert v["roofline/bytes_at_70"] > v["roofline/bytes_at_8"]
    assert (tmp_path / "rollout_static.json").read_text().count("step_s_at") >= 6
