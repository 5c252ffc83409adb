"""Where sampling noise comes from: a named state in Megatron's model-parallel RNG tracker.

Every TP rank draws the same noise: the state is seeded identically on all ranks of a
tensor-parallel group (derive the seed from the data-parallel rank with `noise_seed`,
so data-parallel replicas differ) and the noise is drawn for the K globally selected
slots after the cross-shard selection, never per vocabulary shard. The same seed
therefore gives the same trajectory at TP=1 and TP=2, and the state is saved with the
tracker's other states in checkpoints (`get_cuda_rng_tracker().get_states()`).

`gaussian_from_seeds` is a counter-based normal generator: noise of any width,
recomputable from one int64 seed per row on any device (the embedding-noise ablation
stores a seed per position instead of a hidden-size vector).
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch

NOISE_RNG = "softgrpo-noise-rng"
_DP_STRIDE = 1_000_003  # seeds of data-parallel replicas; a prime far from Megatron's offsets


def _tracker():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from model_patches import cpu_compat

    cpu_compat.apply()  # the tracker saves/restores "the CUDA generator"; on CPU that is the CPU one
    if not torch.cuda.is_available():
        logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_ignore_cpu_rng_warning)
    return get_cuda_rng_tracker()


def _ignore_cpu_rng_warning(record: logging.LogRecord) -> bool:
    # On CPU the tracker's "GPU" generator is the CPU generator, so drawing noise inside
    # fork() always "changes the CPU RNG state"; the warning carries no information there.
    return "CPU RNG state changed" not in record.getMessage()


def noise_seed(base_seed: int, data_parallel_rank: int) -> int:
    """The noise seed of one data-parallel replica: equal on its TP ranks, distinct across replicas."""
    return base_seed + _DP_STRIDE * (data_parallel_rank + 1)


def seed_noise_rng(seed: int) -> None:
    """(Re)seed the noise state. Call on every rank after `init_distributed` (which resets the tracker)."""
    tracker = _tracker()
    original = torch.cuda.get_rng_state()
    torch.cuda.manual_seed(seed)
    states = tracker.get_states()
    states[NOISE_RNG] = torch.cuda.get_rng_state()
    torch.cuda.set_rng_state(original)
    tracker.set_states(states)


def noise_state() -> torch.Tensor:
    """The noise state now (a copy): what `set_noise_state` takes back, on this or another
    process (dedicated generation ranks continue a training rank's stream)."""
    return _tracker().get_states()[NOISE_RNG].clone()


def set_noise_state(state: torch.Tensor) -> None:
    tracker = _tracker()
    states = tracker.get_states()
    states[NOISE_RNG] = state.clone()
    tracker.set_states(states)


def split_noise(parts: int, device) -> list[int]:
    """Seeds of `parts` noise streams drawn from the noise state, which advances by the draw:
    one stream's prompts decoded in parts by several replicas, each part on a stream of its own
    (every replica draws the same seeds and leaves the state where the others do)."""
    with noise_rng():
        return torch.randint(0, 2**62, (parts,), device=device).tolist()


@contextlib.contextmanager
def noise_rng():
    """Draw sampling noise inside this block (the device's default generator is the noise state)."""
    tracker = _tracker()
    if NOISE_RNG not in tracker.get_states():
        raise RuntimeError(
            "the sampling noise RNG is not seeded: call megatron_softgrpo.soft.seed_noise_rng(seed)"
        )
    with tracker.fork(NOISE_RNG):
        yield


# ------------------------------------------------------------------ noise draws (call inside noise_rng)


def standard_gumbel(shape, device) -> torch.Tensor:
    """Gumbel(0, 1) as -log(Exp(1)), the reference's construction."""
    return -torch.empty(shape, device=device).exponential_().log()


def uniform(shape, device) -> torch.Tensor:
    return torch.rand(shape, device=device)


def standard_normal(shape, device) -> torch.Tensor:
    return torch.randn(shape, device=device)


def random_seeds(shape, device) -> torch.Tensor:
    return torch.randint(0, 2**62, shape, device=device, dtype=torch.int64)


def gamma(concentration: torch.Tensor) -> torch.Tensor:
    """Gamma(concentration, 1) samples."""
    return torch._standard_gamma(concentration)


# ------------------------------------------------------------------ counter-based normals

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x < 2^32, in int64 without overflow (16-bit limbs of c)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 integer hash on values < 2^32 held in int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """(0, 1] from the top 24 bits (exact in any float dtype)."""
    return ((bits >> 8) + 1).to(torch.float64) / float(1 << 24)


def gaussian_from_seeds(
    seeds: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """N(0, 1) noise [..., dim], a pure function of the int64 seeds [...].

    The integer part is exact everywhere; the Box-Muller transform (in float64) may differ
    in the last bits between CPU and GPU, never between ranks of one kind of device.
    """
    s = seeds.to(torch.int64).unsqueeze(-1)
    lo, hi = s & _M32, (s >> 32) & _M32
    stream_a = _hash32(lo ^ _hash32(hi))
    stream_b = _hash32(hi ^ _hash32(lo ^ 0x9E3779B9))
    counter = _hash32(torch.arange(dim, device=seeds.device, dtype=torch.int64))
    u1 = _unit_interval(_hash32(stream_a ^ counter))
    u2 = _unit_interval(_hash32(stream_b ^ counter))
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)).to(dtype)
