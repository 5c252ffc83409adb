"""benchmarks/update.py --vs-hf compares like with like: on the same weights and rows, the plain
`transformers` + torch AdamW step it times against ours computes the same first loss, the same
gradient norm and the same old log-probabilities, at micro-batch 1 and 2."""

from __future__ import annotations

import sys

import pytest
from builders import ROOT

sys.path.insert(
    0, str(ROOT / "benchmarks")
)  # importable by name: each side runs in a spawned process
import update as bench  # noqa: E402


@pytest.mark.parametrize("micro", [1, 2])
def test_the_hf_step_does_the_same_work_as_ours(tmp_path, micro):
    shape = dict(bench.SHAPES["tiny"], vocab_size=1000)
    bench.write_random_model(shape, tmp_path / "model")
    v = bench.versus_hf(tmp_path / "model", rows=4, seq=80, micro=micro, reps=1, profile=False)
    key = f"vs_hf/mb{micro}"
    assert v[f"{key}/old_logp_max_abs_diff"] <= 1e-5
    assert v[f"{key}/first_loss"] == pytest.approx(v[f"{key}/first_loss_hf"], abs=1e-6)
    assert v[f"{key}/first_grad_norm"] == pytest.approx(v[f"{key}/first_grad_norm_hf"], rel=1e-4)
    assert v[f"{key}/first_grad_norm"] > 0.01  # a gradient worth comparing
    assert v[f"{key}/ours_step_s"] > 0 and v[f"{key}/hf_step_s"] > 0
