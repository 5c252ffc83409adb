"""Keep the output logits vocab-sharded during KV-cached decoding.

In inference mode GPTModel asserts `runtime_gather_output` and gathers the tensor-parallel
logits (megatron/core/models/gpt/gpt_model.py, `_postprocess`: "Inference must always gather
TP logits"). The soft samplers work on this rank's vocabulary shard and select across shards
themselves, so gathering a 152k vocabulary per step is wasted traffic. This context manager
makes the output layer ignore the gather request.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def sharded_inference_logits(model):
    layer = getattr(model, "output_layer", None)
    if layer is None:  # not the last pipeline stage
        yield
        return
    original = layer.forward

    def forward(input_, weight=None, runtime_gather_output=None):
        return original(input_, weight=weight, runtime_gather_output=False)

    layer.forward = forward
    try:
        yield
    finally:
        del layer.forward  # back to the class's method
