"""What every command shares: the stderr console, JSON output, option types, error rendering."""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from safetensors import SafetensorError

from mtlcli.errors import MtlError
from mtlcli.fileio import to_json

err_console = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override a recipe value: KEY.PATH=VALUE (YAML value; a mapping replaces the whole mapping, a new"
        " model.scheme drops the old scheme's own keys). Repeatable.",
        metavar="KEY=VALUE",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or tables on stderr.")]


ENVIRONMENT_EXIT = 3  # the machine failed us: disk full, permission denied, an I/O error


STDOUT = "standard output"


def print_json(obj: Any) -> None:
    sys.stdout.write(to_json(obj, indent=2) + "\n")
    flush_stdout()


def flush_stdout() -> None:
    """Flush stdout; a failure (a full disk behind ``> file``) names standard output."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, STDOUT) from None


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit cannot fail a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def environment_message(exc: BaseException) -> str:
    """One line for an operating-system failure: the path (when known) and the cause."""
    if isinstance(exc, OSError):
        cause = exc.strerror or str(exc) or type(exc).__name__
        where = "standard output" if exc.filename in (None, STDOUT) else str(exc.filename)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return f"cannot write {where}: {cause}; free some space (or write elsewhere) and run it again"
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"cannot write or read {where}: {cause}; check its permissions, or choose another path"
        if exc.errno == errno.EISDIR:
            return f"{where} is a directory: give a file name"
        return f"{where}: {cause}"
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"cannot write a safetensors file: {first}"


def report(exc: MtlError) -> None:
    """Print an error and its hint on stderr."""
    err_console.print(f"[bold red]error:[/] {escape(exc.message)}", soft_wrap=True)
    if exc.hint:
        err_console.print(f"  [dim]hint:[/] {escape(exc.hint)}", soft_wrap=True)


def handle_errors(command: F) -> F:
    """Render MtlError as one message on stderr with exit code 2; Ctrl-C and SIGTERM as exit code
    130; an operating-system failure (disk full, permission denied, ...) as one line with exit
    code 3. A closed pipe on stdout (``| head``) ends quietly with exit code 0. Standard output is
    flushed here, so that a full disk behind ``> file`` is reported, not lost at exit."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = command(*args, **kwargs)
            flush_stdout()
            return result
        except MtlError as exc:
            report(exc)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            try:
                sys.stdout.flush()  # what was already written (rows scored, a table) reaches the reader
            except OSError:
                _silence_stdout()
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except BrokenPipeError:
            _silence_stdout()
            raise typer.Exit(0) from None
        except (OSError, SafetensorError) as exc:
            if isinstance(exc, OSError) and exc.filename is None:
                exc = OSError(exc.errno, exc.strerror, STDOUT)  # mtl's own files carry their path
            if isinstance(exc, OSError) and exc.filename in (None, STDOUT):
                _silence_stdout()  # stdout itself (`> /dev/full`): do not fail again at exit
            err_console.print(f"[bold red]error:[/] {escape(environment_message(exc))}", soft_wrap=True)
            raise typer.Exit(ENVIRONMENT_EXIT) from None

    return wrapper  # type: ignore[return-value]


def warn(messages: list[str]) -> None:
    """Warnings on stderr, one line each (shown even with --quiet: they say the result may be meaningless)."""
    for message in messages:
        err_console.print(f"[bold yellow]warning:[/] {escape(message)}", soft_wrap=True)


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
