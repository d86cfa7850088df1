"""Experiment trackers (``train.loggers``): TensorBoard and MLflow receive what the run directory
records — per epoch each task's train loss, loss weight and valid metrics, the learning rate and
the throughput; per tracked step the gradient cosines and norms — plus the resolved recipe, and
(MLflow) the model, schema and summary as artifacts.

A tracker is a registry entry (``register_tracker``): the package it needs, a check that it can
start (before any file of the run is touched), and a builder of an observer that also
``finish``es or ``abandon``s. Every scalar is logged at the global step (an epoch's at its last
step), so that one axis serves both. A resumed run continues the same tracker run without logging
a point twice: TensorBoard's writer purges what was logged after the checkpoint (``purge_step``),
and the MLflow run, whose id is kept in the run directory, skips the (metric, step) points it
already holds.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mtlcli.errors import MtlError
from mtlcli.recipe import Recipe, recipe_to_yaml
from mtlcli.registry import Registry
from mtlcli.train.observers import NullObserver, Observer
from mtlcli.train.rundir import TENSORBOARD_DIR

if TYPE_CHECKING:
    from torch import nn

MLFLOW_RUN = ".mlflow_run"  # the MLflow run id of this run directory


@dataclass(frozen=True)
class TrackerSetup:
    """What a tracker is opened with: where the run's files are (``run_dir``), the run's name,
    the recipe, the experiment, the epoch and step a resumed run continues from (None for a new
    run), the steps per epoch and a sweep point's settings (``params``)."""

    run_dir: Path
    name: str
    recipe: Recipe
    experiment: str
    resumed_at: tuple[int, int] | None
    steps_per_epoch: int
    params: dict[str, str]


class Tracker(Observer, Protocol):
    def finish(self, files: list[Path], best: dict[str, dict[str, Any]]) -> None:
        """After training: log the run's files and best metrics; close."""
        ...

    def abandon(self) -> None:
        """Training stopped (interrupted, failed): close without artifacts; the run resumes later."""
        ...


@dataclass(frozen=True)
class TrackerKind:
    """A registered tracker: ``package`` it needs, ``check(experiment)`` raising a clear error
    when it cannot start, ``open(setup)`` the started tracker."""

    name: str
    package: str
    check: Callable[[str], None]
    open: Callable[[TrackerSetup], Tracker]


TRACKERS: Registry[TrackerKind] = Registry("tracker")


def register_tracker(
    name: str, package: str, check: Callable[[str], None] = lambda experiment: None
) -> Callable[[Callable[[TrackerSetup], Tracker]], Callable[[TrackerSetup], Tracker]]:
    """Decorator for a tracker's ``open(setup) -> Tracker``."""

    def decorate(open_: Callable[[TrackerSetup], Tracker]) -> Callable[[TrackerSetup], Tracker]:
        TRACKERS.add(name, TrackerKind(name, package, check, open_))
        return open_

    return decorate


def check_trackers(loggers: Sequence[str], experiment: str) -> None:
    """Each tracker of ``train.loggers`` can start: its package is installed, its own check passes."""
    for name in loggers:
        kind = TRACKERS.get(name)
        if importlib.util.find_spec(kind.package) is None:
            raise MtlError(
                f"train.loggers: {name} needs the {kind.package} package, which is not installed",
                f"pip install 'mtlcli[{name}]', or remove {name} from train.loggers",
            )
        kind.check(experiment)


def open_trackers(loggers: Sequence[str], setup: TrackerSetup) -> list[Tracker]:
    """The trackers of ``train.loggers``, started; those already open are abandoned when one fails."""
    opened: list[Tracker] = []
    try:
        for name in loggers:
            opened.append(TRACKERS.get(name).open(setup))
    except BaseException:
        for tracker in opened:
            tracker.abandon()
        raise
    return opened


def epoch_scalars(record: dict[str, Any]) -> dict[str, float]:
    out = {"epoch": float(record["epoch"]), "lr": record["lr"], "samples_per_second": record["samples_per_second"]}
    for task, value in record["train_loss"].items():
        out[f"train_loss/{task}"] = value
    for task, value in record["weights"].items():
        out[f"weight/{task}"] = value
    for task, metrics in record["valid"].items():
        for metric, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and value is not None:
                out[f"valid/{task}/{metric}"] = float(value)
    return out


