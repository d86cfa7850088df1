"""`mtl recipe check` and `mtl recipe show`."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape

from mtlcli.cli.common import JsonOption, SetOption, err_console, handle_errors, print_json, report
from mtlcli.errors import MtlError
from mtlcli.recipe import recipe_to_yaml
from mtlcli.recipe.load import load_recipe_noted

app = typer.Typer(help="Validate and inspect recipes.", no_args_is_help=True)


@app.command("check")
@handle_errors
def check(
    files: Annotated[list[str], typer.Argument(help="Recipe files ('-' for stdin).")],
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Validate recipes; report every problem of every file. Exit 2 if any is invalid."""
    results: dict[str, dict[str, Any]] = {}
    for file in files:
        try:
            _, notes = load_recipe_noted(file, overrides or [])
            results[file] = {"valid": True} | ({"notes": notes} if notes else {})
            if not as_json:
                err_console.print(f"[green]ok[/] {escape(file)}")
                print_notes(notes)
        except MtlError as exc:
            results[file] = {"valid": False, "error": exc.message}
            report(exc)
    if as_json:
        print_json(results)
    if not all(r["valid"] for r in results.values()):
        raise typer.Exit(2)


@app.command("show")
@handle_errors
def show(
    file: Annotated[str, typer.Argument(help="Recipe file ('-' for stdin).")],
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print the resolved recipe (overrides applied, every default filled in) on stdout."""
    recipe, notes = load_recipe_noted(file, overrides or [])
    print_notes(notes)
    if as_json:
        print_json(recipe.to_dict())
    else:
        typer.echo(recipe_to_yaml(recipe), nl=False)


def print_notes(notes: list[str]) -> None:
    """What the overrides changed beyond the values they set, on stderr."""
    for note in notes:
        err_console.print(f"[cyan]note:[/] {escape(note)}", soft_wrap=True)


@app.command("components")
@handle_errors
def components(as_json: JsonOption = False) -> None:
    """List the sharing schemes and weighting strategies recipes can name."""
    from mtlcli.models import SCHEMES
    from mtlcli.weighting import WEIGHTINGS

    listing = {
        "schemes": {name: SCHEMES.get(name).summary for name in SCHEMES.names()},
        "weightings": {name: WEIGHTINGS.get(name).summary for name in WEIGHTINGS.names()},
    }
    if as_json:
        print_json(listing)
        return
    for title, items in (("model.scheme", listing["schemes"]), ("loss.weighting", listing["weightings"])):
        err_console.print(f"[bold]{title}[/]")
        for name, summary in items.items():
            err_console.print(f"  {name:<16} {summary}")
