"""`mtl compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from mtlcli.cli.common import JsonOption, err_console, fmt, handle_errors, print_json


@handle_errors
def command(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="Run directories written by `mtl train`.", metavar="RUN_DIR...")
    ],
    baseline: Annotated[
        Path | None,
        typer.Option("--baseline", help="A single_task run: each run's gain per task is measured against it."),
    ] = None,
    split: Annotated[str, typer.Option("--split", help="Which split: test, valid or train.")] = "test",
    tolerance: Annotated[
        float,
        typer.Option("--tolerance", min=0.0, help="A task moves when its gain exceeds this (AUC or RMSE units)."),
    ] = 0.001,
    as_json: JsonOption = False,
) -> None:
    """Per-task metrics of several runs side by side; with --baseline, each run's multi-task gain per
    task (AUC up, RMSE down) and a seesaw mark when one task gains while another loses."""
    from mtlcli.explain import compare_runs
    from mtlcli.models.base import scheme
    from mtlcli.train.run import load_run

    if split not in ("train", "valid", "test"):
        raise typer.BadParameter(f"{split!r} is not one of train, valid, test", param_hint="--split")
    result = compare_runs(run_dirs, baseline, split, tolerance)
    if as_json:
        print_json(result)
        return
    names: dict[str, str] = result["names"]
    table = Table(title=f"compare on {split}" + (f" (gain vs {baseline})" if baseline else ""), title_justify="left")
    table.add_column("run", overflow="fold")  # folded, never cut: two runs must not look alike
    table.add_column("scheme")
    for task in result["tasks"]:
        table.add_column(task, justify="right")
    if baseline is not None:
        table.add_column("", justify="left")
    if result["baseline"] is not None:
        base = result["baseline"]
        table.add_row(
            Text(names[str(base["run_dir"])], style="dim"),
            Text(str(base["scheme"]), style="dim"),
            *(Text(_cell(base["tasks"].get(t)), style="dim") for t in result["tasks"]),
            Text("baseline", style="dim"),
        )
    for run in result["runs"]:
        cells = []
        for task in result["tasks"]:
            text = Text(_cell(run["tasks"].get(task)), style="bold" if result["best"][task] == run["run_dir"] else "")
            gain = run.get("gain", {}).get(task)
            if gain is not None:
                colour = "green" if gain["gain"] > tolerance else "red" if gain["gain"] < -tolerance else "dim"
                text.append(f" {gain['gain']:+.4f}", style=colour)
            cells.append(text)
        mark = [Text("seesaw", style="bold yellow") if run.get("seesaw") else Text("")] if baseline else []
        table.add_row(names[str(run["run_dir"])], str(run["scheme"]), *cells, *mark)
    err_console.print(table)
    if baseline is not None and not scheme(load_run(baseline).model).capabilities.baseline:
        err_console.print(f"[yellow]note:[/] the baseline is a {result['baseline']['scheme']} run, not single_task")
    for line in result["readings"]:
        err_console.print(f"  {line}", soft_wrap=True, markup=False)


def _cell(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "-"
    for metric in ("auc", "rmse"):
        if metrics.get(metric) is not None:
            return f"{metric} {fmt(metrics[metric])}"
    return "-"