def gradient_scalars(record: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    tasks = list(record["gradient_cosine"])
    for i, a in enumerate(tasks):
        for b in tasks[i + 1 :]:
            value = record["gradient_cosine"][a][b]
            if value is not None:
                out[f"gradient_cosine/{a}~{b}"] = value
    for task, value in record["gradient_norm"].items():
        if value is not None:
            out[f"gradient_norm/{task}"] = value
    return out


def flat_params(spec: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The recipe as MLflow parameters: dotted keys, values as short text."""
    out: dict[str, str] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= flat_params(value, name + ".")
        else:
            out[name] = json.dumps(value)[:500]
    return out


class TensorBoard(NullObserver):
    """Event files in the run directory's ``tensorboard/``."""

    def __init__(self, setup: TrackerSetup) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.steps, self.params = setup.steps_per_epoch, setup.params
        folder = setup.run_dir / TENSORBOARD_DIR
        purge = None
        if setup.resumed_at is not None:  # drop what was logged after the checkpoint: it is logged again
            epoch, step = setup.resumed_at
            purge = (epoch - 1) * self.steps + step + 1
        try:  # a folder it cannot write fails here, in this thread, not later in the writer's own
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".mtl-write-check"
            probe.write_text("")
            probe.unlink()
            self.writer = SummaryWriter(str(folder), purge_step=purge)
        except OSError as exc:
            raise MtlError(
                f"train.loggers: tensorboard cannot write its event files in {folder} ({exc.strerror or exc})",
                f"make {folder} a writable directory, or remove tensorboard from train.loggers",
            ) from None
        if setup.resumed_at is None:
            self.writer.add_text("recipe", "```yaml\n" + recipe_to_yaml(setup.recipe) + "\n```", 0)
            if self.params:
                self.writer.add_text("settings", json.dumps(self.params), 0)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def on_epoch(self, record: dict[str, Any], model: nn.Module, improved: bool) -> None:
        self.log(epoch_scalars(record), record["epoch"] * self.steps)

    def on_gradients(self, record: dict[str, Any]) -> None:
        self.log(gradient_scalars(record), int(record["step"]))

    def on_checkpoint(self, state: Any, model: nn.Module, optimizer: Any, strategy: Any) -> None:
        self.writer.flush()  # what the checkpoint covers is on disk with it

    def finish(self, files: list[Path], best: dict[str, dict[str, Any]]) -> None:
        """A sweep point's settings with its best valid metrics as HParams; close."""
        if self.params and best:
            metrics = {
                f"best/{task}/{metric}": float(value)
                for task, values in best.items()
                for metric, value in values.items()
                if metric in ("auc", "gauc", "logloss", "rmse", "mae") and value is not None
            }
            self.writer.add_hparams(self.params, metrics, run_name=".")
        self.writer.close()

    def abandon(self) -> None:
        self.writer.close()


@register_tracker("tensorboard", "tensorboard")
def open_tensorboard(setup: TrackerSetup) -> Tracker:
    return TensorBoard(setup)


def mlflow_uri() -> str:
    """Where MLflow writes: ``MLFLOW_TRACKING_URI``, or its default (./mlruns)."""
    return os.environ.get("MLFLOW_TRACKING_URI", "") or "./mlruns (MLflow's default)"


def mlflow_failed(exc: Exception) -> MtlError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return MtlError(
        f"train.loggers: mlflow cannot use its tracking store {mlflow_uri()} (MLFLOW_TRACKING_URI): {first}",
        "set MLFLOW_TRACKING_URI to a reachable server or a writable local path (e.g. sqlite:///mlflow.db), "
        "or remove mlflow from train.loggers",
    )


CHECK_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def check_mlflow(experiment: str) -> None:
    """MLflow can reach its tracking store and use ``experiment`` (nothing of the run is logged).
    A server that does not answer is said within seconds: MLflow's own retries (minutes) are off
    for this check, unless the environment sets them."""
    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    unset = [name for name in CHECK_RETRIES if name not in os.environ]
    os.environ.update({name: CHECK_RETRIES[name] for name in unset})
    try:
        mlflow.set_experiment(experiment)
    except Exception as exc:  # MLflow raises many kinds (bad scheme, unreachable server, no permission)
        raise mlflow_failed(exc) from None
    finally:
        for name in unset:
            del os.environ[name]


class MLflow(NullObserver):
    """One MLflow run per run directory, its id kept in the directory (``.mlflow_run``)."""

    def __init__(self, setup: TrackerSetup) -> None:
        import mlflow

        self.steps, self.mlflow = setup.steps_per_epoch, mlflow
        self.logged: dict[str, int] = {}  # the last step of each metric already in the run
        saved = setup.run_dir / MLFLOW_RUN
        run_id = saved.read_text().strip() if setup.resumed_at is not None and saved.is_file() else None
        try:
            mlflow.set_experiment(setup.experiment)
            run = mlflow.start_run(run_id=run_id, run_name=None if run_id else setup.name)
            if run_id is None:
                saved.write_text(run.info.run_id + "\n")
                mlflow.log_params(flat_params(setup.recipe.to_dict()) | setup.params)
                mlflow.log_text(recipe_to_yaml(setup.recipe), "recipe.yaml")
            else:
                client = mlflow.tracking.MlflowClient()
                for key in client.get_run(run_id).data.metrics:
                    self.logged[key] = max(m.step for m in client.get_metric_history(run_id, key))
        except Exception as exc:  # see check_mlflow
            raise mlflow_failed(exc) from None

    def log(self, scalars: dict[str, float], step: int) -> None:
        named = {k.replace("~", "-"): v for k, v in scalars.items()}  # MLflow's names take no "~"
        fresh = {k: v for k, v in named.items() if step > self.logged.get(k, -1)}
        if fresh:
            self.mlflow.log_metrics(fresh, step=step)
            self.logged |= dict.fromkeys(fresh, step)

    def on_epoch(self, record: dict[str, Any], model: nn.Module, improved: bool) -> None:
        self.log(epoch_scalars(record), record["epoch"] * self.steps)

    def on_gradients(self, record: dict[str, Any]) -> None:
        self.log(gradient_scalars(record), int(record["step"]))

    def finish(self, files: list[Path], best: dict[str, dict[str, Any]]) -> None:
        """The run's files as artifacts; end the run."""
        for path in files:
            if path.is_file():
                self.mlflow.log_artifact(str(path))
        self.mlflow.end_run()

    def abandon(self) -> None:
        self.mlflow.end_run(status="KILLED")


@register_tracker("mlflow", "mlflow", check_mlflow)
def open_mlflow(setup: TrackerSetup) -> Tracker:
    return MLflow(setup)
