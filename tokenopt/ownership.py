"""Whether an optimized module shares its parameters with the model it was made from.

By default it does (no second copy of the weights in memory), so training the optimized module --
``train_gates(..., finetune=True)``, ``tokenopt.train.selector.finetune`` -- changes the original
too. :func:`model_to_rewrite` gives the rewrite a deep copy instead when asked, so the original
stays bit-identical whatever is trained afterwards.
"""
from __future__ import annotations

import copy

from torch import nn


def model_to_rewrite(model: nn.Module, share_parameters: bool) -> nn.Module:
    """``model`` itself (``share_parameters``) or a deep copy that owns its parameters and buffers."""
    return model if share_parameters else copy.deepcopy(model)
