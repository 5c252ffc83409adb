"""What a rollout decodes with: the samplers of both phases, the marker, stops and limits."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_softgrpo.algorithms.registry import answer_sampler, decoding_algorithm
from megatron_softgrpo.config.schema import RecipeCfg
from megatron_softgrpo.errors import UserError
from megatron_softgrpo.models.source import resolve_model_source
from megatron_softgrpo.soft import MixtureRecord, Sampler

GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class RolloutSettings:
    thinking_sampler: Sampler | None  # None: discrete from the first step (GRPO, plain decoding)
    answer_sampler: Sampler
    thinking_temperature: float  # the thinking sampler's: scores the marker step it draws
    think_end: str
    max_new_tokens: int
    eos_ids: frozenset[int]
    stop_strings: tuple[str, ...] = ()
    max_thinking_tokens: int | None = None
    cold_stop_entropy: float | None = None
    cold_stop_steps: int = 256
    max_rows_per_pass: int | None = None  # decode in passes of at most this many rows

    @classmethod
    def from_recipe(
        cls, cfg: RecipeCfg, tokenizer, hidden_size: int, **overrides
    ) -> RolloutSettings:
        soft, gen = cfg.softgrpo, cfg.policy.generation
        eos = eos_token_ids(cfg.policy.model_name, tokenizer)
        settings = dict(
            # softgrpo.sampler may decode as another algorithm would (soft decoding of a GRPO model)
            thinking_sampler=decoding_algorithm(soft).thinking_sampler(soft, hidden_size),
            answer_sampler=answer_sampler(soft, gen),
            thinking_temperature=soft.thinking.temperature,
            think_end=soft.think_end,
            max_new_tokens=gen.max_new_tokens,
            eos_ids=eos,
            stop_strings=tuple(gen.stop_strings),
            max_thinking_tokens=soft.thinking.max_thinking_tokens,
            cold_stop_entropy=soft.thinking.cold_stop_entropy,
            cold_stop_steps=soft.thinking.cold_stop_steps,
            max_rows_per_pass=gen.max_rows_per_pass,
        )
        settings.update(overrides)
        return cls(**settings)

    def input_offset(self, records: MixtureRecord) -> torch.Tensor | None:
        """What a fed step adds to its mixed input: the thinking noise's (zero on discrete rows)."""
        return (
            None if self.thinking_sampler is None else self.thinking_sampler.input_offset(records)
        )


def eos_token_ids(model_name: str, tokenizer) -> frozenset[int]:
    """The tokenizer's EOS id and every id in the model's generation_config.json `eos_token_id`
    (an id or a list: instruct models often end turns with a token other than the tokenizer's EOS)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    source = resolve_model_source(model_name)
    for path in dict.fromkeys(
        [source.path / GENERATION_CONFIG, source.tokenizer_path / GENERATION_CONFIG]
    ):
        if path.is_file():
            ids |= _generation_config_eos(path)
    return frozenset(ids)


def _generation_config_eos(path: Path) -> set[int]:
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: not a readable JSON object ({e})") from None
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise UserError(
            f"{path}: eos_token_id={value!r}; expected a token id or a list of token ids"
        )
    return set(values)
