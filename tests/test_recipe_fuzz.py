"""Recipes fuzzed: random YAML text and random rule dictionaries against the loader and the planner.

Whatever a user writes, :func:`tokenopt.recipe.load_recipe` and :func:`tokenopt.plan.make_plan`
either succeed with a consistent Recipe / Plan, or raise a :class:`TokenoptError` whose message
says where the mistake is (the CLI prints it on one line and exits with status 2). Any other
exception (KeyError, TypeError, ValueError, yaml or pydantic errors, RecursionError, ...) is a bug:
the user would see a traceback.

Strategies:

* ``yaml_text``: arbitrary text; lines assembled from recipe keys and awkward YAML scalars (tabs,
  anchors and aliases, merge keys, tags, timestamps, huge ints, NaN/inf, unclosed brackets,
  duplicate keys); and real recipes dumped to YAML and then cut, doubled or spliced.
* ``recipe_dicts``: dictionaries built from the schema's own vocabulary (top-level keys, pass
  names, layer selectors of every form, each pass's options), each value either plausible or
  junk of another type, plus misspelt keys.

The planner runs on a tiny timm ViT (4 blocks, 17 tokens, 1 prefix token), a tiny CaiT whose last
block is a refused class-attention block, and the same ViT with block 2 marked as refused by a
relative-position bias (an analysis edited by hand: no tiny real model refuses only one middle
block). Each is traced and analysed once per module.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tokenopt.errors import TokenoptError
from tokenopt.passes import available_passes, get_pass
from tokenopt.plan import Plan, make_plan
from tokenopt.recipe import OUTPUTS, SUPPORTED_VERSIONS, TOP_LEVEL_KEYS, Recipe, load_recipe, resolve_layers

# TOKENOPT_FUZZ_EXAMPLES=5000 for a longer hunt; the default keeps the file near 30 s on 2 busy cores.
FUZZ = settings(deadline=None, max_examples=int(os.environ.get("TOKENOPT_FUZZ_EXAMPLES", 150)), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])

PASSES = ("tome", "tofu", "tosa")

# --------------------------------------------------------------------------------------------
# Models, analysed once


@functools.lru_cache(maxsize=None)
def analyses() -> dict:
    """Not a fixture: hypothesis would print the whole analysis with every falsifying example."""
    import timm
    import torch

    from tokenopt.analysis import analyse

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=10,
                            embed_dim=32, num_heads=2).eval()
    cait = timm.create_model("cait_xxs24_224", img_size=32, patch_size=8, depth=2, depth_token_only=1,
                             num_classes=10, embed_dim=32, num_heads=2).eval()
    a_vit, a_cait = analyse(vit), analyse(cait)
    assert [b.refusal for b in a_vit.blocks] == [None] * 4
    assert a_cait.blocks[-1].refusal and not a_cait.blocks[-1].grid_bound
    blocks = list(a_vit.blocks)
    blocks[2] = dataclasses.replace(blocks[2], refusal="relative-position bias: an attention bias indexed by a fixed "
                                                      "N x N token grid (as in BEiT)")
    a_grid = dataclasses.replace(a_vit, blocks=blocks)
    assert a_grid.blocks[2].grid_bound and a_vit.blocks[2].refusal is None
    return {"vit": a_vit, "cait": a_cait, "grid-bound": a_grid}


# --------------------------------------------------------------------------------------------
# Strategies: values

# 10 ** 5000 has more digits than Python prints (sys.int_max_str_digits = 4300): built by a map,
# since hypothesis shows the repr of what sampled_from and just hold.
huge_ints = st.sampled_from([30, -30, 400, 5000]).map(lambda e: 10 ** e if e > 0 else -(10 ** -e))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 40), huge_ints,
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1.0, 1.5, -0.5, 1e-300, 1e300]),
    st.text(max_size=8), st.sampled_from(["", " ", "all", "tome", "5", "yes", "1-3", "re:(", "\t"]))
junk = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=6)


def mostly(good, bad=junk):
    """Plausible values three times out of four."""
    return st.one_of(good, good, good, bad)


ranges = st.tuples(st.integers(0, 6), st.integers(0, 6)).map(lambda t: f"{t[0]}-{t[1]}")   # reversed too
good_selector_part = st.one_of(
    st.sampled_from(["all", "first-half", "second-half"]), st.integers(0, 5), ranges,
    st.lists(st.one_of(st.integers(0, 5).map(str), ranges), min_size=1, max_size=3).map(",".join),
    st.sampled_from(["blocks.1*", "blocks.*", "blocks.?", "blocks.[0-1]", "blocks_token_only.*", "*", "nope.*",
                     "[", "re:blocks\\.(1|2)", "re:blocks\\.\\d+", "re:.*", "re:blocks\\.9", " 2 - 3 ", "0-3,8"]))
bad_selector_part = st.one_of(
    st.integers(max_value=-1), huge_ints,
    st.sampled_from(["", "  ", "re:(", "re:", "re:a{99999999999}", "re:" + "(" * 400 + ")" * 400, "re:(?P<x>a)(?P<x>b)",
                     "0-999999999999", "5-2", "4 - ", "-3", "1,,2", "4-11-12", "first-third", "ALL", "blocks.1*,2",
                     "0-" + "9" * 5000]),
    st.none(), st.booleans(), st.floats(), st.dictionaries(st.text(max_size=3), scalars, max_size=2),
    st.lists(st.lists(st.integers(0, 3), max_size=2), min_size=1, max_size=2), st.just([]))
selectors = st.one_of(good_selector_part, good_selector_part,
                      st.lists(good_selector_part, min_size=1, max_size=3), bad_selector_part,
                      st.lists(st.one_of(good_selector_part, bad_selector_part), min_size=1, max_size=3))
# what a user who read the docs writes for a 3- or 4-block model: these mostly reach the planner
sorted_ranges = st.tuples(st.integers(0, 3), st.integers(0, 3)).map(lambda t: f"{min(t)}-{max(t)}")
planned_selectors = st.one_of(
    st.sampled_from(["all", "first-half", "second-half", "blocks.*", "blocks.1*", "re:blocks\\.(1|2)",
                     "re:blocks\\.[0-9]+", "blocks.[2-3]"]),
    st.integers(0, 3), sorted_ranges, st.lists(st.integers(0, 3) | sorted_ranges, min_size=1, max_size=3),
    selectors)

small = st.integers(0, 10)
big = st.sampled_from([20, 1000, 10 ** 30, 10 ** 400])        # more than any layer can give, or absurd
# GOOD: the right type, including values a model cannot honour (these reach the planner);
# BAD: the wrong type or out of the schema's bounds (these must fail at load time).
# the op-level placement's keys (ToMe's placement: op); on a stream-level rule each is refused by name too
OP_LEVEL_GOOD = {"placement": st.just("stream"), "ratio": st.floats(0, 0.99), "sx": st.integers(1, 4),
                 "sy": st.integers(1, 4), "use_rand": st.booleans(), "seed": small, "max_downsample": st.integers(1, 4),
                 "merge_attn": st.booleans(), "merge_crossattn": st.booleans(), "merge_mlp": st.booleans()}
OP_LEVEL_WRONG = {"placement": ["Op", "around", "", None, 1, True], "ratio": [1.0, 1.5, -0.1, math.nan, "0.5", True],
                  "sx": [0, -1, 1.5, True, "2"], "sy": [0, -2, 2.0, None], "use_rand": ["yes", 1, None],
                  "seed": [-1, 0.5, "0", True], "max_downsample": [0, -1, 1.5, True],
                  "merge_attn": ["no", 0, None], "merge_crossattn": ["yes", 1], "merge_mlp": [2, "true"]}
GOOD = {
    "r": st.one_of(small, small, big, st.lists(small, min_size=1, max_size=5),
                   st.fixed_dictionaries({"start": small | big, "end": small})),
    "prop_attn": st.booleans(),
    "op": st.sampled_from(["prune", "merge", "mlerp", "auto"]),
    "order": st.sampled_from(["original", "rank"]),
    "threshold": st.none() | st.floats(0, 2) | st.just(math.inf),
    "keep": st.floats(0.001, 1.0) | st.integers(1, 20) | big,
    "bypass": st.sampled_from(["block", "attention"]),
    **OP_LEVEL_GOOD,
    "selector": st.fixed_dictionaries({}, optional={
        "input": st.sampled_from(["map", "pooled"]), "hidden": st.integers(1, 64) | st.just(4096),
        "kernel": st.sampled_from([1, 3, 5, 99, 1023]), "residual": st.booleans()}),
}
BAD = {
    "r": st.one_of(st.integers(max_value=-1), st.booleans(), st.sampled_from(["5", 5.0, 5.5, [], [True], [-1]]),
                   st.fixed_dictionaries({"start": st.one_of(small, huge_ints, st.booleans(), junk)},
                                         optional={"end": st.one_of(small, st.integers(-3, -1), junk), "step": small}),
                   st.lists(st.one_of(small, junk), min_size=1, max_size=4), huge_ints, junk),
    "prop_attn": st.sampled_from(["yes", "no", 2, None]) | junk,
    "op": st.sampled_from(["Prune", "avg", "", "auto "]) | junk,
    "order": st.sampled_from(["Rank", "sorted", ""]) | junk,
    "threshold": st.sampled_from([math.nan, -1.0, -math.inf, "0.5"]) | junk,
    "keep": st.sampled_from([0, -1, 0.0, 1.5, math.nan, math.inf, True, "0.5"]) | junk,
    "bypass": st.sampled_from(["mlp", "Block", ""]) | junk,
    **{k: st.sampled_from(v) | junk for k, v in OP_LEVEL_WRONG.items()},
    "selector": st.fixed_dictionaries({}, optional={
        "input": st.just("mean") | junk, "hidden": st.sampled_from([0, -1, True, 1.5]) | junk,
        "kernel": st.sampled_from([0, 2, 4, -1, True, 3.0]) | junk, "residual": st.sampled_from(["no", 2]) | junk,
        "hiden": small}) | junk,
}
# Values each option must refuse when the recipe is loaded, before any model is seen.
WRONG = {
    "r": [-1, True, False, "5", 5.0, 5.5, None, [], [True], [-1], [1.5], "all", {"start": 1}, {"start": True, "end": 0},
          {"start": -1, "end": 0}, {"start": 1, "end": 2, "step": 1}, {"start": 1.0, "end": 0}],
    "prop_attn": ["yes", "no", "true", 1, 0, 2, None, [True]],
    "op": ["Prune", "avg", "", "auto ", None, 1, True],
    "order": ["Rank", "sorted", "", None, 1, True],
    "threshold": [math.nan, -1.0, -math.inf, "0.5", True, [0.5]],
    "keep": [0, -1, 0.0, 1.5, math.nan, math.inf, -math.inf, True, "0.5", None, [0.5], {"k": 1}],
    "bypass": ["mlp", "Block", "", None, True],
    **OP_LEVEL_WRONG,
    "selector": [{"input": "mean"}, {"hidden": 0}, {"hidden": True}, {"hidden": 1.5}, {"hidden": "8"}, {"kernel": 2},
                 {"kernel": True}, {"kernel": 3.0}, {"residual": "no"}, {"residual": 1}, {"hiden": 3}, "map", None,
                 [], True, {"hidden": 10 ** 30}, {"kernel": 10 ** 30 + 1}],     # too big to build: TypeError
}
OPTION_VALUES = {k: mostly(GOOD[k], BAD[k]) for k in GOOD}
OPTION_VALUES["strict"] = st.booleans()      # not an option of any pass: the recipe's top level has it

PASS_OPTIONS = {p: [k for k in get_pass(p).Options.model_fields] for p in PASSES}
MISSPELT_OPTIONS = {"R": small, "layer": st.just("all"), "prop-attn": st.booleans(), "Keep": st.just(0.5), "": small}


def rule_for(pass_name, junk_values: bool):
    valid = PASS_OPTIONS.get(pass_name, ["r"])
    # the op-level keys go with placement: op, which takes ratio instead of r: these rules stay stream-level
    options = {k: (OPTION_VALUES if junk_values else GOOD)[k] for k in valid if k not in OP_LEVEL_GOOD}
    required = {"pass": st.just(pass_name)}
    if pass_name in ("tome", "tofu"):
        required["r"] = options.pop("r")
    elif pass_name == "tosa":
        required["keep"] = options.pop("keep")
    optional = {"layers": selectors if junk_values else planned_selectors, **options}
    if junk_values:
        optional.update({k: OPTION_VALUES[k] for k in ("strict", "r", "keep", "op") if k not in required})
        optional.update(MISSPELT_OPTIONS)
    return st.fixed_dictionaries(required, optional=optional)


def rules(junk_values: bool):
    pass_names = st.sampled_from(PASSES)
    rule = pass_names.flatmap(lambda p: rule_for(p, junk_values))
    if junk_values:
        rule = st.one_of(
            rule, rule, rule,
            st.sampled_from(["ToMe", "unknown", "", "tome ", None, 1, "TOSA"]).flatmap(lambda p: rule_for(p, True)),
            rule.map(lambda r: {k: v for k, v in r.items() if k != "pass"}),     # no pass
            junk)
    return rule


def recipe_dicts(junk_values: bool = True):
    if not junk_values:
        return st.fixed_dictionaries(
            {"version": st.just(1), "rules": st.lists(rules(False), min_size=1, max_size=3)},
            optional={"strict": st.booleans(), "prefix_tokens": st.sampled_from([None, 0, 1, 2, 5, 15, 16, 17, 18, 40]),
                      "outputs": st.sampled_from(OUTPUTS)})
    return st.fixed_dictionaries(
        {"version": mostly(st.just(1), st.sampled_from([0, 2, True, 1.0, "1", None, -1]) | huge_ints | junk),
         "rules": mostly(st.lists(rules(True), min_size=1, max_size=4), st.just([]) | junk)},
        optional={"strict": mostly(st.booleans()),
                  "prefix_tokens": mostly(st.integers(0, 20) | st.none(),
                                          st.integers(max_value=-1) | huge_ints | st.sampled_from([True, 1.0]) | junk),
                  "outputs": mostly(st.sampled_from(OUTPUTS), st.sampled_from(["logit", "features", ""]) | junk),
                  "Version": st.just(1), "rule": st.just([]), "prefix-tokens": small, "output": st.just("logits")})


# --------------------------------------------------------------------------------------------
# Strategies: YAML text

YAML_KEYS = TOP_LEVEL_KEYS + ("rule", "Version", "prefix-tokens", "pass", "layers", "r", "prop_attn", "order", "op",
                              "threshold", "keep", "bypass", "selector", "input", "hidden", "kernel", "start",
                              "end", "<<", "? [a]", "? {a: 1}", "1", "null", "'quoted key'", "&k pass", "*k")
YAML_SCALARS = (
    "1", "0", "-1", "13", "yes", "no", "on", "true", "null", "~", ".nan", ".inf", "-.inf", "1e999", "9" * 5000,
    "0x1F", "0o17", "0b101", "1_000", "1:30", "2001-13-45", "2001-12-14", "2001-12-14 21:59:43.10 -5",
    "!!int abc", "!!float x", "!!binary '!!'", "!!bool maybe", "!!set {a, b}", "!!omap [a: 1]", "!!pairs [a: 1]",
    "!!timestamp 2001-99-99", "!!timestamp x", "!!int", "!!int _", "!!map x", "!!python/object:os.system x",
    "!!str", "!foo bar", "&a 1", "&a [1, 2]", "*a", "*b",
    "&r {start: 13, end: 3}", "*r", "&s [*s]", "[", "]", "{", "}", "'", '"', "'unterminated", "tome", "tofu",
    "tosa", "all", "4-11", "5-2", "re:(", "\t", "[1, 2]", "[[[[1]]]]", "{start: 1, end: 0}", "{start: 1, start: 2}",
    "|", ">", "- ", "? ", ": ", "%YAML 1.1", "---", "...", "#", "@x", "`x", "\x00", "\ufeff", "\u2028", "é",
    "[" * 300 + "]" * 300, "{a: " * 200 + "1" + "}" * 200)
yaml_line = st.one_of(
    st.tuples(st.sampled_from(["", "", "  ", "    ", "      ", "\t", "  \t", " "]),
              st.sampled_from(["", "", "- ", "-  ", "? "]),
              st.sampled_from(YAML_KEYS), st.sampled_from([": ", ":", " : ", ":\t"]),
              st.sampled_from(YAML_SCALARS + ("",) * 10)).map("".join),
    st.sampled_from(YAML_SCALARS), st.just("version: 1"), st.just("rules:"), st.just("  - pass: tome"))
yaml_lines = st.lists(yaml_line, max_size=12).map("\n".join)


@st.composite
def mutated_yaml(draw):
    """A real (or almost real) recipe dumped to YAML, then cut, doubled or spliced."""
    data = draw(recipe_dicts(junk_values=draw(st.booleans())))
    try:
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=draw(st.sampled_from([False, None, True])))
    except ValueError:      # an int too long to print: no text to build
        text = "version: 1\nrules:\n  - pass: tome\n    r: 2\n"
    lines = text.splitlines()
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(lines)))
        what = draw(st.sampled_from(["insert", "delete", "duplicate", "indent", "char", "value", "value"]))
        if what == "insert":
            lines.insert(i, draw(yaml_line))
        elif lines and i < len(lines):
            if what == "delete":
                del lines[i]
            elif what == "duplicate":
                lines.insert(i, lines[i])
            elif what == "value" and ": " in lines[i]:      # same structure, an awkward scalar
                lines[i] = lines[i].split(": ", 1)[0] + ": " + draw(st.sampled_from(YAML_SCALARS))
            elif what == "indent":
                lines[i] = draw(st.sampled_from(["  ", "\t", " "])) + lines[i]
            else:
                j = draw(st.integers(0, len(lines[i])))
                lines[i] = lines[i][:j] + draw(st.sampled_from(list("-:{}[]'\"&*!|>#\t ,?%@`"))) + lines[i][j:]
    return "\n".join(lines)


yaml_text = st.one_of(st.text(max_size=200), yaml_lines, mutated_yaml())

# --------------------------------------------------------------------------------------------
# Checks


def check_error(e: TokenoptError, source: str | None = None) -> str:
    """A user error: a non-empty message that, when it is about a recipe's content, says where."""
    assert isinstance(e, TokenoptError), type(e)
    msg = str(e)
    assert msg.strip(), f"{type(e).__name__} with an empty message"
    assert "Traceback" not in msg
    if source is not None and not msg.startswith(("recipe file not found", "recipe path is a directory")):
        assert source in msg, f"the message does not name {source!r}: {msg}"
    if "could not parse YAML" in msg and "nested too deeply" not in msg:
        assert ", line " in msg, f"a YAML error without its line: {msg}"
    return msg


