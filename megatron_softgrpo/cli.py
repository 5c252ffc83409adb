"""`softgrpo` command line: argument parsing, dispatch, one-line errors.

Exit codes: 0 success, 2 bad input (recipe, file, flag), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from megatron_softgrpo.errors import OneLineError, UserError


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


def _load_checked(
    recipe: str, overrides: list[str], for_cluster: bool = False, training: bool = False
):
    """Recipe validated against its model's architecture, before any weights are read.

    `for_cluster`: outside a launcher, check the layout against the recipe's `cluster` section
    instead of this single process. `training`: also the data, reward and data-parallel batch rules."""
    from megatron_softgrpo.config.checks import cluster_world_size, validate
    from megatron_softgrpo.config.loader import load_recipe
    from megatron_softgrpo.distributed import detect_launch_env

    loaded = load_recipe(recipe, overrides)
    env = detect_launch_env()
    if for_cluster and env.launcher == "single":
        world_size = cluster_world_size(loaded.cfg.cluster)
    else:
        world_size = env.world_size
    validate(loaded, world_size, training)
    return loaded


def _load_engine(cfg, **settings):
    """(rollout engine, tokenizer, parallel state) of this rank's shard of the policy; initialises
    distributed state first."""
    from megatron_softgrpo.distributed import ParallelLayout, init_distributed
    from megatron_softgrpo.models.loading import load_model
    from megatron_softgrpo.models.source import load_tokenizer, resolve_model_source
    from megatron_softgrpo.rollout.engine import make_engine
    from megatron_softgrpo.rollout.settings import RolloutSettings
    from megatron_softgrpo.soft import VocabShard

    mcfg = cfg.policy.megatron_cfg
    source = resolve_model_source(cfg.policy.model_name)
    tokenizer = load_tokenizer(source, cfg.policy.tokenizer.name)
    parallel = init_distributed(
        ParallelLayout(mcfg.tensor_model_parallel_size, mcfg.pipeline_model_parallel_size),
        seed=cfg.grpo.seed,
    )
    model, padded = load_model(source, mcfg, parallel, cfg.policy.precision)
    model.eval()
    shard = VocabShard.of_group(padded, source.arch.vocab_size, parallel.groups.tp)
    rollout = RolloutSettings.from_recipe(cfg, tokenizer, source.arch.hidden_size, **settings)
    engine = make_engine(cfg.policy.generation, model, tokenizer, shard, rollout, parallel)
    return engine, tokenizer, parallel


def cmd_check(ns) -> int:
    import yaml

    loaded = _load_checked(ns.recipe, ns.overrides, for_cluster=True, training=True)
    print(yaml.safe_dump(loaded.cfg.model_dump(), sort_keys=False).rstrip())
    print(f"# {ns.recipe}: valid", file=sys.stderr)
    return 0


def cmd_train(ns) -> int:
    from megatron_softgrpo.train.setup import train

    return train(_load_checked(ns.recipe, ns.overrides, training=True))


def cmd_generate(ns) -> int:
    from megatron_softgrpo.data.prompts import encode_prompt
    from megatron_softgrpo.rollout.show import format_soft_steps
    from megatron_softgrpo.soft import noise_seed, seed_noise_rng

    args, overrides = _split_overrides(ns.overrides, ("prompt",))
    if "prompt" not in args:
        raise UserError('generate: missing prompt="..." argument')
    loaded = _load_checked(ns.recipe, overrides)
    cfg = loaded.cfg
    engine, tokenizer, parallel = _load_engine(cfg)
    seed_noise_rng(noise_seed(ns.seed, 0))
    prompt = encode_prompt(
        tokenizer, args["prompt"], cfg.data.prompt_template, cfg.data.system_prompt
    )
    result = engine.generate([prompt])
    if parallel.main:
        if ns.show_soft:
            print(format_soft_steps(result, 0, tokenizer, top=ns.show_soft))
        print(result.texts[0])
        print(
            f"# {int(result.response_lengths[0])} tokens ({int(result.think_lengths[0])} thinking), "
            f"finished by {result.finish_reasons[0]}",
            file=sys.stderr,
        )
    return 0


def cmd_eval(ns) -> int:
    from megatron_softgrpo.eval.runner import (
        checkpoint_model_name,
        max_new_tokens,
        plan_eval,
        run_eval,
    )

    args, overrides = _split_overrides(ns.overrides, ("checkpoint",))
    if "checkpoint" in args:
        overrides.append(f"policy.model_name={checkpoint_model_name(args['checkpoint'])}")
    loaded = _load_checked(ns.recipe, overrides)
    cfg = loaded.cfg
    plans = plan_eval(loaded)
    engine, tokenizer, parallel = _load_engine(cfg, max_new_tokens=max_new_tokens(cfg))
    summary = run_eval(cfg, plans, engine, tokenizer, parallel)
    if summary is not None:
        from megatron_softgrpo.eval.report import markdown_table

        print(markdown_table(summary).rstrip())
    return 0


def cmd_plan(ns) -> int:
    from megatron_softgrpo.plan import run_plan

    return run_plan(ns.recipe, ns.overrides, gpus=ns.gpus, gpu_mem_gib=ns.gpu_mem_gib)


def cmd_plot(ns) -> int:
    from megatron_softgrpo.eval.plots import plot_kind, plot_pass_at_k
    from megatron_softgrpo.train.plots import TRAINING_CURVES, plot_runs

    if ns.labels is not None and len(ns.labels) != len(ns.dirs):
        raise UserError(f"plot: {len(ns.labels)} --labels for {len(ns.dirs)} directories")
    kind = plot_kind(ns.dirs, ns.kind)
    out = ns.out
    if out is None:
        if len(ns.dirs) > 1:
            raise UserError(f"plot: --out FILE is required with {len(ns.dirs)} directories")
        out = Path(ns.dirs[0]) / (TRAINING_CURVES if kind == "train" else "pass_at_k.png")
    if kind == "train":
        out = plot_runs(ns.dirs, out, ns.labels)
    else:
        out = plot_pass_at_k(ns.dirs, out, ns.labels, ns.metric)
    print(f"# wrote {out}", file=sys.stderr)
    return 0


def cmd_convert(ns) -> int:
    from megatron_softgrpo.models import convert

    to_megatron = ns.direction == "hf-to-megatron"
    needed, unused = ("--hf", "--ckpt") if to_megatron else ("--ckpt", "--hf")
    if not getattr(ns, needed.lstrip("-")):
        raise UserError(f"convert {ns.direction}: {needed} DIR is required")
    if getattr(ns, unused.lstrip("-")):
        raise UserError(f"convert {ns.direction}: {unused} does not apply (the source is {needed})")
    if to_megatron:
        convert.hf_to_megatron(ns.hf, ns.out, tp=ns.tp, pp=ns.pp, precision=ns.precision)
    else:
        convert.megatron_to_hf(ns.ckpt, ns.out, dtype=ns.dtype)
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="softgrpo", description="SofT-GRPO on Megatron-Core")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="validate a recipe and print the merged configuration")
    c.add_argument("recipe")
    c.add_argument("overrides", nargs="*", help="dotted.key=value")
    c.set_defaults(func=cmd_check)

    t = sub.add_parser(
        "train", help="SofT-GRPO / GRPO / ablation training: train RECIPE [overrides]"
    )
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", help="dotted.key=value")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser(
        "generate", help='decode one prompt: generate RECIPE prompt="..." [overrides]'
    )
    g.add_argument("recipe")
    g.add_argument(
        "--show-soft",
        type=int,
        nargs="?",
        const=3,
        default=0,
        metavar="N",
        help="print each soft thinking step's top N slots and weights (default 3)",
    )
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("overrides", nargs="*", help='prompt="..." and dotted.key=value overrides')
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser(
        "eval",
        help="Pass@k, mean@n, maj@k on the benchmarks: eval RECIPE [checkpoint=DIR] [overrides]",
    )
    e.add_argument("recipe")
    e.add_argument(
        "overrides",
        nargs="*",
        help="checkpoint=DIR and dotted.key=value overrides (eval.*, softgrpo.sampler, ...)",
    )
    e.set_defaults(func=cmd_eval)

    pn = sub.add_parser(
        "plan",
        help="per-GPU memory and layout check: plan [--gpus N] [--gpu-mem-gib G] RECIPE [overrides]; "
        "exit 0 fits, 1 does not fit, 2 invalid",
    )
    pn.add_argument("recipe")
    pn.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="total GPUs (default: cluster.num_nodes x cluster.gpus_per_node)",
    )
    pn.add_argument(
        "--gpu-mem-gib",
        type=float,
        default=None,
        help="memory per GPU in GiB (default: cluster.gpu_mem_gib)",
    )
    pn.add_argument("overrides", nargs="*", help="dotted.key=value")
    pn.set_defaults(func=cmd_plan)

    pl = sub.add_parser(
        "plot", help="training curves (metrics.jsonl) or Pass@k curves (eval/summary.json) as PNG"
    )
    pl.add_argument(
        "dirs",
        nargs="+",
        metavar="DIR",
        help="run directories (logger.log_dir) or eval directories",
    )
    pl.add_argument(
        "--out",
        help="image file to write (.png); default with one DIR: DIR/training_curves.png "
        "(training curves) or DIR/pass_at_k.png (Pass@k)",
    )
    pl.add_argument(
        "--kind",
        choices=["auto", "train", "passk"],
        default="auto",
        help="auto: Pass@k when every DIR has an eval summary, else training curves",
    )
    pl.add_argument(
        "--labels",
        nargs="+",
        help="one legend label per DIR (default: DIR's name, and the decoding for Pass@k)",
    )
    pl.add_argument(
        "--metric",
        choices=["pass_at_k", "pass_at_k_first", "maj_at_k"],
        default="pass_at_k",
        help="Pass@k curves: unbiased pass@k (default), first-k pass@k, or majority vote maj@k",
    )
    pl.set_defaults(func=cmd_plot)

    v = sub.add_parser(
        "convert", help="convert between Hugging Face and megatron-softgrpo checkpoints"
    )
    v.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    v.add_argument(
        "--hf", help="Hugging Face model directory, or smollm2-135m-instruct (hf-to-megatron)"
    )
    v.add_argument("--ckpt", help="megatron-softgrpo checkpoint directory (megatron-to-hf)")
    v.add_argument("--out", required=True, help="output directory (must be new or empty)")
    v.add_argument(
        "--tp",
        type=_positive_int,
        default=1,
        help="tensor-parallel size of the conversion processes",
    )
    v.add_argument(
        "--pp",
        type=_positive_int,
        default=1,
        help="pipeline-parallel size of the conversion processes",
    )
    v.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"])
    v.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="export dtype (default: as stored)",
    )
    v.set_defaults(func=cmd_convert)
    return p


def quiet_library_warnings() -> None:
    """Silence what the libraries say that a user can do nothing about."""
    # Megatron announces every missing optional kernel (Apex, TE) at import; the support table covers it.
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*")
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    # Megatron's optimizer probes .grad of non-leaf views, and calls torch collectives that torch
    # renamed (all_gather_into_tensor, reduce_scatter_tensor, ...)
    warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is (deprecated|a private function)"
    )


def main(argv: list[str] | None = None) -> int:
    quiet_library_warnings()
    parser = build_parser()
    # flags may come after the overrides (`plan RECIPE --gpus 8 a.b=1`): argparse leaves the
    # overrides that follow a flag unparsed, and they join the others here
    ns, extra = parser.parse_known_args(argv)
    unknown_flags = [e for e in extra if e.startswith("-")]
    if unknown_flags or (extra and not hasattr(ns, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown_flags or extra)}")
    if extra:
        ns.overrides = [*ns.overrides, *extra]
    try:
        return ns.func(ns)
    except OneLineError as e:
        print(f"softgrpo {ns.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        from megatron_softgrpo.distributed import destroy_distributed

        destroy_distributed()
