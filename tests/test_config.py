"""Recipes: defaults chains, dotted overrides, provenance, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_softgrpo.cli import main
from megatron_softgrpo.config.loader import load_recipe
from megatron_softgrpo.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def chain(tmp_path):
    """grandparent <- parent <- child, the child also overriding a nested key."""
    write(
        tmp_path / "grand.yaml",
        "policy:\n  model_name: a\n  precision: float32\n  megatron_cfg:\n    optimizer: {lr: 1.0e-5, weight_decay: 0.1}\ngrpo: {seed: 1}\n",
    )
    write(
        tmp_path / "parent.yaml",
        "defaults: grand\npolicy:\n  megatron_cfg:\n    optimizer: {lr: 2e-6}\ngrpo: {seed: 2, max_num_steps: 7}\n",
    )
    return write(
        tmp_path / "child.yaml",
        "defaults: [parent.yaml]\ngrpo: {seed: 3}\nloss_fn: {ratio_clip_max: 0.28}\n",
    )


def test_defaults_chain_merges_deeply_and_later_files_win(chain):
    cfg = load_recipe(chain).cfg
    assert cfg.policy.model_name == "a"  # from the grandparent
    assert (
        cfg.policy.megatron_cfg.optimizer.lr == 2e-6
    )  # parent overrides grandparent ("2e-6" parsed as a float)
    assert (
        cfg.policy.megatron_cfg.optimizer.weight_decay == 0.1
    )  # sibling key kept by the deep merge
    assert cfg.grpo.seed == 3 and cfg.grpo.max_num_steps == 7
    assert (
        cfg.loss_fn.ratio_clip_max == 0.28 and cfg.loss_fn.ratio_clip_min == 0.2
    )  # schema default


def test_overrides_win_and_provenance_is_tracked(chain):
    loaded = load_recipe(
        chain,
        [
            "policy.megatron_cfg.optimizer.lr=1e-7",
            "+grpo.val_period=5",
            "policy.generation.stop_strings=[a, b]",
        ],
    )
    cfg = loaded.cfg
    assert cfg.policy.megatron_cfg.optimizer.lr == 1e-7
    assert cfg.grpo.val_period == 5
    assert cfg.policy.generation.stop_strings == ["a", "b"]
    assert loaded.source_of("policy.megatron_cfg.optimizer.lr") == "command line"
    assert loaded.source_of("policy.megatron_cfg.optimizer.weight_decay").endswith("grand.yaml")
    assert loaded.source_of("grpo.max_num_steps").endswith("parent.yaml")


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(["check", *map(str, args)])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "body, overrides, expected",
    [
        # unknown key: names the key and lists what is allowed
        (
            "policy: {model_name: m, precison: float32}\n",
            [],
            ["policy.precison: unknown key", "precision"],
        ),
        # wrong type, from the command line
        (
            "policy: {model_name: m}\n",
            ["grpo.num_prompts_per_step=many"],
            ["command line", "grpo.num_prompts_per_step=many", "integer"],
        ),
        # strict types: YAML booleans and quoted numbers are not coerced
        (
            "policy: {model_name: m}\n",
            ["grpo.seed=true"],
            ["command line", "grpo.seed=true", "integer"],
        ),
        (
            "policy: {model_name: m}\n",
            ["loss_fn.ratio_clip_max=true"],
            ["command line", "loss_fn.ratio_clip_max=true", "number"],
        ),
        ("policy: {model_name: m}\ngrpo: {seed: '7'}\n", [], ["grpo.seed=7", "integer"]),
        (
            "policy: {model_name: m, megatron_cfg: {sequence_parallel: 1}}\n",
            [],
            ["policy.megatron_cfg.sequence_parallel=1", "boolean"],
        ),
        # missing required field
        ("grpo: {seed: 1}\n", [], ["policy: required key is missing"]),
        # out of range
        (
            "policy: {model_name: m}\nloss_fn: {reference_policy_kl_penalty: -1}\n",
            [],
            ["loss_fn.reference_policy_kl_penalty=-1", "greater than or equal to 0"],
        ),
        # not one of the allowed values
        (
            "policy: {model_name: m}\nsoftgrpo: {algorithm: ppo}\n",
            [],
            ["softgrpo.algorithm=ppo", "'softgrpo'", "'grpo'"],
        ),
        (
            "policy: {model_name: m}\n",
            ["env.answer_format=last_word"],
            ["command line", "env.answer_format=last_word", "'boxed'", "'last_number'"],
        ),
        # cross-field rule
        (
            "policy: {model_name: m, megatron_cfg: {sequence_parallel: true}}\n",
            [],
            ["policy.megatron_cfg.sequence_parallel=true", "not supported"],
        ),
        # a file source names exactly one file
        (
            "policy: {model_name: m}\ndata: {train: {kind: json}}\n",
            [],
            ["data.train.path", "required when kind=json", "data.train.builtin"],
        ),
        (
            "policy: {model_name: m}\n",
            ["data.train={path: a.json, builtin: math_train}"],
            ["command line", "data.train.builtin=math_train", "not both"],
        ),
        (
            "policy: {model_name: m}\n",
            ["data.train={builtin: deepscaler}"],
            ["command line", "data.train.builtin=deepscaler", "'math_train'"],
        ),
        # malformed override
        ("policy: {model_name: m}\n", ["grpo.seed"], ["command line", "dotted.key=value"]),
        # dynamic sampling and overlong handling
        (
            "policy: {model_name: m, train_global_batch_size: 64}\n"
            "grpo: {num_generations_per_prompt: 1}\n",
            ["grpo.dynamic_sampling.enabled=true"],
            [
                "command line",
                "grpo.dynamic_sampling.enabled=true",
                "num_generations_per_prompt >= 2",
            ],
        ),
        (
            "policy: {model_name: m}\n",
            ["grpo.dynamic_sampling.max_gen_rounds=-1"],
            ["command line", "max_gen_rounds=-1", "greater than or equal to 0"],
        ),
        (
            "policy: {model_name: m}\ngrpo: {dynamic_sampling: {max_rounds: 3}}\n",
            [],
            ["grpo.dynamic_sampling.max_rounds: unknown key", "max_gen_rounds"],
        ),
        (
            "policy: {model_name: m, generation: {max_new_tokens: 16}}\n"
            "env: {overlong_penalty: {buffer: 32}}\n",
            [],
            ["env.overlong_penalty.buffer=32", "policy.generation.max_new_tokens (16)"],
        ),
        (
            "policy: {model_name: m}\nenv: {overlong_penalty: {buffer: 0}}\n",
            [],
            ["env.overlong_penalty.buffer=0", "greater than or equal to 1"],
        ),
        (
            "policy: {model_name: m}\nenv: {overlong_penalty: {factor: 0.5}}\n",
            [],
            ["env.overlong_penalty.buffer: required key is missing"],
        ),
        (
            "policy: {model_name: m}\n",
            ["loss_fn.overlong_filtering=1"],
            ["command line", "loss_fn.overlong_filtering=1", "boolean"],
        ),
    ],
)
def test_bad_recipes_get_one_line_errors_and_exit_2(tmp_path, capsys, body, overrides, expected):
    recipe = write(tmp_path / "bad.yaml", body)
    code, err = run_cli(capsys, recipe, *overrides)
    assert code == 2
    assert "\n" not in err and "Traceback" not in err
    for fragment in expected:
        assert fragment in err
    if "command line" not in expected:
        assert str(recipe) in err  # names the file that set the bad value


def test_dynamic_sampling_and_overlong_keys_parse():
    recipe = ROOT / "recipes" / "softgrpo-smollm2-135m-cpu.yaml"
    cfg = load_recipe(recipe).cfg
    assert not cfg.grpo.dynamic_sampling.enabled and not cfg.loss_fn.overlong_filtering
    assert cfg.env.overlong_penalty is None
    cfg = load_recipe(
        recipe,
        [
            "grpo.dynamic_sampling={enabled: true, max_gen_rounds: 2}",
            "loss_fn.overlong_filtering=true",
            "env.overlong_penalty={buffer: 8}",
        ],
    ).cfg
    assert cfg.grpo.dynamic_sampling.enabled and cfg.grpo.dynamic_sampling.max_gen_rounds == 2
    assert cfg.loss_fn.overlong_filtering
    assert (cfg.env.overlong_penalty.buffer, cfg.env.overlong_penalty.factor) == (8, 1.0)


def test_tp_not_dividing_heads_is_refused(capsys):
    recipe = ROOT / "recipes" / "softgrpo-smollm2-135m-cpu.yaml"
    code, err = run_cli(capsys, recipe, "policy.megatron_cfg.tensor_model_parallel_size=2")
    assert code == 2 and "\n" not in err
    assert "tensor_model_parallel_size=2" in err and "9 attention heads" in err


def test_tp_error_names_the_heads_before_the_vocabulary_padding(capsys):
    """28 heads at TP=3: the heads are the cause (make_vocab_size_divisible_by=128 is not a multiple of 3 either)."""
    recipe = ROOT / "recipes" / "softgrpo-r1-distill-qwen-7b-1n8g.yaml"
    code, err = run_cli(
        capsys,
        recipe,
        "policy.megatron_cfg.tensor_model_parallel_size=3",
        "cluster.gpus_per_node=6",
    )
    assert code == 2 and "\n" not in err
    assert (
        "tensor_model_parallel_size=3" in err
        and "28 attention heads" in err
        and "make_vocab" not in err
    )
    # with heads that TP splits, the padding rule still applies
    code, err = run_cli(
        capsys,
        recipe,
        "policy.megatron_cfg.tensor_model_parallel_size=2",
        "policy.megatron_cfg.make_vocab_size_divisible_by=3",
    )
    assert (
        code == 2
        and "policy.megatron_cfg.make_vocab_size_divisible_by=3" in err
        and "multiple of tensor_model_parallel_size (2)" in err
    )


def test_missing_recipe_file_and_missing_default(tmp_path, capsys):
    code, err = run_cli(capsys, tmp_path / "nope.yaml")
    assert code == 2 and "nope.yaml: recipe file not found" in err
    recipe = write(tmp_path / "r.yaml", "defaults: ghost.yaml\npolicy: {model_name: m}\n")
    code, err = run_cli(capsys, recipe)
    assert code == 2 and "ghost.yaml" in err and "not found" in err


def test_defaults_cycle_and_invalid_yaml(tmp_path):
    write(tmp_path / "a.yaml", "defaults: b.yaml\n")
    write(tmp_path / "b.yaml", "defaults: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "policy: {model_name: [\n")
    with pytest.raises(ConfigError, match=r"c.yaml: invalid YAML \(line"):
        load_recipe(tmp_path / "c.yaml")


def test_unknown_model_is_a_config_error(tmp_path, capsys):
    recipe = write(tmp_path / "r.yaml", f"policy: {{model_name: {tmp_path / 'missing-model'}}}\n")
    code, err = run_cli(capsys, recipe)
    assert code == 2 and "policy.model_name=" in err and "no such model directory" in err


@pytest.mark.parametrize(
    "recipe", [p for p in RECIPES if p.name != "base.yaml"], ids=lambda p: p.name
)
def test_every_shipped_recipe_validates(recipe, capsys):
    code, err = run_cli(capsys, recipe)
    assert code == 0, err


def test_errors_name_the_default_and_the_command_line_that_built_a_mapping(capsys):
    recipe = ROOT / "recipes" / "softgrpo-smollm2-135m-cpu.yaml"
    # 9 heads and 3 KV heads split 3 ways; the unset vocabulary padding (128) does not
    code, err = run_cli(capsys, recipe, "policy.megatron_cfg.tensor_model_parallel_size=3")
    assert code == 2 and "policy.megatron_cfg.make_vocab_size_divisible_by=128 (the default)" in err
    # an override that turns the recipe's string into a mapping is the command line's doing
    code, err = run_cli(capsys, recipe, "policy.model_name.x=3")
    assert code == 2 and err.startswith("softgrpo check: error: command line: policy.model_name=")


# Each of these passed `softgrpo check` and failed `softgrpo train`, some after the model loaded.
TRAIN_ONLY_REFUSALS = [
    (
        ["softgrpo.sampler=discrete"],
        "softgrpo.sampler=discrete: training samples as the algorithm does (softgrpo); set null",
    ),
    (
        [
            "softgrpo.algorithm=embedding_noise",
            "policy.megatron_cfg.pipeline_model_parallel_size=2",
        ],
        "softgrpo.algorithm=embedding_noise: needs tied embeddings",
    ),
    (
        ["policy.megatron_cfg.scheduler.lr_warmup_init=1.0"],
        "policy.megatron_cfg.scheduler.lr_warmup_init=1.0: exceeds policy.megatron_cfg.optimizer.lr",
    ),
    (
        ["policy.megatron_cfg.optimizer.min_lr=1.0"],
        "policy.megatron_cfg.optimizer.min_lr=1.0: exceeds policy.megatron_cfg.optimizer.lr",
    ),
    (
        [
            "policy.megatron_cfg.scheduler.lr_decay_style=cosine",
            "policy.megatron_cfg.scheduler.lr_warmup_iters=100000",
        ],
        "policy.megatron_cfg.scheduler.lr_warmup_iters=100000: must be below the",
    ),
]
GPU_RECIPE = ROOT / "recipes" / "softgrpo-r1-distill-qwen-1.5b-1n8g.yaml"


@pytest.mark.parametrize(
    "overrides, expected",
    TRAIN_ONLY_REFUSALS,
    ids=["sampler", "embedding_noise_pp2", "warmup_init", "min_lr", "warmup_past_decay"],
)
def test_check_refuses_what_train_refuses_before_any_model_loads(
    overrides, expected, capsys, monkeypatch
):
    code, err = run_cli(capsys, GPU_RECIPE, *overrides)
    assert code == 2 and expected in err and "\n" not in err
    # rank 0 of the recipe's 8-process job: the same refusal, before the trainer starts
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setattr(
        "megatron_softgrpo.train.setup.train", lambda loaded: pytest.fail("train started")
    )
    assert main(["train", str(GPU_RECIPE), *overrides]) == 2
    assert expected in capsys.readouterr().err


def test_check_accepts_the_recipe_those_cases_change(capsys):
    """So that each refusal above is the override's doing."""
    assert run_cli(capsys, GPU_RECIPE) == (0, f"# {GPU_RECIPE}: valid")
    # tied embeddings carry the input table to the last stage; eval does not score densities
    small = ROOT / "recipes" / "softgrpo-smollm2-135m-cpu.yaml"
    pp2 = [
        "softgrpo.algorithm=embedding_noise",
        "policy.megatron_cfg.pipeline_model_parallel_size=2",
    ]
    assert run_cli(capsys, small, *pp2)[0] == 0
    assert (
        run_cli(capsys, GPU_RECIPE, "policy.megatron_cfg.scheduler.lr_warmup_iters=100000")[0] == 0
    )


