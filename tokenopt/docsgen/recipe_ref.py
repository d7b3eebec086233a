"""The recipe reference, from the schema: every top-level key and every option of every pass.

For each key: its type, default and allowed values read from the pydantic field (or, for the
top level, from :mod:`tokenopt.recipe`'s constants), its description, and the error it raises.
The error is not written here: a recipe with a bad value for that key (the first of a few
candidates that the loader refuses) is validated by :func:`tokenopt.recipe.load_recipe`, and its
message is quoted as is.

:func:`check_reference` fails when the schema has a key the rendered reference does not list,
so the build stops instead of shipping a reference that lags the code.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from tokenopt import recipe as recipe_mod
from tokenopt.errors import TokenoptError
from tokenopt.passes import available_passes, get_pass

#: Bad values tried in this order; the first one the loader refuses is the example error.
#: -1 first: below every lower bound and of the wrong type for booleans, strings and choices.
BAD_VALUES = (-1, "nonsense", {"unexpected": 1}, [], 0.5, True)
RECIPE_FILE = "recipe.yaml"       # the name the quoted errors show


class ReferenceError_(AssertionError):
    """The rendered reference lacks keys the schema has."""


@dataclass
class KeyDoc:
    path: str                 # "r", "selector.kernel"
    type: str
    default: str
    allowed: str
    description: str
    bad_value: object = None
    error: str = ""


# ------------------------------------------------------------------------------ reading types


def _type_text(ann) -> str:
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if ann is type(None):
        return "null"
    if origin is typing.Annotated:
        return _type_text(args[0])
    if origin is typing.Literal:
        return " | ".join(repr(a) if not isinstance(a, str) else a for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a) for a in args)
    if origin in (list, tuple, set):
        return f"list of {_type_text(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "mapping: " + ", ".join(ann.model_fields)
    return getattr(ann, "__name__", str(ann))


def _bounds(metas) -> list[str]:
    out = []
    for m in metas:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} {v}")
        if getattr(m, "min_length", None):
            out.append(f"at least {m.min_length} item(s)")
    return out


def _describe(ann, metas=()) -> str:
    """A type with its bounds, e.g. ``int >= 0`` or ``list of int >= 0, at least 1 item(s)``."""
    metas = list(metas)
    if typing.get_origin(ann) is typing.Annotated:
        ann, *more = typing.get_args(ann)
        metas += more
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return "; ".join(_describe(a) for a in typing.get_args(ann))
    if typing.get_origin(ann) is typing.Literal:
        return ", ".join(f"`{a}`" for a in typing.get_args(ann))
    if ann is bool:
        return "`true`, `false`"
    if typing.get_origin(ann) is list:
        item = typing.get_args(ann)[0] if typing.get_args(ann) else None
        bounds = _bounds(metas)
        return f"list of {_describe(item) if item is not None else 'values'}" + (f", {', '.join(bounds)}" if bounds else "")
    if _nested_model(ann) is not None:
        return "mapping: " + ", ".join(f"`{k}`" for k in ann.model_fields)
    bounds = _bounds(metas)
    return _type_text(ann) + (" " + " and ".join(bounds) if bounds else "")


def _allowed(info: FieldInfo, ann) -> str:
    return _describe(ann, info.metadata)


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
        if isinstance(value, BaseModel):
            return "see the keys below"
        return f"`{value!r}`"
    if info.default is PydanticUndefined:
        return "**required**"
    return f"`{yaml.safe_dump(info.default, default_flow_style=True).strip().removesuffix('...').strip()}`"


def _nested_model(ann) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    return None


def option_keys(options_cls: type[BaseModel], prefix: str = "") -> list[KeyDoc]:
    """One KeyDoc per option, nested models (ToSA's selector) flattened to ``selector.kernel``."""
    docs = []
    for name, info in options_cls.model_fields.items():
        ann = info.annotation
        path = prefix + name
        nested = _nested_model(ann)
        desc = info.description or (f"a mapping of the `{path}.*` keys below" if nested is not None else "")
        docs.append(KeyDoc(path, _type_text(ann), _default(info), _allowed(info, ann), desc))
        if nested is not None:
            docs.extend(option_keys(nested, path + "."))
    return docs


def schema_keys() -> dict[str, list[str]]:
    """Every key a recipe can hold: {"recipe": top-level keys, "rule": pass/layers, pass: options}."""
    out = {"recipe": list(recipe_mod.TOP_LEVEL_KEYS), "rule": list(recipe_mod.RULE_KEYS)}
    for name in available_passes():
        out[name] = [k.path for k in option_keys(get_pass(name).Options)]
    return out


# ------------------------------------------------------------------------------ real errors


@contextlib.contextmanager
def _in_tempdir():
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="tokenopt-ref-") as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(old)


