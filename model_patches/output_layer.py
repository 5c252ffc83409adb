"""Two changes to GPTModel's output layer, each for the duration of a `with` block.

GPTModel has no switch for either: its `_postprocess` always calls `self.output_layer(...)`
(megatron/core/models/gpt/gpt_model.py). Both context managers replace that layer's `forward`
on this model only, and do nothing on pipeline stages without an output layer.

- `sharded_inference_logits`: in inference mode GPTModel asserts `runtime_gather_output` and
  gathers the tensor-parallel logits ("Inference must always gather TP logits"). The soft
  samplers work on this rank's vocabulary shard and select across shards themselves, so the
  gather of a 152k vocabulary per decoding step is dropped.
- `final_hidden_states`: the policy update scores positions from the final (normed) hidden
  states and this rank's shard of the output weight, in chunks (`soft.log_density_from_hidden`),
  so the [s, b, V/TP] logits are never materialised. The layer passes its input through and
  `model(...)` returns the hidden states where it would return logits: [b, s, h] (this rank's
  [b, s/TP, h] under sequence parallelism).
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def _replaced_forward(model, make_forward):
    layer = getattr(model, "output_layer", None)
    if layer is None:  # not the last pipeline stage
        yield
        return
    layer.forward = make_forward(layer.forward)
    try:
        yield
    finally:
        del layer.forward  # back to the class's method


def sharded_inference_logits(model):
    def make(original):
        def forward(input_, weight=None, runtime_gather_output=None):
            return original(input_, weight=weight, runtime_gather_output=False)

        return forward

    return _replaced_forward(model, make)


def final_hidden_states(model):
    def make(original):
        def forward(input_, weight=None, runtime_gather_output=None):
            return input_, None  # ColumnParallelLinear returns (output, bias)

        return forward

    return _replaced_forward(model, make)
