"""The per-layer report: tokens in -> out, FLOPs before/after, which rule acted, and why not.

Token counts are per image. Where a layer keeps a different number of tokens per image (a gate),
the planned count reads "≤ max, ≈ expected" and the report adds the mean measured on the example
batch, from the per-image count node the pass recorded in the graph.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx

from tokenopt.analysis import Example, ModelAnalysis
from tokenopt.flops import flops_by_node
from tokenopt.plan import Plan
from tokenopt.tokens import TokenCount
from tokenopt.trace import values_at
from tokenopt.record import record_of


@dataclass
class LayerRow:
    """One block of the per-layer report. FLOPs count multiply-accumulates for one image (the
    convention of the DeiT and ToMe papers and of timm's GMACs).

    Attributes:
        index: the block's position in the model (0 = first block).
        path: the block's module path (``blocks.3``).
        tokens_in: tokens per image entering the block.
        tokens_out: tokens per image leaving it (``≤ max, ≈ expected`` where a gate decides per image).
        flops_before: the block's multiply-accumulates in the original model.
        flops_after: the same in the rewritten model, selector or gate included.
        acted: what the rule did to this block, or why it did nothing.
        selector_flops: the part of ``flops_after`` spent choosing tokens (ToSA selector, SPA gate).
        measured_out: where counts vary per image, the mean tokens out measured on the example batch.
    """

    index: int
    path: str
    tokens_in: TokenCount
    tokens_out: TokenCount
    flops_before: int
    flops_after: int
    acted: str
    selector_flops: int = 0                 # of flops_after: what choosing the tokens costs (ToSA)
    measured_out: float | None = None       # varying counts: mean tokens out per image on the example batch

    def __post_init__(self):
        # manifests store a fixed count as an int and a varying one as {"max", "expected"}
        self.tokens_in, self.tokens_out = (TokenCount(**t) if isinstance(t, dict) else TokenCount.of(t)
                                           for t in (self.tokens_in, self.tokens_out))

    @property
    def tokens_text(self) -> str:
        text = f"{self.tokens_in} → {self.tokens_out}"
        return text if self.measured_out is None else f"{text} (measured {self.measured_out:.1f})"


@dataclass
class Report:
    """The per-layer report of a rewrite: ``tokenopt.record_of(module).report``. FLOPs count
    multiply-accumulates for one image.

    Attributes:
        rows: one [`LayerRow`][tokenopt.report.LayerRow] per transformer block.
        flops_before: the whole original model's multiply-accumulates.
        flops_after: the whole rewritten model's.
        other_before: the part of ``flops_before`` outside the blocks (embedding, head).
        other_after: the same, rewritten.
        warnings: what the plan warned about (a layer that could not take its reduction, ...).
        skipped: (block, reason) for each selected block a pass left unchanged.
        unmatched: (module, reason) for each module the analysis did not take as a block.
        prefix_tokens: class, distillation and register tokens, never reduced.
        pooling: how the head reads the tokens (``token``, ``avg``, ...).
    """

    rows: list[LayerRow]
    flops_before: int                       # whole model, batch 1 (multiply-accumulates)
    flops_after: int
    other_before: int                       # embedding + head
    other_after: int
    warnings: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unmatched: list[tuple[str, str]] = field(default_factory=list)
    prefix_tokens: int = 0
    pooling: str = ""

    @property
    def flops_ratio(self) -> float:
        """FLOPs of the original over the optimized model: the ideal speedup."""
        return self.flops_before / max(self.flops_after, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        for row, r in zip(d["rows"], self.rows):
            row["tokens_in"], row["tokens_out"] = r.tokens_in.to_json(), r.tokens_out.to_json()
        return d

    def rich_table(self):
        from rich.table import Table
        t = Table(title=f"tokenopt: {len(self.rows)} blocks, {self.prefix_tokens} prefix token(s), pooling {self.pooling}")
        # the selector column exists only when some layer pays for choosing its tokens (ToSA)
        sel = any(r.selector_flops for r in self.rows)

        def selector(text: str) -> tuple[str, ...]:
            return (text,) if sel else ()

        for col, just in (("layer", "right"), ("block", "left"), ("tokens in → out", "right"),
                          ("GFLOPs before", "right"), ("GFLOPs after", "right"),
                          *selector(("of which selector MFLOPs", "right")), ("rule", "left")):
            t.add_column(col, justify=just)
        for r in self.rows:
            t.add_row(str(r.index), r.path, r.tokens_text, f"{r.flops_before / 1e9:.3f}",
                      f"{r.flops_after / 1e9:.3f}", *selector(f"{r.selector_flops / 1e6:.3f}"), r.acted)
        t.add_row("", "embed + head", "", f"{self.other_before / 1e9:.3f}", f"{self.other_after / 1e9:.3f}",
                  *selector(""), "")
        t.add_section()
        t.add_row("", "total", "", f"{self.flops_before / 1e9:.3f}", f"{self.flops_after / 1e9:.3f}",
                  *selector(f"{sum(r.selector_flops for r in self.rows) / 1e6:.3f}"),
                  f"FLOPs ratio {self.flops_ratio:.2f}x (ideal speedup)")
        return t

    def __str__(self) -> str:
        from io import StringIO

        from rich.console import Console
        buf = StringIO()
        Console(file=buf, width=140, force_terminal=False).print(self.rich_table())
        return buf.getvalue()


def _per_block(gm: fx.GraphModule, analysis: ModelAnalysis, counts: dict[str, int]) -> tuple[list[int], int]:
    """Sum node FLOPs per block: a block owns the nodes after its input up to its output."""
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    bounds = [(order[b.input], order[b.output]) for b in analysis.blocks]
    per = [0] * len(bounds)
    other = 0
    for name, f in counts.items():
        pos = order.get(name)
        for i, (lo, hi) in enumerate(bounds):
            if pos is not None and lo < pos <= hi:
                per[i] += f
                break
        else:
            other += f
    return per, other


def measured_token_counts(gm: fx.GraphModule, batch: torch.Tensor) -> dict[int, float]:
    """Mean tokens per image after each layer that recorded a per-image count node, on ``batch``.

    ``record_of(gm).token_counts`` maps a site (a block) to the node holding its (B,) counts.
    """
    return {block: float(v.float().mean()) for block, v in token_counts_per_image(gm, batch).items()}


def token_counts_per_image(gm: fx.GraphModule, batch: torch.Tensor) -> dict[int, torch.Tensor]:
    """The (B,) tokens of each image of ``batch`` after each layer that records a per-image count
    (a gate keeps a different number per image); empty when no layer does."""
    present = {n.name for n in gm.graph.nodes}      # a count node cleaned away since has nothing to measure
    wanted = {name: site.block for site, name in getattr(record_of(gm), "token_counts", {}).items() if name in present}
    if not wanted:
        return {}
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            values = values_at(gm, wanted, *Example.of(batch).positional(gm))
    finally:
        gm.train(was_training)
    return {wanted[name]: torch.as_tensor(v).reshape(-1) for name, v in values.items()}


@dataclass
class BlockFlops:
    """Multiply-accumulates of one run, per block (``per``) and outside the blocks (``other``)."""

    per: list[int]
    other: int
    by_node: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.by_node.values())


def block_flops(gm: fx.GraphModule, analysis: ModelAnalysis, x: torch.Tensor) -> BlockFlops:
    """Count ``gm``'s FLOPs on ``x`` per block of ``analysis``. On the unrewritten graph, call it
    before the passes run: the analysis's graph is then the original (no second trace needed)."""
    with torch.no_grad():
        by_node = flops_by_node(gm, *Example.of(x).positional(gm))
    per, other = _per_block(gm, analysis, by_node)
    return BlockFlops(per, other, by_node)


def build_report(before: BlockFlops, optimized: fx.GraphModule, analysis: ModelAnalysis, plan: Plan,
                 x: torch.Tensor, batch: torch.Tensor | None = None) -> Report:
    """FLOPs per block on ``x`` (one image) against ``before`` (the original, counted by
    `block_flops` before rewriting); varying token counts measured on ``batch`` (default x)."""
    after = block_flops(optimized, analysis, x)
    measured = measured_token_counts(optimized, batch if batch is not None else x)
    selector = [0] * len(after.per)
    for name, site in getattr(record_of(optimized), "overhead", {}).items():
        selector[site.block] += after.by_node.get(name, 0)
    rows = [LayerRow(lp.block, lp.path, lp.tokens_in, lp.tokens_out, fb, fa, lp.acted, fs, measured.get(lp.block))
            for lp, fb, fa, fs in zip(plan.layers, before.per, after.per, selector)]
    return Report(rows, before.total, after.total, before.other, after.other,
                  list(plan.warnings), list(plan.skipped), list(analysis.unmatched), analysis.prefix_tokens,
                  ", ".join(p.kind for p in analysis.pooling) or "none")
