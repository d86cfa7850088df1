"""Evaluating a bundle on any labelled file in its recipe's source format."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import polars as pl

from mtlcli.export.bundle import load_bundle
from mtlcli.export.predict import InputFormat, evaluation_columns, labelled_tensors, open_input, read_chunks
from mtlcli.train.run import evaluate_loaded


def evaluate_bundle(bundle: Path, data: str, batch_size: int = 65536) -> dict[str, Any]:
    """Per-task metrics (as ``mtl eval RUN``) of a bundle's model on the labelled rows of ``data``.

    The labels are made as preprocessing made them, so the whole file is read at once.
    """
    loaded = load_bundle(bundle)
    layout = InputFormat.from_recipe(loaded.recipe, loaded.schema, data)
    name = "standard input" if data == "-" else data
    with open_input(data, sys.stdin.buffer) as stream:
        frame = pl.concat(list(read_chunks(stream, layout, name, 1 << 40, evaluation_columns(loaded.schema))))
    tensors = labelled_tensors(frame, loaded.recipe, loaded.schema)
    return {"data": data, "tasks": evaluate_loaded(loaded, tensors, batch_size)}
