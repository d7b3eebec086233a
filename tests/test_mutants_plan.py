"""make_plan, checked value by value on analyses written by hand (no model, no tracing).

Written to kill the mutants that survived the mutation run of tokenopt/plan.py (docs/testing.md):
every expected value below is worked out in the test from the recipe and the block list, not read
back from the code under test.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import warnings

import pytest

from tokenopt.analysis import CLASS_ATTENTION, AttentionCore, BlockRecord, ModelAnalysis
from tokenopt.errors import PlanError, RecipeError
from tokenopt.passes import base as passes_base
from tokenopt.passes.tome import ToMe
from tokenopt.plan import TokenoptWarning, make_plan
from tokenopt.recipe import load_recipe


def block(i: int, tokens: int = 17, refusal: str | None = None) -> BlockRecord:
    return BlockRecord(i, f"blocks.{i}", f"x{i}", AttentionCore("sdpa", f"sdpa{i}", heads=2), f"res{i}", f"h{i}",
                       f"y{i}", tokens, 8, refusal)


def analysis(n: int = 4, tokens: int = 17, prefix: int = 1, refusals: dict | None = None,
             token_counts: list[int] | None = None) -> ModelAnalysis:
    refusals = refusals or {}
    counts = token_counts or [tokens] * n
    return ModelAnalysis(graph=None, blocks=[block(i, counts[i], refusals.get(i)) for i in range(n)],
                         prefix_tokens=prefix)


def recipe(*rules, strict=False):
    return load_recipe({"version": 1, "strict": strict, "rules": list(rules)})


def cap(tokens: int, prefix: int) -> int:
    """The largest r a layer can merge, from ToMe's definition: half the unprotected tokens."""
    return (tokens - prefix) // 2


# ------------------------------------------------------------------------------------------------
# the token walk


def test_token_counts_walk_block_by_block():
    rs = [3, 5, 0, 20]
    rec = recipe({"pass": "tome", "r": rs})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = make_plan(rec, analysis(4, tokens=17, prefix=1))
    expect, tokens = [], 17
    for r in rs:
        got = min(r, cap(tokens, 1))
        expect.append((tokens, tokens - got, got))
        tokens -= got
    assert expect == [(17, 14, 3), (14, 9, 5), (9, 9, 0), (9, 5, 4)]
    assert plan.recipe is rec
    assert [(lp.block, lp.path) for lp in plan.layers] == [(i, f"blocks.{i}") for i in range(4)]
    assert [(lp.tokens_in, lp.tokens_out, lp.step.params.r) for lp in plan.layers] == expect
    assert all(lp.rule is rec.rules[0] for lp in plan.layers)
    assert [lp.acted for lp in plan.layers] == [f"rule 1 (tome): merge r={r}" for _, _, r in expect]
    assert plan.skipped == []
    # the last layer asked for more than it has: one note, also issued as a TokenoptWarning
    note = ("<dict> (rule 1, pass tome): blocks.3 (3): r=20 asked, but only 4 of its 9 tokens can merge "
            "(1 prefix token(s) are protected); it merges 4")
    assert plan.warnings == [note]
    assert [(w.category, str(w.message)) for w in caught] == [(TokenoptWarning, note)]


def test_blocks_left_alone_pass_the_tokens_on():
    plan = make_plan(recipe({"pass": "tome", "layers": [1, 3], "r": 2}), analysis(4, tokens=21, prefix=0))
    assert [(lp.tokens_in, lp.tokens_out) for lp in plan.layers] == [(21, 21), (21, 19), (19, 19), (19, 17)]
    assert [lp.rule is None for lp in plan.layers] == [True, False, True, False]
    assert plan.layers[0].step is None and plan.layers[0].acted == "-"
    assert plan.warnings == []


def test_the_walk_starts_at_the_first_blocks_token_count():
    # CaiT-like: the class token joins in the last (class-attention) block, which sees one more token
    an = analysis(2, prefix=0, token_counts=[16, 17], refusals={1: f"{CLASS_ATTENTION}: reads all tokens"})
    plan = make_plan(recipe({"pass": "tome", "layers": 0, "r": 3}), an)
    assert [(lp.tokens_in, lp.tokens_out) for lp in plan.layers] == [(16, 13), (13, 13)]


def test_a_later_rule_replaces_an_earlier_one_on_the_same_block():
    rec = recipe({"pass": "tome", "r": 2}, {"pass": "tofu", "layers": "2", "r": 3, "op": "prune"})
    plan = make_plan(rec, analysis(4, tokens=17, prefix=1))
    assert [lp.rule.index for lp in plan.layers] == [0, 0, 1, 0]
    assert [lp.acted for lp in plan.layers] == ["rule 1 (tome): merge r=2", "rule 1 (tome): merge r=2",
                                                "rule 2 (tofu): prune r=3", "rule 1 (tome): merge r=2"]
    assert [lp.tokens_out for lp in plan.layers] == [15, 13, 10, 8]


# ------------------------------------------------------------------------------------------------
# refused blocks


