"""Shared fixtures: the tiny timm ViT spec, and a user's own model module on sys.path.

The user module is written to a temporary folder (not imported from tests/) so that factory
paths like ``tokenopt_user_models:make_cnn`` resolve exactly as they would for a user's own
package, in-process and in ``python -m tokenopt`` subprocesses (via PYTHONPATH).
"""
from __future__ import annotations

import sys
import textwrap

import pytest

TINY_VIT = "timm:vit_small_patch16_224?img_size=32&patch_size=8&depth=2&num_classes=10"
TOME_RECIPE = {"version": 1, "rules": [{"pass": "tome", "r": 2}]}

USER_MODELS = textwrap.dedent('''\
    """A user's own models: a CNN (no transformer blocks) and a small ViT written by hand."""
    import torch
    import torch.nn.functional as F
    from torch import nn


    def make_cnn(width=8, classes=10):
        return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(width, classes))


    class Block(nn.Module):
        def __init__(self, dim, heads):
            super().__init__()
            self.heads = heads
            self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(self.n1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
            x = x + self.proj(a)
            return x + self.mlp(self.n2(x))


    class TinyViT(nn.Module):
        def __init__(self, img=32, patch=8, dim=32, depth=2, heads=2, classes=10):
            super().__init__()
            self.embed = nn.Conv2d(3, dim, patch, patch)
            self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
            self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, classes)

        def forward(self, x):
            x = self.embed(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
            for blk in self.blocks:
                x = blk(x)
            return self.head(self.norm(x)[:, 0])


    class WideViT(TinyViT):
        """Needs an argument: cannot be rebuilt from its class alone."""

        def __init__(self, dim):
            super().__init__(dim=dim)


    def make_vit(**kwargs):
        return TinyViT(**kwargs)


    def not_a_model():
        return 42
''')


@pytest.fixture(scope="session")
def user_models(tmp_path_factory):
    """The folder holding ``tokenopt_user_models.py``, importable for the whole session."""
    folder = tmp_path_factory.mktemp("user_models")
    (folder / "tokenopt_user_models.py").write_text(USER_MODELS)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("tokenopt_user_models", None)


@pytest.fixture(scope="session")
def tiny_vit_spec() -> str:
    return TINY_VIT


@pytest.fixture(scope="session")
def tome_recipe() -> dict:
    return dict(TOME_RECIPE)


@pytest.fixture(scope="session")
def trained_demo():
    """``trained_demo("digits")`` -> ``"demo:digits"``, trained first if neither the cache nor the package has it.

    Loading a ``demo:`` spec never trains (it asks the user to run ``tokenopt demo``); the package ships
    the demo models trained, so this trains only a model whose spec changed since they were shipped.
    """
    from tokenopt.demo import demo_model

    def ensure(name: str) -> str:
        demo_model(name, quiet=True)
        return f"demo:{name}"

    return ensure
