"""Recipe schema, loading, overrides and validation."""

from mtlcli.recipe.load import load_recipe, recipe_from_dict, recipe_from_text, recipe_to_yaml
from mtlcli.recipe.schema import Recipe

__all__ = ["Recipe", "load_recipe", "recipe_from_dict", "recipe_from_text", "recipe_to_yaml"]