def load(recipe, source: str | None) -> Recipe | None:
    """load_recipe's result, or None after checking the TokenoptError it raised."""
    try:
        r = load_recipe(recipe)
    except TokenoptError as e:
        event(f"load: {type(e).__name__}")
        check_error(e, source)
        return None
    event("load: ok")
    check_recipe(r, recipe if isinstance(recipe, dict) else None)
    return r


def same(kept, given) -> bool:
    """Whether the loader kept a value as written: never True -> 1, "5" -> 5, 5.0 -> 5 or 1 -> True.
    The one widening allowed is an int where a float is expected (threshold: 1)."""
    if isinstance(given, bool) or isinstance(kept, bool):
        return type(kept) is type(given) and kept == given
    if isinstance(given, int):
        return type(kept) in (int, float) and kept == given
    if isinstance(given, float):
        return type(kept) is float and (kept == given or math.isnan(kept) and math.isnan(given))
    if isinstance(given, (list, tuple)):
        return isinstance(kept, list) and len(kept) == len(given) and all(map(same, kept, given))
    if isinstance(given, dict):
        return isinstance(kept, dict) and all(k in kept and same(kept[k], v) for k, v in given.items())
    return type(kept) is type(given) and kept == given


def check_recipe(r: Recipe, given: dict | None = None) -> None:
    assert isinstance(r, Recipe)
    assert type(r.version) is int and r.version in SUPPORTED_VERSIONS
    assert isinstance(r.strict, bool)
    assert r.prefix_tokens is None or (type(r.prefix_tokens) is int and r.prefix_tokens >= 0)
    assert r.outputs in OUTPUTS
    assert r.rules and [x.index for x in r.rules] == list(range(len(r.rules)))
    for rule in r.rules:
        assert rule.pass_name in available_passes()
        assert isinstance(rule.options, get_pass(rule.pass_name).Options)
        assert rule.line is None or rule.line >= 1
    if given is not None:
        for rule, raw in zip(r.rules, given["rules"]):
            kept = rule.options.model_dump()
            for key, value in raw.items():
                if key not in ("pass", "layers"):
                    assert same(kept[key], value), f"option {key!r} = {value!r} was read as {kept[key]!r}"
    # what a saved model stores replays to the same recipe
    again = load_recipe(r.to_yaml())
    assert [(x.pass_name, x.layers, x.options) for x in again.rules] == \
           [(x.pass_name, x.layers, x.options) for x in r.rules]
    assert (again.strict, again.prefix_tokens, again.outputs) == (r.strict, r.prefix_tokens, r.outputs)


