"""Reading a recipe: a file path, YAML text or a dict, to plain data whose mappings know their lines.

Nothing here knows what a recipe contains (that is `tokenopt.recipe.schema`); it only turns
what the user gave into data, and YAML mistakes into one message naming the line and column.
Mappings read from YAML remember their own line and the line of each key, so the schema's
messages can point at the exact key (`line_of`).
"""
from __future__ import annotations

import os
from collections.abc import Hashable
from pathlib import Path

import yaml

from tokenopt.errors import RecipeError


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
        why = f" ({lower_first(str(e).split(';')[0])})" if isinstance(e, (ValueError, OverflowError)) and value \
            and kind in ("int", "float", "timestamp") else ""
        raise yaml.constructor.ConstructorError(
            None, None, f"cannot read {shown} as {'an' if kind[:1] in 'aeiou' else 'a'} {kind}{why}; "
            f"write a valid {kind}, or quote it to keep it as text", node.start_mark) from None


_LineLoader.construct_object = _construct_object


def lower_first(msg: str) -> str:
    """``msg`` with its first letter lower-cased, to follow a colon in a longer message."""
    return msg[:1].lower() + msg[1:]


def line_of(mapping, key=None) -> int | None:
    """The line of ``mapping[key]`` (or of the mapping), when the recipe came from YAML."""
    if not isinstance(mapping, _Mapping):
        return None
    if key is not None and key in mapping.key_lines:
        return mapping.key_lines[key]
    return mapping.line


def at(source: str, line: int | None) -> str:
    """``source, line N`` for messages, or only ``source`` when the line is unknown."""
    return source if line is None else f"{source}, line {line}"


def parse_yaml(text: str, source: str):
    """YAML ``text`` as data (mappings with line numbers); any mistake as a RecipeError naming ``source``."""
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


def read_data(recipe: str | os.PathLike | dict) -> tuple[object, str]:
    """``(data, source)`` of a recipe given as a file path, YAML text or a dict; source names it in
    messages (the path, ``<string>`` or ``<dict>``)."""
    if isinstance(recipe, dict):
        return recipe, "<dict>"
    if isinstance(recipe, os.PathLike) or (isinstance(recipe, str) and (
            ("\n" not in recipe and recipe.endswith((".yaml", ".yml"))) or _is_file(recipe))):
        path = Path(recipe)
        return parse_yaml(_read_file(path), str(path)), str(path)
    if isinstance(recipe, str):
        data = parse_yaml(recipe, "<string>")
        if isinstance(data, str) and "\n" not in recipe.strip():
            # A lone word is far more likely a mistyped file name than a YAML recipe.
            raise RecipeError(f"recipe file not found: {recipe}\n"
                              "  Check the spelling of the path, or pass the recipe as YAML text or a dict.")
        return data, "<string>"
    raise RecipeError(f"a recipe must be a file path, YAML text, a dict or a Recipe, "
                      f"not {type(recipe).__name__}")


def _is_file(s: str) -> bool:
    # YAML text can be long or multi-line; only a plausible path is worth a stat call.
    try:
        return "\n" not in s and len(s) < 4096 and Path(s).is_file()
    except (OSError, ValueError):
        return False


def _read_file(path: Path) -> str:
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
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read recipe file {path}: {e}") from None
