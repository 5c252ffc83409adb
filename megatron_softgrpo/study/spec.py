"""What a study compares: its training arms, its named evaluation decodings, and the rule that the
arms explore alike (docs/algorithm.md, "Comparing algorithms").

Every arm trains with the same recipe, so they can differ in how they explore only where the
algorithm picks the section it samples from: GRPO samples with `policy.generation`, a soft algorithm
thinks with `softgrpo.thinking`. `StudySpec.check` refuses arms whose temperature, top-k or top-p
differ there, unless the study says it means it (`allow_mismatched_exploration`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from megatron_softgrpo.algorithms.registry import ALGORITHMS, decoding_spec
from megatron_softgrpo.config.checks import cluster_world_size, validate
from megatron_softgrpo.config.loader import load_recipe
from megatron_softgrpo.errors import UserError

EXPLORATION_KEYS = ("temperature", "top_k", "top_p")  # what the arms must share


@dataclass(frozen=True)
class Decoding:
    """An evaluation decoding: `softgrpo eval` overrides, and the models it applies to."""

    overrides: tuple[str, ...]
    models: tuple[str, ...] | None = None  # "base" and algorithm names; None: every model
    source: str = ""  # where its settings come from

    def applies_to(self, model: str) -> bool:
        return self.models is None or model in self.models


def _sampling(section: str, temperature: float, top_k: int) -> tuple[str, ...]:
    return tuple(
        f"{section}.{key}={value}"
        for key, value in (("temperature", temperature), ("top_k", top_k), ("top_p", 0.95))
    ) + (f"{section}.min_p=0.0",)


# The reference's evaluation scripts (SofT-GRPO-master at 7a83626, Soft-Thinking+noise+loss-main/):
# its SofT-GRPO checkpoints decode soft as they trained; base and GRPO models decode at T 0.6 with
# top-k 30, discretely or soft with K 30 and tau_g 0.5. Both phases use the same sampling there.
_REFERENCE = "reference evaluation, Soft-Thinking+noise+loss-main/"
BUILTIN_DECODINGS: dict[str, Decoding] = {
    "hard": Decoding(("softgrpo.sampler=discrete",), source="the recipe's policy.generation"),
    "soft": Decoding(("softgrpo.sampler=gumbel",), source="the recipe's softgrpo.thinking"),
    "multiplex": Decoding(
        ("softgrpo.sampler=multiplex",),
        source="the recipe's softgrpo.thinking, softgrpo.multiplex_width draws",
    ),
    "ref-soft": Decoding(
        (
            "softgrpo.sampler=gumbel",
            *_sampling("softgrpo.thinking", 1.0, 5),
            *_sampling("policy.generation", 1.0, 5),
            "softgrpo.mixture_size=5",
            "softgrpo.gumbel_tau=0.1",
            "softgrpo.noise_scale=1.0",
        ),
        ("softgrpo",),
        _REFERENCE + "run_sample_gumbel.sh",
    ),
    "ref-hard": Decoding(
        ("softgrpo.sampler=discrete", *_sampling("policy.generation", 0.6, 30)),
        ("base", "grpo"),
        _REFERENCE + "run_sample_discrete-token_grpo.sh",
    ),
    "ref-soft-k30": Decoding(
        (
            "softgrpo.sampler=gumbel",
            *_sampling("softgrpo.thinking", 0.6, 30),
            *_sampling("policy.generation", 0.6, 30),
            "softgrpo.mixture_size=30",
            "softgrpo.gumbel_tau=0.5",
            "softgrpo.noise_scale=1.0",
        ),
        ("base", "grpo"),
        _REFERENCE + "run_sample_gumbel_grpo.sh",
    ),
}


def read_decodings(path: str | Path | None) -> dict[str, Decoding]:
    """The built-in decodings and those a YAML file defines:
    `NAME: {overrides: [key=value, ...], models: [base, grpo, ...]}` (models optional: all)."""
    decodings = dict(BUILTIN_DECODINGS)
    if path is None:
        return decodings
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: cannot read the decodings ({exc})".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of decoding names, got {type(data).__name__}")
    for name, entry in data.items():
        where = f"{path}: {name}"
        if name in BUILTIN_DECODINGS:
            raise UserError(f"{where}: a built-in decoding has this name; choose another")
        if not isinstance(entry, dict) or set(entry) - {"overrides", "models"}:
            raise UserError(f"{where}: expected {{overrides: [key=value, ...], models: [...]}}")
        overrides, models = entry.get("overrides", []), entry.get("models")
        if not _strings(overrides) or not (models is None or _strings(models)):
            raise UserError(f"{where}: overrides and models must be lists of strings")
        decodings[name] = Decoding(tuple(overrides), None if models is None else tuple(models))
    return decodings


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


@dataclass(frozen=True)
class StudySpec:
    recipe: str
    algorithms: tuple[str, ...] = ("grpo", "softgrpo")
    seeds: tuple[int, ...] = (1, 2, 3)
    # evaluation decodings by name (eval/<model>/<name>/); BUILTIN_DECODINGS by default
    decodings: dict[str, Decoding] = field(
        default_factory=lambda: {k: BUILTIN_DECODINGS[k] for k in ("hard", "soft")}
    )
    overrides: tuple[str, ...] = ()  # dotted.key=value for every train and eval job
    allow_mismatched_exploration: bool = False

    def models(self) -> list[str]:
        """The evaluated models: base, then each algorithm-seed checkpoint."""
        return ["base"] + [f"{a}-seed{s}" for a in self.algorithms for s in self.seeds]

    def evaluations(self) -> list[tuple[str, str]]:
        """(model, decoding) of every evaluation; a checkpoint takes its algorithm's decodings."""
        return [
            (model, name)
            for model in self.models()
            for name, decoding in self.decodings.items()
            if decoding.applies_to(model.split("-seed")[0])
        ]

    def check(self) -> None:
        for name, values in (
            ("--algorithms", self.algorithms),
            ("--seeds", self.seeds),
            ("--decodings", tuple(self.decodings)),
        ):
            if len(set(values)) != len(values) or not values:
                raise UserError(f"study: {name} must be distinct and non-empty, got {list(values)}")
        for name, decoding in self.decodings.items():
            unknown = set(decoding.models or ()) - {"base", *ALGORITHMS}
            if unknown:
                raise UserError(
                    f"study: decoding {name!r} applies to unknown models {sorted(unknown)}; "
                    f"expected base or one of {sorted(ALGORITHMS)}"
                )
            if decoding.models is not None and not set(decoding.models) & {
                "base",
                *self.algorithms,
            }:
                raise UserError(
                    f"study: decoding {name!r} applies to {list(decoding.models)}: none of them "
                    "is in this study"
                )

    def arm_decodings(self) -> dict[str, dict]:
        """Each training arm's effective decoding (`algorithms.registry.decoding_spec`)."""
        return {a: _spec(self.recipe, self.train_overrides(a)) for a in self.algorithms}

    def eval_decodings(self) -> dict[str, dict]:
        return {n: _spec(self.recipe, self.eval_overrides(n)) for n in self.decodings}

    def train_overrides(self, algorithm: str) -> list[str]:
        return [f"softgrpo.algorithm={algorithm}", *self.overrides]

    def eval_overrides(self, decoding: str) -> list[str]:
        return [*self.decodings[decoding].overrides, *self.overrides]  # the study's win

    def validate_jobs(self) -> None:
        """Every job's recipe passes `validate` before any job starts."""
        recipes = [(self.train_overrides(a), True) for a in self.algorithms]
        recipes += [(self.eval_overrides(n), False) for n in self.decodings]
        for overrides, training in recipes:
            loaded = load_recipe(self.recipe, overrides)
            validate(loaded, cluster_world_size(loaded.cfg.cluster), training)

    def exploration_mismatches(self, arms: dict[str, dict] | None = None) -> list[str]:
        """How the arms' exploring phases differ, one 'key=value' list per arm; [] when alike.
        `arms`: `arm_decodings()` when the caller has it already."""
        arms = self.arm_decodings() if arms is None else arms
        differs = [
            key for key in EXPLORATION_KEYS if len({json.dumps(s[key]) for s in arms.values()}) > 1
        ]
        if not differs:
            return []
        return [
            f"{a} " + ", ".join(f"{exploring_section(s)}.{k}={s[k]}" for k in differs)
            for a, s in arms.items()
        ]

    def check_exploration(self) -> None:
        mismatches = self.exploration_mismatches()
        if mismatches and not self.allow_mismatched_exploration:
            raise UserError(
                "study: the training arms explore differently ("
                + "; ".join(mismatches)
                + "); set them equal, or pass --allow-mismatched-exploration"
            )

    def manifest(self) -> dict:
        asked = asdict(self) | {"recipe": str(Path(self.recipe).resolve())}
        return json.loads(json.dumps(asked))  # tuples as lists, as read back