def plan(recipe: Recipe, analysis, context) -> Plan | None:
    if recipe.prefix_tokens is not None:     # what analyse(..., prefix_tokens=recipe.prefix_tokens) does:
        # the model's prefix, and the first stream's (which the plan reads), are the recipe's
        streams = [dataclasses.replace(st, prefix_tokens=recipe.prefix_tokens) if st.index == 0 else st
                   for st in analysis.streams]
        analysis = dataclasses.replace(analysis, prefix_tokens=recipe.prefix_tokens, streams=streams)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = make_plan(recipe, analysis, context)
    except TokenoptError as e:
        event(f"plan: {type(e).__name__}")
        check_error(e, recipe.source)
        return None
    event(f"plan: ok{' with warnings' if p.warnings else ''}")
    check_plan(p, recipe, analysis)
    return p


def expected_rule(recipe: Recipe, analysis, i: int):
    """The last rule that selects block i, unless its pass refuses the block."""
    last = None
    for rule in recipe.rules:
        if i in resolve_layers(rule.layers, analysis.block_paths, "here"):
            last = rule
    if last is None or get_pass(last.pass_name)().refuse(analysis.blocks[i]) is not None:
        return None
    return last


def check_plan(p: Plan, recipe: Recipe, analysis) -> None:
    blocks, prefix = analysis.blocks, analysis.prefix_tokens
    assert isinstance(p, Plan) and p.recipe is recipe
    assert [(lp.block, lp.path) for lp in p.layers] == [(b.index, b.path) for b in blocks]
    assert p.layers[0].tokens_in == blocks[0].tokens
    assert prefix < blocks[0].tokens
    for lp, nxt in zip(p.layers, p.layers[1:]):
        assert nxt.tokens_in == lp.tokens_out
    for lp in p.layers:
        assert prefix <= lp.tokens_out <= lp.tokens_in, lp
        assert lp.rule is expected_rule(recipe, analysis, lp.block), lp
        if lp.rule is None:
            assert lp.step is None and lp.tokens_out == lp.tokens_in
            continue
        step = lp.step
        assert step is not None and step.tokens_out == lp.tokens_out and step.describe
        if lp.rule.pass_name in ("tome", "tofu"):
            assert lp.tokens_in - step.params.r == lp.tokens_out and step.params.r >= 0
        else:
            assert lp.tokens_out == lp.tokens_in and 1 <= step.params.k <= lp.tokens_in.max - prefix
    if recipe.strict:
        assert not p.warnings