def test_refused_blocks_are_skipped_with_their_reason():
    # (class-attention refusals: other refused blocks need the grid, so no merge could come before them)
    why1, why3 = f"{CLASS_ATTENTION}: one query", f"{CLASS_ATTENTION}: two queries"
    an = analysis(4, refusals={1: why1, 3: why3})
    plan = make_plan(recipe({"pass": "tome", "r": 2}), an)
    assert plan.skipped == [("blocks.1", why1), ("blocks.3", why3)]
    assert [lp.step is not None for lp in plan.layers] == [True, False, True, False]


def test_nothing_usable_names_the_rule_the_count_and_the_reasons():
    an = analysis(4, refusals={1: "RoPE", 2: "relative-position bias"})
    with pytest.raises(RecipeError) as e:
        make_plan(recipe({"pass": "tosa", "layers": "1-2", "keep": 0.5}), an)
    assert str(e.value) == ("<dict> (rule 1, pass tosa): tosa cannot rewrite any block it selects (2 selected): "
                            "blocks.1: RoPE; blocks.2: relative-position bias.\n  None of tokenopt's passes "
                            "(spa, tofu, tome, tosa) can reduce these blocks yet, for the reasons above; select "
                            "other layers: tosa can rewrite blocks.0, blocks.3.")


def test_nothing_usable_anywhere_says_so_and_counts_one_reason_once():
    an = analysis(4, refusals={i: "RoPE" for i in range(4)})
    with pytest.raises(RecipeError) as e:
        make_plan(recipe({"pass": "tome", "r": 1}), an)
    assert str(e.value) == ("<dict> (rule 1, pass tome): tome cannot rewrite any block it selects (4 selected): "
                            "4 blocks: RoPE.\n  None of tokenopt's passes (spa, tofu, tome, tosa) can reduce "
                            "these blocks yet, for the reason above; no block of this model can be reduced.")


def test_one_check_with_texts_that_differ_by_shape_is_one_reason():
    an = analysis(3, refusals={i: f"a grid of {i + 2} x {i + 2}" for i in range(3)})
    an = dataclasses.replace(an, blocks=[dataclasses.replace(b, refused_by="token_stream") for b in an.blocks])
    with pytest.raises(RecipeError) as e:
        make_plan(recipe({"pass": "tome", "r": 1}), an)
    assert "(3 selected): 3 blocks (as at blocks.0): a grid of 2 x 2.\n" in str(e.value)


def test_nothing_usable_names_the_passes_that_would_accept_the_blocks(monkeypatch):
    """Advice to use another pass only when a registered pass accepts those blocks."""

    class Lenient(ToMe):
        def refuse(self, b):
            return None if b.index != 2 else "not block 2"

    monkeypatch.setitem(passes_base._REGISTRY, "lenient", Lenient)
    an = analysis(4, refusals={1: "RoPE", 2: "RoPE"})
    with pytest.raises(RecipeError) as e:
        make_plan(recipe({"pass": "tome", "layers": "1-2", "r": 1}), an)
    assert str(e.value).endswith("(2 selected): 2 blocks: RoPE.\n  Use lenient (1 of them) for these blocks; "
                                 "select other layers: tome can rewrite blocks.0, blocks.3.")


def test_a_later_pass_that_refuses_a_block_takes_it_back_from_an_earlier_rule(monkeypatch):
    """Passes may refuse more than the analysis does (Pass.refuse); the block is then left alone,
    even if an earlier rule had chosen it."""

    class EvenOnly(ToMe):
        def refuse(self, b):
            return None if b.index % 2 == 0 else "odd blocks are not for this pass"

    monkeypatch.setitem(passes_base._REGISTRY, "even-only", EvenOnly)
    rec = recipe({"pass": "tome", "r": 1}, {"pass": "even-only", "r": 2})
    plan = make_plan(rec, analysis(4, tokens=17, prefix=1))
    assert [lp.rule.index if lp.rule else None for lp in plan.layers] == [1, None, 1, None]
    assert plan.skipped == [("blocks.1", "odd blocks are not for this pass"),
                            ("blocks.3", "odd blocks are not for this pass")]
    assert [lp.tokens_out for lp in plan.layers] == [15, 15, 13, 13]


# ------------------------------------------------------------------------------------------------
# blocks that need the original grid


def test_a_merge_before_a_grid_bound_block_is_refused_naming_both():
    an = analysis(4, refusals={2: "absolute position embedding added here"})
    for layers in ("1", "0-1", [0]):
        with pytest.raises(PlanError) as e:
            make_plan(recipe({"pass": "tome", "layers": layers, "r": 2}), an)
        first = 1 if layers == "1" else 0
        assert str(e.value) == (f"<dict> (rule 1, pass tome): reducing tokens at blocks.{first} breaks blocks.2, "
                                "which needs the original token grid (absolute position embedding added here).\n"
                                "  Select only layers after blocks.2.")


def test_the_rule_named_is_the_one_that_reduces_first():
    an = analysis(5, refusals={4: "needs the grid"})
    rec = recipe({"pass": "tome", "layers": 3, "r": 1}, {"pass": "tofu", "layers": 1, "r": 1, "op": "prune"})
    with pytest.raises(PlanError, match=r"^<dict> \(rule 2, pass tofu\): reducing tokens at blocks\.1 breaks "
                                        r"blocks\.4"):
        make_plan(rec, an)


