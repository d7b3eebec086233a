"""The one record a rewritten module carries: what tokenopt made it from and what it did.

``tokenopt.optimize`` returns an ``fx.GraphModule``; everything tokenopt knows about it lives in
one frozen [`Record`][tokenopt.record.Record] at ``module.meta["tokenopt"]`` (as torch.ao keeps its bookkeeping in
one dataclass), never in loose attributes::

    rec = tokenopt.record_of(fast)        # None for a module tokenopt did not make
    rec.report, rec.plan, rec.recipe       # per-layer table, the plan, the recipe
    fast = update_record(fast, base=...)   # records are frozen: a change is a new record

It is read through wrappers that hold the module (DistributedDataParallel's ``.module``,
``torch.compile``'s ``_orig_mod``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

KEY = "tokenopt"


@dataclass(frozen=True)
class Record:
    """What tokenopt knows about a module it rewrote: ``tokenopt.record_of(module)``.

    Attributes:
        recipe: the [`Recipe`][tokenopt.recipe.Recipe] applied.
        plan: the Plan: one step per layer, with token counts.
        analysis: the ModelAnalysis of the original graph (blocks, streams, prefix tokens).
        report: the [`Report`][tokenopt.report.Report], None when not counted.
        context: the measurements the plan used (ToFu's linearity profile), replayed by artifacts.
        outputs: ``"logits"`` or ``"tokens"``.
        capture: ``"fx"`` or ``"export"``, the front end the graph came from.
        leaf_modules: names of the modules kept whole by the trace.
        base: how to rebuild the unmodified model (tokenopt.sources' dict), None when unknown.
        manifest: the artifact's manifest, for a loaded module.
        inserted: node name -> what tokenopt inserted there.
        inserted_by: node name -> the pass that inserted it.
        overhead: node name -> the block whose tokens it chooses (a selector's cost).
        token_counts: block index -> the node holding its (B,) tokens per image, where they vary.
        dynamic_axes: input (pytree position) -> {axis: (multiple, smallest, largest)}: the input axes
            the module takes at other sizes (the image's height and width, where the original does too).
    """

    recipe: Any = None
    plan: Any = None
    analysis: Any = None
    report: Any = None
    context: Mapping = field(default_factory=dict)
    outputs: str = "logits"
    capture: str = "fx"
    leaf_modules: tuple = ()
    base: Mapping | None = None
    manifest: Mapping | None = None
    inserted: Mapping = field(default_factory=dict)
    inserted_by: Mapping = field(default_factory=dict)
    overhead: Mapping = field(default_factory=dict)
    token_counts: Mapping = field(default_factory=dict)
    dynamic_axes: Mapping = field(default_factory=dict)


def _holder(module):
    """The module that holds the record, looking through DDP and torch.compile wrappers."""
    for _ in range(4):
        if isinstance(getattr(module, "meta", None), dict) and KEY in module.meta:
            return module
        inner = getattr(module, "_orig_mod", None) or getattr(module, "module", None)
        if inner is None or inner is module:
            break
        module = inner
    return module


def record_of(module) -> Record | None:
    """The record of a module tokenopt rewrote (or loaded), else None."""
    meta = getattr(_holder(module), "meta", None)
    return meta.get(KEY) if isinstance(meta, dict) else None


def update_record(module, **changes) -> Record:
    """Give ``module`` a new record: its current one (or an empty one) with ``changes``."""
    holder = _holder(module)
    if not isinstance(getattr(holder, "meta", None), dict):
        holder.meta = {}
    new = replace(holder.meta.get(KEY) or Record(), **changes)
    holder.meta[KEY] = new
    return new
