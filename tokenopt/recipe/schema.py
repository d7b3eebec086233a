"""Recipes: the YAML that says which pass runs on which layers, validated before any model is seen.

A recipe::

    version: 1
    strict: false          # true: a reduction too large for a layer is an error, not a warning
    prefix_tokens: 1       # override the detected number of cls/dist/register tokens
    outputs: logits        # logits | tokens
    rules:                 # in order; a later rule replaces an earlier one on the same layer
      - pass: tome
        layers: 4-11       # all | 5 | "4-11" | "0-3,8" | [0, 2, "5-7"] | "blocks.1*" | "re:blocks\\.(1|2)"
        r: 13              # every other key is an option of the pass (its pydantic Options)

:func:`load_recipe` checks everything that does not need a model (syntax, versions, pass names,
option types, selector syntax) and names the file and line of each mistake. Selectors are
matched against a model's blocks later, by :func:`resolve_layers`.
"""
from __future__ import annotations

import difflib
import fnmatch
import os
import re
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from tokenopt.errors import RecipeError
from tokenopt.passes import available_passes, get_pass
from tokenopt.passes.base import PassOptions

SUPPORTED_VERSIONS = (1,)
#: The schema version this tokenopt writes (``Recipe.to_dict``).
PASSES_SCHEMA_VERSION = SUPPORTED_VERSIONS[-1]
OUTPUTS = ("logits", "tokens")
TOP_LEVEL_KEYS = ("version", "strict", "prefix_tokens", "outputs", "rules")
RULE_KEYS = ("pass", "layers")  # every other key of a rule is an option of its pass


# --------------------------------------------------------------------------------------------
# Data


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
        """Plain data that :func:`load_recipe` accepts back.

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


# --------------------------------------------------------------------------------------------
# YAML with line numbers


class _Mapping(dict):
    """A YAML mapping that remembers its own line and the line of each key (1-based)."""

    line: int | None = None
    key_lines: dict


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings carry line numbers, and which refuses duplicate keys.

    PyYAML silently keeps the last of two equal keys; in a recipe that hides a typo-level
    mistake (two ``r:`` in one rule), so it is reported instead.
    """


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode):
    if not isinstance(node, yaml.MappingNode):  # `!!map x`
        raise yaml.constructor.ConstructorError(None, None, f"expected a mapping, but found a {node.id}",
                                                node.start_mark)
    data = _Mapping()
    data.line = node.start_mark.line + 1
    data.key_lines = {}
    yield data  # yield first, as PyYAML does, so recursive structures still work
    # `<<: *anchor` merge keys come first after flattening; the mapping's own keys may override
    # them, so only duplicates among its own keys are mistakes.
    own = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)
    merged = len(node.value) - own
    own_keys = set()
    for i, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                None, None, "a key cannot be a list or a mapping", key_node.start_mark)
        if i >= merged:
            if key in own_keys:
                raise yaml.constructor.ConstructorError(
                    None, None,
                    f"duplicate key {key!r} (first on line {data.key_lines[key]}); keep only one",
                    key_node.start_mark)
            own_keys.add(key)
        data[key] = loader.construct_object(value_node, deep=True)
        data.key_lines[key] = key_node.start_mark.line + 1


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _construct_object(loader: _LineLoader, node, deep=False):
    """PyYAML's constructors fail with plain Python errors (ValueError, KeyError, IndexError,
    AttributeError) on values such as ``2001-13-45`` (a timestamp), ``!!int abc``, ``!!bool maybe``,
    ``!!timestamp x``, ``!!int`` or an integer of more than 4300 digits; give them the node's line."""
    try:
        return yaml.SafeLoader.construct_object(loader, node, deep)
    except (yaml.YAMLError, RecursionError):
        raise
    except Exception as e:  # noqa: BLE001 - any failure to build a value is a mistake in the YAML
        kind = node.tag.rsplit(":", 1)[-1]
        value = node.value if isinstance(node.value, str) else ""
        shown = repr(value if len(value) <= 40 else value[:37] + "...")
        # Python's own reason helps for numbers and dates ("month must be in 1..12"), not elsewhere
        why = f" ({_lower(str(e).split(';')[0])})" if isinstance(e, (ValueError, OverflowError)) and value \
            and kind in ("int", "float", "timestamp") else ""
        raise yaml.constructor.ConstructorError(
            None, None, f"cannot read {shown} as {'an' if kind[:1] in 'aeiou' else 'a'} {kind}{why}; "
            f"write a valid {kind}, or quote it to keep it as text", node.start_mark) from None


_LineLoader.construct_object = _construct_object


def _line_of(mapping, key=None) -> int | None:
    """The line of ``mapping[key]`` (or of the mapping), when the recipe came from YAML."""
    if not isinstance(mapping, _Mapping):
        return None
    if key is not None and key in mapping.key_lines:
        return mapping.key_lines[key]
    return mapping.line