def test_tp_must_divide_a_checkpoints_padded_vocabulary(tmp_path, capsys):
    """A checkpoint fixes its vocabulary padding (an HF model is padded per the recipe): check
    refuses a TP that cannot split it, naming the key, before any weights are read."""
    import json
    from dataclasses import asdict

    from megatron_softgrpo.models.checkpoint import META_FILE, CheckpointMeta
    from megatron_softgrpo.models.source import SMOLLM2_ARCH

    recipe = ROOT / "recipes" / "softgrpo-smollm2-135m-cpu.yaml"
    tp3 = ["policy.megatron_cfg.tensor_model_parallel_size=3"]
    tp3.append("policy.megatron_cfg.make_vocab_size_divisible_by=3")  # 9 heads, 3 KV heads
    for padded, refused in ((49280, True), (49152, False)):  # 49280 = 3 * 16426 + 2
        ckpt = tmp_path / f"ckpt{padded}"
        ckpt.mkdir()
        meta = CheckpointMeta(arch=SMOLLM2_ARCH.to_dict(), padded_vocab_size=padded)
        (ckpt / META_FILE).write_text(json.dumps(asdict(meta)))
        code, err = run_cli(capsys, recipe, f"policy.model_name={ckpt}", *tp3)
        if refused:
            assert code == 2 and "\n" not in err
            assert (
                "tensor_model_parallel_size=3: must divide the checkpoint's padded vocabulary (49280"
                in err
            )
        else:
            assert code == 0, err


def test_check_and_plan_do_not_import_megatron():
    """Validating a recipe must stay quick: Megatron-Core takes seconds to import and warns."""
    code = (
        "import sys; from megatron_softgrpo.cli import main\n"
        f"assert main(['check', {str(GPU_RECIPE)!r}]) == 0\n"
        f"assert main(['plan', {str(GPU_RECIPE)!r}]) == 0\n"
        "print(sorted(m for m in sys.modules if m.startswith('megatron.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.strip().splitlines()[-1] == "[]"
