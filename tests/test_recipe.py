"""Recipe loading, validation messages, and layer selectors."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tokenopt.errors import RecipeError
from tokenopt.passes.tome import DecreasingSchedule, ToMeOptions
from tokenopt.recipe import SUPPORTED_VERSIONS, Recipe, Rule, load_recipe, resolve_layers

GOOD = textwrap.dedent("""\
    version: 1
    strict: true
    prefix_tokens: 2
    outputs: tokens
    rules:
      - pass: tome
        layers: all
        r: 8
      - pass: tome
        layers: "4-11"
        r: {start: 13, end: 3}
        prop_attn: false
    """)

PATHS = [f"blocks.{i}" for i in range(12)]


def error(recipe) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe)
    return str(e.value)


def rules_yaml(rule: str) -> str:
    """A version-1 recipe whose single rule starts on line 3."""
    return "version: 1\nrules:\n" + textwrap.indent(textwrap.dedent(rule), "  ")


# -- valid recipes ------------------------------------------------------------------------------


def check_good(r: Recipe) -> None:
    assert r.version == 1 and r.strict is True and r.prefix_tokens == 2 and r.outputs == "tokens"
    assert [x.pass_name for x in r.rules] == ["tome", "tome"]
    assert [x.index for x in r.rules] == [0, 1]
    assert r.rules[0].layers == "all"
    assert r.rules[0].options == ToMeOptions(r=8, prop_attn=True)
    assert r.rules[1].layers == "4-11"
    assert r.rules[1].options.r == DecreasingSchedule(start=13, end=3)
    assert r.rules[1].options.prop_attn is False


def test_from_text():
    r = load_recipe(GOOD)
    check_good(r)
    assert r.source == "<string>"
    assert [x.line for x in r.rules] == [6, 9]
    assert r.rules[1].where(r.source) == "<string>, line 9 (rule 2, pass tome)"


@pytest.mark.parametrize("as_path", [True, False])
def test_from_file(tmp_path, as_path):
    f = tmp_path / "recipe.yaml"
    f.write_text(GOOD)
    r = load_recipe(f if as_path else str(f))
    check_good(r)
    assert r.source == str(f)
    assert r.rules[0].where(r.source) == f"{f}, line 6 (rule 1, pass tome)"


def test_file_without_yaml_suffix_is_read_when_it_exists(tmp_path):
    f = tmp_path / "recipe.txt"
    f.write_text(GOOD)
    check_good(load_recipe(str(f)))


def test_from_dict_and_defaults():
    r = load_recipe({"version": 1, "rules": [{"pass": "tome", "r": 4}]})
    assert r.source == "<dict>"
    assert (r.strict, r.prefix_tokens, r.outputs) == (False, None, "logits")
    rule = r.rules[0]
    assert (rule.layers, rule.options.r, rule.options.prop_attn, rule.line) == ("all", 4, True, None)
    assert rule.where(r.source) == "<dict> (rule 1, pass tome)"


def test_recipe_is_returned_as_is():
    r = load_recipe(GOOD)
    assert load_recipe(r) is r


def test_round_trip_through_dict_and_yaml():
    r = load_recipe(GOOD)
    d = r.to_dict()
    assert d == {
        "version": 1, "strict": True, "prefix_tokens": 2, "outputs": "tokens",
        "rules": [
            {"pass": "tome", "layers": "all", "r": 8, "prop_attn": True, "order": "original"},
            {"pass": "tome", "layers": "4-11", "r": {"start": 13, "end": 3}, "prop_attn": False,
             "order": "original"},
        ],
    }
    assert load_recipe(d).to_dict() == d
    assert load_recipe(r.to_yaml()).to_dict() == d


def test_round_trip_keeps_list_selector_and_omits_unset_prefix():
    d = load_recipe({"version": 1, "rules": [{"pass": "tome", "layers": [0, "3-4"], "r": [1, 2, 3]}]}).to_dict()
    assert "prefix_tokens" not in d
    assert load_recipe(load_recipe(d).to_yaml()).to_dict() == d


def test_yaml_anchors_merge_and_override():
    r = load_recipe(rules_yaml("""\
        - &base
          pass: tome
          r: 4
          prop_attn: false
        - <<: *base
          layers: 0-2
          r: 5
        """))
    assert [(x.layers, x.options.r, x.options.prop_attn) for x in r.rules] == [("all", 4, False), ("0-2", 5, False)]


def test_rule_where_without_line():
    assert Rule("tome", "all", ToMeOptions(r=1), index=4).where("x.yaml") == "x.yaml (rule 5, pass tome)"


def test_supported_versions():
    assert SUPPORTED_VERSIONS == (1,)


# -- errors -------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    for given in (missing, str(missing)):
        msg = error(given)
        assert msg.startswith(f"recipe file not found: {missing}\n  Check the spelling of the path")


def test_missing_relative_file_names_the_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert error("sub/r.yml").startswith(f"recipe file not found: sub/r.yml (relative to {tmp_path})")


def test_lone_word_is_taken_for_a_missing_file():
    assert error("my_recipe") == ("recipe file not found: my_recipe\n"
                                  "  Check the spelling of the path, or pass the recipe as YAML text or a dict.")


def test_directory_is_not_a_recipe(tmp_path):
    assert "is a directory" in error(tmp_path)


def test_malformed_yaml_names_line(tmp_path):
    f = tmp_path / "recipe.yaml"
    f.write_text("version: 1\nrules:\n  - pass: tome\n    r: [1, 2\n  - pass: tome\n")
    msg = error(f)
    assert msg.startswith(f"{f}, line 5, column 9: could not parse YAML: while parsing a flow sequence "
                          "(started on line 4); expected ',' or ']'")
    assert "\n" in msg and msg.count("\n") == 1  # the reason and one hint, no dump


def test_bad_indentation_names_line():
    assert error("version: 1\nrules:\n  - pass: tome\n     r: 3\n").startswith("<string>, line 4")


def test_duplicate_key_names_both_lines():
    msg = error(rules_yaml("- pass: tome\n  r: 1\n  r: 2\n"))
    assert msg.startswith("<string>, line 5, column 5: could not parse YAML: duplicate key 'r'")
    assert "first on line 4" in msg


@pytest.mark.parametrize("text, expect", [
    ("", "got an empty document"),
    ("- pass: tome\n", "got a list"),
    ("rules:\n  - pass: tome\n    r: 1\n", "<string>, line 1: the recipe has no 'version'"),
    ("version: 2\nrules: []\n", "<string>, line 1: unsupported recipe version 2; this tokenopt reads version 1"),
    ("version: '1'\nrules: []\n", "unsupported recipe version '1'"),
    ("version: 1.0\nrules: []\n", "unsupported recipe version 1.0"),
    ("version: 1\n", "the recipe has no 'rules'"),
    ("version: 1\nrules: []\n", "<string>, line 2: the recipe 'rules' must be a non-empty list"),
    ("version: 1\nrules:\n", "'rules' must be a non-empty list"),
    ("version: 1\nstrict: maybe\nrules: [{pass: tome, r: 1}]\n", "line 2: 'strict' must be true or false"),
    ("version: 1\nprefix_tokens: -1\nrules: [{pass: tome, r: 1}]\n", "line 2: 'prefix_tokens' must be"),
    ("version: 1\noutputs: probs\nrules: [{pass: tome, r: 1}]\n",
     "line 2: 'outputs' must be one of logits, tokens, got 'probs'"),
])
def test_top_level_errors(text, expect):
    assert expect in error(text)


def test_unknown_top_level_key_lists_valid_keys():
    msg = error("version: 1\nrules: [{pass: tome, r: 1}]\nstirct: true\n")
    assert msg.startswith("<string>, line 3: unknown top-level key 'stirct' (did you mean 'strict'?)")
    assert "Valid keys: version, strict, prefix_tokens, outputs, rules." in msg


def test_rule_not_a_mapping():
    msg = error("version: 1\nrules:\n  - tome\n")
    assert msg.startswith("<string>, line 2 (rule 1): a rule must be a mapping") and "'tome'" in msg


def test_missing_pass():
    msg = error(rules_yaml("- pass: tome\n  r: 1\n- layers: all\n  r: 1\n"))
    assert msg.startswith("<string>, line 5 (rule 2): the rule has no 'pass'")
    assert "available passes: spa, tofu, tome, tosa" in msg


def test_unknown_pass_lists_available():
    msg = error(rules_yaml("- pass: toem\n  r: 1\n"))
    assert msg.startswith("<string>, line 3 (rule 1): unknown pass 'toem' (did you mean 'tome'?)")
    assert "Available passes: spa, tofu, tome, tosa" in msg


def test_unknown_option_lists_valid_keys():
    msg = error(rules_yaml("- pass: tome\n  r: 1\n  prop_atn: false\n"))
    assert msg.startswith("<string>, line 5 (rule 1, pass tome): unknown option 'prop_atn' "
                          "(did you mean 'prop_attn'?)")
    assert ("Options of tome: pass, layers, placement, ratio, sx, sy, use_rand, seed, max_downsample, merge_attn, "
            "merge_crossattn, merge_mlp, r, prop_attn, order.") in msg


def test_unknown_option_from_dict_has_no_line():
    msg = error({"version": 1, "rules": [{"pass": "tome", "r": 1, "x": 2}]})
    assert msg.startswith("<dict> (rule 1, pass tome): unknown option 'x'")


@pytest.mark.parametrize("option, expect", [
    ("r: many", "option 'r' = 'many' is not valid (expected tokens merged per layer: an int, "
                "a per-layer list, or {start, end})"),
    ("r: {start: 3}", "option 'r' = {'start': 3} is not valid (expected"),
    ("r: [1, x]", "; at 1: input should be a valid integer"),
    ("r: 1\n  prop_attn: sometimes", "option 'prop_attn' = 'sometimes': input should be a valid boolean"),
    ("prop_attn: true", "option 'r' is required (tokens merged per layer"),
])
def test_wrong_option_type_is_one_short_line(option, expect):
    msg = error(rules_yaml(f"- pass: tome\n  {option}\n"))
    assert msg.startswith("<string>, line 3 (rule 1, pass tome): ")
    assert expect in msg
    assert "\n" not in msg and "pydantic" not in msg and "validation error" not in msg


def test_missing_end_of_schedule_is_named():
    assert "at end: field required" in error(rules_yaml("- pass: tome\n  r: {start: 3}\n"))


@pytest.mark.parametrize("layers, expect", [
    ("5-3", "range '5-3' runs backwards; write it as 3-5"),
    ("1-2-3", "write ranges as"),
    ("'0-3,'", "write ranges as"),
    ("-1", "layer indices start at 0"),
    ("[]", "an empty list"),
    ("[[1]]", "lists cannot nest"),
    ("1.5", "invalid layers selector 1.5"),
    ("true", "invalid layers selector True"),
    ("", "invalid layers selector None"),
    ("'re:blocks.('", "not a valid regular expression"),
    ("stage0", "stages are counted from 1 (stage1 is the first)"),
    ("stage4-3", "stages 4-3 run backwards; write stage3-4"),
    ("[1, stage0-2]", "stages are counted from 1"),
    ("stage1234567", "a stage number of more than 6 digits"),
])
def test_bad_selector_syntax_caught_without_a_model(layers, expect):
    msg = error(rules_yaml(f"- pass: tome\n  layers: {layers}\n  r: 1\n"))
    assert msg.startswith("<string>, line 3 (rule 1, pass tome): invalid layers selector")
    assert expect in msg


def test_unmatched_glob_is_not_an_error_before_a_model():
    # whether a glob matches is only known once the model's block paths are
    assert load_recipe(rules_yaml("- pass: tome\n  layers: 'encoder.layer.*'\n  r: 1\n")).rules[0].layers \
        == "encoder.layer.*"


# -- resolve_layers -----------------------------------------------------------------------------


@pytest.mark.parametrize("selector, expect", [
    ("all", list(range(12))),
    (5, [5]),
    (0, [0]),
    ("7", [7]),
    ("4-11", [4, 5, 6, 7, 8, 9, 10, 11]),
    ("0-3,8", [0, 1, 2, 3, 8]),
    (" 8, 0 - 1 ", [0, 1, 8]),
    ([0, 2, 5], [0, 2, 5]),
    ([5, 0, 5, "1-2"], [0, 1, 2, 5]),
    (["0-1", "blocks.1?"], [0, 1, 10, 11]),
    ("blocks.1*", [1, 10, 11]),
    ("blocks.[02]", [0, 2]),
    ("blocks.*", list(range(12))),
    ("re:blocks\\.(1|3)", [1, 3]),
    ("re:blocks\\.1", [1]),  # fullmatch: not 10, 11
])
def test_resolve_layers(selector, expect):
    assert resolve_layers(selector, PATHS, "W") == expect


def test_resolve_layers_nested_paths():
    paths = ["encoder.layers.0", "encoder.layers.1", "decoder.layers.0"]
    assert resolve_layers("encoder.*", paths, "W") == [0, 1]
    assert resolve_layers("*.layers.0", paths, "W") == [0, 2]
    assert resolve_layers("re:.*\\.0", paths, "W") == [0, 2]


def resolve_error(selector, paths=PATHS) -> str:
    with pytest.raises(RecipeError) as e:
        resolve_layers(selector, paths, "recipe.yaml, line 7 (rule 2, pass tome)")
    return str(e.value)


@pytest.mark.parametrize("selector, expect", [
    (12, "layers 12: index 12 is out of range"),
    ("10-12", "index 12 is out of range"),
    ([1, 40], "index 40 is out of range"),
    ("block.*", "glob 'block.*' matches no block"),
    (["0", "head*"], "glob 'head*' matches no block"),
    ("re:blocks\\.12", "regex 'blocks\\\\.12' matches no block"),
])
def test_resolve_layers_errors_name_where_and_what_exists(selector, expect):
    msg = resolve_error(selector)
    assert msg.startswith("recipe.yaml, line 7 (rule 2, pass tome): layers ")
    assert expect in msg
    # long path lists are abbreviated, but the range and both ends are shown
    assert "the model has 12 blocks (0-11): blocks.0, blocks.1, blocks.2, ... (6 more), " \
           "blocks.9, blocks.10, blocks.11." in msg


def test_resolve_layers_short_path_list_is_shown_whole():
    assert resolve_error(3, ["a.0", "a.1", "a.2"]).endswith("the model has 3 blocks (0-2): a.0, a.1, a.2.")


def test_resolve_layers_bad_syntax():
    assert "runs backwards" in resolve_error("3-1")


def test_resolve_layers_no_blocks():
    assert "the model has no transformer blocks" in resolve_error("all", [])


# -- stage selectors: one token stream per stage of a hierarchical ViT --------------------------

SWIN_STREAMS = [0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3]    # stages of 2, 2, 6, 2 blocks (Swin-T)
SWIN_WHERE = "recipe.yaml, line 7 (rule 2, pass tome)"


def test_stage_selectors_load_without_a_model():
    rules = load_recipe(rules_yaml("- pass: tome\n  layers: stage3-4\n  r: 1\n- pass: tome\n  layers: [stage1, 7]\n"
                                   "  r: 1\n")).rules
    assert [r.layers for r in rules] == ["stage3-4", ["stage1", 7]]


@pytest.mark.parametrize("selector, expect", [
    ("stage1", [0, 1]),
    ("stage3", [4, 5, 6, 7, 8, 9]),
    ("stage3-4", [4, 5, 6, 7, 8, 9, 10, 11]),
    ("stage1-4", list(range(12))),
    (" stage4 ", [10, 11]),
    (["stage1", 11], [0, 1, 11]),
    (["stage2", "stage4", "blocks.5"], [2, 3, 5, 10, 11]),
])
def test_stage_selectors_pick_every_block_of_their_streams(selector, expect):
    assert resolve_layers(selector, PATHS, "W", streams=SWIN_STREAMS) == expect


def test_streams_in_any_order():
    # a stage is its stream, wherever its blocks sit
    assert resolve_layers("stage2", ["a", "b", "c", "d"], "W", streams=[1, 0, 1, 0]) == [0, 2]


@pytest.mark.parametrize("streams", [None, [0] * 12])
def test_stage1_of_a_model_with_one_stream_is_every_block(streams):
    assert resolve_layers("stage1", PATHS, "W", streams=streams) == list(range(12))


@pytest.mark.parametrize("streams", [None, [0] * 12])
@pytest.mark.parametrize("selector, stage", [("stage2", 2), ("stage1-3", 2), ([0, "stage3"], 3)])
def test_stage_selector_on_a_model_with_one_stream(streams, selector, stage):
    with pytest.raises(RecipeError) as e:
        resolve_layers(selector, PATHS, SWIN_WHERE, streams=streams)
    assert str(e.value) == (f"{SWIN_WHERE}: layers {selector!r}: stage {stage} does not exist: the model has one "
                            "token stream (a single stage, stage1).\n  Select its blocks by index, range or path "
                            "instead.")


@pytest.mark.parametrize("selector, stage", [("stage5", 5), ("stage3-6", 5), ("stage7-9", 7), (["stage1", "stage6"], 6)])
def test_stage_selector_past_the_last_stage_says_how_many_there_are(selector, stage):
    with pytest.raises(RecipeError) as e:
        resolve_layers(selector, PATHS, SWIN_WHERE, streams=SWIN_STREAMS)
    assert str(e.value) == (f"{SWIN_WHERE}: layers {selector!r}: stage {stage} is out of range; the model has 4 "
                            "stages (stage1-stage4) of 2, 2, 6, 2 blocks.")


def test_streams_must_cover_every_block():
    with pytest.raises(ValueError, match="streams has 3 entries for 12 blocks"):
        resolve_layers("stage1", PATHS, "W", streams=[0, 0, 1])


SHIPPED = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
SWIN_RECIPES = [p for p in SHIPPED if "swin" in p.stem]     # they select Swin stages: a plain ViT has one


@pytest.mark.parametrize("path", SWIN_RECIPES, ids=lambda p: p.stem)
def test_every_shipped_swin_recipe_plans_on_a_swin(path):
    import timm
    import torch

    from tokenopt.analysis import analyse
    from tokenopt.plan import make_plan

    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, embed_dim=32, depths=(1, 1, 2, 1),
                              num_heads=(1, 2, 2, 2), window_size=4, num_classes=10).eval()
    plan = make_plan(load_recipe(path), analyse(model, torch.randn(2, 3, 64, 64)), {})
    assert [lp.step is not None for lp in plan.layers] == [False, False, True, True, True]


@pytest.mark.filterwarnings("ignore:.*can merge")   # shallow tiny models run out of tokens: expected
@pytest.mark.parametrize("path", [p for p in SHIPPED if p not in SWIN_RECIPES], ids=lambda p: p.stem)
@pytest.mark.parametrize("depth", [6, 12])
def test_every_shipped_recipe_plans_on_shallow_and_deep_vits(path, depth):
    # shipped recipes are what users try first: none may assume a depth (the demo models have 6 blocks)
    import timm
    import torch

    from tokenopt.analysis import analyse
    from tokenopt.plan import make_plan

    model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=4, depth=depth, embed_dim=48,
                              num_heads=4, num_classes=10).eval()
    analysis = analyse(model, torch.randn(2, 3, 32, 32))
    plan = make_plan(load_recipe(path), analysis, {"linearity": [0.1 * (i % 3) for i in range(depth)]})
    assert len(plan.layers) == depth
    assert sum(lp.step is not None for lp in plan.layers) >= depth // 2
