"""Which algorithm is running: one entry per `softgrpo.algorithm` name, and nowhere else.

An entry names the sampler of its thinking phase (the `softgrpo.sampler` value that decodes as
it does), its noise kind with the recipe keys that parameterise it, and the capabilities that
rollout, train and the recipe checks ask about. The answer phase (and all of GRPO) samples
discretely with `policy.generation`. The scorer scores soft rows and the marker step (the
discrete step the thinking sampler drew, flagged `thinking` in its record) at the thinking
temperature, and the other discrete rows at the answer temperature: the temperatures they were
sampled at.

Adding an ablation is one `Algorithm` entry here plus its noise class in `soft/noises.py`
(docs/architecture.md, "Adding an algorithm"). Multiplex Thinking has no noise density: its
`MultiplexAlgorithm` draws K tokens and scores each slot as a token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_softgrpo.config.schema import GenerationCfg, SoftGRPOCfg, ThinkingCfg
from megatron_softgrpo.soft.logprob import Scorer
from megatron_softgrpo.soft.noises import (
    DirichletNoise,
    EmbeddingNoise,
    GaussianNoise,
    GumbelNoise,
    SoftNoise,
)
from megatron_softgrpo.soft.samplers import DiscreteSampler, MultiplexSampler, Sampler, SoftSampler
from megatron_softgrpo.soft.truncation import Truncation


@dataclass(frozen=True)
class Algorithm:
    name: str  # softgrpo.algorithm
    sampler: str  # the softgrpo.sampler that decodes as this algorithm does
    noise_kind: type[SoftNoise] | None = None  # None: discrete from the first step (GRPO)
    params: dict[str, str] = field(default_factory=dict)  # noise field -> softgrpo key

    # capabilities, read off the noise kind so that they cannot drift from its math
    @property
    def perturbs_input(self) -> bool:
        """Adds a vector of the model's width to the mixed input (the noise needs hidden_size)."""
        return self.noise_kind is not None and self.noise_kind.perturbs_input

    @property
    def needs_input_table(self) -> bool:
        """Its density reads the input embedding table (on the last pipeline stage)."""
        return self.noise_kind is not None and self.noise_kind.needs_input_table

    @property
    def soft(self) -> bool:
        """It has a soft thinking phase (all but GRPO)."""
        return self.noise_kind is not None

    def width(self, soft: SoftGRPOCfg) -> int:
        """K, the slots of every record: the mixture's support size."""
        return soft.mixture_size

    def noise(self, soft: SoftGRPOCfg, hidden_size: int) -> SoftNoise | None:
        if self.noise_kind is None:
            return None
        kwargs = {name: getattr(soft, key) for name, key in self.params.items()}
        if self.perturbs_input:
            kwargs["hidden_size"] = hidden_size
        return self.noise_kind(**kwargs)

    def thinking_sampler(self, soft: SoftGRPOCfg, hidden_size: int) -> Sampler | None:
        """The sampler of the thinking phase; None without one (GRPO)."""
        noise = self.noise(soft, hidden_size)
        if noise is None:
            return None
        return SoftSampler(_truncation(soft.thinking), soft.mixture_size, noise)

    def scorer(self, soft: SoftGRPOCfg, generation: GenerationCfg, hidden_size: int) -> Scorer:
        return Scorer(
            self.noise(soft, hidden_size), soft.thinking.temperature, generation.temperature
        )


@dataclass(frozen=True)
class MultiplexAlgorithm(Algorithm):
    """Multiplex Thinking: K = softgrpo.multiplex_width independent draws mixed by their
    probabilities (`MultiplexSampler`); the trainer scores each slot's token at the thinking
    temperature, so the loss has one term per slot (`Scorer.per_slot`)."""

    @property
    def soft(self) -> bool:
        return True

    def width(self, soft: SoftGRPOCfg) -> int:
        return soft.multiplex_width

    def thinking_sampler(self, soft: SoftGRPOCfg, hidden_size: int) -> MultiplexSampler:
        uniform = soft.multiplex_weighting == "uniform"
        return MultiplexSampler(_truncation(soft.thinking), soft.multiplex_width, uniform)

    def scorer(self, soft: SoftGRPOCfg, generation: GenerationCfg, hidden_size: int) -> Scorer:
        return Scorer(None, soft.thinking.temperature, generation.temperature, per_slot=True)


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("grpo", "discrete"),
        Algorithm("softgrpo", "gumbel", GumbelNoise, {"tau": "gumbel_tau", "scale": "noise_scale"}),
        Algorithm("gaussian", "gaussian", GaussianNoise, {"sigma": "gaussian_sigma"}),
        Algorithm("dirichlet", "dirichlet", DirichletNoise),
        Algorithm(
            "embedding_noise", "embedding_noise", EmbeddingNoise, {"sigma": "embedding_noise_sigma"}
        ),
        MultiplexAlgorithm("multiplex", "multiplex", params={"weighting": "multiplex_weighting"}),
    )
}
BY_SAMPLER: dict[str, Algorithm] = {a.sampler: a for a in ALGORITHMS.values()}


def training_algorithm(soft: SoftGRPOCfg) -> Algorithm:
    return ALGORITHMS[soft.algorithm]


def decoding_algorithm(soft: SoftGRPOCfg) -> Algorithm:
    """What decodes: the algorithm `softgrpo.sampler` names (generate/eval), else the trained one."""
    return BY_SAMPLER[soft.sampler] if soft.sampler is not None else ALGORITHMS[soft.algorithm]


def answer_sampler(soft: SoftGRPOCfg, generation: GenerationCfg) -> DiscreteSampler:
    return DiscreteSampler(_truncation(generation), decoding_algorithm(soft).width(soft))


def decoding_spec(soft: SoftGRPOCfg, generation: GenerationCfg) -> dict:
    """What `decoding_algorithm` samples with, in the study report's field names (null: does not
    apply). A soft sampler's thinking phase at the top level, the discrete answer phase that follows
    the marker under `answer`; a discrete decoding is one phase (`answer`: null)."""
    algorithm = decoding_algorithm(soft)
    answer = _phase("discrete", generation)
    if not algorithm.soft:
        return answer | {"answer": None}
    noise = {key: getattr(soft, key) for key in algorithm.params.values()}  # by recipe key
    thinking = _phase(algorithm.sampler, soft.thinking) | {"mixture_size": algorithm.width(soft)}
    return thinking | noise | {"answer": answer}


def _phase(sampler: str, section: ThinkingCfg | GenerationCfg) -> dict:
    return {
        "sampler": sampler,
        "temperature": section.temperature,
        "top_k": section.top_k,
        "top_p": section.top_p,
        "min_p": section.min_p,
        "mixture_size": None,
        "gumbel_tau": None,
        "noise_scale": None,
    }


def _truncation(section: ThinkingCfg | GenerationCfg) -> Truncation:
    return Truncation(section.temperature, section.top_k, section.top_p, section.min_p)