contexts = st.sampled_from([None, "linearity"])


def context_for(kind, analysis):
    if kind is None:
        return None
    return {"linearity": [0.1 * ((3 * i) % 5) for i in range(len(analysis.blocks))]}


# --------------------------------------------------------------------------------------------
# Tests


RULE = "version: 1\nrules:\n  - pass: tome\n    r: {r}\n    layers: {layers}\n"
# 9 aliases of 9 aliases of ... of 9 values: 9**9 values once expanded ("billion laughs"), which the
# message about the (nested, so invalid) layers list used to print in full
LAUGHS = RULE.format(r=2, layers="[&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1], " + ", ".join(
    f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)) + "]")


@FUZZ
@given(text=yaml_text, as_file=st.sampled_from([False, False, False, True]))
# regressions: each raised something other than a TokenoptError (or ran out of memory) before
@example(text="version: 2001-13-45\nrules: []", as_file=False)            # ValueError (timestamp)
@example(text="version: " + "9" * 5000, as_file=True)                      # ValueError (int of 5000 digits)
@example(text="version: !!int abc", as_file=False)                          # ValueError
@example(text="version: !!float abc", as_file=False)                        # ValueError
@example(text="version: !!bool maybe\nrules:\n- pass: tome\n  r: 0", as_file=False)   # KeyError
@example(text="version: 1\nrules:\n - pass: tome\n   r: !!timestamp x", as_file=False)  # AttributeError
@example(text="version: 1\nrules:\n - pass: tome\n   r: !!int", as_file=False)          # IndexError
@example(text="!!map x", as_file=False)                                     # ValueError (unpacking)
@example(text="- !!map x", as_file=False)                                   # ValueError (unpacking)
@example(text="[" * 5000 + "]" * 5000, as_file=False)                      # RecursionError
@example(text="a: " + "{a: " * 3000 + "1" + "}" * 3000, as_file=True)      # RecursionError
@example(text="r" * 5000 + ".yaml", as_file=False)                         # OSError: file name too long
@example(text="version: 1\nrules: x.yaml", as_file=False)                  # read as a file name
@example(text=RULE.format(r=2, layers="re:a{99999999999}"), as_file=False)  # OverflowError
@example(text=RULE.format(r=2, layers="re:" + "(" * 2000 + ")" * 2000), as_file=False)   # RecursionError
@example(text=RULE.format(r=2, layers="0-" + "9" * 5000), as_file=False)   # ValueError (int of 5000 digits)
@example(text=RULE.format(r=2, layers="'0-999999999999'"), as_file=False)  # MemoryError: the range was listed
@example(text=RULE.format(r="&r {a: *r}", layers="all"), as_file=False)    # recursive mapping
@example(text=LAUGHS, as_file=False)                                        # exponential repr in the message
@example(text="version: 1\nrules:\n  - pass: to\x89me\n", as_file=True)      # no line for a control character
def test_yaml_text_loads_or_says_what_is_wrong(text, as_file, tmp_path_factory):
    if as_file:
        path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        load(path, str(path))
    else:
        load(text, "<string>" if "\n" in text else None)


