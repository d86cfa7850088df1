"""train.loggers: TensorBoard and MLflow get every epoch's metrics and the tracked gradient steps,
read back with their own readers; a run stopped between an epoch's log and its checkpoint, then
resumed, has each epoch exactly once in both; a logger without its package is a clear error."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mtlcli.cli.app import app
from mtlcli.errors import MtlError
from mtlcli.recipe import recipe_from_text
from mtlcli.train.loop import NullObserver
from mtlcli.train.run import train_run

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


def census_recipe(tmp_path: Path, epochs: int = 3) -> Any:
    from tests.conftest import CENSUS, REPO

    if not CENSUS.is_file():
        pytest.skip(f"census data not found at {CENSUS}")
    spec = yaml.safe_load((REPO / "recipes" / "census-mmoe.yaml").read_text())
    spec["data"]["source"] = str(CENSUS)
    spec["data"]["cache_dir"] = str(tmp_path / "cache")
    spec["train"] |= {"epochs": epochs, "early_stopping": None, "threads": 1, "track_gradients": 40,
                      "loggers": ["tensorboard", "mlflow"]}  # fmt: skip
    return recipe_from_text(yaml.safe_dump(spec), "census-mmoe.yaml")


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts go below the working directory
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return uri


def tensorboard_steps(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def mlflow_history(experiment: str, key: str) -> tuple[Any, list[tuple[int, float]]]:
    import mlflow

    runs = mlflow.search_runs(experiment_names=[experiment])
    assert len(runs) == 1, runs
    client = mlflow.tracking.MlflowClient()
    run_id = runs.run_id[0]
    return runs, sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_every_epoch_and_tracked_step_reach_both_trackers(tmp_path: Path, mlflow_store: str) -> None:
    import mlflow

    summary = train_run(census_recipe(tmp_path), tmp_path / "run", experiment="census-mmoe")
    steps = 59  # census train rows / 1024
    auc = tensorboard_steps(tmp_path / "run", "valid/income/auc")
    assert [s for s, _ in auc] == [steps, 2 * steps, 3 * steps]
    assert auc[-1][1] == pytest.approx(summary["valid"]["income"]["auc"], abs=1e-6)  # the last epoch is the best here
    assert [s for s, _ in tensorboard_steps(tmp_path / "run", "gradient_cosine/income~marital")] == [40, 80, 120, 160]
    runs, history = mlflow_history("census-mmoe", "valid/income/auc")
    assert [s for s, _ in history] == [s for s, _ in auc]
    assert [v for _, v in history] == pytest.approx([v for _, v in auc], abs=1e-6)  # TensorBoard keeps float32
    assert runs["tags.mlflow.runName"][0] == "run" and runs["params.model.n_experts"][0] == "8"
    names = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(runs.run_id[0])}
    assert {"model.safetensors", "schema.json", "summary.json", "recipe.yaml"} <= names


class Stop(Exception):
    pass


class StopAtEpoch(NullObserver):
    """Raises after the trackers logged epoch ``epoch`` and before its checkpoint is written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch(self, record: dict[str, Any], model: Any, improved: bool) -> None:
        if record["epoch"] == self.epoch:
            raise Stop


def test_a_resumed_run_logs_each_epoch_once(tmp_path: Path, mlflow_store: str) -> None:
    recipe, run = census_recipe(tmp_path), tmp_path / "run"
    with pytest.raises(Stop):
        train_run(recipe, run, observer=StopAtEpoch(2), experiment="census-mmoe")
    assert [s for s, _ in tensorboard_steps(run, "epoch")] == [59, 118]  # epoch 2 logged, not checkpointed
    train_run(recipe, run, resume=True, experiment="census-mmoe")
    epochs = tensorboard_steps(run, "epoch")
    assert epochs == [(59, 1.0), (118, 2.0), (177, 3.0)]
    _, history = mlflow_history("census-mmoe", "epoch")
    assert history == [(59, 1.0), (118, 2.0), (177, 3.0)]
    _, grads = mlflow_history("census-mmoe", "gradient_norm/income")
    assert [s for s, _ in grads] == [40, 80, 120, 160]
    assert [s for s, _ in tensorboard_steps(run, "gradient_norm/income")] == [40, 80, 120, 160]


def test_a_logger_without_its_package_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(MtlError, match=r"train.loggers: mlflow needs the mlflow package") as caught:
        train_run(census_recipe(tmp_path), tmp_path / "run")
    assert "pip install 'mtlcli[mlflow]'" in str(caught.value)
    from tests.conftest import REPO

    result = CliRunner().invoke(
        app, ["train", str(REPO / "recipes" / "quickstart.yaml"), "--out", str(tmp_path / "q"),
              "--set", "train.loggers=[mlflow]", "--set", f"data.cache_dir={tmp_path}/cache"],
    )  # fmt: skip
    assert result.exit_code == 2 and "mtlcli[mlflow]" in result.output and not (tmp_path / "q").exists()


def test_a_sweep_logs_each_point_as_a_run_of_one_experiment(tmp_path: Path, mlflow_store: str) -> None:
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.conftest import REPO

    result = CliRunner().invoke(
        app,
        ["sweep", str(REPO / "recipes" / "quickstart.yaml"), "--grid", "train.seed=0,1", "--out", str(tmp_path / "grid"),
         "--set", "train.epochs=1", "--set", "data.synthetic.rows=2000", "--set", "train.loggers=[tensorboard, mlflow]",
         "--set", f"data.cache_dir={tmp_path}/cache", "--set", "train.threads=1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    runs = mlflow.search_runs(experiment_names=["grid"])
    assert sorted(runs["params.sweep.train.seed"]) == ["0", "1"]
    assert sorted(runs["tags.mlflow.runName"]) == ["seed=0", "seed=1"]
    events = EventAccumulator(str(tmp_path / "grid" / "seed=1" / "tensorboard"))
    events.Reload()
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
