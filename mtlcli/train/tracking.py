"""Experiment trackers (``train.loggers``): TensorBoard and MLflow receive what the run directory
records — per epoch each task's train loss, loss weight and valid metrics, the learning rate and
the throughput; per tracked step the gradient cosines and norms — plus the resolved recipe, and
(MLflow) the model, schema and summary as artifacts.

Every scalar is logged at the global step (an epoch's at its last step), so that one axis serves
both. A resumed run continues the same tracker run without logging a point twice: TensorBoard's
writer purges what was logged after the checkpoint (``purge_step``), and the MLflow run, whose id
is kept in the run directory, skips the (metric, step) points it already holds.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from mtlcli.errors import MtlError
from mtlcli.recipe import Recipe, recipe_to_yaml
from mtlcli.train.loop import LoopState, Observer

TENSORBOARD_DIR = "tensorboard"  # inside the run directory
MLFLOW_RUN = ".mlflow_run"  # the MLflow run id of this run directory
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


def check_loggers(loggers: Sequence[str]) -> None:
    """A clear error for a logger whose library is not installed."""
    for name in loggers:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise MtlError(
                f"train.loggers: {name} needs the {PACKAGES[name]} package, which is not installed",
                f"pip install 'mtlcli[{name}]', or remove {name} from train.loggers",
            )


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


class Trackers:
    """An observer layer that forwards to ``inner`` after logging to the chosen trackers."""

    def __init__(
        self,
        loggers: Sequence[str],
        run_dir: Path,
        recipe: Recipe,
        experiment: str,
        inner: Observer,
        resumed: LoopState | None = None,
        params: dict[str, str] | None = None,
    ) -> None:
        self.loggers, self.run_dir, self.recipe, self.inner = loggers, run_dir, recipe, inner
        self.experiment, self.resumed, self.params = experiment, resumed, params or {}
        self.steps = 1
        self.tensorboard: Any = None
        self.mlflow: Any = None
        self.logged: dict[str, int] = {}  # MLflow: the last step of each metric already in the run

    # --- the observer ---

    def on_start(self, epochs: int, steps_per_epoch: int) -> None:
        self.steps = steps_per_epoch
        if "tensorboard" in self.loggers:
            self._open_tensorboard()
        if "mlflow" in self.loggers:
            self._open_mlflow()
        self.inner.on_start(epochs, steps_per_epoch)

    def on_step(self, epoch: int, step: int) -> None:
        self.inner.on_step(epoch, step)

    def on_epoch(self, record: dict[str, Any], model: nn.Module, improved: bool) -> None:
        self._log(epoch_scalars(record), record["epoch"] * self.steps)
        self.inner.on_epoch(record, model, improved)

    def on_checkpoint(self, state: LoopState, model: nn.Module, optimizer: Any, strategy: Any) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()  # what the checkpoint covers is on disk with it
        self.inner.on_checkpoint(state, model, optimizer, strategy)

    def on_gradients(self, record: dict[str, Any]) -> None:
        self._log(gradient_scalars(record), int(record["step"]))
        self.inner.on_gradients(record)

    # --- the trackers ---

    def _open_tensorboard(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None
        if self.resumed is not None:  # drop what was logged after the checkpoint: it is logged again
            purge = (self.resumed.epoch - 1) * self.steps + self.resumed.step + 1
        self.tensorboard = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=purge)
        if self.resumed is None:
            self.tensorboard.add_text("recipe", "```yaml\n" + recipe_to_yaml(self.recipe) + "\n```", 0)
            if self.params:
                self.tensorboard.add_text("settings", json.dumps(self.params), 0)

    def _open_mlflow(self) -> None:
        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.mlflow = mlflow
        mlflow.set_experiment(self.experiment)
        saved = self.run_dir / MLFLOW_RUN
        run_id = saved.read_text().strip() if self.resumed is not None and saved.is_file() else None
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else self.run_dir.name)
        if run_id is None:
            saved.write_text(run.info.run_id + "\n")
            mlflow.log_params(flat_params(self.recipe.to_dict()) | self.params)
            mlflow.log_text(recipe_to_yaml(self.recipe), "recipe.yaml")
        else:
            client = mlflow.tracking.MlflowClient()
            for key in client.get_run(run_id).data.metrics:
                self.logged[key] = max(m.step for m in client.get_metric_history(run_id, key))

    def _log(self, scalars: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.mlflow is not None:  # MLflow's names take no "~"
            named = {k.replace("~", "-"): v for k, v in scalars.items()}
            fresh = {k: v for k, v in named.items() if step > self.logged.get(k, -1)}
            if fresh:
                self.mlflow.log_metrics(fresh, step=step)
                self.logged |= dict.fromkeys(fresh, step)

    def finish(self, files: list[Path], best: dict[str, dict[str, Any]] | None = None) -> None:
        """After training: a sweep point's settings with its best valid metrics as TensorBoard
        HParams, the run's files as MLflow artifacts; close everything."""
        if self.tensorboard is not None:
            if self.params and best:
                metrics = {
                    f"best/{task}/{metric}": float(value)
                    for task, values in best.items()
                    for metric, value in values.items()
                    if metric in ("auc", "gauc", "logloss", "rmse", "mae") and value is not None
                }
                self.tensorboard.add_hparams(self.params, metrics, run_name=".")
            self.tensorboard.close()
        if self.mlflow is not None:
            for path in files:
                if path.is_file():
                    self.mlflow.log_artifact(str(path))
            self.mlflow.end_run()

    def abandon(self) -> None:
        """Training stopped (interrupted, failed): close without artifacts; the run resumes later."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.mlflow is not None:
            self.mlflow.end_run(status="KILLED")
