"""optimize(): load recipe -> analyse -> calibrate -> plan -> rewrite -> verify -> report.

The library's front door. It names no pass: each rule's pass is asked whether it needs
calibration, measures on the analysis made here, and plans and rewrites its own layers.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from tokenopt.analysis import Example, ModelAnalysis, analyse, example_input_for
from tokenopt import calling
from tokenopt.cleanup import drop_noop_calls
from tokenopt.errors import PlanError, RecipeError
from tokenopt.ops import native
from tokenopt.ownership import model_to_rewrite
from tokenopt.passes import get_pass
from tokenopt.plan import Plan, make_plan
from tokenopt.recipe import Recipe, load_recipe
from tokenopt.report import block_flops, build_report
from tokenopt.rewrite import GraphRewriter
from tokenopt.rewrite.outputs import restore_pooling, return_tokens
from tokenopt.trace import NodeTaggingInterpreter
from tokenopt.record import record_of, update_record


def optimize(model: nn.Module, recipe: Recipe | dict | str | os.PathLike, example_input=None,
             *, leaf_modules: Iterable[type | str] = (), outputs: str | None = None,
             calibration: torch.Tensor | None = None, context: dict | None = None,
             report: bool = True, capture: str = "auto", share_parameters: bool = True,
             analysis: ModelAnalysis | None = None) -> fx.GraphModule:
    """Rewrite ``model`` as ``recipe`` asks and return an ordinary ``nn.Module`` (an fx GraphModule).

    The result carries one [`tokenopt.record.Record`][tokenopt.record.Record] (``tokenopt.record_of(result)``):
    the report (per-layer table, FLOPs before/after), the recipe, the plan and the analysis. The
    rewrite works on a copy of the analysed graph: neither the original model nor the analysis changes.

    Args:
        model: the ViT to rewrite (timm, Hugging Face, open_clip, torchvision or your own class).
        recipe: a path to a YAML file, a YAML string, a dict or a [`Recipe`][tokenopt.recipe.Recipe].
        example_input (torch.Tensor | tuple | tokenopt.Example | None): a batch of the size the model expects (default: from the model's config), or
            for a model of several inputs a tuple of them or ``tokenopt.Example(args, kwargs)``.
        leaf_modules: module classes (or their names) the trace keeps whole instead of tracing into.
        outputs: ``"logits"`` (the model's own output) or ``"tokens"`` (all patch tokens, original
            order); default: the recipe's ``outputs``.
        calibration: a batch of real images, for rules that measure the model (ToFu's ``op: auto``).
        context: measurements from an earlier run (``record_of(module).context``), used instead of
            measuring again; artifacts replay with it so a loaded model is the one that was saved.
        report: count FLOPs and build the per-layer report (which also runs the rewritten graph
            once); False skips it and only checks that the graph runs.
        capture: ``"auto"`` (torch.fx symbolic tracing; torch.export when that fails), ``"fx"`` or
            ``"export"``. The result records the one used (``record_of(m).capture``).
        analysis: an analysis of this same model and example (``tokenopt.analysis.analyse``), reused
            instead of capturing again: several recipes on one model (a quality table) capture it once.
            The rewrite never changes it.
        share_parameters: True: the result uses the original's parameter tensors, so training the
            result (fine-tuning) changes the original too. False: the result owns copies, and the
            original stays untouched by anything done to the result.

    Returns:
        The rewritten module; call it as you call ``model``.

    Raises:
        tokenopt.errors.RecipeError: the recipe is invalid, or asks for what the model cannot do.
        tokenopt.errors.TokenoptError: any other user error (an untraceable model, a refused block),
            with a message that says what to do.
    """
    model = model_to_rewrite(model, share_parameters)
    recipe = load_recipe(recipe)
    outputs = outputs or recipe.outputs
    if outputs not in ("logits", "tokens"):
        raise RecipeError(f"outputs must be 'logits' or 'tokens', got {outputs!r}")
    example = Example.of(example_input if example_input is not None else example_input_for(model))
    if analysis is None:
        analysis = analyse(model, example, leaf_modules, prefix_tokens=recipe.prefix_tokens, capture=capture)
    # the original's FLOPs, counted on the analysis's graph (the rewrite works on a copy of it)
    before = block_flops(analysis.graph, analysis, example.first(1)) if report else None
    context = calibrate(recipe, model, analysis, calibration, context)
    plan = make_plan(recipe, analysis, context)
    gm = apply_plan(analysis, plan, outputs)
    # what tokenopt.save needs to rebuild this module: how the base model was made (the loader's
    # note on the model), its leaves, the measurements the plan used
    update_record(gm, recipe=recipe, context=context, plan=plan, outputs=outputs, capture=analysis.capture,
                  base=getattr(model, "tokenopt_base", None),
                  leaf_modules=tuple(m if isinstance(m, str) else m.__name__ for m in leaf_modules))
    # called as the original is, or a clear refusal; the input axes that may change size go in the record
    update_record(gm, dynamic_axes=calling.install(gm, model, example, analysis, plan))
    if report:   # counting FLOPs runs the rewritten graph: that run is the verification too
        try:
            update_record(gm, report=build_report(before, gm, analysis, plan, example.first(1), example))
        except Exception as e:
            _raise_if_rewritten_graph_failed(gm, e)
            raise
    elif any(lp.step is not None for lp in plan.layers):
        verify_runs(gm, example)
    if native.needed_by(gm):
        native.prepare()   # built now, so a torch.compile of this module can call it too
    # after the report, which counts FLOPs per node by the names the analysis gave them
    if drop_noop_calls(gm):
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return gm


def calibrate(recipe: Recipe, model: nn.Module, analysis: ModelAnalysis, images: torch.Tensor | None,
              context: dict | None = None) -> dict:
    """Measurements for every rule whose pass asks for them, made on ``analysis``'s graph.

    What ``context`` already holds (an artifact's replay, a probe's output) is kept, not measured
    again. Without ``images`` nothing is measured; a pass that needed it says so when planning.
    """
    context = dict(context or {})
    if images is None:
        return context
    for rule in recipe.rules:
        p = get_pass(rule.pass_name)()
        if p.needs_calibration(rule.options) and p.calibration_key not in context:
            context.update(p.calibrate(model, analysis, images))
    return context


def apply_plan(analysis: ModelAnalysis, plan: Plan, outputs: str = "logits") -> fx.GraphModule:
    """Walk the blocks in order, threading the token state, then fix pooling and outputs."""
    needs_index = outputs == "tokens" or any(p.kind == "tokens" for p in analysis.pooling)
    g = GraphRewriter(analysis, track_index=needs_index)
    # node name -> the pass that inserted it; what begin_block adds for the token state (e.g. the
    # log(size) attention bias after a merge) belongs to the pass that last rewrote a block
    inserted_by: dict[str, str] = {}
    owner = None
    for block, layer in zip(analysis.blocks, plan.layers):
        known = len(g.inserted)
        g.begin_block(block)
        if layer.step is not None:
            owner = layer.rule.pass_name
            get_pass(owner)().rewrite(g, block, layer.step)
        if owner is not None:
            inserted_by.update(dict.fromkeys(list(g.inserted)[known:], owner))
    if g.state.reduced:
        restore_pooling(g, analysis)
    if outputs == "tokens":
        return_tokens(g, analysis)
    gm = g.finish()
    # inserted_by misses what pooling/outputs inserted after the blocks
    update_record(gm, inserted=dict(g.inserted), inserted_by=inserted_by, overhead=dict(g.overhead),
                  token_counts=dict(g.token_counts), analysis=analysis)
    return gm


def verify_runs(gm: fx.GraphModule, example_input) -> None:
    """Run the rewritten graph once on the example batch (eval mode, no grad).

    Analysis refuses the block kinds it knows cannot lose tokens; a model that hides its grid
    elsewhere (an attention module that takes the feature-map size, a reshape to H x W in a
    leaf module) would otherwise fail at the user's first forward with a shape error deep in
    its own code. Here it fails once, naming the node and the block.
    """
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            NodeTaggingInterpreter(gm).run(*Example.of(example_input).positional(gm))
    except Exception as e:
        _raise_if_rewritten_graph_failed(gm, e)
        raise
    finally:
        gm.train(was_training)


def _raise_if_rewritten_graph_failed(gm: fx.GraphModule, e: Exception) -> None:
    """Turn an error raised at a node of ``gm`` into one PlanError that names the place."""
    n = getattr(e, "tokenopt_node", None)
    if n is None or n.graph is not gm.graph:
        return
    where = f"{n.target}" if n.op == "call_module" else n.name
    stack = list(n.meta.get("nn_module_stack", {}).values())
    block = stack[-1][0] if stack else None
    first = (str(e).strip().splitlines() or [""])[0]
    raise PlanError(
        f"the rewritten model fails on the example batch at {where}"
        f"{f' (in {block})' if block and block != where else ''}: {type(e).__name__}: {first}\n"
        "  That part of the model depends on the number or layout of the tokens in a way tokenopt did not "
        "detect (e.g. attention that takes the feature-map size). Leave its blocks out of the rule's "
        "`layers:`, and please report the model.") from None
