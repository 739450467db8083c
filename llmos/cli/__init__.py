"""The `llmos` command: the registry of every command, each a thin wrapper over the Python API.

One module per command group defines plain functions (and typer sub-apps for nested commands);
only this file knows the `app`. The modules import llmos.cli.common and the library, never each
other, and keep heavy imports inside the commands so that `llmos --help` starts fast.
"""

from __future__ import annotations

import sys

import typer

from llmos.cli import chat, check, generate, prefs, safety, serve, sweep, train, write
from llmos.cli import eval as eval_cmd
from llmos.cli.common import err

app = typer.Typer(
    name="llmos",
    help="LLMOS: local-first creative writing with language models. Runs offline on a CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# `llmos --help` lists commands in this order, then the groups in theirs.
app.command()(generate.generate)
app.command()(generate.pull)
app.command("models")(generate.list_models)

app.command()(train.prepare)
app.command()(train.ngram)
app.command()(train.train)
app.command()(train.finetune)
app.command()(sweep.sweep)
app.command()(train.merge)
app.command()(train.export)
app.command()(train.embed)

app.command()(write.write)
app.command()(write.tasks)
app.command("forms")(write.list_forms)
app.command("check-poem")(write.check_poem)
app.command("eval")(eval_cmd.evaluate)
app.command("check")(check.check)
app.add_typer(write.story_app, name="story")

app.command()(serve.serve)

app.command()(chat.chat)
app.add_typer(chat.sessions_app, name="sessions")
app.add_typer(chat.personas_app, name="personas")
app.add_typer(chat.kb_app, name="kb")

app.add_typer(prefs.prefs_app, name="prefs")
app.add_typer(safety.safety_app, name="safety")


def style_rank_argv(argv: list[str]) -> list[str]:
    """`--rank style:RUN` reads as `--rank-style RUN` (typer options cannot take an optional value)."""
    out = []
    for arg in argv:
        if out and out[-1] == "--rank" and arg.startswith("style:"):
            out[-1], arg = "--rank-style", arg[6:]
        elif arg.startswith("--rank=style:"):
            arg = "--rank-style=" + arg[len("--rank=style:"):]
        out.append(arg)
    return out


def main():
    sys.argv[1:] = style_rank_argv(sys.argv[1:])
    try:
        app()
    except KeyboardInterrupt:
        err.print("[yellow]stopped[/] (Ctrl-C)")
        sys.exit(130)
