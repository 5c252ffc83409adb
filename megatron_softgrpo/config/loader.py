"""Recipe loading: a `defaults:` chain of YAML files, Hydra-style dotted overrides, typed validation.

Merging keeps the provenance of every leaf (the file, or "command line", that set it),
so a validation error can say exactly where the bad value came from:

    recipes/my.yaml: policy.megatron_cfg.tensor_model_parallel_size=abc: expected an integer
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from megatron_softgrpo.config.checks import check_recipe, validate
from megatron_softgrpo.config.recipe import MISSING, LoadedRecipe, lookup
from megatron_softgrpo.config.schema import RecipeCfg
from megatron_softgrpo.errors import ConfigError

COMMAND_LINE = "command line"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-6` (no dot) as a float, as users expect."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """Parse an override's value like a YAML scalar/flow value (`3`, `1e-6`, `[a,b]`, `null`)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}"
        )
    return data


def _leaf_sources(value: dict, source: str, prefix: str = "") -> dict[str, str]:
    """Provenance of every leaf (non-mapping value or empty mapping) in `value`: `source`."""
    out: dict[str, str] = {}
    for key, v in value.items():
        dotted = f"{prefix}{key}"
        if isinstance(v, dict) and v:
            out.update(_leaf_sources(v, source, dotted + "."))
        else:
            out[dotted] = source
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    """Dicts merge recursively; any other value in `over` replaces the one in `base`."""
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            _deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def _merge(base: dict, prov: dict[str, str], over: dict, over_prov: dict[str, str]) -> dict:
    """Merge `over` into `base`; update `prov` in place (a replaced subtree forgets its old sources)."""
    merged = _deep_merge(base, over)
    # forget sources of keys that are gone, or that were values and are now mappings (a.b=1 then a.b.c=2)
    for key in [
        k for k in prov if lookup(merged, k) is MISSING or isinstance(lookup(merged, k), dict)
    ]:
        del prov[key]
    prov.update(over_prov)
    return merged


def _load_chain(path: Path, prov: dict[str, str], seen: tuple[Path, ...]) -> dict:
    """The file merged over its `defaults:` (in order); fills `prov` for every key it sets."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"{path}: defaults chain has a cycle: {chain}")
    data = _read_yaml(path)
    defaults = data.pop("defaults", None)
    if isinstance(defaults, str):
        defaults = [defaults]
    if defaults is not None and not (
        isinstance(defaults, list) and all(isinstance(d, str) for d in defaults)
    ):
        raise ConfigError(
            f"{path}: defaults={defaults}: expected a file name or a list of file names"
        )
    merged: dict = {}
    for parent in defaults or []:
        parent_path = path.parent / (
            parent if parent.endswith((".yaml", ".yml")) else parent + ".yaml"
        )
        if not parent_path.is_file():
            raise ConfigError(f"{path}: defaults: {parent}: file {parent_path} not found")
        parent_prov: dict[str, str] = {}
        parent_data = _load_chain(parent_path, parent_prov, (*seen, path))
        merged = _merge(merged, prov, parent_data, parent_prov)
    return _merge(merged, prov, data, _leaf_sources(data, str(path)))


def apply_overrides(raw: dict, overrides: list[str], prov: dict[str, str]) -> dict:
    """Apply `a.b.c=value` overrides (a leading `+` is accepted, as in Hydra)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().lstrip("+")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            raise ConfigError(
                f"{COMMAND_LINE}: {item!r}: expected an override of the form dotted.key=value"
            )
        nested: Any = parse_value(text)
        for part in reversed(key.split(".")):
            nested = {part: nested}
        raw = _merge(raw, prov, nested, _leaf_sources(nested, COMMAND_LINE))
    return raw


def _format_validation_error(loaded: LoadedRecipe, err: ValidationError) -> ConfigError:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    dotted = ".".join(loc)
    kind = first["type"]
    if kind == "extra_forbidden":
        parent = ".".join(loc[:-1])
        allowed = _allowed_keys(parent)
        return ConfigError(
            f"{loaded.source_of(dotted)}: {dotted}: unknown key"
            + (
                f"; allowed keys in {parent or 'the recipe'}: {', '.join(allowed)}"
                if allowed
                else ""
            )
        )
    if kind == "missing":
        return ConfigError(f"{loaded.source_of(dotted)}: {dotted}: required key is missing")
    msg = first["msg"]
    if kind == "literal_error":
        msg = "expected one of " + msg.split("Input should be ", 1)[-1]
    else:
        msg = msg.replace("Input should be", "expected").replace("Input should", "expected to")
    return loaded.error(dotted, msg)


def _allowed_keys(dotted_parent: str) -> list[str]:
    model: Any = RecipeCfg
    for part in [p for p in dotted_parent.split(".") if p]:
        field_info = model.model_fields.get(part)
        if field_info is None:
            return []
        ann = field_info.annotation
        args = getattr(ann, "__args__", ())
        model = next(
            (a for a in (ann, *args) if isinstance(a, type) and hasattr(a, "model_fields")), None
        )
        if model is None:
            return []
    return sorted(model.model_fields)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> LoadedRecipe:
    """Load, merge and type-check a recipe, with the rules that need no model; any problem raises
    ConfigError (one line, exit code 2). A job's recipe then passes `config.checks.validate`."""
    path = Path(path)
    prov: dict[str, str] = {}
    raw = _load_chain(path, prov, ())
    raw = apply_overrides(raw, list(overrides or []), prov)
    loaded = LoadedRecipe(cfg=None, path=path, raw=raw, provenance=prov)  # type: ignore[arg-type]
    try:
        loaded.cfg = RecipeCfg.model_validate(raw)
    except ValidationError as e:
        raise _format_validation_error(loaded, e) from None
    check_recipe(loaded)
    return loaded


def load_checked_recipe(
    recipe: str, overrides: list[str], world_size: int | None, training: bool = False
) -> LoadedRecipe:
    """`load_recipe`, then `validate` for a job of `world_size` processes: every rule, before any
    weights are read. `training`: also the rules of `softgrpo train`."""
    loaded = load_recipe(recipe, overrides)
    validate(loaded, world_size, training)
    return loaded
