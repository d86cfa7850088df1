"""The `mtl` command: a thin shell over the library; one small module per command."""

from __future__ import annotations

import signal
from typing import Annotated

import typer

from mtlcli import __version__
from mtlcli.cli import compare, evaluate, explain, export, predict, preprocess, recipe_cmd, report, sweep, train
from mtlcli.cli.common import err_console

app = typer.Typer(
    name="mtl",
    help="Multi-task learning for recommender systems: one YAML recipe, every sharing scheme and loss weighting.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(recipe_cmd.app, name="recipe")
app.command("preprocess")(preprocess.command)
app.command("train")(train.command)
app.command("eval")(evaluate.command)
app.command("export")(export.command)
app.command("predict")(predict.command)
app.command("explain")(explain.command)
app.command("compare")(compare.command)
app.command("report")(report.command)
app.command("sweep")(sweep.command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mtl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Multi-task learning for recommender systems."""


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (schedulers, `timeout`, Kubernetes) stops a command as Ctrl-C does


def _stopped_by_launcher(signum: int, frame: object) -> None:
    raise SystemExit(130)  # quietly (the launcher says why); finally blocks and the run's settling still run


def main() -> None:
    from mtlcli.train.launch import under_launcher

    # a rank of `mtl train --nproc` is stopped by its launcher, which says why
    signal.signal(signal.SIGTERM, _stopped_by_launcher if under_launcher() else _terminate)
    try:
        app()
    except KeyboardInterrupt:  # before a command's own handling began (typer building the commands)
        err_console.print("[yellow]interrupted[/]")
        raise SystemExit(130) from None
