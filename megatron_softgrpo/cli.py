"""`softgrpo` command line: argument parsing, dispatch, one-line errors.

Exit codes: 0 success, 2 bad input (recipe, file, flag), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from megatron_softgrpo.errors import UserError


def _split_overrides(items: list[str], known: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """Separate command arguments such as `prompt=...` from recipe overrides."""
    args, overrides = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if sep and key in known:
            args[key] = value
        else:
            overrides.append(item)
    return args, overrides


def _load_checked(recipe: str, overrides: list[str]):
    """Recipe validated against its model's architecture, before any weights are read."""
    from megatron_softgrpo.config import load_recipe
    from megatron_softgrpo.config.checks import check_model_fit
    from megatron_softgrpo.distributed import detect_launch_env
    from megatron_softgrpo.models.source import model_arch_of

    loaded = load_recipe(recipe, overrides)
    try:
        arch = model_arch_of(loaded.cfg.policy.model_name)
    except UserError as e:
        raise loaded.error("policy.model_name", str(e)) from None
    check_model_fit(loaded, arch, world_size=detect_launch_env().world_size)
    return loaded


def cmd_check(ns) -> int:
    import yaml

    loaded = _load_checked(ns.recipe, ns.overrides)
    print(yaml.safe_dump(loaded.cfg.model_dump(), sort_keys=False).rstrip())
    print(f"# {ns.recipe}: valid", file=sys.stderr)
    return 0


def cmd_generate(ns) -> int:
    from megatron_softgrpo.data.prompts import encode_prompt
    from megatron_softgrpo.distributed import ParallelLayout, init_distributed, is_main_rank
    from megatron_softgrpo.models.loading import load_model
    from megatron_softgrpo.models.source import load_tokenizer, resolve_model_source
    from megatron_softgrpo.rollout.greedy import greedy_generate

    args, overrides = _split_overrides(ns.overrides, ("prompt",))
    if "prompt" not in args:
        raise UserError('generate: missing prompt="..." argument')
    loaded = _load_checked(ns.recipe, overrides)
    cfg = loaded.cfg
    mcfg = cfg.policy.megatron_cfg
    source = resolve_model_source(cfg.policy.model_name)
    tokenizer = load_tokenizer(source, cfg.policy.tokenizer.name)
    init_distributed(ParallelLayout(mcfg.tensor_model_parallel_size, mcfg.pipeline_model_parallel_size), seed=cfg.grpo.seed)
    model, _ = load_model(source, mcfg, cfg.policy.precision)
    model.eval()
    prompt = encode_prompt(tokenizer, args["prompt"], cfg.data.prompt_template, cfg.data.system_prompt)
    stop = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    out = greedy_generate(model, prompt, cfg.policy.generation.max_new_tokens, source.arch.vocab_size, stop)
    if is_main_rank():
        print(tokenizer.decode(out, skip_special_tokens=True))
    return 0


def cmd_convert(ns) -> int:
    from megatron_softgrpo.models import convert

    if ns.direction == "hf-to-megatron":
        if not ns.hf:
            raise UserError("convert hf-to-megatron: --hf DIR is required")
        convert.hf_to_megatron(ns.hf, ns.out, tp=ns.tp, pp=ns.pp, precision=ns.precision)
    else:
        if not ns.ckpt:
            raise UserError("convert megatron-to-hf: --ckpt DIR is required")
        convert.megatron_to_hf(ns.ckpt, ns.out, dtype=ns.dtype)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="softgrpo", description="SofT-GRPO on Megatron-Core")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="validate a recipe and print the merged configuration")
    c.add_argument("recipe")
    c.add_argument("overrides", nargs="*", help="dotted.key=value")
    c.set_defaults(func=cmd_check)

    g = sub.add_parser("generate", help='decode one prompt: generate RECIPE prompt="..." [overrides]')
    g.add_argument("recipe")
    g.add_argument("overrides", nargs="*", help='prompt="..." and dotted.key=value overrides')
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("convert", help="convert between Hugging Face and megatron-softgrpo checkpoints")
    v.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    v.add_argument("--hf", help="Hugging Face model directory, or smollm2-135m-instruct (hf-to-megatron)")
    v.add_argument("--ckpt", help="megatron-softgrpo checkpoint directory (megatron-to-hf)")
    v.add_argument("--out", required=True, help="output directory (must be new or empty)")
    v.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the conversion processes")
    v.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the conversion processes")
    v.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"])
    v.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="export dtype (default: as stored)")
    v.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    # Megatron announces every missing optional kernel (Apex, TE) at import; the support table covers it.
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*")
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except UserError as e:
        print(f"softgrpo {ns.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        from megatron_softgrpo.distributed import destroy_distributed

        destroy_distributed()
