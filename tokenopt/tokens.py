"""How many tokens a layer sees, and how they are laid out: plain data shared by every stage.

A merge (ToMe, ToFu) leaves every image with the same number of tokens, fixed by the recipe. A
gate (SPA) keeps a different number per image, known only when the model runs. Both are planned
and reported with one type::

    TokenCount.fixed(197)            # "197"            every image, always
    TokenCount(max=197, expected=98) # "≤ 197, ≈ 98 expected": at most 197; 98 on average (planned or measured)

The layout of the token stream inside a rewritten graph is either :class:`Dense` — a
(B, N, C) tensor, every image N tokens — or :class:`Packed` — the selected tokens of the whole
batch in one (1, T, C) sequence, image ``i`` at ``offsets[i] : offsets[i] + lengths[i]``. A
Packed layout names the graph nodes that hold ``lengths`` and ``offsets`` (values known only at
run time), so the passes after it can isolate attention per image and unpack at the end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class TokenCount:
    """Tokens per image at one point of the model: at most ``max``; ``expected`` on average.

    Compares equal to an ``int`` when the count is fixed at that value, so code (and tests) that
    reason about fixed counts read naturally: ``step.tokens_out == 185``; orders by ``max``.
    """

    max: int
    expected: float

    def __post_init__(self):
        if self.max < 0 or not 0 <= self.expected <= self.max or math.isnan(self.expected):
            raise ValueError(f"a token count needs 0 <= expected <= max, got max={self.max}, "
                             f"expected={self.expected}")

    @classmethod
    def fixed(cls, n: int) -> "TokenCount":
        return cls(int(n), float(n))

    @classmethod
    def of(cls, n: "int | TokenCount") -> "TokenCount":
        return n if isinstance(n, TokenCount) else cls.fixed(n)

    @property
    def varies(self) -> bool:
        """True when images may keep different numbers of tokens."""
        return self.expected != self.max

    def minus(self, r: int) -> "TokenCount":
        """The count after every image loses ``r`` tokens."""
        return TokenCount(self.max - r, max(self.expected - r, 0.0))

    def __eq__(self, other) -> bool:
        if isinstance(other, TokenCount):
            return self.max == other.max and self.expected == other.expected
        if isinstance(other, int) and not isinstance(other, bool):
            return not self.varies and self.max == other
        return NotImplemented

    def __sub__(self, r):
        """``count - r``: every image has r tokens fewer (see :meth:`minus`)."""
        if isinstance(r, int) and not isinstance(r, bool):
            return self.minus(r)
        return NotImplemented

    # ordered by the maximum: "tokens_out < 64" holds when no image can keep 64 or more
    def _bound(self, other):
        if isinstance(other, TokenCount):
            return other.max
        if isinstance(other, int) and not isinstance(other, bool):
            return other
        return None

    def __lt__(self, other):
        b = self._bound(other)
        return NotImplemented if b is None else self.max < b

    def __le__(self, other):
        b = self._bound(other)
        return NotImplemented if b is None else self.max <= b

    def __gt__(self, other):
        b = self._bound(other)
        return NotImplemented if b is None else self.max > b

    def __ge__(self, other):
        b = self._bound(other)
        return NotImplemented if b is None else self.max >= b

    def __hash__(self) -> int:
        return hash((self.max, self.expected))

    def __str__(self) -> str:
        if not self.varies:
            return str(self.max)
        return f"≤ {self.max}, ≈ {self.expected:.0f} expected"

    def to_json(self) -> "int | dict":
        """A plain int when fixed (what manifests always held), else {"max": ..., "expected": ...}."""
        return self.max if not self.varies else {"max": self.max, "expected": round(self.expected, 3)}


@dataclass(frozen=True)
class Dense:
    """Every image has the same number of tokens: the stream is a (B, N, C) tensor."""


@dataclass(frozen=True)
class Packed:
    """The kept tokens of the whole batch in one (1, T, C) sequence.

    ``lengths`` and ``offsets`` name the graph nodes holding the (B,) tokens per image and the
    (B,) start of each image in the packed sequence; ``capacity`` is the static upper bound of
    tokens per image when the layout is padded for ``torch.compile``/export (None: data-dependent T).
    ``layout`` says which runs: "packed" (1, T, C), "padded" (B, capacity, C) with each image's
    tokens first, or "auto" (packed in eager runs, padded while torch.compile/export traces).
    ``positions`` names the node with every row's flat position ``b * N0 + n`` on the original
    grid (-1: an empty padded slot) and ``valid`` the (B, N0) mask of tokens still present;
    ``strategy`` is the packed attention's implementation (ops.packing.STRATEGIES or "auto").
    """

    lengths: str
    offsets: str
    capacity: int | None = None
    layout: str = "packed"
    positions: str | None = None
    valid: str | None = None
    strategy: str = "auto"


Layout = Union[Dense, Packed]
