"""`mtl eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mtlcli.cli.common import JsonOption, err_console, fmt, handle_errors, print_json


@handle_errors
def command(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory written by `mtl train`, or a bundle written by `mtl export`.")
    ],
    split: Annotated[str, typer.Option("--split", help="Which split: test, valid or train.")] = "test",
    data: Annotated[
        str | None,
        typer.Option("--data", help="A bundle only: a labelled file in the recipe's source format ('-' for stdin)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Per-task metrics of a trained run on one split, or of a bundle on a labelled file (--data):
    AUC and logloss (binary), RMSE and MAE (regression), row count and positive rate."""
    from mtlcli.errors import MtlError
    from mtlcli.export.bundle import is_bundle

    if split not in ("train", "valid", "test"):
        raise typer.BadParameter(f"{split!r} is not one of train, valid, test", param_hint="--split")
    if is_bundle(run_dir):
        if data is None:
            raise MtlError(f"{run_dir} is a bundle: say which labelled file to evaluate on", "add --data FILE")
        from mtlcli.export.evaluate import evaluate_bundle

        result = evaluate_bundle(run_dir, data)
        where = f"{run_dir} on {data}"
        key = {"data": data}
    else:
        if data is not None:
            raise MtlError("--data takes a bundle (from `mtl export`), not a run directory", "export the run first")
        from mtlcli.train.run import evaluate_run

        result = evaluate_run(run_dir, split)
        where = f"{run_dir} on {split}"
        key = {"split": split}
    if as_json:
        print_json({**key, "tasks": result["tasks"]})
        return
    table = Table(title=where, title_justify="left")
    columns = ["auc", "gauc", "logloss", "pcoc", "rmse", "mae", "n", "positive_rate", "gauc_groups"]
    used = [c for c in columns if any(c in m for m in result["tasks"].values())]
    table.add_column("task")
    for column in used:
        table.add_column(column, justify="right")
    for task, metrics in result["tasks"].items():
        table.add_row(task, *(fmt(metrics.get(c)) for c in used))
    err_console.print(table)
    for task, metrics in result["tasks"].items():
        if "space" in metrics:
            err_console.print(
                f"{task}: only the {metrics['n']:,} rows where {metrics['space']} count (its sample space)"
            )
