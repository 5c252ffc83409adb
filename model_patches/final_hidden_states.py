"""Make GPTModel return its final hidden states instead of logits (the trainer's log-densities).

The policy update scores each position from the final (normed) hidden states and this rank's
vocabulary shard of the output weight, in chunks (`soft.logprob.log_density_from_hidden`), so
the [s, b, V/TP] logits are never materialised. GPTModel has no switch for that: its
`_postprocess` always calls the output layer. Inside this context manager the output layer
passes its input through, so `model(...)` returns the hidden states in the layout it would
have returned logits: [b, s, h] (this rank's [b, s/TP, h] slice under sequence parallelism).
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def final_hidden_states(model):
    layer = getattr(model, "output_layer", None)
    if layer is None:  # not the last pipeline stage
        yield
        return

    def forward(input_, weight=None, runtime_gather_output=None):
        return input_, None  # ColumnParallelLinear returns (output, bias)

    layer.forward = forward
    try:
        yield
    finally:
        del layer.forward  # back to the class's method
