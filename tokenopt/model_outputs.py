"""What a classifier returns, read one way everywhere (evaluation, fine-tuning, gate training)."""
from __future__ import annotations


def class_logits(out):
    """The class scores in a model's return value: a tensor as it is, the first of a tuple or list
    (distilled heads: the class head), or a Hugging Face ModelOutput's ``logits``."""
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out
