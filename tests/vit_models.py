"""Tiny ViTs written in the tests: the 'own ViT class' a user brings, in two attention styles."""
from __future__ import annotations

import torch
from torch import nn


class ExplicitAttention(nn.Module):
    """Attention written out: softmax(q k^T * scale) v, as many research codebases do."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.to_qkv = nn.Linear(dim, dim * 3)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.to_qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, c))


class ExplicitBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = ExplicitAttention(dim, heads)
        self.ff = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.ff(self.ln2(x))


class ExplicitViT(nn.Module):
    """cls-token ViT with explicit attention; pools the cls token."""

    def __init__(self, img: int = 32, patch: int = 8, dim: int = 64, depth: int = 3, heads: int = 4, classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
        self.layers = nn.ModuleList(ExplicitBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.fc(self.norm(x)[:, 0])


class MHABlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))

    def forward(self, x):
        h = self.n1(x)
        x = x + self.mha(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.n2(x))


class MHAViT(nn.Module):
    """ViT on nn.MultiheadAttention, no cls token, average pooling over tokens."""

    def __init__(self, img: int = 32, patch: int = 8, dim: int = 64, depth: int = 3, heads: int = 4, classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(MHABlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(dim=1))


class SmallCNN(nn.Module):
    """No attention at all: tokenopt must refuse it with a clear message."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def small_cnn():
    return SmallCNN()


def explicit_vit():
    return ExplicitViT()


def mha_vit():
    return MHAViT()


class GridConvViT(ExplicitViT):
    """A conditional positional encoding (as in Twins/CPVT) after the first block: the tokens are
    reshaped to a fixed 4 x 4 grid. Nothing in the attention says so; only running it tells."""

    def __init__(self):
        super().__init__(img=32, patch=8, dim=64, depth=3)
        self.peg = nn.Conv2d(64, 64, 3, padding=1, groups=64)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == 0:
                cls, grid = x[:, :1], x[:, 1:].transpose(1, 2).reshape(x.shape[0], 64, 4, 4)
                x = torch.cat([cls, grid.flatten(2).transpose(1, 2) + self.peg(grid).flatten(2).transpose(1, 2)], 1)
        return self.fc(self.norm(x)[:, 0])


def grid_conv_vit():
    return GridConvViT()


class ConditionedViT(ExplicitViT):
    """Two inputs, as a conditioned model has: images and a conditioning vector (B, dim) that is
    added to every token before every block (``model(x, cond)`` or ``model(x, cond=cond)``)."""

    def forward(self, x, cond=None):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for layer in self.layers:
            if cond is not None:
                x = x + cond[:, None, :]
            x = layer(x)
        return self.fc(self.norm(x)[:, 0])
