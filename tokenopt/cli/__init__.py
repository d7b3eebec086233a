"""The ``tokenopt`` command line: the Typer app, assembled from one module per group of verbs.

    tokenopt apply recipe.yaml model.pt --arch timm:vit_small_patch16_224 -o model.tokenopt.pt --check
    tokenopt validate recipe.yaml [MODEL]
    tokenopt inspect model.tokenopt.pt --graph svg -o graph.svg
    tokenopt eval | probe | demo | train ...
    tokenopt tune MODEL --data DATA --budget speed=1.5 -o tuned.yaml
    tokenopt export model.tokenopt.pt -o model.pt2 [--format onnx]
    tokenopt generate demo:digits-dit --class 3 -o grid.png

    cli/common.py     options, console, loading models, recipes and images: what every verb shares
    cli/apply.py      apply, validate
    cli/inspect.py    inspect
    cli/measure.py    eval, probe, demo
    cli/train.py      train
    cli/export.py     export
    cli/generate.py   generate (samples of a class-conditional generator)
    cli/tune.py       tune

Verb modules import ``common`` and never each other or this module; registering their commands
here is the only place they meet. Every user error (a :class:`~tokenopt.errors.TokenoptError`) ends
as one ``error: ...`` message on stderr with exit status 2 and no traceback; usage errors (a
missing argument, an unknown option) exit 2 as well. Files are written to a temporary name and
renamed when complete, so a failed run never leaves a partial output behind.
"""
from __future__ import annotations

import sys
from typing import Annotated

import typer

from tokenopt.cli import apply, export, generate, inspect, measure, train, tune
from tokenopt.cli.common import error
from tokenopt.errors import TokenoptError
from tokenopt.version import __version__

app = typer.Typer(
    name="tokenopt",
    help="Make Vision Transformers faster by rewriting their torch.fx graphs (ToMe, ToFu, ToSA, SPA) "
         "from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# The verbs, in the order `tokenopt --help` lists them.
app.command("apply")(apply.apply)
app.command("validate")(apply.validate)
app.command("inspect")(inspect.inspect)
app.command("eval")(measure.eval_)
app.command("probe")(measure.probe)
app.command("demo")(measure.demo)
app.command("train")(train.train_)
app.command("export")(export.export)
app.command("generate")(generate.generate)
app.command("tune")(tune.tune_)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"tokenopt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Make Vision Transformers faster by rewriting their torch.fx graphs, from YAML recipes."""


def main(argv: list[str] | None = None) -> None:
    """Console script entry point: user errors are one line on stderr and exit status 2."""
    try:
        app(args=argv, prog_name="tokenopt")
    except TokenoptError as e:  # raised outside a command (commands handle their own)
        error(str(e))
        sys.exit(2)


__all__ = ["app", "main"]
