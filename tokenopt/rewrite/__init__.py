"""Rewriting: the GraphRewriter primitives passes use, the token state they thread, the outputs.

    state.py      TokenState: size, index, layout (Dense | Packed) as graph nodes and data
    rewriter.py   GraphRewriter: insert, wrap, reroute, attention bias/replace/decompose
    outputs.py    pooling and returned tokens after merges
"""
from tokenopt.rewrite.rewriter import GraphRewriter
from tokenopt.rewrite.state import TokenState

__all__ = ["GraphRewriter", "TokenState"]
