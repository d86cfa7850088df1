"""`mtl preprocess`."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mtlcli.cli.common import JsonOption, QuietOption, SetOption, err_console, fmt, handle_errors, print_json, warn
from mtlcli.data.schema import SPLIT_NAMES, DataSchema
from mtlcli.recipe import load_recipe


def schema_tables(schema: DataSchema) -> list[Table]:
    """Rows and positives per split and task; vocabulary sizes and OOV rates per feature."""
    splits = Table(title="splits", title_justify="left")
    splits.add_column("split")
    splits.add_column("rows", justify="right")
    for task in schema.tasks:
        splits.add_column(f"{task.name} {'positives' if task.type == 'binary' else 'mean'}", justify="right")
    for name in SPLIT_NAMES:
        info = schema.splits[name]
        cells = [name, f"{info.rows:,}"]
        for task in schema.tasks:
            if task.type == "binary":
                rate = info.label_mean[task.name]
                cells.append(f"{info.positives.get(task.name, 0):,} ({rate:.1%})")
            else:
                cells.append(fmt(info.label_mean[task.name], 3))
        splits.add_row(*cells)
    features = Table(title="categorical features", title_justify="left")
    for column in ("feature", "vocabulary", "OOV valid", "OOV test"):
        features.add_column(column, justify="left" if column == "feature" else "right")
    for feature in schema.categorical:
        size = f"hash {feature.hash_buckets}" if feature.hash_buckets else f"{len(feature.vocab):,}"
        features.add_row(
            feature.name,
            size,
            f"{schema.splits['valid'].oov_rate[feature.name]:.2%}",
            f"{schema.splits['test'].oov_rate[feature.name]:.2%}",
        )
    return [splits, features]


@handle_errors
def command(
    recipe: Annotated[str, typer.Argument(help="Recipe file ('-' for stdin).")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write here instead of the recipe's cache directory.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when a matching cache entry exists.")] = False,
    overrides: SetOption = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Read the raw data, make labels, split, fit vocabularies and statistics on train, encode.

    Writes {train,valid,test}.parquet and schema.json; reuses a matching cache entry.
    """
    from mtlcli.data.store import prepare

    loaded = load_recipe(recipe, overrides or [])
    started = time.perf_counter()
    with err_console.status("preprocessing", spinner="dots") if not quiet else nullcontext() as status:

        def progress(stage: str) -> None:  # the stage in progress and the time so far, on stderr
            if status is not None:
                status.update(f"preprocessing: {stage} ({time.perf_counter() - started:.0f} s)")

        prepared = prepare(loaded, out=out, force=force, progress=progress)
    if not quiet:
        verb = "reused" if prepared.reused else "wrote"
        err_console.print(f"{verb} [bold]{prepared.directory}[/]")
        for table in schema_tables(prepared.schema):
            err_console.print(table)
    warn(prepared.schema.warnings)
    if as_json:
        print_json(
            {
                "directory": str(prepared.directory),
                "reused": prepared.reused,
                "splits": prepared.schema.to_dict()["splits"],
                "warnings": prepared.schema.warnings,
            }
        )
