"""Megatron Qwen2/Llama against transformers: logits at TP=1, TP=2, PP=2; conversion; resharding checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from distributed_helpers import run_ranks
from tiny_models import make_hf_model

from megatron_softgrpo.config.schema import MegatronCfg
from megatron_softgrpo.distributed import ParallelLayout, init_distributed
from megatron_softgrpo.models.arch import ModelArch
from megatron_softgrpo.models.forward import forward_logits
from megatron_softgrpo.models.loading import load_model
from megatron_softgrpo.models.source import resolve_model_source

TOKENS = torch.tensor(
    [
        [5, 17, 999, 3, 42, 7, 7, 100, 256, 1, 0, 998],
        [900, 2, 33, 4, 8, 16, 32, 64, 128, 512, 11, 12],
    ]
)


def hf_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


def megatron_logits(model_name: str, tp: int = 1, pp: int = 1, tokens=TOKENS):
    """Logits of `model_name` on this process's layout; None off the last pipeline stage."""
    parallel = init_distributed(ParallelLayout(tp, pp))
    source = resolve_model_source(model_name)
    mcfg = MegatronCfg(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model, _ = load_model(source, mcfg, parallel)
    model.eval()
    logits = forward_logits(model, tokens, parallel)
    return None if logits is None else logits[..., : source.arch.vocab_size].clone()


def _rank_logits(rank, model_name, tp, pp):
    return megatron_logits(model_name, tp, pp)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_tp1_matches_transformers(kind, tmp_path):
    ref = hf_logits(make_hf_model(kind, tmp_path))
    ours = megatron_logits(str(tmp_path))
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 1e-4


def test_llama3_rope_frequencies_match_transformers(tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    make_hf_model("llama", tmp_path)
    arch = ModelArch.from_hf_dir(tmp_path)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig.from_pretrained(tmp_path), "cpu")
    assert torch.allclose(arch.rope_inv_freq(), expected.float(), rtol=1e-6, atol=0)
    # the scaled frequencies really differ from plain RoPE, so the logits test above sees them
    plain = 1.0 / (arch.rope_theta ** (torch.arange(0, arch.head_dim, 2).float() / arch.head_dim))
    assert not torch.allclose(arch.rope_inv_freq(), plain)


@pytest.mark.multiproc
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_matches_transformers(kind, tp, pp, tmp_path):
    ref = hf_logits(make_hf_model(kind, tmp_path))
    results = run_ranks(tp * pp, _rank_logits, str(tmp_path), tp, pp)
    last_stage = [r for r in results if r is not None]
    assert len(last_stage) == tp  # every TP rank of the last stage returns the gathered logits
    for logits in last_stage:
        assert (logits - ref).abs().max() <= 1e-4


def _convert(rank, hf_dir, out, tp, pp):
    from megatron_softgrpo.models.convert import hf_to_megatron

    hf_to_megatron(hf_dir, out, tp=tp, pp=pp)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_hf_megatron_hf_round_trip_is_bit_exact(kind, tmp_path):
    from safetensors.torch import load_file

    from megatron_softgrpo.models.convert import hf_to_megatron, megatron_to_hf

    make_hf_model(kind, tmp_path / "hf")
    hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "mcore"))
    from megatron_softgrpo.distributed import destroy_distributed

    destroy_distributed()
    megatron_to_hf(str(tmp_path / "mcore"), str(tmp_path / "back"))
    original = load_file(tmp_path / "hf" / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    # the exported directory loads in transformers and gives the same logits
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert torch.equal(hf_logits(reloaded), hf_logits(expected))


def test_sharded_export_loads_in_transformers_and_imports_back(tmp_path, monkeypatch):
    """7B+ models export and import as several safetensors files with an index."""
    from transformers import AutoModelForCausalLM

    from megatron_softgrpo.distributed import destroy_distributed
    from megatron_softgrpo.models import convert

    ref = hf_logits(make_hf_model("qwen2", tmp_path / "hf"))
    convert.hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "mcore"))
    destroy_distributed()
    monkeypatch.setattr(convert, "SHARD_BYTES", 64 * 1024)
    back = convert.megatron_to_hf(str(tmp_path / "mcore"), str(tmp_path / "back"))
    index = json.loads((back / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and not (back / "model.safetensors").exists()
    assert all((back / f).stat().st_mode & 0o777 == 0o644 for f in files)
    config = json.loads((back / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and "_name_or_path" not in config
    assert torch.equal(
        hf_logits(AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)), ref
    )
    destroy_distributed()
    assert (megatron_logits(str(back)) - ref).abs().max() <= 1e-4  # read through the index


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_checkpoint_saved_parallel_loads_at_tp1(tp, pp, tmp_path):
    ref = hf_logits(make_hf_model("qwen2", tmp_path / "hf"))
    run_ranks(tp * pp, _convert, str(tmp_path / "hf"), str(tmp_path / "ckpt"), tp, pp)
    meta = json.loads((tmp_path / "ckpt" / "softgrpo_checkpoint.json").read_text())
    assert meta["saved_layout"] == {
        "tensor_parallel": tp,
        "pipeline_parallel": pp,
        "world_size": tp * pp,
    }
    ours = megatron_logits(str(tmp_path / "ckpt"))
    assert (ours - ref).abs().max() <= 1e-4


@pytest.mark.multiproc
def test_checkpoint_saved_at_tp1_loads_at_tp2(tmp_path):
    from megatron_softgrpo.models.convert import hf_to_megatron

    ref = hf_logits(make_hf_model("llama", tmp_path / "hf"))
    hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    for logits in run_ranks(2, _rank_logits, str(tmp_path / "ckpt"), 2, 1):
        assert (logits - ref).abs().max() <= 1e-4


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    from megatron_softgrpo.models import checkpoint
    from megatron_softgrpo.models.convert import hf_to_megatron

    ref = hf_logits(make_hf_model("qwen2", tmp_path / "hf"))
    ckpt = tmp_path / "ckpt"
    hf_to_megatron(str(tmp_path / "hf"), str(ckpt))
    before = sorted(p.relative_to(ckpt) for p in ckpt.rglob("*"))

    parallel = init_distributed(ParallelLayout(1, 1))
    model, _ = load_model(resolve_model_source(str(ckpt)), MegatronCfg(), parallel)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash mid-save")

    monkeypatch.setattr(dist_checkpointing, "save", crash)
    with pytest.raises(RuntimeError):
        checkpoint.save_checkpoint(
            ckpt, {"model": model.sharded_state_dict()}, checkpoint.read_meta(ckpt), parallel
        )
    monkeypatch.undo()
    assert sorted(p.relative_to(ckpt) for p in ckpt.rglob("*")) == before
    assert (megatron_logits(str(ckpt)) - ref).abs().max() <= 1e-4

    # a crash between the two renames of an overwrite: the old checkpoint is set aside, the new
    # one not yet in place; readers move the old one back
    replace, calls = checkpoint.os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise RuntimeError("simulated crash between the renames")
        replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_second)
    with pytest.raises(RuntimeError, match="between the renames"):
        checkpoint.save_checkpoint(
            ckpt, {"model": model.sharded_state_dict()}, checkpoint.read_meta(ckpt), parallel
        )
    monkeypatch.undo()
    assert not ckpt.exists() and (tmp_path / "ckpt.old").is_dir()
    assert checkpoint.is_checkpoint(ckpt) and not (tmp_path / "ckpt.old").exists()
    assert sorted(p.relative_to(ckpt) for p in ckpt.rglob("*")) == before


def test_unsupported_layout_is_refused_before_building(tmp_path, capsys):
    from megatron_softgrpo.cli import main

    make_hf_model("qwen2", tmp_path / "hf")  # 4 heads, 2 key/value heads, 2 layers
    capsys.readouterr()
    assert (
        main(
            [
                "convert",
                "hf-to-megatron",
                "--hf",
                str(tmp_path / "hf"),
                "--out",
                str(tmp_path / "o"),
                "--tp",
                "4",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--tp 4" in err and "2 key/value heads" in err
    assert not (tmp_path / "o").exists()


def test_convert_refuses_the_other_directions_source(tmp_path, capsys):
    from megatron_softgrpo.cli import main

    assert (
        main(
            [
                "convert",
                "hf-to-megatron",
                "--hf",
                str(tmp_path),
                "--ckpt",
                "z",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "--ckpt does not apply" in capsys.readouterr().err
    assert main(["convert", "megatron-to-hf", "--out", str(tmp_path / "o")]) == 2
    assert "--ckpt DIR is required" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--tp", "0"), ("--pp", "-1")])
def test_non_positive_layout_flags_are_usage_errors(flag, value, tmp_path, capsys):
    from megatron_softgrpo.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "convert",
                "hf-to-megatron",
                "--hf",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                flag,
                value,
            ]
        )
    assert exit_info.value.code == 2
    assert f"argument {flag}: expected a positive integer, got '{value}'" in capsys.readouterr().err
