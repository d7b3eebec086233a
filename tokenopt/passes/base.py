"""The pass interface and its registry: prepare -> calibrate -> convert, as torch.ao does it.

A pass is a small class in its own module under ``tokenopt/passes``, registered by name with
[`register_pass`][tokenopt.passes.base.register_pass]; recipes refer to passes by that name. The planner and the pipeline call
it in this order, and name no pass themselves::

    per_layer = p.layer_options(options, n, where)         # prepare: one Params per selected layer
    p.refuse(block)                                        #   ... or the reason it cannot
    context |= p.calibrate(model, analysis, images)        # calibrate: only if p.needs_calibration
    per_layer = p.resolve(options, per_layer, blocks, context, where)   # measurements -> choices
    step = p.plan_layer(block, params, tokens_in, prefix)  # decide everything: a LayerStep
    p.rewrite(g, block, step)                              # convert: carry the decision out

``Params`` is a dataclass per pass (what one layer asks for, then what it will do), never a
dict: the rewrite reads ``step.params.r``, and a typo is an AttributeError in the pass's own
tests rather than a silent ``None``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict

from tokenopt.tokens import TokenCount


class PassOptions(BaseModel):
    """Options shared by every pass; a pass extends this with its own fields.

    ``extra="forbid"`` makes an unknown key in a recipe rule an error rather than a silent no-op;
    ``strict=True`` refuses a value of another type instead of converting it (``r: yes`` is not 1,
    ``prop_attn: 1`` is not true, ``r: "5"`` and ``r: 5.0`` are not 5); an int is still a float.
    """

    model_config = ConfigDict(extra="forbid", strict=True)


@dataclass
class LayerStep:
    """What a pass will do at one layer, decided before rewriting.

    ``tokens_out`` is per image: fixed for merges, varying (``TokenCount(max, expected)``) for
    gates whose selection depends on the image. ``params`` is the pass's own Params dataclass.
    """

    tokens_out: TokenCount
    params: Any
    describe: str = ""                            # shown in the report, e.g. "merge r=13"
    shortfall: str = ""                           # non-empty: asked for more than the layer can give
    # for export (tokenopt.deploy): why this layer's tensor shapes depend on the images ("": they do not),
    # and whether a count that varies per image still runs in static, padded shapes
    dynamic: str = ""
    padded: bool = False
    # for another input size (tokenopt.calling): why this step only works at the token count it was
    # planned for ("": it follows the tokens it gets), and the fewest tokens in at which it still
    # does what was planned
    fixed_grid: str = ""
    min_tokens: int = 0

    def __post_init__(self):
        self.tokens_out = TokenCount.of(self.tokens_out)


@dataclass(frozen=True)
class Probe:
    """What ``tokenopt probe`` shows and writes for a pass: a table of per-block measurements, the
    rules of the recipe they imply, and the comment that heads the written recipe."""

    title: str
    caption: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str
    rules: tuple[dict, ...]
    comment: str


@dataclass(frozen=True)
class TuneMethod:
    """One per-layer choice a pass offers ``tokenopt tune`` (see `Pass.tune_methods`).

    ``rules(layers, rs, tokens)``: the recipe rules that reduce block indices ``layers`` by ``rs`` tokens
    each (one r per layer), ``tokens`` entering each of those blocks in the original model.
    ``keeps_stream``: an op-level reduction (``placement: op``): the layer's op runs on r fewer tokens and
    the stream keeps every token, so later layers see as many as it did. ``cap(tokens, prefix)``: the most
    tokens such a layer can take (a stream-level layer takes at most half its unprotected tokens).
    """

    rules: Callable[[list[int], list[int], int | None], list[dict]]
    keeps_stream: bool = False
    cap: Callable[[int, int], int] | None = None

    def __post_init__(self):
        if self.keeps_stream and self.cap is None:
            raise TypeError("an op-level TuneMethod needs its cap(tokens, prefix)")


class Pass:
    """Base class: one token-reduction method."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = PassOptions
    #: True when the pass changes the number of tokens that later blocks see.
    changes_token_count: ClassVar[bool] = False
    #: The key of the measurement `calibrate` returns (None: the pass never calibrates).
    #: A context that already holds it (e.g. replayed from a saved artifact) is not measured again.
    calibration_key: ClassVar[str | None] = None
    #: The kind of learned part the pass inserts (tokenopt.rewrite.learned), None when it learns nothing;
    #: ``tokenopt train`` finds the trainer through it.
    learned: ClassVar = None

    @classmethod
    def sweep_curves(cls) -> dict:
        """The curves ``tokenopt eval --sweep`` can draw for this pass: method name -> a function of r
        returning the recipe rules of that point. Empty for passes that have no single knob r."""
        return {}

    @classmethod
    def tune_methods(cls) -> dict[str, TuneMethod]:
        """The per-layer choices ``tokenopt tune`` may make with this pass: method name -> `TuneMethod`.
        Only training-free reductions belong here: ones that shorten the token stream, and op-level ones
        (``keeps_stream``: the cost model prices their op at the tokens it runs on, the rest of the block at
        the whole stream). Empty: the tuner never picks this pass."""
        return {}

    def probe(self, model, analysis, images, r: int, threshold: float | None):
        """A per-block measurement that writes a recipe (``tokenopt probe``): a `Probe`, or
        None for passes without one."""
        return None

    def refuse(self, block) -> str | None:
        """None when the block can be rewritten, else the reason shown to the user."""
        if block.refusal is None and self.changes_token_count and block.keeps_tokens:
            return block.keeps_tokens
        return block.refusal

    def refuse_layer(self, block, params, analysis) -> str | None:
        """`refuse` for one layer's ``params`` (a pass whose options change what it needs, e.g.
        ToMe's op-level placement, overrides this); may raise a RecipeError for a request that is wrong."""
        return self.refuse(block)

    def check_layers(self, layers: list) -> None:
        """Validate the layers the whole recipe gives this pass, together: ``layers`` is
        [(block, params, where)] in block order, over every rule of this pass (``where``: the rule's
        place in the recipe). Raise a RecipeError for a combination that cannot run (default: none)."""

    def changes_tokens(self, options: PassOptions) -> bool:
        """Whether a rule with ``options`` changes the token count later blocks see."""
        return self.changes_token_count

    def layer_options(self, options: PassOptions, n_layers: int, where: str) -> list:
        """Expand a rule's options into one Params per selected layer (schedules live here)."""
        raise NotImplementedError

    def needs_calibration(self, options: PassOptions) -> bool:
        """True when planning this rule needs measurements on real images (e.g. ToFu's op: auto)."""
        return False

    def calibrate(self, model, analysis, images) -> dict:
        """Measure what `resolve` needs on calibration ``images`` (N, C, H, W), using the
        ``analysis`` the pipeline already made (no second trace). Returns {calibration_key: value}."""
        return {}

    def resolve(self, options: PassOptions, per_layer: list, blocks: list, context: dict, where: str) -> list:
        """Fill in per-layer choices that depend on measurements in ``context`` (default: none)."""
        return per_layer

    def plan_layer(self, block, params, tokens_in: TokenCount, prefix: int) -> LayerStep:
        raise NotImplementedError

    def rewrite(self, g, block, step: LayerStep) -> None:
        """Insert this pass's ops for ``block`` using the GraphRewriter ``g``."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(name: str):
    """Class decorator: make a pass available to recipes under ``name``."""

    def wrap(cls: type[Pass]) -> type[Pass]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_pass(name: str) -> type[Pass]:
    return _REGISTRY[name]


def available_passes() -> list[str]:
    return sorted(_REGISTRY)


def registered_passes() -> list[type[Pass]]:
    """Every registered pass class, in the order they registered."""
    return list(_REGISTRY.values())
