"""Recipes: YAML with a `defaults:` chain, dotted overrides, and a typed schema.

- `schema`: the typed sections (`RecipeCfg`);
- `recipe`: `LoadedRecipe`, the config with where each key was set;
- `loader`: `load_recipe` (files, overrides, types, model-free rules) and `load_checked_recipe`;
- `checks`: the cross-key rules, and `validate`, every rule a job must pass before it loads
  anything.

Import from the submodules: this package imports none of them, so that `schema` stays importable
from anywhere (the algorithm registry reads it, and the checks read the registry).
"""