@FUZZ
@given(data=recipe_dicts())
@example(data={"version": 10 ** 5000, "rules": []})                                  # ValueError in repr()
@example(data={"version": 1, "rules": [{"pass": "tome", "r": [10 ** 5000]}]})       # ValueError in repr()
@example(data={"version": 1, "rules": [{"pass": "tome", "r": 2, "layers": 10 ** 5000}]})
@example(data={"version": 1, "rules": [{"pass": "tome", "r": 2, 10 ** 5000: 1}]})       # as a key
def test_recipe_dicts_load_or_say_what_is_wrong(data):
    r = load(data, "<dict>")
    # the same data written as YAML gives the same verdict, with line numbers
    try:
        text = yaml.safe_dump(data, sort_keys=False)
    except (ValueError, RecursionError):      # an int too long to print, nested too deep
        return
    r2 = load(text, "<string>")
    assert (r is None) == (r2 is None), text


def _self_containing_rule() -> dict:
    rule = {"pass": "tome", "r": 2}
    rule["layers"] = [rule]
    return rule


@pytest.mark.parametrize("data", [
    {"version": 1, "rules": [{"pass": "tome", "r": functools.reduce(lambda x, _: [x], range(3000), 1)}]},
    {"version": 1, "rules": [_self_containing_rule()]},
], ids=["nested-3000-deep", "contains-itself"])
def test_pathological_dicts(data):
    """Explicit rather than @example: hypothesis prints every example, and these break its printer."""
    with pytest.raises(TokenoptError) as e:    # before: RecursionError
        load_recipe(data)
    assert "nested more than" in check_error(e.value, "<dict>")


