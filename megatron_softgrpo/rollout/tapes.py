"""The sampling noise of a decoding pass, drawn before its first step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_softgrpo.rollout.settings import RolloutSettings
from megatron_softgrpo.soft import rng


@dataclass
class NoiseTapes:
    """The randomness of every (step, row) of a decoding pass, drawn once before the first step
    from the noise RNG: a row's noise is then the same whichever rows are still decoding and
    however the engine batches them, and no step touches a generator (CUDA-graph capture).
    None: the sampler needs none (greedy) or draws per step (Dirichlet noise depends on pt)."""

    thinking: torch.Tensor | None  # [steps, rows, ...]
    answer: torch.Tensor | None

    @classmethod
    def draw(cls, settings: RolloutSettings, steps: int, rows: int, device) -> NoiseTapes:
        samplers = {"thinking": settings.thinking_sampler, "answer": settings.answer_sampler}
        ahead = {name: s for name, s in samplers.items() if s is not None and s.draws == "ahead"}
        tapes = dict.fromkeys(samplers)
        if ahead:
            with rng.noise_rng():
                for name, sampler in ahead.items():
                    tapes[name] = sampler.draw_ahead(steps, rows, device)
        return cls(**tapes)

    def at(self, name: str, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """Step t's noise (t: a 0-dim tensor, read on the device) of the rows `rows`."""
        tape = getattr(self, name)
        return None if tape is None else tape.index_select(0, t.view(1))[0, rows]

    def assign(self, other: NoiseTapes) -> None:
        """Take `other`'s noise (of the same shapes), in place."""
        for mine, theirs in ((self.thinking, other.thinking), (self.answer, other.answer)):
            if mine is not None:
                mine.copy_(theirs)

    def padded(self, rows: int) -> NoiseTapes:
        """Zero-extended to `rows` rows (a bucket's padding rows, and rows never recorded)."""

        def pad(tape):
            if tape is None or tape.shape[1] == rows:
                return tape
            extra = tape.new_zeros((tape.shape[0], rows - tape.shape[1], *tape.shape[2:]))
            return torch.cat([tape, extra], dim=1)

        return NoiseTapes(pad(self.thinking), pad(self.answer))
