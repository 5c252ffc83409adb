"""Recipes: YAML with a `defaults:` chain, dotted overrides, and a typed schema."""

from megatron_softgrpo.config.loader import LoadedRecipe, load_recipe
from megatron_softgrpo.config.schema import RecipeCfg

__all__ = ["LoadedRecipe", "RecipeCfg", "load_recipe"]
