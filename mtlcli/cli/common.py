"""What every command shares: the stderr console, JSON output, option types, error rendering."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from mtlcli.errors import MtlError

err_console = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override a recipe value: KEY.PATH=VALUE (YAML value). Repeatable.", metavar="KEY=VALUE"
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or tables on stderr.")]


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, allow_nan=False, default=_nan_to_none) + "\n")
    sys.stdout.flush()


def _nan_to_none(value: Any) -> Any:
    return None


def report(exc: MtlError) -> None:
    """Print an error and its hint on stderr."""
    err_console.print(f"[bold red]error:[/] {escape(exc.message)}", soft_wrap=True)
    if exc.hint:
        err_console.print(f"  [dim]hint:[/] {escape(exc.hint)}", soft_wrap=True)


def handle_errors(command: F) -> F:
    """Render MtlError as one message on stderr with exit code 2; Ctrl-C as exit code 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except MtlError as exc:
            report(exc)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
