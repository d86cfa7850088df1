"""`mtl report`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from mtlcli.cli.common import err_console, handle_errors, warn


@handle_errors
def command(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="Run directories written by `mtl train`.", metavar="RUN_DIR...")
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="The HTML file to write ('-' for stdout).")],
    baseline: Annotated[
        Path | None,
        typer.Option("--baseline", help="A single_task run: the page shows each run's gain per task against it."),
    ] = None,
    max_rows: Annotated[
        int | None,
        typer.Option("--max-rows", min=1, help="Rows of valid the gate and gradient reports read (when computed)."),
    ] = 20000,
) -> None:
    """One self-contained HTML page (no network, no script): training curves and loss weights, metrics on
    valid and test, the gain over --baseline, gate heatmaps, what masks, gate control and a training
    objective learned, label and gradient correlation, and the recipe.
    Several runs are compared side by side. A run's saved explain.json (`mtl explain RUN --json >
    RUN/explain.json`) is used when present; otherwise the reports are computed on valid."""
    from mtlcli.explain.page import report_page
    from mtlcli.fileio import write_text

    with err_console.status("reporting", spinner="dots"):
        page, warnings = report_page(run_dirs, baseline, max_rows)
    warn(warnings)
    if out == "-":
        sys.stdout.write(page)
        return
    write_text(Path(out), page)
    err_console.print(f"wrote {out} ({len(page.encode()) / 1024:,.0f} KiB)", highlight=False)
