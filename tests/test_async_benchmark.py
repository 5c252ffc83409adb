"""benchmarks/async.py's projection of a GPU step time, against a case worked by hand."""

from __future__ import annotations

import importlib
import sys

from builders import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
bench = importlib.import_module("async")  # a keyword: not importable with `import`


def test_the_projection_takes_the_longer_side_the_refit_on_the_trainers():
    p = {
        "gpus": 4,
        "rows": 128,  # 2 passes of 64 rows on one GPU, 1 on two or more
        "max_new_tokens": 10,  # a pass: 10 steps of 1 s
        "mean_new_tokens": 5,
        "prompt_tokens": 5,  # 128 x 10 = 1,280 tokens to train on
        "decode_step_s": 1.0,
        "rows_per_gpu_pass": 64,
        "update_tokens_per_s_per_gpu": 128.0,  # 10 s on one GPU
        "logprob_share": 0.0,
        "refit_bytes": 3.0,
        "refit_bytes_per_s": 3.0,  # 1 s
    }
    assert bench.project(p) == {
        "colocated_s": 10 + 10 / 4,
        "async_3t_1g_s": 20,  # decoding on one GPU takes two passes
        "async_2t_2g_s": 10,  # the refit (1 s) fits in the trainer's wait
        "async_1t_3g_s": 10 + 1,  # training on one GPU, then the refit, is the longer side
    }
