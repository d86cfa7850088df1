"""Serving takes its own inputs: every history shape a recipe can declare (pooling kinds, own and
shared vocabularies, parallel type and time lists with and without a row time, another separator,
histories from an event log, the shipped generated recipe) trains, exports, and `mtl predict`
scores the raw test rows from CSV, Parquet and JSON lines exactly as the run's model scores its
encoded test split, and `mtl eval BUNDLE --data` gives the run's metrics."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from typer.testing import CliRunner

from mtlcli.cli.app import app
from mtlcli.data.checks import ROW_COLUMN
from mtlcli.data.events import event_indexes
from mtlcli.data.scan import SPLIT_COLUMN, scan_source
from mtlcli.data.schema import DataSchema
from mtlcli.recipe import load_recipe, recipe_from_text
from mtlcli.train.loop import predict_logits
from mtlcli.train.run import encoded_data, load_run, train_run
from tests.conftest import REPO
from tests.numerics import assert_kernel_close

pytestmark = pytest.mark.numerics
runner = CliRunner()

ROWS = 300
ITEMS = [f"i{k}" for k in range(12)]


def raw_rows(seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Impressions (user, item, x, row time t, a mixed history with parallel kinds and times,
    click and buy) and an event log (user, item, ts, kind) for the same users."""
    rng = np.random.default_rng(seed)
    hist: list[list[str] | None] = []
    kinds: list[list[str] | None] = []
    times: list[list[int] | None] = []
    for r in range(ROWS):
        n = int(rng.integers(0, 6))
        if r % 11 == 3:  # a missing history: empty, with its parallel lists
            hist.append(None), kinds.append(None), times.append(None)
            continue
        hist.append([ITEMS[int(k)] for k in rng.integers(0, len(ITEMS), n)])
        kinds.append(["click" if k else "buy" for k in rng.integers(0, 2, n)])
        times.append(sorted(int(t) for t in rng.integers(0, 100, n)))
    item = [ITEMS[int(k)] for k in rng.integers(0, len(ITEMS), ROWS)]
    rows = pl.DataFrame(
        {
            "user": [f"u{int(k)}" for k in rng.integers(0, 20, ROWS)],
            "item": item,
            "x": rng.standard_normal(ROWS).round(3),
            "t": rng.integers(0, 100, ROWS),
            "hist": hist,
            "kinds": kinds,
            "times": times,
            "click": [int(i in (h or [])) for i, h in zip(item, hist, strict=True)],
            "buy": rng.integers(0, 2, ROWS),
        }
    )
    events = pl.DataFrame(
        {
            "user": [f"u{int(k)}" for k in rng.integers(0, 20, 600)],
            "item": [ITEMS[int(k)] for k in rng.integers(0, len(ITEMS), 600)],
            "ts": rng.integers(0, 100, 600),
            "kind": ["click" if k else "buy" for k in rng.integers(0, 2, 600)],
        }
    )
    return rows, events


SHAPES: dict[str, dict[str, Any]] = {
    "pooling kinds": {
        "h_mean": {"column": "hist", "max_len": 4, "pooling": "mean"},
        "h_sum": {"column": "hist", "vocabulary": "item", "pooling": "sum"},
        "h_att": {"column": "hist", "vocabulary": "item", "pooling": "attention"},
    },
    "parallel types and times": {
        "clicked": {
            "column": "hist",
            "type_column": "kinds",
            "types": ["click"],
            "time_column": "times",
            "row_time": "t",
            "vocabulary": "item",
            "pooling": "attention",
            "weights": "softmax",  # export and serving of the normalised weights too
        },
        "bought": {
            "column": "hist",
            "type_column": "kinds",
            "types": ["buy"],
            "time_column": "times",
            "row_time": "t",
            "pooling": "mean",
        },
    },
    "types only": {"h": {"column": "hist", "type_column": "kinds", "types": ["buy"], "pooling": "sum"}},
    "times without a row time": {"h": {"column": "hist", "time_column": "times", "vocabulary": "item"}},
    "another separator": {
        "h": {"column": "hist", "separator": ";", "type_column": "kinds", "time_column": "times", "row_time": "t"}
    },
    "event log": {
        "clicked": {
            "events": {"source": "events.parquet", "time": "ts", "type": "kind", "types": ["click"], "row_time": "t"},
            "vocabulary": "item",
            "pooling": "attention",
        },
        "seen": {"events": {"source": "events.parquet", "time": "ts", "row_time": "t"}, "max_len": 3},
    },
}


def recipe_text(histories: dict[str, Any]) -> str:
    recipe = {
        "data": {"source": "rows.parquet", "split": {"by": "modulo", "modulus": 5, "test": [0], "valid": [1]},
                 "cache_dir": "cache"},
        "features": {"categorical": ["user", "item"], "numeric": ["x"], "sequences": histories},
        "tasks": {"click": {"label": "click"}, "buy": {"label": "buy"}},
        "model": {"scheme": "mmoe", "embedding_dim": 4, "n_experts": 2, "expert_units": [8], "tower_units": [4]},
        "train": {"epochs": 1, "batch_size": 64, "early_stopping": None, "threads": 1},
    }  # fmt: skip
    return yaml.safe_dump(recipe, sort_keys=False)


