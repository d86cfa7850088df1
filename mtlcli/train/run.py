"""Run directories: ``train_run`` writes one, ``load_run`` and ``evaluate_run`` read one.

A run directory holds recipe.yaml (resolved), schema.json, model.safetensors (best epoch),
metrics.jsonl (one line per epoch), checkpoint.safetensors (everything needed to resume, saved at
every epoch end and on interrupt) and summary.json (written last: its presence marks a finished
run). Every file is written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtlcli.data.schema import DataSchema
from mtlcli.data.source import BatchSource, open_source
from mtlcli.data.store import Prepared, data_key, prepare
from mtlcli.distributed import SINGLE, Ranks, alike_on_every_rank, rank_device
from mtlcli.errors import ArtifactError, DataError
from mtlcli.fileio import append_line, to_json, write_json, write_text
from mtlcli.models import build_model
from mtlcli.models.base import scheme
from mtlcli.models.blocks import sparse_embeddings, use_sparse_rows
from mtlcli.objectives.base import TrainingObjective
from mtlcli.objectives.training import build_crossdistil
from mtlcli.recipe import Recipe, recipe_to_yaml
from mtlcli.train.checkpoint import LoadedModel, input_spec, load_checkpoint, load_model, save_checkpoint, save_model
from mtlcli.train.loop import LoopState, build_parts, evaluate, make_step, train_loop
from mtlcli.train.observers import Observer, Observers
from mtlcli.train.optimizer import TrainingOptimizer
from mtlcli.train.plan import Plan, resolve_plan
from mtlcli.train.rundir import CHECKPOINT, GRADIENTS, claimed
from mtlcli.train.rundir import EXPLAINED as EXPLAINED  # the run files other commands read
from mtlcli.train.rundir import run_lock as run_lock
from mtlcli.train.tracking import Tracker, TrackerSetup, open_trackers
from mtlcli.weighting import WeightingStrategy, build_weighting


class RunWriter:
    """Observes the loop into the run directory: appends metrics.jsonl, saves the best model and
    the checkpoints, appends gradients.jsonl."""

    def __init__(
        self,
        run_dir: Path,
        recipe: Recipe,
        schema: DataSchema,
        identity: dict[str, str],
        objective: TrainingObjective | None = None,
    ) -> None:
        self.run_dir, self.recipe, self.schema, self.identity = run_dir, recipe, schema, identity
        self.objective = objective  # checkpointed beside the model; never in model.safetensors

    def on_start(self, epochs: int, steps_per_epoch: int) -> None:
        return None

    def on_step(self, epoch: int, step: int) -> None:
        return None

    def on_epoch(self, record: dict[str, Any], model: nn.Module, improved: bool) -> None:
        append_line(self.run_dir / "metrics.jsonl", to_json(record))
        if improved:
            save_model(model, self.run_dir / "model.safetensors", self.recipe, self.schema)

    def on_checkpoint(
        self, state: LoopState, model: nn.Module, optimizer: TrainingOptimizer, strategy: WeightingStrategy
    ) -> None:
        save_checkpoint(self.run_dir / CHECKPOINT, state, model, optimizer, strategy, self.identity, self.objective)

    def on_gradients(self, record: dict[str, Any]) -> None:
        append_line(self.run_dir / GRADIENTS, to_json(record))


SMALL_MODEL = 1_000_000  # parameters
# train.sparse_embeddings: auto trains tables of at least this many rows row-wise. Below it a dense
# Adam step over the whole table costs little (census: 520 rows), above it the step would grow
# with the vocabulary.
SPARSE_MIN_ROWS = 100_000


def choose_threads(setting: int | str, model: nn.Module) -> int:
    """``auto``: one thread for small models, whose small matrix products gain nothing from more
    threads and slow down many times over when the cores are busy; for large ones the cores,
    shared among the training processes of this machine. A table that trains row-wise does not
    count: a step touches only the batch's rows, whatever its size."""
    if setting != "auto":
        return int(setting)
    row_wise = {id(m.table.weight) for _, m in sparse_embeddings(model)}
    params = sum(p.numel() for p in model.parameters() if id(p) not in row_wise)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun for each rank
    return 1 if params < SMALL_MODEL else max(1, (os.cpu_count() or 1) // local)


def to_device(model: nn.Module, strategy_parameters: list[nn.Parameter], device: torch.device) -> None:
    """The model and the weighting's own parameters onto ``device``, in place: the optimizer keeps
    the same parameter objects."""
    if device.type == "cpu":
        return
    model.to(device)
    for parameter in strategy_parameters:
        parameter.data = parameter.data.to(device)


def train_run(
    recipe: Recipe,
    run_dir: Path,
    force: bool = False,
    observer: Observer | None = None,
    prepared: Prepared | None = None,
    resume: bool = False,
    stop_requested: Callable[[], bool] = lambda: False,
    experiment: str | None = None,
    tracker_params: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Preprocess if needed, train on this process, and write the run directory. Returns the summary.

    With ``resume``, continue the run in ``run_dir`` from its last checkpoint (refused when the
    recipe, apart from train.epochs, or the data changed since). Only one process at a time may
    train into a run directory.
    """
    plan = resolve_plan(recipe, run_dir, force, resume, 1, experiment, prepared)
    return run_plan(plan, SINGLE, [observer] if observer is not None else [], stop_requested, tracker_params)


def run_plan(
    plan: Plan,
    ranks: Ranks,
    observers: list[Observer],
    stop_requested: Callable[[], bool] = lambda: False,
    tracker_params: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train ``plan`` as rank ``ranks.rank`` of its processes; rank 0 alone writes the run
    directory (``plan.place``), its trackers and ``observers``. Returns the summary."""
    recipe, settings, place, schema = plan.recipe, plan.recipe.train, plan.place, plan.prepared.schema
    with alike_on_every_rank(ranks):  # the same shards, batch and file on every rank
        train_data = split_source(plan.prepared, "train", recipe, settings.batch_size, "train.batch_size", plan.shards)
    valid_data = split_source(plan.prepared, "valid", recipe, settings.eval_batch_size, "train.eval_batch_size")
    torch.manual_seed(settings.seed)
    tasks, types = schema.task_names, [t.type for t in schema.tasks]
    model = build_model(recipe.model.scheme, recipe.model.params, input_spec(schema))
    if settings.sparse_embeddings is not False:
        use_sparse_rows(model, SPARSE_MIN_ROWS if settings.sparse_embeddings == "auto" else 0)
    torch.set_num_threads(choose_threads(settings.threads, model))
    strategy = build_weighting(recipe.loss.weighting, recipe.loss.params, tasks)
    own = list(strategy.capabilities.parameters)
    device = rank_device(plan.device)
    pos_weight = pos_weight_tensor(recipe)
    pos_weight = pos_weight.to(device) if pos_weight is not None else None
    steps = train_data.steps(settings.batch_size)
    with claimed(place) if ranks.writes else nullcontext():
        trackers = _trackers(plan, steps, tracker_params) if ranks.writes else []  # before any file is touched
        try:
            search = scheme(model).capabilities.search  # schemes that find their structure first
            if search is not None and not place.resume:
                search(train_data, settings.batch_size, settings.lr, settings.seed)
            to_device(model, own, device)  # before the optimizer's state is loaded next to them
            own_lr = recipe.loss.params.own_lr()  # the weighting's own parameters' learning rate
            objective = None
            if recipe.objective is not None:
                objective = build_crossdistil(
                    recipe.objective, model, recipe.model.scheme, tasks, types,
                    train_data, settings.batch_size, settings.seed, device,
                )  # fmt: skip
            parts = build_parts(
                model, strategy, settings, tasks, types, steps, pos_weight, own_lr, ranks, None, objective
            )
            state = None
            if place.resume:
                state = _resume_state(place.work, model, parts.optimizer, strategy, ranks.writes, objective)
            if ranks.writes:
                write_text(place.work / "recipe.yaml", recipe_to_yaml(recipe))
                schema.save(place.work / "schema.json")
                writer = RunWriter(place.work, recipe, schema, plan.identity, objective)
                observers = [writer, *trackers, *observers]
            result = train_loop(
                parts, make_step(parts), train_data, valid_data, types,
                Observers(observers if ranks.writes else []), state or LoopState(), stop_requested,
            )  # fmt: skip
        except BaseException:
            for tracker in trackers:
                tracker.abandon()
            raise
        summary = {
            "run_dir": str(place.path),
            "scheme": recipe.model.scheme,
            "weighting": recipe.loss.weighting,
            "tasks": tasks,
            "inputs": model_inputs(schema),
            "epochs_run": len(result.history),
            "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early,
            "valid": result.best_metrics,
            "train_samples_per_second": result.samples_per_second,
            "train_seconds": result.train_seconds,
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_rows": len(train_data),
            "train_shards": train_data.shards,
            "data_dir": str(plan.prepared.directory.resolve()),
            "data_reused": plan.prepared.reused,
            "resumed": place.resume,
            "warnings": schema.warnings + training_warnings(result.history, tasks, types),
            "processes": plan.world,
            "exchange": parts.exchange.kind,
        }
        if ranks.writes:
            save_model(model, place.work / "model.safetensors", recipe, schema)
            write_json(place.work / "summary.json", summary)
            files = [place.work / name for name in ("model.safetensors", "schema.json", "summary.json")]
            for tracker in trackers:
                tracker.finish(files, result.best_metrics)
    return summary


def _trackers(plan: Plan, steps: int, params: dict[str, str] | None) -> list[Tracker]:
    """The run's trackers, started before any file of the run is touched."""
    place = plan.place
    setup = TrackerSetup(
        place.work, place.path.name, plan.recipe, plan.experiment, plan.resumed_at, steps, params or {}
    )
    return open_trackers(plan.recipe.train.loggers, setup)


def model_inputs(schema: DataSchema) -> dict[str, list[str]]:
    """What the model reads: its categorical features, numbers and behaviour histories, by name."""
    return {
        "categorical": [f.name for f in schema.categorical],
        "numeric": [f.name for f in schema.numeric],
        "histories": [f.name for f in schema.sequences],
    }


def training_warnings(history: list[dict[str, Any]], tasks: list[str], types: list[str]) -> list[str]:
    """A model whose scores did not depend on its input: every binary task's valid AUC exactly 0.5
    in every epoch (its output constant: all ReLUs of the towers dead, or a constant input)."""
    binary = [t for t, kind in zip(tasks, types, strict=True) if kind == "binary"]
    if not history or not binary:
        return []
    flat = all(record["valid"][t].get("auc") == 0.5 for record in history for t in binary)
    if not flat:
        return []
    return [
        f"the model's output is constant: valid AUC is exactly 0.5 for {', '.join(binary)} in every epoch "
        f"({len(history)}); likely causes: train.lr too high (the ReLUs of the towers died), or inputs "
        "that do not vary; lower train.lr, or check the features"
    ]


def split_source(
    prepared: Prepared, split: str, recipe: Recipe, batch_size: int, field: str, shards: int = 1
) -> BatchSource:
    """A split in memory or streamed, as ``train.loading`` and ``data.memory_budget`` say; the
    train split shuffled in windows of ``train.shuffle_buffer`` rows when that is set, and dealt
    to ``shards`` (which the plan's processes share evenly)."""
    settings = recipe.train
    return open_source(
        prepared.file(split),
        settings.loading,
        recipe.data.memory_budget,
        settings.shuffle_buffer,
        batch_size,
        field,
        shuffled=split == "train",
        shards=shards,
    )


def _resume_state(
    run_dir: Path,
    model: nn.Module,
    optimizer: TrainingOptimizer,
    strategy: WeightingStrategy,
    writes: bool,
    objective: TrainingObjective | None = None,
) -> LoopState:
    """The checkpoint's state loaded into the model, optimizer, strategy and objective; the
    writing rank trims the run's logs back to it (what comes after is logged again)."""
    state = load_checkpoint(run_dir / CHECKPOINT, model, optimizer, strategy, objective)
    if not writes:
        return state
    write_text(run_dir / "metrics.jsonl", "".join(to_json(r) + "\n" for r in state.history))
    tracked = run_dir / GRADIENTS
    if tracked.is_file():  # drop samples taken after the checkpoint: the resumed run takes them again
        keep = [line for line in tracked.read_text().splitlines() if _before(json.loads(line), state)]
        write_text(tracked, "".join(line + "\n" for line in keep))
    return state


def _before(record: dict[str, Any], state: LoopState) -> bool:
    """Was this gradients sample taken before the checkpoint of ``state`` (epoch, step in epoch)?"""
    epoch = int(record.get("epoch", 0))
    return epoch < state.epoch or (epoch == state.epoch and int(record.get("step_in_epoch", 0)) <= state.step)


def loaded_run(run_dir: Path) -> tuple[LoadedModel, Prepared]:
    """A run's model and its checked data (``load_run``, ``run_data``)."""
    loaded = load_run(run_dir)
    return loaded, run_data(run_dir, loaded)


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


def encoded_data(run_dir: Path, loaded: LoadedModel) -> Prepared:
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


def pos_weight_tensor(recipe: Recipe) -> torch.Tensor | None:
    """Each task's ``pos_weight`` in task order, for the loss; None when every weight is 1."""
    weights = [spec.pos_weight for spec in recipe.tasks.values()]
    return torch.tensor(weights) if any(w != 1.0 for w in weights) else None


def evaluate_loaded(loaded: LoadedModel, data: BatchSource, batch_size: int) -> dict[str, Any]:
    """Per-task metrics of a loaded run or bundle on encoded data: the training loss's
    ``pos_weight``, and each task with a sample space marked (its metrics count only those rows)."""
    types = [t.type for t in loaded.schema.tasks]
    metrics = evaluate(
        loaded.model, data, loaded.schema.task_names, types, batch_size, pos_weight_tensor(loaded.recipe)
    )
    for task in loaded.schema.tasks:
        if task.space is not None:
            metrics[task.name]["space"] = task.space
    return metrics


def evaluate_run(run_dir: Path, split: str = "test", batch_size: int = 65536) -> dict[str, Any]:
    """Per-task metrics of a run's model on one split of its data (re-encoded if the cache is gone)."""
    return evaluate_splits(run_dir, [split], batch_size)[split]


def run_data(run_dir: Path, loaded: LoadedModel) -> Prepared:
    """``encoded_data``, refused when it no longer matches the schema the model was trained with."""
    prepared = encoded_data(run_dir, loaded)
    if prepared.schema.to_dict() != loaded.schema.to_dict():
        raise ArtifactError(
            f"{run_dir}: the data no longer matches the schema the model was trained with",
            "the source files or the recipe's data part changed since training; retrain",
        )
    return prepared


def evaluate_splits(
    run_dir: Path, splits: list[str], batch_size: int = 65536, run: tuple[LoadedModel, Prepared] | None = None
) -> dict[str, dict[str, Any]]:
    """``evaluate_run`` on several splits, the run and its data loaded once (or given: ``run``)."""
    loaded, prepared = run or loaded_run(run_dir)
    out = {}
    for split in splits:
        data = split_source(prepared, split, loaded.recipe, batch_size, "--batch-size")
        out[split] = {"split": split, "run_dir": str(run_dir), "tasks": evaluate_loaded(loaded, data, batch_size)}
    return out
