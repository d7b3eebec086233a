"""Each block of an exported graph reads the batch size from its own input.

An exported graph reads the batch size once off the image (``aten.sym_size.int(x, 0)``) and every
block's reshapes use that one value. :func:`localise_batch` makes each block read it from its own
input, as fx graphs do (``B, N, C = x.shape``), so a block that runs on another batch (SPA's
packed tokens, ``(1, T, C)``) reshapes its own. It needs the blocks, so the analysis calls it once
they are found.
"""
from __future__ import annotations

import torch.fx as fx

from tokenopt.analysis.nodes import is_input_batch_size, region, shape_of


def localise_batch(gm: fx.GraphModule, spans: list[tuple[str, str]]) -> int:
    """Make each block read the batch size from its own input, not from the model's.

    ``spans`` are the blocks as (input node, output node) names. A node of a block (computed from
    its input on the way to its output) that reads the batch size off the image
    (:func:`~tokenopt.analysis.nodes.is_input_batch_size`) reads ``input.size(0)`` instead, one
    such node per block, inserted right after the input. The same value on the captured batch;
    the block's own once its input has another batch. Blocks whose input does not lead with the
    batch axis (sequence-first streams) are left alone. Returns how many uses moved.
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    image = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    batch = (shape_of(image) or (None,))[0] if image is not None else None
    moved = 0
    for start_name, end_name in spans:
        start, end = by_name[start_name], by_name[end_name]
        if batch is None or (shape_of(start) or (None,))[0] != batch:
            continue
        local = None
        for n in sorted(region(start, end, order), key=order.__getitem__):
            for a in n.all_input_nodes:
                if not is_input_batch_size(a):
                    continue
                if local is None:
                    with gm.graph.inserting_after(start):
                        local = gm.graph.call_method("size", (start, 0))
                    local.meta["nn_module_stack"] = dict(n.meta.get("nn_module_stack", {}))
                n.replace_input_with(a, local)
                moved += 1
    if moved:
        gm.graph.lint()
        gm.recompile()
    return moved