def _error_of(data: dict) -> str | None:
    """The loader's message for ``data`` written as a recipe file, or None when it loads."""
    with _in_tempdir():
        Path(RECIPE_FILE).write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None))
        try:
            recipe_mod.load_recipe(Path(RECIPE_FILE))
        except TokenoptError as e:
            return str(e)
    return None


def _set(rule: dict, path: str, value) -> dict:
    out = dict(rule)
    head, _, rest = path.partition(".")
    if rest:
        inner = dict(out.get(head) or {})
        out[head] = _set(inner, rest, value)
    else:
        out[head] = value
    return out


def _find_error(make) -> tuple[object, str]:
    for bad in BAD_VALUES:
        msg = _error_of(make(bad))
        if msg is not None:
            return bad, msg
    return None, ""


def base_rule(name: str, recipes_dir: Path) -> dict:
    """A valid rule of pass ``name``: the first one in the shipped recipes."""
    for path in sorted(recipes_dir.glob("*.yaml")):
        for rule in (yaml.safe_load(path.read_text()) or {}).get("rules", []):
            if rule.get("pass") == name:
                return dict(rule)
    raise LookupError(f"no shipped recipe in {recipes_dir} uses pass {name!r}; the reference needs one valid rule")


def collect(recipes_dir: Path) -> dict[str, list[KeyDoc]]:
    """The reference's content, errors included (each found by validating a bad value)."""
    top = {"version": ("int", "**required**", ", ".join(map(str, recipe_mod.SUPPORTED_VERSIONS)),
                       "schema version of the recipe"),
           "strict": ("bool", "`false`", "`true`, `false`",
                      "true: a layer that cannot take the requested reduction is an error, not a warning"),
           "prefix_tokens": ("int", "detected", ">= 0",
                             "override the detected number of cls/distillation/register tokens"),
           "outputs": ("string", f"`{recipe_mod.OUTPUTS[0]}`", ", ".join(f"`{o}`" for o in recipe_mod.OUTPUTS),
                       "logits: the model's own output; tokens: every patch token in its original position"),
           "rules": ("list of rules", "**required**", "at least one rule", "applied in order; a later rule "
                     "replaces an earlier one on the same block")}
    first_pass = available_passes()[0]
    valid_rule = base_rule(first_pass, recipes_dir)
    base = {"version": recipe_mod.PASSES_SCHEMA_VERSION, "rules": [valid_rule]}
    out: dict[str, list[KeyDoc]] = {"recipe": [], "rule": []}
    for key in recipe_mod.TOP_LEVEL_KEYS:
        typ, default, allowed, desc = top.get(key, ("?", "?", "?", ""))
        bad, msg = _find_error(lambda v, k=key: {**base, k: v})
        out["recipe"].append(KeyDoc(key, typ, default, allowed, desc, bad, msg))
    rule_desc = {"pass": ("string", "**required**", ", ".join(f"`{p}`" for p in available_passes()),
                          "the pass this rule runs"),
                 "layers": ("selector", "`all`", "`all`, `first-half`, `second-half`, an index, a range `\"4-11\"`, "
                            "a stage `stage3` or `stage3-4` (1-based), a list, a glob on block paths, "
                            "`\"re:<regex>\"`", "the blocks the rule applies to")}
    for key in recipe_mod.RULE_KEYS:
        typ, default, allowed, desc = rule_desc.get(key, ("?", "?", "?", ""))
        bad, msg = _find_error(lambda v, k=key: {**base, "rules": [{**valid_rule, k: v}]})
        out["rule"].append(KeyDoc(key, typ, default, allowed, desc, bad, msg))
    for name in available_passes():
        rule = base_rule(name, recipes_dir)
        docs = option_keys(get_pass(name).Options)
        for d in docs:
            d.bad_value, d.error = _find_error(
                lambda v, p=d.path: {**base, "rules": [_set(rule, p, v)]})
        out[name] = docs
    return out