@FUZZ
@given(data=st.one_of(recipe_dicts(junk_values=False), recipe_dicts(junk_values=False), recipe_dicts()),
       model=st.sampled_from(["vit", "cait", "grid-bound"]), context=contexts, as_yaml=st.booleans())
@example(data={"version": 1, "prefix_tokens": 17, "rules": [{"pass": "tome", "r": 0}]},
         model="vit", context=None, as_yaml=False)         # a plan with fewer tokens than prefix tokens
@example(data={"version": 1, "prefix_tokens": 40, "rules": [{"pass": "tosa", "keep": 0.5, "layers": "1-3"}]},
         model="vit", context=None, as_yaml=True)          # attend 1 of -23 tokens
@example(data={"version": 1, "rules": [{"pass": "tome", "r": {"start": 10 ** 400, "end": 0}}]},
         model="vit", context=None, as_yaml=False)         # OverflowError in the schedule
@example(data={"version": 1, "rules": [{"pass": "tofu", "r": 1, "layers": "0-999999999999"}]},
         model="cait", context=None, as_yaml=False)        # MemoryError: the range was listed
def test_plans_are_consistent_or_say_what_is_wrong(data, model, context, as_yaml):
    if as_yaml:
        try:
            data = yaml.safe_dump(data, sort_keys=False)
        except ValueError:
            pass
    recipe = load(data, "<string>" if isinstance(data, str) else "<dict>")
    if recipe is not None:
        analysis = analyses()[model]
        plan(recipe, analysis, context_for(context, analysis))


