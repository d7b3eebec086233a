"""Token-reduction passes, one module per method, registered by name."""
from tokenopt.passes.base import Pass, PassOptions, available_passes, get_pass, register_pass

__all__ = ["Pass", "PassOptions", "available_passes", "get_pass", "register_pass"]
