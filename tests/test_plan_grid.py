"""make_plan's grid check: no token reduction before a block that needs the original token grid.

The model is a user-written ViT (explicit softmax attention) in which chosen blocks add a learned
relative-position bias of shape (heads, N, N): analysis refuses exactly those blocks as grid-bound,
the others stay reducible. The cases put the grid-bound block exactly one block after the reducing
one, two blocks after, and last, so that an off-by-one in the check fails at least one of them.
"""
from __future__ import annotations

import pytest
import torch
from vit_models import ExplicitAttention, ExplicitViT

import tokenopt
from tokenopt.analysis import analyse
from tokenopt.errors import PlanError
from tokenopt.plan import make_plan
from tokenopt.recipe import load_recipe

TOKENS = 17            # 32x32 image, 8x8 patches, + cls
REL = "relative-position bias"


class RelBiasAttention(ExplicitAttention):
    """Explicit attention plus a learned bias indexed by the fixed N x N token grid (as in BEiT)."""

    def __init__(self, dim: int, heads: int, tokens: int):
        super().__init__(dim, heads)
        self.rel_pos_bias = torch.nn.Parameter(torch.randn(heads, tokens, tokens) * 0.02)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.to_qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.rel_pos_bias
        attn = attn.softmax(dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, c))


def grid_vit(rel_at: tuple[int, ...], depth: int = 4) -> ExplicitViT:
    torch.manual_seed(0)
    m = ExplicitViT(depth=depth)
    for i in rel_at:
        m.layers[i].attn = RelBiasAttention(64, 4, TOKENS)
    return m.eval()


_ANALYSES: dict = {}


def analysis_for(rel_at: tuple[int, ...]):
    if rel_at not in _ANALYSES:
        _ANALYSES[rel_at] = analyse(grid_vit(rel_at), torch.randn(2, 3, 32, 32))
    return _ANALYSES[rel_at]


def plan(tmp_path, rel_at, rules_yaml: str):
    path = tmp_path / "recipe.yaml"
    path.write_text("version: 1\nrules:\n" + rules_yaml)
    return make_plan(load_recipe(path), analysis_for(rel_at))


def test_the_model_has_one_grid_bound_block():
    """Sanity: only the biased block is refused, and it is grid-bound (not class attention)."""
    a = analysis_for((2,))
    assert [b.path for b in a.blocks] == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert [b.grid_bound for b in a.blocks] == [False, False, True, False]
    assert REL in a.blocks[2].refusal and a.blocks[0].refusal is None


@pytest.mark.parametrize("pass_name", ["tome", "tofu"])
@pytest.mark.parametrize("rel_at,merge_at", [((2,), 1), ((3,), 2)])
def test_merge_directly_before_a_grid_bound_block_is_refused(tmp_path, pass_name, rel_at, merge_at):
    """The grid-bound block is first_change + 1 (also as the last block): PlanError naming both
    blocks, the reason and the recipe line of the rule."""
    with pytest.raises(PlanError) as e:
        plan(tmp_path, rel_at, f"  - pass: {pass_name}\n    layers: [{merge_at}]\n    r: 2\n")
    msg = str(e.value)
    bound = f"layers.{rel_at[0]}"
    assert f"reducing tokens at layers.{merge_at} breaks {bound}" in msg
    assert "recipe.yaml, line 3" in msg and f"pass {pass_name}" in msg
    assert REL in msg and f"Select only layers after {bound}" in msg


def test_merge_two_blocks_before_a_grid_bound_block_is_refused(tmp_path):
    """Every later block is checked, not only the next one."""
    with pytest.raises(PlanError, match="reducing tokens at layers.0 breaks layers.2"):
        plan(tmp_path, (2,), "  - pass: tome\n    layers: [0]\n    r: 2\n")


def test_merge_after_the_grid_bound_block_is_planned(tmp_path):
    """A reduction after the grid-bound block leaves its grid intact: the plan goes through."""
    p = plan(tmp_path, (2,), "  - pass: tome\n    layers: [3]\n    r: 2\n")
    assert [(lp.tokens_in, lp.tokens_out) for lp in p.layers] == [(TOKENS, TOKENS)] * 3 + [(TOKENS, TOKENS - 2)]
    assert p.skipped == []


def test_grid_bound_block_selected_is_skipped_with_its_reason(tmp_path):
    """Selecting the grid-bound block and the one after it: the grid-bound one is listed in
    plan.skipped with its refusal, the other is reduced."""
    p = plan(tmp_path, (2,), "  - pass: tofu\n    layers: [2, 3]\n    r: 2\n    op: prune\n")
    assert len(p.skipped) == 1 and p.skipped[0][0] == "layers.2" and REL in p.skipped[0][1]
    assert [lp.acted == "-" for lp in p.layers] == [True, True, True, False]
    assert p.layers[3].tokens_out == TOKENS - 2


def test_selecting_all_layers_still_refuses_the_early_merges(tmp_path):
    """`layers: all` skips the grid-bound block but the blocks before it would still reduce:
    refused, naming the first reducing block."""
    with pytest.raises(PlanError, match="reducing tokens at layers.0 breaks layers.2"):
        plan(tmp_path, (2,), "  - pass: tome\n    r: 1\n")


def test_the_earliest_reduction_is_checked_and_its_rule_named(tmp_path):
    """Rule 1 reduces after the grid-bound block (fine), rule 2 directly before it: the error
    names rule 2 and its line, not rule 1."""
    rules = ("  - pass: tome\n    layers: [3]\n    r: 2\n"
             "  - pass: tome\n    layers: [1]\n    r: 2\n")
    with pytest.raises(PlanError) as e:
        plan(tmp_path, (2,), rules)
    msg = str(e.value)
    assert "line 6 (rule 2, pass tome)" in msg and "reducing tokens at layers.1 breaks layers.2" in msg


def test_a_pass_that_keeps_every_token_may_precede_the_grid_bound_block(tmp_path):
    """ToSA returns every token to its place, so it is allowed right before the grid-bound block."""
    p = plan(tmp_path, (2,), "  - pass: tosa\n    layers: [1]\n    keep: 0.5\n"
                             "  - pass: tome\n    layers: [3]\n    r: 2\n")
    assert [lp.tokens_out for lp in p.layers] == [TOKENS] * 3 + [TOKENS - 2]
    assert p.layers[1].acted != "-"


def test_reduction_inside_a_grid_bound_block_does_not_break_it(tmp_path, monkeypatch):
    """The check starts at the block after the reduction: a block's own attention runs on the full
    grid before the merge point. No shipped pass accepts a grid-bound block (they all refuse what
    analysis refused), so this uses a ToMe that accepts everything."""
    from tokenopt.passes.tome import ToMe
    monkeypatch.setattr(ToMe, "refuse", lambda self, block: None)
    p = plan(tmp_path, (2,), "  - pass: tome\n    layers: [2, 3]\n    r: 2\n")
    assert [lp.tokens_out for lp in p.layers] == [TOKENS, TOKENS, TOKENS - 2, TOKENS - 4]


def test_optimize_surfaces_the_plan_error(tmp_path):
    """The library entry point raises the same PlanError before touching the graph."""
    path = tmp_path / "recipe.yaml"
    path.write_text("version: 1\nrules:\n  - pass: tome\n    layers: [1]\n    r: 2\n")
    with pytest.raises(PlanError, match="layers.1 breaks layers.2"):
        tokenopt.optimize(grid_vit((2,)), path, report=False)
