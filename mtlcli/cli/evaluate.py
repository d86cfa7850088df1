"""`mtl eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mtlcli.cli.common import JsonOption, err_console, fmt, handle_errors, print_json


@handle_errors
def command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `mtl train`.")],
    split: Annotated[str, typer.Option("--split", help="Which split: test, valid or train.")] = "test",
    as_json: JsonOption = False,
) -> None:
    """Per-task metrics of a trained run on one split: AUC and logloss (binary), RMSE and MAE
    (regression), row count and positive rate."""
    from mtlcli.train.run import evaluate_run

    if split not in ("train", "valid", "test"):
        raise typer.BadParameter(f"{split!r} is not one of train, valid, test", param_hint="--split")
    result = evaluate_run(run_dir, split)
    if as_json:
        print_json({"split": result["split"], "tasks": result["tasks"]})
        return
    table = Table(title=f"{run_dir} on {split}", title_justify="left")
    columns = ["auc", "logloss", "rmse", "mae", "n", "positive_rate"]
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
