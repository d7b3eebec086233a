"""Recipes: the YAML that says which pass runs on which layers, validated before any model is seen.

A recipe::

    version: 1
    strict: false          # true: a reduction too large for a layer is an error, not a warning
    prefix_tokens: 1       # override the detected number of cls/dist/register tokens
    outputs: logits        # logits | tokens
    rules:                 # in order; a later rule replaces an earlier one on the same layer
      - pass: tome
        layers: 4-11       # all | 5 | "4-11" | "0-3,8" | stage3 | [0, 2, "5-7"] | "blocks.1*" | "re:blocks\\.(1|2)"
        r: 13              # every other key is an option of the pass (its pydantic Options)

    loader     a file path, YAML text or a dict -> plain data whose mappings know their lines
    schema     Recipe, Rule, the top-level keys and versions: validation, with the file and line of each mistake
    selectors  the ``layers:`` grammar; `resolve_layers` picks a model's blocks once it is known
"""
from tokenopt.recipe.schema import (OUTPUTS, PASSES_SCHEMA_VERSION, RULE_KEYS, SUPPORTED_VERSIONS, TOP_LEVEL_KEYS,
                                    Recipe, Rule, load_recipe)
from tokenopt.recipe.selectors import resolve_layers

__all__ = ["OUTPUTS", "PASSES_SCHEMA_VERSION", "RULE_KEYS", "SUPPORTED_VERSIONS", "TOP_LEVEL_KEYS", "Recipe", "Rule",
           "load_recipe", "resolve_layers"]