def exploring_section(spec: dict) -> str:
    """The recipe section a decoding explores with: the thinking sampler's, or the discrete one's."""
    return "policy.generation" if spec["answer"] is None else "softgrpo.thinking"


def _spec(recipe: str, overrides: Sequence[str]) -> dict:
    cfg = load_recipe(recipe, list(overrides)).cfg
    return decoding_spec(cfg.softgrpo, cfg.policy.generation)


GROWING = ("algorithms", "seeds", "decodings")  # a rerun may add to these (a third arm, a seed)


def check_manifest(spec: StudySpec, out: Path) -> None:
    """Write study.json, or check a rerun against it: the same recipe and overrides, and every
    algorithm, seed and decoding it ran (with the same definition); new ones join the study, and
    its jobs that are done are kept."""
    path = out / "study.json"
    asked = spec.manifest()
    if path.is_file():
        stored = json.loads(path.read_text())
        for key, value in asked.items():
            kept = stored.get(key)
            if key in GROWING and _extends(kept, value):
                continue
            if kept != value:
                rule = (
                    "a rerun may add to it, not change or drop what ran"
                    if key in GROWING
                    else "use another --out, or the same settings to continue it"
                )
                raise UserError(
                    f"{path}: this study ran with {key}={json.dumps(kept)}, now "
                    f"{json.dumps(value)}; {rule}"
                )
        if asked == stored:
            return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asked, indent=1) + "\n")


def _extends(kept, asked) -> bool:
    """`asked` holds everything of `kept` (a list's items; a mapping's entries, unchanged)."""
    if isinstance(kept, dict) and isinstance(asked, dict):
        return all(name in asked and asked[name] == value for name, value in kept.items())
    return isinstance(kept, list) and isinstance(asked, list) and set(kept) <= set(asked)
