"""The algorithm registry: the schema's names, what each entry builds from a recipe, and its
capability flags against what its noise kind actually does."""

from __future__ import annotations

import typing

import pytest
import torch

from megatron_softgrpo.algorithms.registry import (
    ALGORITHMS,
    BY_SAMPLER,
    answer_sampler,
    decoding_algorithm,
    decoding_spec,
    training_algorithm,
)
from megatron_softgrpo.config.schema import GenerationCfg, SoftGRPOCfg
from megatron_softgrpo.soft import (
    DirichletNoise,
    GumbelNoise,
    Truncation,
    VocabShard,
    noise_rng,
    seed_noise_rng,
)

HIDDEN = 16
SOFT = [name for name, a in ALGORITHMS.items() if a.noise_kind is not None]


def _choices(field: str) -> set[str]:
    annotation = SoftGRPOCfg.model_fields[field].annotation
    options = (annotation, *typing.get_args(annotation))  # Literal[...] or Literal[...] | None
    literal = next(a for a in options if typing.get_origin(a) is typing.Literal)
    return set(typing.get_args(literal))


def test_schema_choices_are_the_registry():
    assert _choices("algorithm") == set(ALGORITHMS)
    assert _choices("sampler") == set(BY_SAMPLER)
    assert len(BY_SAMPLER) == len(ALGORITHMS)  # one sampler name per algorithm


def test_recipe_sections_map_to_samplers_and_scorer():
    soft, generation = SoftGRPOCfg(), GenerationCfg(temperature=0.7, top_p=0.9)
    softgrpo = training_algorithm(soft)
    thinking = softgrpo.thinking_sampler(soft, HIDDEN)
    assert thinking.noise == GumbelNoise(tau=0.1, scale=1.0) and thinking.mixture_size == 5
    assert thinking.truncation == Truncation(temperature=1.0, top_k=5, top_p=0.95, min_p=0.0)
    answer = answer_sampler(soft, generation)
    assert answer.truncation == Truncation(temperature=0.7, top_p=0.9) and answer.mixture_size == 5
    scorer = softgrpo.scorer(soft, generation, HIDDEN)
    assert scorer.noise == thinking.noise
    assert (scorer.soft_temperature, scorer.discrete_temperature) == (1.0, 0.7)
    grpo = ALGORITHMS["grpo"]
    assert grpo.thinking_sampler(soft, HIDDEN) is None
    assert grpo.scorer(soft, generation, HIDDEN).noise is None
    assert ALGORITHMS["dirichlet"].noise(soft, HIDDEN) == DirichletNoise()
    assert ALGORITHMS["embedding_noise"].noise(soft, 64).hidden_size == 64


@pytest.mark.parametrize("name", SOFT)
def test_every_parameter_key_reaches_its_noise(name):
    algorithm = ALGORITHMS[name]
    for param, key in algorithm.params.items():
        changed = SoftGRPOCfg(**{key: getattr(SoftGRPOCfg(), key) * 2 + 0.5})
        assert getattr(algorithm.noise(changed, HIDDEN), param) == getattr(changed, key), key


@pytest.mark.parametrize("sampler", sorted(BY_SAMPLER))
def test_the_sampler_override_decodes_as_its_algorithm(sampler):
    for trained in ALGORITHMS:
        soft = SoftGRPOCfg(algorithm=trained, sampler=sampler)
        assert decoding_algorithm(soft).sampler == sampler
        assert training_algorithm(soft).name == trained
        assert decoding_algorithm(SoftGRPOCfg(algorithm=trained)).name == trained


@pytest.mark.parametrize("name", SOFT)
def test_capability_flags_match_what_the_noise_does(name):
    algorithm = ALGORITHMS[name]
    sampler = algorithm.thinking_sampler(SoftGRPOCfg(), HIDDEN)
    logits = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    shard = VocabShard.whole(64, 60)
    seed_noise_rng(0)
    with noise_rng():
        step = sampler.sample(logits, shard)
    offset = sampler.input_offset(step)
    assert (offset is not None) == algorithm.perturbs_input
    if offset is not None:
        assert offset.shape == (6, HIDDEN) and bool(offset.abs().sum(-1).gt(0).all())
    scaled = shard.scaled(logits, 1.0).gather(-1, step.mix_ids)
    if algorithm.needs_input_table:
        with pytest.raises(ValueError, match="input embedding table"):
            sampler.noise.log_density(scaled, step)
    else:
        assert bool(torch.isfinite(sampler.noise.log_density(scaled, step)).all())
    if sampler.draws == "ahead":
        assert sampler.draw_ahead(2, 6, "cpu").shape[:2] == (2, 6)
    else:
        with pytest.raises(NotImplementedError, match="drawn per step"):
            sampler.draw_ahead(2, 6, "cpu")


def test_decoding_spec_names_the_sampling_of_each_phase():
    soft = SoftGRPOCfg(mixture_size=7, gumbel_tau=0.3, noise_scale=0.5)
    soft.thinking.temperature, soft.thinking.top_k = 0.6, 30
    generation = GenerationCfg(temperature=0.9, top_p=0.8, top_k=None, min_p=0.05)
    answer = {"sampler": "discrete", "temperature": 0.9, "top_k": None, "top_p": 0.8}
    answer |= {"min_p": 0.05, "mixture_size": None, "gumbel_tau": None, "noise_scale": None}
    assert decoding_spec(soft, generation) == {
        "sampler": "gumbel", "temperature": 0.6, "top_k": 30, "top_p": 0.95, "min_p": 0.0,
        "mixture_size": 7, "gumbel_tau": 0.3, "noise_scale": 0.5, "answer": answer,
    }  # fmt: skip
    soft.sampler = "discrete"  # one phase, all of it policy.generation
    assert decoding_spec(soft, generation) == answer | {"answer": None}
    soft.sampler = "gaussian"  # its own noise key; no Gumbel fields
    spec = decoding_spec(soft, generation)
    assert spec["gaussian_sigma"] == soft.gaussian_sigma and spec["gumbel_tau"] is None
    assert spec["sampler"] == "gaussian" and spec["answer"] == answer