def served_rows(recipe: Any) -> pl.DataFrame:
    """The raw test rows as a user serves them: the source's columns, with each history derived
    from an event log as the list column named after it (the serving contract)."""
    scanned, indexes = event_indexes(scan_source(recipe), recipe)
    temporary = [expr for index in indexes.values() for expr in (index.user, index.time)]
    rows = scanned.frame.filter(pl.col(SPLIT_COLUMN) == 2).with_columns(temporary).collect()
    for name, index in indexes.items():
        start, end = index.rows(rows, recipe.features.sequences[name].max_len)
        items = index.items.to_list()
        histories = [items[a:b] for a, b in zip(start.tolist(), end.tolist(), strict=True)]
        rows = rows.with_columns(pl.Series(name, histories, dtype=pl.List(pl.String)))
    return rows.drop(SPLIT_COLUMN, ROW_COLUMN, *(e.meta.output_name() for e in temporary))


def write_inputs(frame: pl.DataFrame, schema: DataSchema, directory: Path) -> dict[str, Path]:
    """The rows as Parquet, JSON lines and CSV (each list as text between its history's separator)."""
    separators = {column: f.separator for f in schema.sequences for column in f.columns().values()}
    paths = {"parquet": directory / "in.parquet", "jsonl": directory / "in.jsonl", "csv": directory / "in.csv"}
    frame.write_parquet(paths["parquet"])
    frame.write_ndjson(paths["jsonl"])
    lists = [c for c, t in frame.schema.items() if isinstance(t, pl.List)]
    text = frame.with_columns(pl.col(c).cast(pl.List(pl.String)).list.join(separators.get(c, "|")) for c in lists)
    text.write_csv(paths["csv"])
    return paths


def check_round_trip(run: Path, recipe: Any, directory: Path, engines: tuple[str, ...] = ("torch",)) -> None:
    bundle = directory / "bundle"
    onnx = ["--format", "onnx"] if "onnxruntime" in engines else []
    exported = runner.invoke(app, ["export", str(run), "--out", str(bundle), *onnx])
    assert exported.exit_code == 0, exported.output
    loaded = load_run(run)
    data = encoded_data(run, loaded).load("test")
    assert data.sequence_lengths is not None and bool((data.sequence_lengths.sum(0) > 0).all()), "empty histories"
    expected = torch.sigmoid(predict_logits(loaded.model, data, 65536).double())
    run_eval = json.loads(runner.invoke(app, ["eval", str(run), "--json"]).stdout)["tasks"]
    frame = served_rows(recipe)
    assert frame.height == expected.shape[0]
    for fmt, path in write_inputs(frame, loaded.schema, directory).items():
        for engine in engines:
            out = directory / f"out-{fmt}-{engine}.parquet"
            args = ["predict", str(bundle), str(path), "-f", "parquet", "-o", str(out), "--engine", engine]
            scored = runner.invoke(app, args)
            assert scored.exit_code == 0, (fmt, engine, scored.output)
            got = torch.from_numpy(pl.read_parquet(out).select(loaded.schema.task_names).to_numpy())
            assert_kernel_close(got, expected, floor=1.0, what=f"predict from {fmt} with {engine} vs the run's model")
        evaluated = runner.invoke(app, ["eval", str(bundle), "--data", str(path), "--json"])
        assert evaluated.exit_code == 0, (fmt, evaluated.output)
        for task, metrics in json.loads(evaluated.stdout)["tasks"].items():
            assert metrics["auc"] == pytest.approx(run_eval[task]["auc"], abs=1e-6), (fmt, task)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_history_shape_round_trips_through_predict(
    shape: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    rows, events = raw_rows()
    rows.write_parquet("rows.parquet")
    events.write_parquet("events.parquet")
    recipe = recipe_from_text(recipe_text(SHAPES[shape]), "roundtrip")
    train_run(recipe, tmp_path / "run")
    engines: tuple[str, ...] = ("torch",)
    if shape == "parallel types and times" and importlib.util.find_spec("onnxruntime") is not None:
        engines = ("torch", "onnxruntime")  # the ONNX model takes the same encoded histories
    check_round_trip(tmp_path / "run", recipe, tmp_path, engines)


SHIPPED_WITH_HISTORIES = sorted(
    p.name
    for p in (REPO / "recipes").glob("*.yaml")
    if (yaml.safe_load(p.read_text()).get("features") or {}).get("sequences")
)


@pytest.mark.parametrize("name", SHIPPED_WITH_HISTORIES)
def test_shipped_recipes_with_histories_round_trip(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    overrides = [f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1", "train.early_stopping=null"]
    recipe = load_recipe(REPO / "recipes" / name, overrides)
    if recipe.data.synthetic is not None:
        recipe = load_recipe(REPO / "recipes" / name, [*overrides, "data.synthetic.rows=1500"])
    train_run(recipe, tmp_path / "run")
    check_round_trip(tmp_path / "run", recipe, tmp_path)
