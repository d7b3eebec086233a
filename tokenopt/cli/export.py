"""``tokenopt export``: a saved optimized model out as a ``torch.export`` program or an ONNX file.

    tokenopt export model.tokenopt.pt -o model.pt2
    tokenopt export model.tokenopt.pt -o model.onnx --format onnx
"""
from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from tokenopt.cli.common import ArchOpt, console, status, user_errors


class ExportFormat(str, enum.Enum):
    pt2 = "pt2"
    onnx = "onnx"


@user_errors
def export(
    artifact: Annotated[Path, typer.Argument(metavar="ARTIFACT", help="An optimized model saved by `tokenopt apply` "
                                                                      "or `tokenopt train` (OUT.tokenopt.pt).")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUT",
                                         help="Where to write the program (.pt2) or the ONNX file.")],
    fmt: Annotated[Optional[ExportFormat], typer.Option(
        "--format", "-f", help="pt2 (torch.export.save) or onnx (default: from OUT's suffix, else pt2).")] = None,
    static_batch: Annotated[bool, typer.Option(
        "--static-batch", help="Fix the batch size at the saved example's instead of leaving it dynamic.")] = False,
    arch: ArchOpt = None,
) -> None:
    """Export ARTIFACT with static token counts (ToMe, ToFu, ToSA, SPA padded), checked against eager."""
    from tokenopt import deploy

    chosen = fmt.value if fmt is not None else ("onnx" if output.suffix.lower() == ".onnx" else "pt2")
    with status(f"exporting {artifact} as {chosen}"):
        res = deploy.export_artifact(artifact, output, chosen, arch=arch, dynamic_batch=not static_batch)
    out = console()
    batch = "dynamic batch" if res.dynamic_batch else "static batch"
    checked = (f"max abs difference to eager {res.max_abs_diff:.2g} on a batch of {res.checked_batch}"
               if res.max_abs_diff is not None else "not checked")
    out.print(f"wrote {res.path} ({res.format}, {batch}; {checked}; {res.path.stat().st_size / 1e6:.1f} MB)", soft_wrap=True)
    if res.note:
        out.print(f"note: {res.note}")