def _at(source: str, line: int | None) -> str:
    return source if line is None else f"{source}, line {line}"


def _parse_yaml(text: str, source: str):
    try:
        return yaml.load(text, Loader=_LineLoader)  # noqa: S506 - _LineLoader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "invalid YAML"
        if e.context and e.problem:
            # an unclosed bracket or quote is reported where parsing gave up; where it opened helps
            cm = e.context_mark
            opened = f" (started on line {cm.line + 1})" if cm and mark and cm.line != mark.line else ""
            problem = f"{e.context}{opened}; {e.problem}"
        loc = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
        # constructor errors (duplicate keys) are about content; the rest are syntax
        hint = "" if isinstance(e, yaml.constructor.ConstructorError) else \
            "\n  Check the indentation and quoting near that line."
        raise RecipeError(f"{loc}: could not parse YAML: {problem}.{hint}") from None
    except yaml.reader.ReaderError as e:  # a control character; the position is an offset in the text
        if not isinstance(e.character, int):
            raise RecipeError(f"{source}: could not parse YAML: {e}") from None
        before = text[:e.position]
        line, column = before.count("\n") + 1, e.position - before.rfind("\n")
        raise RecipeError(f"{source}, line {line}, column {column}: could not parse YAML: the character "
                          f"{chr(e.character)!r} (#x{e.character:04x}) is not allowed in YAML.\n"
                          "  Remove it, or write it as an escape in a double-quoted string.") from None
    except yaml.YAMLError as e:  # no position known
        raise RecipeError(f"{source}: could not parse YAML: {e}") from None
    except RecursionError:  # PyYAML composes and constructs nested nodes recursively
        raise RecipeError(f"{source}: could not parse YAML: brackets or indentation nested too deeply.\n"
                          "  A recipe needs only a few levels (rules, a rule, an option).") from None
    except Exception as e:  # noqa: BLE001 - a constructor failed outside _construct_object: no line known
        raise RecipeError(f"{source}: could not parse YAML: {type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------------------------
# Loading and validation


def _suggest(word, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_recipe(recipe: str | os.PathLike | dict | Recipe) -> Recipe:
    """Read and validate a recipe from a file path, YAML text, a dict, or return a Recipe as is."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return _from_data(recipe, "<dict>")
    if isinstance(recipe, os.PathLike) or (isinstance(recipe, str) and (
            ("\n" not in recipe and recipe.endswith((".yaml", ".yml"))) or _is_file(recipe))):
        return _from_file(Path(recipe))
    if isinstance(recipe, str):
        data = _parse_yaml(recipe, "<string>")
        if isinstance(data, str) and "\n" not in recipe.strip():
            # A lone word is far more likely a mistyped file name than a YAML recipe.
            raise RecipeError(f"recipe file not found: {recipe}\n"
                              "  Check the spelling of the path, or pass the recipe as YAML text or a dict.")
        return _from_data(data, "<string>")
    raise RecipeError(f"a recipe must be a file path, YAML text, a dict or a Recipe, "
                      f"not {type(recipe).__name__}")


def _is_file(s: str) -> bool:
    # YAML text can be long or multi-line; only a plausible path is worth a stat call.
    try:
        return "\n" not in s and len(s) < 4096 and Path(s).is_file()
    except (OSError, ValueError):
        return False


def _from_file(path: Path) -> Recipe:
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except (OSError, ValueError) as e:  # a name too long, a NUL byte
        name = str(path) if len(str(path)) <= 80 else str(path)[:77] + "..."
        raise RecipeError(f"cannot read recipe file {name}: {getattr(e, 'strerror', None) or e}.\n"
                          "  Check the path, or pass the recipe as YAML text or a dict.") from None
    if not exists:
        raise RecipeError(f"recipe file not found: {path}"
                          + ("" if path.is_absolute() else f" (relative to {Path.cwd()})")
                          + "\n  Check the spelling of the path, or pass the recipe as YAML text or a dict.")
    if is_dir:
        raise RecipeError(f"recipe path is a directory, not a file: {path}\n"
                          "  Name the .yaml file inside it.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read recipe file {path}: {e}") from None
    return _from_data(_parse_yaml(text, str(path)), str(path))


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
    _check_selector(rule.layers, where)

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


def _lower(msg: str) -> str:
    return msg[:1].lower() + msg[1:]


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


# --------------------------------------------------------------------------------------------
# Layer selectors

_RANGES = re.compile(r"\s*\d+\s*(-\s*\d+\s*)?(,\s*\d+\s*(-\s*\d+\s*)?)*")
_RANGE_CHARS = re.compile(r"[\d\s,\-]+")


def _check_selector(selector, where: str) -> None:
    """Syntax only: whether the selector can match anything is known once a model is."""
    _parse(selector, where, top=True)


def _parse(selector, where: str, top: bool):
    """A selector as ("all",) | ("indices", [range, ..]) | ("glob", pat) | ("re", compiled) | ("any", [..]).

    Index ranges stay ``range`` objects: "0-999999999999" must not become a list before the model
    says how many blocks there are."""
    bad = f"{where}: invalid layers selector {selector!r}"
    forms = ('  Use all, first-half, second-half, an index (5), a range ("4-11"), a list ("0-3,8" or [0, 2, 5]), '
             'a glob on block paths ("blocks.1*"), or "re:<regex>".')
    if isinstance(selector, bool) or selector is None:
        raise RecipeError(f"{bad}.\n{forms}")
    if isinstance(selector, int):
        if selector < 0:
            raise RecipeError(f"{bad}: layer indices start at 0.\n{forms}")
        return ("indices", [range(selector, selector + 1)])
    if isinstance(selector, list):
        if not top or not selector:
            raise RecipeError(f"{bad}: {'an empty list' if not selector else 'lists cannot nest'}.\n{forms}")
        return ("any", [_parse(s, where, top=False) for s in selector])
    if not isinstance(selector, str) or not selector.strip():
        raise RecipeError(f"{bad}.\n{forms}")
    s = selector.strip()
    if s == "all":
        return ("all",)
    if s in ("first-half", "second-half"):
        # depth-relative, so one recipe fits models of any depth (ToFu's prune-early rule)
        return ("half", s)
    if s.startswith("re:"):
        try:
            return ("re", re.compile(s[3:]))
        except (re.error, OverflowError, RecursionError) as e:
            why = "groups nested too deeply" if isinstance(e, RecursionError) else e
            raise RecipeError(f"{bad}: not a valid regular expression ({why}).") from None
    # Digits, dashes and commas only can never be a block path glob, so they must be ranges.
    if _RANGE_CHARS.fullmatch(s):
        if not _RANGES.fullmatch(s):
            raise RecipeError(f"{bad}: write ranges as \"4-11\" or \"0-3,8\".\n{forms}")
        indices = []
        for part in s.split(","):
            lo, _, hi = part.partition("-")
            try:
                lo, hi = int(lo), int(hi or lo)
            except ValueError:  # more digits than Python converts (4300)
                raise RecipeError(f"{where}: invalid layers selector: a layer index of {len(s)} digits.\n"
                                  f"{forms}") from None
            if hi < lo:
                raise RecipeError(f"{bad}: range {part.strip()!r} runs backwards; write it as {hi}-{lo}.")
            indices.append(range(lo, hi + 1))
        return ("indices", indices)
    return ("glob", s)


def _abbreviate(paths: list[str], keep: int = 3) -> str:
    if len(paths) <= 2 * keep:
        return ", ".join(paths)
    return ", ".join(paths[:keep]) + f", ... ({len(paths) - 2 * keep} more), " + ", ".join(paths[-keep:])


def resolve_layers(selector, block_paths: list[str], where: str) -> list[int]:
    """The sorted, unique block indices that ``selector`` picks among ``block_paths``.

    Every part of a selector must pick at least one block: a glob that matches nothing is
    almost always a misspelt path, and silently doing nothing would hide it.
    """
    n = len(block_paths)
    available = f"the model has {n} blocks (0-{n - 1}): {_abbreviate(block_paths)}" if n \
        else "the model has no transformer blocks"

    def pick(parsed) -> set[int]:
        kind = parsed[0]
        if kind == "all":
            return set(range(n))
        if kind == "half":
            return set(range(n // 2)) if parsed[1] == "first-half" else set(range(n // 2, n))
        if kind == "any":
            return set().union(*(pick(p) for p in parsed[1]))
        if kind == "indices":
            out = [max(r.start, n) for r in parsed[1] if r.stop > n]   # the first index past the last block
            if out:
                raise RecipeError(f"{where}: layers {selector!r}: index {out[0]} is out of range; {available}.")
            return {i for r in parsed[1] for i in r}
        if kind == "glob":
            hits = {i for i, p in enumerate(block_paths) if fnmatch.fnmatchcase(p, parsed[1])}
            what = f"glob {parsed[1]!r}"
        else:
            hits = {i for i, p in enumerate(block_paths) if parsed[1].fullmatch(p)}
            what = f"regex {parsed[1].pattern!r}"
        if not hits:
            raise RecipeError(f"{where}: layers {selector!r}: {what} matches no block; {available}.")
        return hits

    chosen = pick(_parse(selector, where, top=True))
    if not chosen:
        raise RecipeError(f"{where}: layers {selector!r} selects no block; {available}.")
    return sorted(chosen)
