"""Graph hygiene after the passes: calls that provably do nothing are taken out of the graph.

A traced timm block calls about a dozen modules that are identities in every mode: ``nn.Identity``
(LayerScale off, drop-path off, q/k norms off, the MLP's norm) and ``nn.Dropout(p=0)``. Each call
still pays ``nn.Module.__call__`` in eager mode; on ViT-S that is ~140 calls per image, ~3% of a
batch-1 forward once tokens are merged. ``torch.compile`` drops them itself, so compiled models
gain nothing here and lose nothing either.

The result is bit-identical in train and eval mode (dropout with p=0 returns its input in both).
The modules stay in the GraphModule, unused, so ``named_modules`` and ``state_dict`` are
unchanged; only hooks registered on those identity modules stop firing.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn


def is_noop_module(module: nn.Module) -> bool:
    """Identity in every mode: nn.Identity, or dropout whose probability is zero."""
    if type(module) is nn.Identity:
        return True
    return isinstance(module, nn.modules.dropout._DropoutNd) and module.p == 0


def is_noop_dropout_call(node: fx.Node) -> bool:
    """``F.dropout(x, p, training)`` with p == 0 or training False, as a captured (torch.export)
    graph spells dropout: the training flag was fixed when the graph was captured."""
    if node.op != "call_function" or node.target is not F.dropout or not isinstance(node.args[0], fx.Node):
        return False
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    return p == 0 or training is False


def drop_noop_calls(gm: fx.GraphModule) -> int:
    """Route the uses of every single-input no-op module call (and no-op dropout function call) to
    its input; returns how many."""
    dropped = 0
    for node in list(gm.graph.nodes):
        if is_noop_dropout_call(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            dropped += 1
            continue
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(node.args[0], fx.Node) or not is_noop_module(module):
            continue
        if module._forward_hooks or module._forward_pre_hooks:
            continue   # somebody listens to this call: keep it
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        dropped += 1
    return dropped
