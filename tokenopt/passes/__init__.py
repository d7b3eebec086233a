"""Token-reduction passes, one module per method, registered by name.

Importing this package registers the built-in passes (each module's ``@register_pass`` runs on
import); a pass of one's own registers the same way, by importing its module.
"""
from tokenopt.passes.base import LayerStep, Pass, PassOptions, available_passes, get_pass, register_pass
from tokenopt.passes import tome, tofu, tosa, spa  # noqa: E402,F401  (registration)

__all__ = ["LayerStep", "Pass", "PassOptions", "available_passes", "get_pass", "register_pass"]
