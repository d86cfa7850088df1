"""Run directories: ``train_run`` writes one, ``load_run`` and ``evaluate_run`` read one.

A run directory holds recipe.yaml (resolved), schema.json, model.safetensors (best epoch),
metrics.jsonl (one line per epoch), checkpoint.safetensors (everything needed to resume, saved at
every epoch end and on interrupt) and summary.json (written last: its presence marks a finished
run). Every file is written atomically.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtlcli import distributed
from mtlcli.data.schema import DataSchema
from mtlcli.data.source import BatchSource, check_shards, open_source
from mtlcli.data.store import Prepared, data_key, prepare
from mtlcli.errors import ArtifactError, DataError, MtlError
from mtlcli.fileio import append_line, sha256_json, to_json, write_json, write_text
from mtlcli.models import build_model
from mtlcli.models.base import scheme
from mtlcli.models.blocks import sparse_embeddings, use_sparse_rows
from mtlcli.recipe import Recipe, recipe_to_yaml
from mtlcli.train.checkpoint import (
    LoadedModel,
    input_spec,
    load_checkpoint,
    load_model,
    read_checkpoint_identity,
    save_checkpoint,
    save_model,
)
from mtlcli.train.loop import LoopState, NullObserver, Observer, evaluate, fit, make_optimizer
from mtlcli.train.tracking import TENSORBOARD_DIR, Trackers, check_loggers
from mtlcli.weighting import WeightingStrategy, build_weighting

CHECKPOINT = "checkpoint.safetensors"
GRADIENTS = "gradients.jsonl"  # train.track_gradients samples
EXPLAINED = "explain.json"  # a saved `mtl explain --json`, which `mtl report` reads
RUN_FILES = (
    "recipe.yaml",
    "schema.json",
    "model.safetensors",
    "metrics.jsonl",
    "summary.json",
    CHECKPOINT,
    GRADIENTS,
    EXPLAINED,
    TENSORBOARD_DIR,
)


class RunWriter:
    """Observes the loop: appends metrics.jsonl, saves the best model; forwards to ``inner``."""

    def __init__(
        self, run_dir: Path, recipe: Recipe, schema: DataSchema, inner: Observer, identity: dict[str, str]
    ) -> None:
        self.run_dir, self.recipe, self.schema, self.inner = run_dir, recipe, schema, inner
        self.identity = identity

    def on_start(self, epochs: int, steps_per_epoch: int) -> None:
        self.inner.on_start(epochs, steps_per_epoch)

    def on_step(self, epoch: int, step: int) -> None:
        self.inner.on_step(epoch, step)

    def on_epoch(self, record: dict[str, Any], model: nn.Module, improved: bool) -> None:
        append_line(self.run_dir / "metrics.jsonl", to_json(record))
        if improved:
            save_model(model, self.run_dir / "model.safetensors", self.recipe, self.schema)
        self.inner.on_epoch(record, model, improved)

    def on_checkpoint(
        self, state: LoopState, model: nn.Module, optimizer: torch.optim.Optimizer, strategy: WeightingStrategy
    ) -> None:
        save_checkpoint(self.run_dir / CHECKPOINT, state, model, optimizer, strategy, self.identity)
        self.inner.on_checkpoint(state, model, optimizer, strategy)

    def on_gradients(self, record: dict[str, Any]) -> None:
        append_line(self.run_dir / GRADIENTS, to_json(record))
        self.inner.on_gradients(record)


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


def to_device(model: nn.Module, strategy_parameters: list[nn.Parameter], device: torch.device) -> None:
    """The model and the weighting's own parameters onto ``device``, in place: the optimizer keeps
    the same parameter objects."""
    if device.type == "cpu":
        return
    model.to(device)
    for parameter in strategy_parameters:
        parameter.data = parameter.data.to(device)


def check_batch_split(batch_size: int, processes: int, shards: int | str = "auto") -> None:
    """The global batch and ``train.shards`` (a number) against the process count, before any work."""
    if batch_size % processes:
        raise MtlError(
            f"train.batch_size ({batch_size}) does not divide evenly among the {processes} processes",
            f"train.batch_size is the global batch: make it a multiple of {processes}",
        )
    if shards != "auto":
        check_shards(int(shards), processes)


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
    """Preprocess if needed, train, and write the run directory. Returns the summary.

    With ``resume``, continue the run in ``run_dir`` from its last checkpoint (refused when the
    recipe, apart from train.epochs, or the data changed since). Only one process at a time may
    train into a run directory.
    """
    ranks = distributed.current()  # on several ranks, rank 0 alone writes the run directory
    settings = recipe.train
    check_loggers(settings.loggers)
    device = distributed.training_device(settings.device)  # a missing GPU is said before any work
    with distributed.alike_on_every_rank(ranks):
        check_batch_split(settings.batch_size, ranks.world, settings.shards)
    if not resume:
        if ranks.writes:
            check_run_dir(run_dir, force)
    elif not (run_dir / CHECKPOINT).is_file():
        raise ArtifactError(f"{run_dir}: no checkpoint to resume from", "train it without --resume")
    prepared = prepared or prepare(recipe)
    schema = prepared.schema
    saved = read_checkpoint_identity(run_dir / CHECKPOINT) if resume else {}
    shards = stream_shards(settings.shards, ranks.world, saved)
    with distributed.alike_on_every_rank(ranks):  # the same shards, batch and file on every rank
        train_data = split_source(
            prepared, "train", recipe, settings.batch_size, "train.batch_size", shards, ranks.world
        )
    valid_data = split_source(prepared, "valid", recipe, settings.eval_batch_size, "train.eval_batch_size")
    torch.manual_seed(settings.seed)
    tasks = schema.task_names
    types = [t.type for t in schema.tasks]
    model = build_model(recipe.model.scheme, recipe.model.params, input_spec(schema))
    if settings.sparse_embeddings is not False:
        use_sparse_rows(model, SPARSE_MIN_ROWS if settings.sparse_embeddings == "auto" else 0)
    torch.set_num_threads(choose_threads(settings.threads, model))
    strategy = build_weighting(recipe.loss.weighting, recipe.loss.params, tasks)
    own = list(strategy.capabilities.parameters)
    optimizer = make_optimizer(settings, list(model.parameters()), own, recipe.loss.params.own_lr())
    identity = run_identity(recipe, schema, train_data.shards)
    pos_weight = pos_weight_tensor(recipe)
    if pos_weight is not None:
        pos_weight = pos_weight.to(device)
    with run_lock(run_dir) if ranks.writes else nullcontext():
        if resume:
            to_device(model, own, device)  # before the optimizer's state is loaded next to them
            state = _resume_state(run_dir, identity, model, optimizer, strategy)
        else:
            search = scheme(model).capabilities.search  # schemes that find their structure first
            if search is not None:
                search(train_data, settings.batch_size, settings.lr, settings.seed)
            to_device(model, own, device)
            if ranks.writes:
                _claim_run_dir(run_dir, force)
            state = None
        tracker = None
        try:
            writer: Observer = NullObserver()
            if ranks.writes:
                write_text(run_dir / "recipe.yaml", recipe_to_yaml(recipe))
                schema.save(run_dir / "schema.json")
                inner: Observer = observer or NullObserver()
                if settings.loggers:  # only rank 0 logs
                    name = experiment or settings.experiment or "mtl"
                    tracker = Trackers(settings.loggers, run_dir, recipe, name, inner, state, tracker_params)
                    inner = tracker
                writer = RunWriter(run_dir, recipe, schema, inner, identity)
            result = fit(
                model,
                strategy,
                train_data,
                valid_data,
                settings,
                tasks,
                types,
                writer,
                optimizer,
                state,
                stop_requested,
                pos_weight=pos_weight,
            )
        except BaseException:
            if tracker is not None:
                tracker.abandon()
            if ranks.writes and not resume and not (run_dir / CHECKPOINT).exists():
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        if ranks.writes:
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
            "train_shards": train_data.shards,
            "data_dir": str(prepared.directory.resolve()),
            "data_reused": prepared.reused,
            "resumed": resume,
            "warnings": schema.warnings,
            "processes": ranks.world,
        }
        if ranks.writes:
            write_json(run_dir / "summary.json", summary)
        if tracker is not None:
            files = [run_dir / name for name in ("model.safetensors", "schema.json", "summary.json")]
            tracker.finish(files, result.best_metrics)
    return summary


def split_source(
    prepared: Prepared, split: str, recipe: Recipe, batch_size: int, field: str, shards: int = 1, world: int = 1
) -> BatchSource:
    """A split in memory or streamed, as ``train.loading`` and ``data.memory_budget`` say; the
    train split shuffled in windows of ``train.shuffle_buffer`` rows when that is set, and dealt
    to ``shards`` read by ``world`` processes."""
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
        world=world,
    )


def stream_shards(setting: int | str, world: int, saved: dict[str, str]) -> int:
    """``train.shards``: a number as given; auto, one per process, or on resume the run's own
    count (the order of an epoch depends on it; a run that began before shards existed had 1)."""
    if setting != "auto":
        return int(setting)
    return int(saved.get("shards", "1")) if saved else world


def run_identity(recipe: Recipe, schema: DataSchema, shards: int = 1) -> dict[str, str]:
    """What a checkpoint must match to be resumed: the recipe (train.epochs, the loggers, the
    experiment and the device may change: a run may go on elsewhere), the data, and the shards a
    streamed train split is dealt to (``train.shards`` may say auto or the number)."""
    spec = recipe.to_dict()
    free = ("epochs", "loggers", "experiment", "device", "shards")
    spec["train"] = {k: v for k, v in spec["train"].items() if k not in free}
    return {"recipe_sha256": sha256_json(spec), "data_key": schema.data_key, "shards": str(shards)}


def _resume_state(
    run_dir: Path, identity: dict[str, str], model: nn.Module, optimizer: torch.optim.Optimizer, strategy: Any
) -> LoopState:
    saved = read_checkpoint_identity(run_dir / CHECKPOINT)
    if saved.get("data_key") != identity["data_key"]:
        raise ArtifactError(
            f"{run_dir}: cannot resume: the data changed since the run started",
            "train into a new --out, or restore the original data",
        )
    if saved.get("recipe_sha256") != identity["recipe_sha256"]:
        raise ArtifactError(
            f"{run_dir}: cannot resume: the recipe differs from the run's recipe.yaml (only train.epochs may change)",
            f"compare with `mtl recipe show {run_dir / 'recipe.yaml'}`, or train into a new --out",
        )
    if saved.get("shards", "1") != identity["shards"]:
        raise ArtifactError(
            f"{run_dir}: cannot resume: the run streamed its train split as {saved.get('shards', '1')} "
            f"shards (train.shards), and {identity['shards']} are asked for now",
            "set train.shards: auto to go on in the run's order",
        )
    state = load_checkpoint(run_dir / CHECKPOINT, model, optimizer, strategy)
    write_text(run_dir / "metrics.jsonl", "".join(to_json(r) + "\n" for r in state.history))
    tracked = run_dir / GRADIENTS
    if tracked.is_file():  # drop samples taken after the checkpoint: the resumed run takes them again
        keep = [line for line in tracked.read_text().splitlines() if _before(json.loads(line), state)]
        write_text(tracked, "".join(line + "\n" for line in keep))
    (run_dir / "summary.json").unlink(missing_ok=True)
    return state


def _before(record: dict[str, Any], state: LoopState) -> bool:
    """Was this gradients sample taken before the checkpoint of ``state`` (epoch, step in epoch)?"""
    epoch = int(record.get("epoch", 0))
    return epoch < state.epoch or (epoch == state.epoch and int(record.get("step_in_epoch", 0)) <= state.step)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on a run directory: a sibling ``.NAME.lock`` file holding the owner's pid,
    removed when the lock is released.

    Removing a lock file can let two processes hold "the" lock at once (one locked the old file
    just before it was unlinked, another creates a new one), so the lock is only taken on a file
    that is still the one at the path (same inode after ``flock``; else try again), and the owner
    unlinks it while still holding the lock.
    """
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir.parent / f".{run_dir.name}.lock"
    while True:
        handle = lock_path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise ArtifactError(
                f"{run_dir}: another mtl process (pid {owner}) is training into this run directory",
                "wait for it to finish, or choose another --out",
            ) from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # the previous owner removed this file after we opened it: take the new one
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


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