@FUZZ
@given(data=recipe_dicts(junk_values=False), st_data=st.data(), as_yaml=st.booleans())
def test_a_wrong_option_is_refused_when_the_recipe_is_loaded(data, st_data, as_yaml):
    """One option of one rule set to a value of the wrong type or out of bounds: the loader, which
    sees no model, refuses it by name (no silent True -> 1, "5" -> 5, 5.0 -> 5, 1 -> True)."""
    data["rules"] = [{k: v for k, v in r.items() if k != "layers"} for r in data["rules"]]    # all: valid
    i = st_data.draw(st.integers(0, len(data["rules"]) - 1), label="rule")
    rule = data["rules"][i]
    key = st_data.draw(st.sampled_from(PASS_OPTIONS[rule["pass"]]), label="option")
    value = st_data.draw(st.sampled_from(WRONG[key]), label="value")
    data["rules"][i] = {**rule, key: value}
    source = "<dict>"
    if as_yaml:
        data, source = yaml.safe_dump(data, sort_keys=False), "<string>"
    with pytest.raises(TokenoptError) as e:
        load_recipe(data)
    msg = check_error(e.value, source)
    assert f"rule {i + 1}" in msg and repr(key) in msg, msg


BASE_RULES = {"tome": {"pass": "tome", "r": 2}, "tofu": {"pass": "tofu", "r": 2}, "tosa": {"pass": "tosa", "keep": 0.5}}


@pytest.mark.parametrize("pass_name,key,value", [
    (p, k, v) for p in PASSES for k in PASS_OPTIONS[p] for v in WRONG[k]])
def test_every_wrong_option_value_is_refused(pass_name, key, value):
    """The same, for every value of WRONG on every pass that has the option."""
    with pytest.raises(TokenoptError) as e:
        load_recipe({"version": 1, "rules": [{**BASE_RULES[pass_name], key: value}]})
    msg = check_error(e.value, "<dict>")
    assert f"(rule 1, pass {pass_name})" in msg and repr(key) in msg, msg
