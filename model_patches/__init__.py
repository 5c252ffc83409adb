"""The only code that reaches into Megatron-Core internals.

- `cpu_compat`: run Megatron on machines without CUDA (gloo, CPU tensors).
"""

from model_patches import cpu_compat


def apply_all() -> None:
    """Apply every patch this machine needs; call before building a Megatron model."""
    cpu_compat.apply()
