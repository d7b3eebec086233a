"""The recipe schema: top-level keys, versions, rules and their pass options, validated.

[`load_recipe`][tokenopt.recipe.load_recipe] checks everything that does not need a model (syntax, versions, pass names,
option types, selector syntax) and names the file and line of each mistake; the data comes from
`tokenopt.recipe.loader`, the selector syntax from `tokenopt.recipe.selectors`.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass

import yaml
from pydantic import ValidationError

from tokenopt.errors import RecipeError
from tokenopt.passes import available_passes, get_pass
from tokenopt.passes.base import PassOptions
from tokenopt.recipe.loader import at as _at, line_of as _line_of, lower_first as _lower, read_data
from tokenopt.recipe.selectors import check_selector

SUPPORTED_VERSIONS = (1,)
#: The schema version this tokenopt writes (``Recipe.to_dict``).
PASSES_SCHEMA_VERSION = SUPPORTED_VERSIONS[-1]
OUTPUTS = ("logits", "tokens")
TOP_LEVEL_KEYS = ("version", "strict", "prefix_tokens", "outputs", "rules")
RULE_KEYS = ("pass", "layers")  # every other key of a rule is an option of its pass


@dataclass
class Rule:
    """One entry of ``rules``: a pass, the layers it selects, and its validated options."""

    pass_name: str
    layers: object = "all"
    options: PassOptions | None = None
    index: int = 0                 # 0-based; messages show it 1-based ("rule 1" is the first)
    line: int | None = None        # 1-based YAML line, None when the recipe came from a dict

    def where(self, source: str) -> str:
        """Where this rule is, for messages: ``recipe.yaml, line 7 (rule 2, pass tome)``."""
        what = f"rule {self.index + 1}, pass {self.pass_name}"
        if self.line is None:
            return f"{source} ({what})"
        return f"{source}, line {self.line} ({what})"


@dataclass
class Recipe:
    version: int
    rules: list[Rule]
    strict: bool = False
    prefix_tokens: int | None = None
    outputs: str = "logits"
    source: str = "<dict>"

    def to_dict(self) -> dict:
        """Plain data that [`load_recipe`][tokenopt.recipe.load_recipe] accepts back.

        Options are written in full (defaults included) so that a saved model replays the same
        rewrite even if a later tokenopt changes a default.
        """
        out: dict = {"version": self.version, "strict": self.strict}
        if self.prefix_tokens is not None:
            out["prefix_tokens"] = self.prefix_tokens
        out["outputs"] = self.outputs
        out["rules"] = [
            {"pass": r.pass_name, "layers": r.layers, **r.options.model_dump(mode="json")}
            for r in self.rules
        ]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


def _suggest(word, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_recipe(recipe: str | os.PathLike | dict | Recipe) -> Recipe:
    """Read and validate a recipe from a file path, YAML text, a dict, or return a Recipe as is."""
    if isinstance(recipe, Recipe):
        return recipe
    return _from_data(*read_data(recipe))


#: Limits of what a recipe can hold; real recipes stay far below them. Past them, messages that
#: quote a value, and the checks themselves, would take a traceback (RecursionError, an int too
#: long to print) or exponential time (YAML aliases of aliases expand like a "billion laughs").
MAX_DEPTH, MAX_VALUES, MAX_INT_BITS = 32, 100_000, 10_000    # 10_000 bits: about 3000 digits


def _check_values(data, source: str) -> None:
    """Refuse data no recipe needs: nested too deep (or containing itself), too many values once
    YAML aliases are expanded, or integers too long to print."""
    def huge(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > MAX_INT_BITS

    def where(line, path: tuple) -> str:    # path: dict keys, and [i] for list items
        shown = "".join(p if isinstance(p, str) and p.startswith("[") else "." + ("<number>" if huge(p) else str(p))
                        for p in path).lstrip(".")
        return _at(source, line) + (f" (at {shown})" if shown else "")

    count = 0
    todo = [(data, 0, None, ())]      # (value, depth, line of the nearest key, path)
    while todo:
        value, depth, line, path = todo.pop()
        count += 1
        if count > MAX_VALUES:
            raise RecipeError(f"{source}: the recipe holds more than {MAX_VALUES} values once its YAML aliases "
                              "(*name) are expanded.\n  Write the rules out without nesting aliases.")
        if depth > MAX_DEPTH:
            raise RecipeError(f"{where(line, path)}: values nested more than {MAX_DEPTH} levels deep "
                              "(or a YAML alias inside its own anchor).\n  A recipe needs only a few levels.")
        if huge(value):
            raise RecipeError(f"{where(line, path)}: a whole number of about {int(value.bit_length() * 0.30103)} "
                              "digits; no recipe value is that large.")
        if isinstance(value, dict):
            for k, v in value.items():
                below = (_line_of(value, k) or line, (*path, k))
                todo.extend([(v, depth + 1, *below), (k, depth + 1, *below)])
        elif isinstance(value, (list, tuple, set, frozenset)):
            todo.extend((v, depth + 1, line, (*path, f"[{i}]")) for i, v in enumerate(value))


def _from_data(data, source: str) -> Recipe:
    _check_values(data, source)
    if not isinstance(data, dict):
        kind = type(data).__name__
        got = "an empty document" if data is None else f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"
        raise RecipeError(f"{source}: a recipe must be a mapping with 'version' and 'rules', got {got}.\n"
                          "  Start the file with `version: 1` and a `rules:` list.")

    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise RecipeError(f"{_at(source, _line_of(data, key))}: unknown top-level key {key!r}"
                              f"{_suggest(key, TOP_LEVEL_KEYS)}.\n"
                              f"  Valid keys: {', '.join(TOP_LEVEL_KEYS)}.")

    supported = ", ".join(map(str, SUPPORTED_VERSIONS))
    if "version" not in data:
        raise RecipeError(f"{_at(source, _line_of(data))}: the recipe has no 'version'.\n"
                          f"  Add `version: {PASSES_SCHEMA_VERSION}` at the top.")
    version = data["version"]
    # type() rather than isinstance: bool is an int, and neither `yes` nor 1.0 is a version.
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise RecipeError(f"{_at(source, _line_of(data, 'version'))}: unsupported recipe version "
                          f"{version!r}; this tokenopt reads version {supported}.\n"
                          "  Rewrite the recipe for a supported version, or upgrade tokenopt.")

    strict = data.get("strict", False)
    if not isinstance(strict, bool):
        raise RecipeError(f"{_at(source, _line_of(data, 'strict'))}: 'strict' must be true or false, "
                          f"got {strict!r}.")
    prefix = data.get("prefix_tokens")
    if prefix is not None and (isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0):
        raise RecipeError(f"{_at(source, _line_of(data, 'prefix_tokens'))}: 'prefix_tokens' must be a "
                          f"whole number >= 0 (or left out to detect it), got {prefix!r}.")
    outputs = data.get("outputs", "logits")
    if outputs not in OUTPUTS:
        raise RecipeError(f"{_at(source, _line_of(data, 'outputs'))}: 'outputs' must be one of "
                          f"{', '.join(OUTPUTS)}, got {outputs!r}.")

    raw_rules = data.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        what = "has no 'rules'" if "rules" not in data else "'rules' must be a non-empty list"
        raise RecipeError(f"{_at(source, _line_of(data, 'rules'))}: the recipe {what}.\n"
                          "  Add at least one rule, e.g.\n"
                          "    rules:\n      - pass: tome\n        layers: all\n        r: 8")
    rules_line = _line_of(data, "rules")
    rules = [_rule(raw, i, source, rules_line) for i, raw in enumerate(raw_rules)]
    return Recipe(version, rules, strict, prefix, outputs, source)


def _rule(raw, index: int, source: str, rules_line: int | None) -> Rule:
    n = index + 1
    if not isinstance(raw, dict):
        # A scalar list item has no line of its own; the `rules:` line is the nearest we know.
        raise RecipeError(f"{_at(source, rules_line)} (rule {n}): a rule must be a mapping like "
                          f"`- pass: tome`, got {raw!r}.")
    line = _line_of(raw)
    if "pass" not in raw:
        raise RecipeError(f"{_at(source, line)} (rule {n}): the rule has no 'pass'.\n"
                          f"  Add `pass: NAME`; available passes: {', '.join(available_passes())}.")
    name = raw["pass"]
    if name not in available_passes():
        raise RecipeError(f"{_at(source, _line_of(raw, 'pass'))} (rule {n}): unknown pass {name!r}"
                          f"{_suggest(name, available_passes())}.\n"
                          f"  Available passes: {', '.join(available_passes())}.")
    rule = Rule(name, raw.get("layers", "all"), None, index, line)
    where = rule.where(source)
    check_selector(rule.layers, where)

    options_cls = get_pass(name).Options
    options = {k: v for k, v in raw.items() if k not in RULE_KEYS}
    valid = list(options_cls.model_fields)
    for key in options:
        if key not in valid:
            raise RecipeError(f"{_at(source, _line_of(raw, key))} (rule {n}, pass {name}): unknown option "
                              f"{key!r}{_suggest(key, valid)}.\n"
                              f"  Options of {name}: {', '.join(RULE_KEYS + tuple(valid))}.")
    try:
        rule.options = options_cls(**{str(k): v for k, v in options.items()})
    except ValidationError as e:
        raise RecipeError(f"{where}: {_explain(e, options_cls, options)}") from None
    return rule


def _explain(error: ValidationError, options_cls, given: dict) -> str:
    """One line per bad field instead of pydantic's multi-line dump.

    A Union field (ToMe's ``r``) yields one error per alternative; the field's description says
    what is accepted far better than any one of them, so it is used when there is one.
    """
    by_field: dict[str, list[dict]] = {}
    for err in error.errors():
        by_field.setdefault(str(err["loc"][0]) if err["loc"] else "?", []).append(err)
    parts = []
    for name, errs in by_field.items():
        info = options_cls.model_fields.get(name)
        if not errs[0]["loc"] and errs[0]["type"] == "value_error":   # a rule across options (a model validator)
            parts.append(str(errs[0]["ctx"]["error"]))
            continue
        if errs[0]["type"] == "missing" and len(errs[0]["loc"]) == 1:
            hint = f" ({info.description})" if info and info.description else ""
            parts.append(f"option {name!r} is required{hint}")
            continue
        value = given.get(name)
        if len(errs) > 1 and info and info.description:
            text = f"option {name!r} = {value!r} is not valid (expected {info.description})"
            # the alternative that got furthest inside the value says most about what is off
            deep = max(errs, key=lambda e: len(e["loc"]))
            if len(deep["loc"]) > 2:
                at = ".".join(str(p) for p in deep["loc"][2:])
                text += f"; at {at}: {_lower(deep['msg'])}"
        else:
            err = errs[0]
            at = ".".join(str(p) for p in err["loc"][1:])
            text = f"option {name!r} = {value!r}: {_lower(err['msg'])}" + (f" (at {at})" if at else "")
        parts.append(text)
    return "; ".join(parts) + "."
