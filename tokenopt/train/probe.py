"""Moved: the linearity probe is ToFu's calibration and lives in :mod:`tokenopt.passes.linearity`."""
from tokenopt.passes.linearity import LinearityProfile, block_inputs, linearity_profile  # noqa: F401
