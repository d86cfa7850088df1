"""Run directories: ``train_run`` writes one, ``load_run`` and ``evaluate_run`` read one.

A run directory holds recipe.yaml (resolved), schema.json, model.safetensors (best epoch),
metrics.jsonl (one line per epoch) and summary.json (written last: its presence marks a
finished run). Every file is written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtlcli.data.preprocess import Prepared, data_key, prepare
from mtlcli.data.schema import DataSchema
from mtlcli.errors import ArtifactError, DataError
from mtlcli.fileio import append_line, write_json, write_text
from mtlcli.models import build_model
from mtlcli.recipe import Recipe, recipe_to_yaml
from mtlcli.train.checkpoint import LoadedModel, input_spec, load_model, save_model
from mtlcli.train.loop import NullObserver, Observer, evaluate, fit
from mtlcli.weighting import build_weighting

RUN_FILES = ("recipe.yaml", "schema.json", "model.safetensors", "metrics.jsonl", "summary.json")


class RunWriter:
    """Observes the loop: appends metrics.jsonl, saves the best model; forwards to ``inner``."""

    def __init__(self, run_dir: Path, recipe: Recipe, schema: DataSchema, inner: Observer) -> None:
        self.run_dir, self.recipe, self.schema, self.inner = run_dir, recipe, schema, inner

    def on_start(self, epochs: int, steps_per_epoch: int) -> None:
        self.inner.on_start(epochs, steps_per_epoch)

    def on_step(self, epoch: int, step: int) -> None:
        self.inner.on_step(epoch, step)

    def on_epoch(self, record: dict[str, Any], model: nn.Module, improved: bool) -> None:
        append_line(self.run_dir / "metrics.jsonl", json.dumps(record))
        if improved:
            save_model(model, self.run_dir / "model.safetensors", self.recipe, self.schema)
        self.inner.on_epoch(record, model, improved)


SMALL_MODEL = 1_000_000  # parameters


def choose_threads(setting: int | str, model: nn.Module) -> int:
    """``auto``: one thread for small models, whose small matrix products gain nothing from more
    threads and slow down many times over when the cores are busy; all cores for large ones."""
    if setting != "auto":
        return int(setting)
    params = sum(p.numel() for p in model.parameters())
    return 1 if params < SMALL_MODEL else (os.cpu_count() or 1)


def check_run_dir(run_dir: Path, force: bool) -> None:
    """Refuse a run directory that holds anything, unless ``force`` and it is an mtl run
    (``--force`` never deletes a directory that is not a run, such as the working directory)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ArtifactError(f"{run_dir}: exists and is not a directory", "choose another --out")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not force:
            raise ArtifactError(
                f"{run_dir}: the run directory exists and is not empty",
                "choose another --out, or pass --force to replace it",
            )
        entries = {p.name for p in run_dir.iterdir()}
        looks_like_run = bool(entries & set(RUN_FILES)) and all(n in RUN_FILES or n.startswith(".") for n in entries)
        if not looks_like_run:
            raise ArtifactError(
                f"{run_dir}: --force only replaces an mtl run directory, and this one holds other files",
                "choose another --out",
            )


def _claim_run_dir(run_dir: Path, force: bool) -> None:
    check_run_dir(run_dir, force)
    if run_dir.is_dir():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def train_run(
    recipe: Recipe,
    run_dir: Path,
    force: bool = False,
    observer: Observer | None = None,
    prepared: Prepared | None = None,
) -> dict[str, Any]:
    """Preprocess if needed, train, and write the run directory. Returns the summary."""
    check_run_dir(run_dir, force)
    prepared = prepared or prepare(recipe)
    schema = prepared.schema
    train_data, valid_data = prepared.load("train"), prepared.load("valid")
    settings = recipe.train
    torch.manual_seed(settings.seed)
    tasks = schema.task_names
    types = [t.type for t in schema.tasks]
    model = build_model(recipe.model.scheme, recipe.model.params, input_spec(schema))
    torch.set_num_threads(choose_threads(settings.threads, model))
    strategy = build_weighting(recipe.loss.weighting, recipe.loss.params, tasks)
    _claim_run_dir(run_dir, force)
    try:
        write_text(run_dir / "recipe.yaml", recipe_to_yaml(recipe))
        schema.save(run_dir / "schema.json")
        writer = RunWriter(run_dir, recipe, schema, observer or NullObserver())
        result = fit(model, strategy, train_data, valid_data, settings, tasks, types, writer)
    except BaseException:
        if not (run_dir / "model.safetensors").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    save_model(model, run_dir / "model.safetensors", recipe, schema)
    summary = {
        "run_dir": str(run_dir),
        "scheme": recipe.model.scheme,
        "weighting": recipe.loss.weighting,
        "tasks": tasks,
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "valid": result.best_metrics,
        "train_samples_per_second": result.samples_per_second,
        "train_seconds": result.train_seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_rows": len(train_data),
        "data_dir": str(prepared.directory.resolve()),
        "data_reused": prepared.reused,
    }
    write_json(run_dir / "summary.json", summary)
    return summary


def load_run(run_dir: Path) -> LoadedModel:
    """The trained model of a run directory, with its recipe and schema."""
    if not run_dir.is_dir():
        raise ArtifactError(f"{run_dir}: not a directory", "give the --out directory of `mtl train`")
    if not (run_dir / "model.safetensors").is_file():
        raise ArtifactError(
            f"{run_dir}: not an mtl run directory (no model.safetensors in it)",
            "give the --out directory of a finished `mtl train`",
        )
    return load_model(run_dir / "model.safetensors")


def _encoded_data(run_dir: Path, loaded: LoadedModel) -> Prepared:
    """The run's encoded data: the directory it was trained from if it is still there and
    matches, else the recipe's data prepared again (from the working directory)."""
    try:
        current_key: str | None = data_key(loaded.recipe)[0]
    except DataError:
        current_key = None  # the source files are gone; the encoded copy is all there is
    if current_key is not None and current_key != loaded.schema.data_key:
        raise ArtifactError(
            f"{run_dir}: the source data changed since this model was trained",
            "retrain on the new data, or restore the files the run was trained on",
        )
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        directory = Path(summary["data_dir"])
        schema = DataSchema.load(directory / "schema.json")
        if schema.to_dict() == loaded.schema.to_dict():
            return Prepared(directory, schema, reused=True)
    except (OSError, ValueError, KeyError, TypeError, ArtifactError):
        pass
    return prepare(loaded.recipe)


def evaluate_run(run_dir: Path, split: str = "test", batch_size: int = 65536) -> dict[str, Any]:
    """Per-task metrics of a run's model on one split of its data (re-encoded if the cache is gone)."""
    loaded = load_run(run_dir)
    prepared = _encoded_data(run_dir, loaded)
    if prepared.schema.to_dict() != loaded.schema.to_dict():
        raise ArtifactError(
            f"{run_dir}: the data no longer matches the schema the model was trained with",
            "the source files or the recipe's data part changed since training; retrain",
        )
    data = prepared.load(split)
    types = [t.type for t in loaded.schema.tasks]
    metrics = evaluate(loaded.model, data, loaded.schema.task_names, types, batch_size)
    return {"split": split, "run_dir": str(run_dir), "tasks": metrics}
