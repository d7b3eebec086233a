"""Training and evaluation shared by every pass: one loop, resumable, single-process or torchrun."""
from tokenopt.train.checkpoint import ResumeError
from tokenopt.train.evaluate import evaluate
from tokenopt.train.loop import TrainResult, train

__all__ = ["ResumeError", "TrainResult", "evaluate", "train"]
from tokenopt.train import gate, selector  # noqa: E402,F401  (each registers its trainer)
