"""ToMe: merge r tokens per block by bipartite soft matching (Bolya et al., ICLR 2023)."""
from __future__ import annotations

from typing import Union

from pydantic import BaseModel, ConfigDict, Field

from tokenopt.passes.base import Pass, PassOptions, register_pass


class DecreasingSchedule(BaseModel):
    """r falls linearly from ``start`` at the first selected layer to ``end`` at the last."""

    model_config = ConfigDict(extra="forbid")
    start: int = Field(ge=0)
    end: int = Field(ge=0)


class ToMeOptions(PassOptions):
    r: Union[int, list[int], DecreasingSchedule] = Field(
        description="tokens merged per layer: an int, a per-layer list, or {start, end}")
    prop_attn: bool = Field(True, description="add log(size) to every later attention's logits")


@register_pass("tome")
class ToMe(Pass):
    """Merge r tokens per block by bipartite soft matching."""

    Options = ToMeOptions
    changes_token_count = True
