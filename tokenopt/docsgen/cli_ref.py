"""The command-line reference, read from the Typer app: every verb, argument and option, with help.

The app is turned into its click command (what ``tokenopt`` runs), so the reference lists what
the parser accepts, not what someone remembered to write down.
"""
from __future__ import annotations

def command():
    import typer.main

    from tokenopt.cli import app
    return typer.main.get_command(app)


def verbs() -> dict:
    group = command()
    ctx = _context(group, "tokenopt")
    return {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}


def _cell(s: str) -> str:
    text = " ".join((s or "").split()).replace("|", "\\|")
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _code(s: str) -> str:
    return "<code>" + s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;") \
        + "</code>"


def param_names(p) -> list[str]:
    """How a user writes the parameter: ``--output`` and ``-o``, or the argument's metavar."""
    if p.param_type_name == "argument":
        return [p.metavar or p.name.upper()]
    return list(p.opts) + list(p.secondary_opts)


def _context(cmd, name: str, parent=None):
    return cmd.context_class(cmd, info_name=name, parent=parent)


def render() -> str:
    group = command()
    root = _context(group, "tokenopt")
    out = ["# Command-line reference", "",
           "Generated from the Typer app (`tokenopt.cli.app`) when the site is built: every verb of "
           "`tokenopt`, its arguments and options, and their help text as `--help` prints it. "
           "[Getting started](../getting-started.md) shows the verbs running, with their output.", "",
           f"`tokenopt` — {_cell(group.help)}", "",
           "| global option | help |", "|---|---|"]
    for p in group.params:
        record = p.get_help_record(root)
        if record:
            out.append(f"| {_code(record[0])} | {_cell(record[1])} |")
    out += ["| <code>-h, --help</code> | Show the help of `tokenopt` or of a verb, and exit. |", ""]
    for name, cmd in verbs().items():
        ctx = _context(cmd, name, root)
        help_text = (cmd.help or "").strip()
        summary, _, rest = help_text.partition("\n\n")
        out += [f"## `tokenopt {name}`", "", _cell(summary), ""]
        if rest.strip():
            out += [" ".join(rest.split()), ""]
        out += ["```text", " ".join(["tokenopt", name, *cmd.collect_usage_pieces(ctx)]), "```", ""]
        out += ["| argument or option | help |", "|---|---|"]
        for p in cmd.params:
            record = None if getattr(p, "hidden", False) else p.get_help_record(ctx)
            if record:
                out.append(f"| {_code(record[0])} | {_cell(record[1])} |")
        out.append("")
    return "\n".join(out)
