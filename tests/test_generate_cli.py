"""`softgrpo generate` on a tiny random Qwen2 model (SmolLM2's tokenizer): the printed answer
against transformers' greedy decoding, and the per-step view of the soft thinking."""

from __future__ import annotations

import ast
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import make_hf_model

from megatron_softgrpo.cli import main, quiet_library_warnings
from megatron_softgrpo.data.prompts import encode_prompt
from megatron_softgrpo.models.source import load_tokenizer, resolve_model_source

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is 2 + 3?"
MAX_NEW = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_hf_dir):
    model_dir = tmp_path_factory.mktemp("tiny-qwen2")
    hf = make_hf_model("qwen2", model_dir, vocab_size=49152)
    recipe = model_dir / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {  # JSON is YAML
                "defaults": str(ROOT / "recipes" / "base.yaml"),
                "policy": {
                    "model_name": str(model_dir),
                    "tokenizer": {"name": str(smollm2_hf_dir)},
                    "precision": "float32",
                    "generation": {"max_new_tokens": MAX_NEW},
                },
                "cluster": {"gpus_per_node": 0},
            }
        )
    )
    tokenizer = load_tokenizer(resolve_model_source(str(smollm2_hf_dir)))
    return recipe, hf, tokenizer


def generate(capsys, *args) -> tuple[int, str, str]:
    code = main(["generate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_greedy_generate_prints_the_transformers_answer(setup, capsys):
    recipe, hf, tokenizer = setup
    code, out, err = generate(
        capsys,
        str(recipe),
        f"prompt={PROMPT}",
        "softgrpo.sampler=discrete",
        "policy.generation.top_k=1",
    )
    assert code == 0
    from megatron_softgrpo.config.loader import load_recipe

    template = load_recipe(str(recipe), []).cfg.data.prompt_template
    prompt = torch.tensor([encode_prompt(tokenizer, PROMPT, template)])
    expected = hf.generate(
        prompt, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tokenizer.eos_token_id
    )[0, prompt.shape[1] :]
    assert out == tokenizer.decode(expected, skip_special_tokens=True) + "\n"
    assert re.search(rf"# {len(expected)} tokens \(0 thinking\), finished by (length|eos)", err)


def test_show_soft_prints_each_soft_step_with_its_top_slots(setup, capsys):
    recipe, _, tokenizer = setup
    marker = tokenizer("</think>", add_special_tokens=False)["input_ids"]
    code, out, err = generate(
        capsys,
        str(recipe),
        "--show-soft",
        "2",
        "--seed",
        "3",
        f"prompt={PROMPT}",
        "softgrpo.thinking.max_thinking_tokens=3",
    )
    assert code == 0
    lines = out.splitlines()
    steps = [line for line in lines if re.match(r"^ {0,3}\d+ ", line)]
    assert len(steps) == MAX_NEW and "tokens (" in err
    kinds = [line.split()[1] for line in steps]
    # three soft steps, the forced marker, then the answer phase (docs/algorithm.md section 1)
    assert kinds == ["soft"] * 3 + ["forced"] * len(marker) + ["discrete"] * (
        MAX_NEW - 3 - len(marker)
    )
    for line in steps[:3]:
        weights = [float(w) for w in re.findall(r":(\d\.\d\d)(?:\s|$)", line)]
        assert (
            1 <= len(weights) <= 2
            and weights == sorted(weights, reverse=True)
            and sum(weights) <= 1.005
        )
    forced = "".join(
        ast.literal_eval(line.split(None, 2)[2]) for line in steps[3 : 3 + len(marker)]
    )  # the repr of each token
    assert forced == "</think>"
    assert lines[-1] not in steps  # the response text follows the per-step view


def test_generate_without_a_prompt_is_a_user_error(setup, capsys):
    recipe, *_ = setup
    assert main(["generate", str(recipe)]) == 2
    assert 'missing prompt="..."' in capsys.readouterr().err


def test_the_cli_silences_torchs_renamed_collectives_but_not_other_warnings():
    import torch.distributed as dist

    x = torch.zeros(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_warnings()
        for fn in (dist.reduce_scatter_tensor, dist.all_gather_into_tensor):
            with pytest.raises((ValueError, RuntimeError)):  # no process group: torch warns first
                fn(x, x)
        warnings.warn("`torch.load` is deprecated", FutureWarning, stacklevel=1)  # not ours
    assert [str(w.message) for w in caught] == ["`torch.load` is deprecated"]
