"""`mtl predict`."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mtlcli.cli.common import err_console, handle_errors


@handle_errors
def command(
    bundle: Annotated[Path, typer.Argument(help="A bundle directory written by `mtl export`.")],
    source: Annotated[
        str | None, typer.Argument(help="Input file, or '-' for stdin: the same as --input.", show_default=False)
    ] = None,
    input: Annotated[
        str | None,
        typer.Option(
            "--input",
            "-i",
            help="Raw rows in the recipe's source format; '-' for stdin (the default; gzip is read too).",
        ),
    ] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="Where to write; '-' for stdout.")] = "-",
    fmt: Annotated[str, typer.Option("--format", "-f", help="Output format: csv, jsonl or parquet.")] = "csv",
    keep: Annotated[
        str | None, typer.Option("--keep", help="Input columns to pass through, comma-separated (e.g. id,item).")
    ] = None,
    score: Annotated[
        str | None,
        typer.Option("--score", help='Add a fused ranking column: product of task^power, e.g. "click^1 * like^0.5".'),
    ] = None,
    score_factor: Annotated[
        str | None, typer.Option("--score-factor", help="Numeric input column that multiplies the score.")
    ] = None,
    header: Annotated[
        bool | None,
        typer.Option(
            "--header/--no-header",
            help="Whether the input's first line names its columns (default: as the recipe says). "
            "With a header, columns are matched by name and may come in any order.",
        ),
    ] = None,
    engine: Annotated[
        str, typer.Option("--engine", help="torch, or onnxruntime (bundles exported with --format onnx).")
    ] = "torch",
    chunk_rows: Annotated[int, typer.Option("--chunk-rows", help="Rows read, scored and written at a time.")] = 25_000,
    rejects: Annotated[
        str | None,
        typer.Option(
            "--rejects",
            help="Skip rows that cannot be scored (a numeric value that is not a finite number) and write them, "
            "with their row number and the reason, to this CSV file. Without it such a row stops the run (exit 2).",
        ),
    ] = None,
) -> None:
    """Score raw rows with a bundle: one probability column per binary task (a value per
    regression task), the --keep columns first and an optional fused score last.

    Rows are read, encoded with the bundle's schema (unseen categories get the out-of-vocabulary
    id) and written chunk by chunk, so memory stays flat and it works in pipes:
    zcat rows.gz | mtl predict BUNDLE | head. Label columns may be absent.
    """
    from mtlcli.data.encode import list_columns
    from mtlcli.errors import MtlError
    from mtlcli.export.bundle import bundle_onnx_session, load_bundle
    from mtlcli.export.predict import (
        InputFormat,
        OnnxScorer,
        Scorer,
        ScoreSpec,
        TorchScorer,
        check_output_names,
        needed_columns,
        open_input,
        parse_score,
        predict_chunks,
        read_chunks,
    )
    from mtlcli.fileio import atomic_path

    if fmt not in ("csv", "jsonl", "parquet"):
        raise typer.BadParameter(f"{fmt!r} is not one of csv, jsonl, parquet", param_hint="--format")
    if engine not in ("torch", "onnxruntime"):
        raise typer.BadParameter(f"{engine!r} is not one of torch, onnxruntime", param_hint="--engine")
    if source is not None and input is not None and source != input:
        raise MtlError(f"two inputs given ({source} and --input {input})", "give one")
    input = input or source or "-"
    if score_factor and not score:
        raise MtlError("--score-factor needs --score")
    loaded = load_bundle(bundle)
    schema = loaded.schema
    keep_columns = [c.strip() for c in keep.split(",") if c.strip()] if keep else []
    spec = ScoreSpec(parse_score(score, schema.task_names), score_factor) if score else None
    check_output_names(schema, keep_columns, spec is not None)
    scorer: Scorer = (
        OnnxScorer(bundle_onnx_session(bundle))
        if engine == "onnxruntime"
        else TorchScorer(loaded.model, len(schema.tasks))
    )
    name = "standard input" if input == "-" else input
    layout = InputFormat.from_recipe(loaded.recipe, schema, input, header)
    stream = open_input(input, sys.stdin.buffer)
    if rejects is not None and (rejects == output or Path(rejects).is_dir()):
        raise MtlError(f"--rejects {rejects}: give a file of its own", "e.g. --rejects rejects.csv")
    with contextlib.ExitStack() as stack:
        reject = None
        rejected = [0]
        if rejects is not None:
            sink = stack.enter_context(stack.enter_context(atomic_path(Path(rejects))).open("wb"))

            def reject(frame: Any) -> None:
                buffer = io.BytesIO()
                frame.write_csv(buffer, include_header=rejected[0] == 0)
                sink.write(buffer.getvalue())
                rejected[0] += frame.height

        frames = predict_chunks(
            read_chunks(stream, layout, name, chunk_rows, needed_columns(schema, keep_columns, spec)),
            schema,
            scorer,
            keep_columns,
            spec,
            reject,
        )
        _write(frames, output, fmt, list_columns(schema))
    if rejects is not None:
        err_console.print(f"{rejected[0]} row{'s' if rejected[0] != 1 else ''} could not be scored: see {rejects}")


def _write(frames: Any, output: str, fmt: str, separators: dict[str, str]) -> None:
    """Write the scored frames to ``output`` ('-': stdout; a file atomically; a device as is)."""
    import tempfile

    from mtlcli.errors import MtlError
    from mtlcli.export.predict import write_chunks
    from mtlcli.fileio import atomic_path

    with tempfile.TemporaryDirectory(prefix="mtl-predict-") as spool:
        if output == "-":
            write_chunks(
                frames, fmt, sys.stdout.buffer, Path(spool), separators
            )  # `| head`: handle_errors ends quietly
            sys.stdout.buffer.flush()
        elif Path(output).is_dir():
            raise MtlError(f"--output {output}: is a directory", "give a file name, or '-' for standard output")
        elif Path(output).exists() and not Path(output).is_file():
            # A device or a FIFO (/dev/null, a named pipe): write into it, never rename over it.
            with Path(output).open("wb") as sink:
                write_chunks(frames, fmt, sink, Path(spool), separators)
        else:
            try:
                with atomic_path(Path(output)) as tmp, tmp.open("wb") as sink:
                    write_chunks(frames, fmt, sink, Path(spool), separators)
            except KeyboardInterrupt:
                err_console.print(
                    f"{output} was not written: an interrupted file is never left half-written", soft_wrap=True
                )
                raise
