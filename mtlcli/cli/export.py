"""`mtl export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtlcli.cli.common import JsonOption, err_console, handle_errors, print_json


@handle_errors
def command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `mtl train`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to write.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing bundle directory.")] = False,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="safetensors, or onnx to add model.onnx (needs the extra: pip install 'mtlcli[onnx]'); "
            "the ONNX model is checked against PyTorch before the bundle is written.",
        ),
    ] = "safetensors",
    as_json: JsonOption = False,
) -> None:
    """Write a self-contained bundle: model.safetensors (recipe and schema embedded), recipe.yaml,
    schema.json and manifest.json with sha256 of every file."""
    from mtlcli.export.bundle import export_bundle

    manifest = export_bundle(run_dir, out, force=force, fmt=fmt)
    if as_json:
        print_json({"bundle": str(out), **manifest})
    else:
        err_console.print(f"wrote bundle [bold]{out}[/] ({', '.join(manifest['files'])}, manifest.json)")