def test_merges_after_the_grid_bound_block_and_selection_before_it_are_fine():
    an = analysis(4, refusals={0: "needs the grid"})
    plan = make_plan(recipe({"pass": "tome", "layers": "1-3", "r": 2}), an)
    assert [lp.tokens_out for lp in plan.layers] == [17, 15, 13, 11]
    # ToSA keeps every token: a grid-bound block after it is not affected
    an = analysis(4, refusals={3: "needs the grid"})
    plan = make_plan(recipe({"pass": "tosa", "layers": "1-2", "keep": 4}), an)
    assert [lp.step.params.k if lp.step else None for lp in plan.layers] == [None, 4, 4, None]
    assert [lp.tokens_out for lp in plan.layers] == [17] * 4


def test_class_attention_blocks_do_not_need_the_grid():
    an = analysis(3, refusals={2: f"{CLASS_ATTENTION}: 1 class token query reads 17 tokens as keys"})
    plan = make_plan(recipe({"pass": "tome", "layers": "0-1", "r": 2}), an)
    assert [lp.tokens_out for lp in plan.layers] == [15, 13, 13]


# ------------------------------------------------------------------------------------------------
# strict, warnings, context, where


def test_strict_turns_a_shortfall_into_an_error():
    with pytest.raises(PlanError) as e:
        make_plan(recipe({"pass": "tome", "r": [2, 9]}, strict=True), analysis(2, tokens=17, prefix=1))
    assert str(e.value) == ("<dict> (rule 1, pass tome): blocks.1 (1): r=9 asked, but only 7 of its 15 tokens can "
                            "merge (1 prefix token(s) are protected); it merges 7.\n  Lower the reduction for this "
                            "layer, or drop `strict: true` to let it take the most it can.")


def _optimize_like(rec, an):
    """Stands for tokenopt.optimize: make_plan's caller."""
    return make_plan(rec, an)


@pytest.mark.skipif("MUTANT_UNDER_TEST" in os.environ,
                    reason="mutmut's trampolines add stack frames, so no stacklevel points where it should")
def test_the_warning_points_at_the_line_that_called_optimize():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        _optimize_like(recipe({"pass": "tome", "r": 9}), analysis(1, tokens=17, prefix=1))
    assert len(caught) == 1 and caught[0].category is TokenoptWarning
    assert caught[0].filename == __file__ and caught[0].lineno == line


def test_yaml_recipes_are_named_by_line():
    rec = load_recipe("version: 1\nrules:\n  - pass: tome\n    r: 1\n  - pass: tome\n    layers: 5\n    r: 1\n")
    with pytest.raises(RecipeError, match=r"^<string>, line 5 \(rule 2, pass tome\): layers 5: index 5 is out of "
                                          r"range; the model has 4 blocks"):
        make_plan(rec, analysis(4))


def test_tofu_auto_reads_the_linearity_from_the_context():
    rec = recipe({"pass": "tofu", "r": 1, "op": "auto", "threshold": 0.5})
    with pytest.raises(RecipeError, match=r"^<dict> \(rule 1, pass tofu\): op: auto needs calibration images"):
        make_plan(rec, analysis(3))
    plan = make_plan(rec, analysis(3), {"linearity": [0.7, 0.1, 0.5]})
    assert [lp.step.params.op for lp in plan.layers] == ["prune", "mlerp", "prune"]


def test_prefix_tokens_must_leave_patch_tokens():
    an = analysis(2, prefix=17, token_counts=[17, 20])
    an = dataclasses.replace(an, prefix_source="set in the recipe")
    with pytest.raises(PlanError) as e:
        make_plan(recipe({"pass": "tome", "r": 1}), an)
    assert str(e.value) == ("<dict>: prefix_tokens is 17 (set in the recipe), but blocks.0, the first block, sees only 17 "
                            "tokens: no patch token would be left to reduce.\n  Set prefix_tokens to the number of "
                            "cls/distillation/register tokens, or leave it out to detect it.")
    with pytest.warns(TokenoptWarning, match="it merges 0"):
        plan = make_plan(recipe({"pass": "tome", "r": 1}), analysis(2, prefix=16, token_counts=[17, 16]))
    assert [(lp.tokens_in, lp.tokens_out) for lp in plan.layers] == [(17, 17), (17, 17)]   # nothing to merge


def test_errors_of_the_passes_name_the_recipe_line():
    with pytest.raises(RecipeError) as e:
        make_plan(recipe({"pass": "tome", "r": [1, 2]}), analysis(4))
    assert str(e.value) == ("<dict> (rule 1, pass tome): r lists 2 values but the rule selects 4 layers; give one "
                            "value per selected layer")
    rec = load_recipe("version: 1\nrules:\n  - pass: tosa\n    layers: 2\n    keep: 20\n")
    with pytest.raises(RecipeError, match=r"^<string>, line 3 \(rule 1, pass tosa\): keep=20 at blocks\.2 \(2\), but "
                                          r"it has only 16 tokens"):
        make_plan(rec, analysis(4))
