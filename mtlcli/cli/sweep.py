"""`mtl sweep`."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from mtlcli.cli.common import JsonOption, QuietOption, SetOption, err_console, fmt, handle_errors, print_json
from mtlcli.recipe import load_recipe

if TYPE_CHECKING:
    from mtlcli.cli.train_console import ConsoleReporter

GridOption = Annotated[
    list[str] | None,
    typer.Option(
        "--grid",
        "-g",
        help="An axis of the grid: KEY=V1,V2,... (values are YAML; commas inside [...] stay). Repeat for more axes.",
        metavar="KEY=V1,V2",
    ),
]


@handle_errors
def command(
    recipes: Annotated[
        list[str],
        typer.Argument(help="Recipe file(s); several make the recipe an axis of the grid.", metavar="RECIPE..."),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Directory for the runs (one per grid point) and sweep.json.")
    ],
    grid: GridOption = None,
    split: Annotated[
        str, typer.Option("--split", help="Which split the table reports: test, valid or train.")
    ] = "test",
    replicate: Annotated[
        list[str] | None,
        typer.Option(
            "--replicate",
            help="Grid keys that are repetitions, averaged in the summary (default: train.seed).",
            metavar="KEY",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Retrain grid points whose run directory holds another recipe's run.")
    ] = False,
    overrides: SetOption = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train the recipe at every point of a grid of settings, evaluate each run and print the table:
    one row per setting, mean ± std over the replicate key (train.seed) per task.

    Every point gets a run directory under --out named after its settings; finished runs are reused
    and an interrupted one resumes, so running the same command again continues a stopped sweep.
    Several recipe files (e.g. one per scheme) add the recipe as an axis. Example: mtl sweep
    recipes/census-mmoe.yaml --grid loss.weighting=equal,pcgrad,mgda --grid train.seed=0,1,2
    --out runs/sweep
    """
    from mtlcli.cli.train_console import ConsoleReporter, StopFlag
    from mtlcli.sweep import expand, parse_grid, run_sweep
    from mtlcli.train.loop import TrainingInterrupted

    if split not in ("train", "valid", "test"):
        raise typer.BadParameter(f"{split!r} is not one of train, valid, test", param_hint="--split")
    if "-" in recipes:
        raise typer.BadParameter("a sweep reads its recipe once per grid point: give a file, not -")
    axes = parse_grid(grid or [])
    if not axes and len(recipes) < 2:
        raise typer.BadParameter(
            "nothing to sweep: give --grid KEY=V1,V2 (e.g. train.seed=0,1,2) or several recipes", param_hint="--grid"
        )
    for recipe in recipes:
        load_recipe(recipe, overrides or [])  # each base recipe's own errors first, as they are
    points = expand(recipes, axes, overrides or [])
    keys = replicate if replicate else ["train.seed"]
    unknown = [k for k in keys if replicate and k not in [a.key for a in axes]]
    if unknown:
        raise typer.BadParameter(f"{unknown[0]!r} is not a --grid key", param_hint="--replicate")
    total = len(points)
    reporters: list[ConsoleReporter] = []

    def on_start(index: int, point: Any, state: str) -> ConsoleReporter | None:
        if quiet:
            return None
        what = {"done": "finished, reused", "partial": "resuming", "other": "retraining", "new": "training"}[state]
        where = " ".join(f"{k}={v}" for k, v in point.settings.items())
        err_console.print(f"[{index}/{total}] {escape(where)}: {what}", highlight=False)
        for note in point.notes:
            err_console.print(f"[cyan]note:[/] {escape(note)}", soft_wrap=True)
        if state == "done":
            return None
        reporters.append(ConsoleReporter.for_recipe(point.recipe))
        return reporters[-1]

    def on_done(index: int, point: Any, record: dict[str, Any]) -> None:
        while reporters:
            reporters.pop().close()
        if not quiet:
            cells = ", ".join(f"{t} {_headline(m)}" for t, m in record["tasks"].items())
            err_console.print(f"        {split}: {cells}", highlight=False)

    stop = StopFlag()
    try:
        with stop.installed():
            result = run_sweep(points, out, split, keys, force, on_start, on_done, stop)
    except TrainingInterrupted as exc:
        while reporters:
            reporters.pop().close()
        again = ["mtl", "sweep", *recipes, *(f"--grid={g}" for g in grid or []), "--out", str(out), "--split", split]
        again += [f"--set={s}" for s in overrides or []] + [f"--replicate={r}" for r in replicate or []]
        err_console.print(
            f"[yellow]{escape(exc.message)}[/]\n  continue the sweep with: {escape(shlex.join(again))}", soft_wrap=True
        )
        raise typer.Exit(130) from None
    if as_json:
        print_json(result)
    if not quiet:
        err_console.print(summary_table(result))
        err_console.print(f"runs and {out / 'sweep.json'} in [bold]{escape(str(out))}[/]", highlight=False)


def _headline(metrics: dict[str, Any]) -> str:
    for metric in ("auc", "rmse"):
        if metrics.get(metric) is not None:
            return f"{metric} {fmt(metrics[metric])}"
    return "-"


def summary_table(result: dict[str, Any]) -> Table:
    """One row per setting (replicates averaged), one column per task; the best cell in bold."""
    rows = result["summary"]
    replicated = bool(result["replicate"])
    title = f"sweep on {result['split']}" + (
        f", mean ± std over {', '.join(result['replicate'])}" if replicated else ""
    )
    table = Table(title=title, title_justify="left")
    keys = [k for k in result["grid"] if k not in result["replicate"]]
    for key in keys:
        table.add_column(key)
    tasks = list(rows[0]["tasks"]) if rows else []
    best: dict[str, float] = {}
    metric_of: dict[str, str] = {}
    for task in tasks:
        for metric in ("auc", "rmse"):
            values = [r["tasks"][task][metric]["mean"] for r in rows if metric in r["tasks"][task]]
            if values:
                metric_of[task] = metric
                best[task] = max(values) if metric == "auc" else min(values)
                break
        table.add_column(f"{task} {metric_of.get(task, '')}".strip(), justify="right")
    if replicated:
        table.add_column("runs", justify="right")
    table.add_column("samples/s", justify="right")
    for row in rows:
        cells: list[Text | str] = [row["settings"][k] for k in keys]
        for task in tasks:
            entry = row["tasks"][task].get(metric_of.get(task, ""))
            if entry is None:
                cells.append("-")
                continue
            text = f"{entry['mean']:.4f}" + (f" ± {entry['std']:.4f}" if replicated else "")
            cells.append(Text(text, style="bold" if entry["mean"] == best[task] else ""))
        if replicated:
            cells.append(str(len(row["runs"])))
        cells.append(f"{row['train_samples_per_second']:,.0f}")
        table.add_row(*cells)
    return table
