"""Layer selectors: the ``layers:`` value of a rule, and which blocks of a model it picks.

    all                       every block
    first-half, second-half   blocks 0 .. n/2-1, n/2 .. n-1 (depth-relative)
    5, "4-11", "0-3,8"        block indices (0-based)
    stage3, stage3-4          every block of those stages (1-based, as Swin papers count them)
    "blocks.1*"               a glob on block paths
    "re:blocks\\.(1|2)"       an anchored regular expression on block paths
    [0, "5-7", stage4]        any of the above (lists do not nest)

`check_selector` checks the syntax when a recipe is loaded; `resolve_layers` picks
the blocks once a model is known. A hierarchical ViT has one token stream per stage; the model's
``streams`` (one 0-based stream index per block) say which blocks a stage holds.
"""
from __future__ import annotations

import fnmatch
import re

from tokenopt.errors import RecipeError

_RANGES = re.compile(r"\s*\d+\s*(-\s*\d+\s*)?(,\s*\d+\s*(-\s*\d+\s*)?)*")
_RANGE_CHARS = re.compile(r"[\d\s,\-]+")
_STAGES = re.compile(r"stage(\d+)(?:-(\d+))?")
_FORMS = ('  Use all, first-half, second-half, an index (5), a range ("4-11"), a list ("0-3,8" or [0, 2, 5]), '
          'a stage (stage3 or stage3-4), a glob on block paths ("blocks.1*"), or "re:<regex>".')


def check_selector(selector, where: str) -> None:
    """Syntax only: whether the selector can match anything is known once a model is."""
    _parse(selector, where, top=True)


def _parse(selector, where: str, top: bool):
    """A selector as ("all",) | ("half", name) | ("indices", [range, ..]) | ("stages", range) | ("glob", pat)
    | ("re", compiled) | ("any", [..]).

    Index ranges stay ``range`` objects: "0-999999999999" must not become a list before the model
    says how many blocks there are."""
    bad = f"{where}: invalid layers selector {selector!r}"
    if isinstance(selector, bool) or selector is None:
        raise RecipeError(f"{bad}.\n{_FORMS}")
    if isinstance(selector, int):
        if selector < 0:
            raise RecipeError(f"{bad}: layer indices start at 0.\n{_FORMS}")
        return ("indices", [range(selector, selector + 1)])
    if isinstance(selector, list):
        if not top or not selector:
            raise RecipeError(f"{bad}: {'an empty list' if not selector else 'lists cannot nest'}.\n{_FORMS}")
        return ("any", [_parse(s, where, top=False) for s in selector])
    if not isinstance(selector, str) or not selector.strip():
        raise RecipeError(f"{bad}.\n{_FORMS}")
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
    stages = _STAGES.fullmatch(s)
    if stages:
        return ("stages", _stage_range(stages, bad))
    # Digits, dashes and commas only can never be a block path glob, so they must be ranges.
    if _RANGE_CHARS.fullmatch(s):
        if not _RANGES.fullmatch(s):
            raise RecipeError(f"{bad}: write ranges as \"4-11\" or \"0-3,8\".\n{_FORMS}")
        indices = []
        for part in s.split(","):
            lo, _, hi = part.partition("-")
            try:
                lo, hi = int(lo), int(hi or lo)
            except ValueError:  # more digits than Python converts (4300)
                raise RecipeError(f"{where}: invalid layers selector: a layer index of {len(s)} digits.\n"
                                  f"{_FORMS}") from None
            if hi < lo:
                raise RecipeError(f"{bad}: range {part.strip()!r} runs backwards; write it as {hi}-{lo}.")
            indices.append(range(lo, hi + 1))
        return ("indices", indices)
    return ("glob", s)


def _stage_range(match: re.Match, bad: str) -> range:
    """The 1-based stage numbers of ``stageK`` / ``stageK-L``."""
    digits = match.group(1), match.group(2) or match.group(1)
    if max(len(d) for d in digits) > 6:     # no model has a million stages; keeps int() and messages short
        raise RecipeError(f"{bad}: a stage number of more than 6 digits.\n{_FORMS}")
    lo, hi = map(int, digits)
    if lo == 0:
        raise RecipeError(f"{bad}: stages are counted from 1 (stage1 is the first).")
    if hi < lo:
        raise RecipeError(f"{bad}: stages {lo}-{hi} run backwards; write stage{hi}-{lo}.")
    return range(lo, hi + 1)


def _abbreviate(paths: list[str], keep: int = 3) -> str:
    if len(paths) <= 2 * keep:
        return ", ".join(paths)
    return ", ".join(paths[:keep]) + f", ... ({len(paths) - 2 * keep} more), " + ", ".join(paths[-keep:])


def resolve_layers(selector, block_paths: list[str], where: str, streams: list[int] | None = None) -> list[int]:
    """The sorted, unique block indices that ``selector`` picks among ``block_paths``.

    ``streams``, when given, holds one 0-based token stream index per block (a hierarchical ViT
    has one stream per stage); without it the model has one stream. Every part of a selector must
    pick at least one block: a glob that matches nothing is almost always a misspelt path, and
    silently doing nothing would hide it.
    """
    n = len(block_paths)
    if streams is not None and len(streams) != n:
        raise ValueError(f"streams has {len(streams)} entries for {n} blocks; give one stream index per block")
    stream_of = list(streams) if streams is not None else [0] * n
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
        if kind == "stages":
            return pick_stages(parsed[1])
        if kind == "glob":
            hits = {i for i, p in enumerate(block_paths) if fnmatch.fnmatchcase(p, parsed[1])}
            what = f"glob {parsed[1]!r}"
        else:
            hits = {i for i, p in enumerate(block_paths) if parsed[1].fullmatch(p)}
            what = f"regex {parsed[1].pattern!r}"
        if not hits:
            raise RecipeError(f"{where}: layers {selector!r}: {what} matches no block; {available}.")
        return hits

    def pick_stages(stages: range) -> set[int]:
        if not n:
            raise RecipeError(f"{where}: layers {selector!r} selects no block; {available}.")
        count = max(stream_of) + 1
        if stages.stop - 1 > count:
            missing = max(stages.start, count + 1)
            if count == 1:
                raise RecipeError(f"{where}: layers {selector!r}: stage {missing} does not exist: the model has one "
                                  "token stream (a single stage, stage1).\n  Select its blocks by index, range or "
                                  "path instead.")
            sizes = ", ".join(str(stream_of.count(s)) for s in range(count))
            raise RecipeError(f"{where}: layers {selector!r}: stage {missing} is out of range; the model has "
                              f"{count} stages (stage1-stage{count}) of {sizes} blocks.")
        hits = {i for i, s in enumerate(stream_of) if s + 1 in stages}
        if not hits:
            raise RecipeError(f"{where}: layers {selector!r}: no block is in stage "
                              f"{'-'.join(map(str, sorted({stages.start, stages.stop - 1})))}; {available}.")
        return hits

    chosen = pick(_parse(selector, where, top=True))
    if not chosen:
        raise RecipeError(f"{where}: layers {selector!r} selects no block; {available}.")
    return sorted(chosen)