# ------------------------------------------------------------------------------ markdown


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _text_cell(s: str) -> str:
    """A cell of prose: as ``_cell``, and braces as entities, since attr_list reads a trailing
    ``{start, end}`` as attributes and removes it from the page."""
    return _cell(s).replace("{", "&#123;").replace("}", "&#125;")


def _error_cell(d: KeyDoc) -> str:
    if not d.error:
        return "—"
    value = yaml.safe_dump(d.bad_value, default_flow_style=True).strip().removesuffix("...").strip()
    return f"`{_cell(value)}` → <code>{_html(d.error)}</code>"


def _html(s: str) -> str:
    return (s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")
            .replace("\n", "<br>"))


def key_table(docs: list[KeyDoc]) -> list[str]:
    """The keys as a Markdown table: type, default, allowed values, what each does."""
    lines = ["| key | type | default | allowed | what it does |", "|---|---|---|---|---|"]
    for d in docs:
        lines.append(f"| `{d.path}` | {_text_cell(d.type)} | {_text_cell(d.default)} | {_text_cell(d.allowed)} | "
                     f"{_text_cell(d.description)} |")
    return lines


def _table(docs: list[KeyDoc]) -> list[str]:
    lines = key_table(docs)
    lines += ["", "Errors, one bad value per key:", ""]
    for d in docs:
        if not d.error:
            lines += [f"- `{d.path}`: no bad value found among {', '.join(map(repr, BAD_VALUES))}", ""]
            continue
        value = yaml.safe_dump(d.bad_value, default_flow_style=True).strip().removesuffix("...").strip()
        lines += [f"- `{d.path}: {value}`", "", "    ``` { .text .wrap .nocopy }",
                  *[f"    {line}" for line in d.error.splitlines()], "    ```", ""]
    return lines


def render(content: dict[str, list[KeyDoc]], titles: dict[str, str] | None = None) -> str:
    titles = titles or {}
    out = ["# Recipe reference", "",
           "Generated from the recipe schema (`tokenopt/recipe/` and each pass's pydantic `Options`) when "
           "the site is built. Each error was produced by writing the bad value shown into a recipe file "
           f"(`{RECIPE_FILE}`) and loading it with `tokenopt.recipe.load_recipe`; the message is quoted "
           "as tokenopt prints it (`tokenopt validate` and `apply` show the same text after `error:`).", "",
           "A recipe's own guide, with layer selectors and schedules: [Recipes](../recipes.md).", "",
           "## Top level", "", *_table(content["recipe"]), "",
           "## Every rule", "", "Keys every rule has; all its other keys are options of its pass.", "",
           *_table(content["rule"]), ""]
    for name in available_passes():
        title = titles.get(name, name)
        out += [f"## `{name}` options", "",
                f"Options of the {title} pass ([its page](../passes/{name}.md)), class "
                f"`{get_pass(name).Options.__module__}.{get_pass(name).Options.__qualname__}`.", "",
                *_table(content[name]), ""]
    return "\n".join(out)


def check_reference(markdown: str) -> None:
    """Raise when a key of the schema is missing from ``markdown`` (a rendered reference)."""
    sections: dict[str, str] = {}
    current = None
    for line in markdown.splitlines():
        if line.startswith("## "):
            head = line[3:].strip()
            current = ("recipe" if head == "Top level" else "rule" if head == "Every rule"
                       else head.split("`")[1] if head.startswith("`") else head)
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    missing = [f"{section}: {key}" for section, keys in schema_keys().items() for key in keys
               if f"| `{key}` |" not in sections.get(section, "")]
    if missing:
        raise ReferenceError_("the recipe reference lacks these schema keys: " + ", ".join(missing)
                              + ". Regenerate it (mkdocs build) or fix tokenopt.docsgen.recipe_ref.")
