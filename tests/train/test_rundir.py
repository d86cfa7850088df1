"""The run directory: a run replaces another only when complete, a failure never leaves less than
there was and says truly what it kept; trackers that cannot start fail before any file is touched,
with one clear message."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner, Result

from mtlcli.cli.app import app
from mtlcli.errors import MtlError
from mtlcli.recipe import Recipe, recipe_from_text
from mtlcli.train.loop import TrainingInterrupted
from mtlcli.train.run import train_run
from mtlcli.train.rundir import replacement

runner = CliRunner()


def tiny_recipe(tmp_path: Path, **train: Any) -> Path:
    """Two binary tasks on 300 rows of CSV (64-row batches: 3 steps an epoch)."""
    rng = random.Random(0)
    lines = ["user,item,age,click,buy"]
    for _ in range(300):
        user, item, age = rng.randrange(12), rng.randrange(6), rng.gauss(35.0, 8.0)
        click = int(rng.random() < 0.15 + 0.1 * item)
        lines.append(f"u{user},i{item},{age:.2f},{click},{int(click == 1 and age > 35)}")
    (tmp_path / "tiny.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    spec = {
        "data": {"source": str(tmp_path / "tiny.csv"), "split": {"by": "modulo"}, "cache_dir": str(tmp_path / "cache")},
        "features": {"numeric": ["age"], "categorical": ["user", "item"]},
        "tasks": {"click": {"label": "click"}, "buy": {"label": "buy"}},
        "model": {"scheme": "mmoe", "embedding_dim": 2, "n_experts": 2, "expert_units": [4], "tower_units": [2]},
        "train": {"lr": 0.01, "epochs": 2, "batch_size": 64, "threads": 1, "early_stopping": None, **train},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def invoke(*args: str | Path) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def contents(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def user_error(result: Result, *expected: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, MtlError)
    for text in expected:
        assert text in result.stderr, result.stderr
    return result.stderr


DIVERGES = ["--set", "train.lr=1e30"]  # Adam's first step takes every weight to ~1e30: NaN at step 2


def test_force_over_a_run_keeps_it_whole_when_the_new_run_fails_early(tmp_path: Path) -> None:
    recipe, run = tiny_recipe(tmp_path), tmp_path / "run"
    assert invoke("train", recipe, "--out", run, "--quiet").exit_code == 0
    before = contents(run)
    said = user_error(
        invoke("train", recipe, "--out", run, "--quiet", "--force", *DIVERGES), "became NaN or infinite", "unchanged"
    )
    assert "checkpoint is kept" not in said
    assert contents(run) == before  # the old run, every byte
    assert not replacement(run).exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_first_run_that_fails_early_leaves_nothing_and_says_so(tmp_path: Path) -> None:
    recipe, run = tiny_recipe(tmp_path), tmp_path / "run"
    said = user_error(invoke("train", recipe, "--out", run, "--quiet", *DIVERGES), "wrote no checkpoint")
    assert "checkpoint is kept" not in said and not run.exists()
    empty = tmp_path / "mine"
    empty.mkdir()  # a directory the user made stays (empty, as it was)
    user_error(invoke("train", recipe, "--out", empty, "--quiet", *DIVERGES), "wrote no checkpoint")
    assert empty.is_dir() and not any(empty.iterdir())


def interrupted_beside(tmp_path: Path, then: dict[str, Any], **how: bool) -> tuple[Recipe, Recipe, Path]:
    """The tiny recipe trained into a run, then the recipe with ``then`` trained into it (``how``:
    force or resume) and interrupted at its 4th step: the first run is unchanged and the hint says
    so and how to go on. Returns (first recipe, second recipe, run)."""
    first = recipe_from_text(tiny_recipe(tmp_path).read_text(), "tiny.yaml")
    second = recipe_from_text(tiny_recipe(tmp_path, **then).read_text(), "tiny.yaml")
    run = tmp_path / "run"
    train_run(first, run)
    before = contents(run)
    steps = iter(range(100))
    with pytest.raises(TrainingInterrupted) as caught:
        train_run(second, run, stop_requested=lambda: next(steps) == 4, **how)  # type: ignore[arg-type]
    assert "unchanged" in str(caught.value.hint) and "--resume" in str(caught.value.hint)
    assert contents(run) == before
    return first, second, run


def test_an_interrupted_replacement_waits_beside_the_old_run_and_takes_its_place_when_resumed(tmp_path: Path) -> None:
    _, new, run = interrupted_beside(tmp_path, {"lr": 0.02}, force=True)
    assert (replacement(run) / "checkpoint.safetensors").is_file()
    summary = train_run(new, run, resume=True)
    assert summary["run_dir"] == str(run) and summary["resumed"]
    assert "lr: 0.02" in (run / "recipe.yaml").read_text() and not replacement(run).exists()
    assert (run / "summary.json").is_file()


def test_a_finished_run_resumed_for_more_epochs_stays_whole_until_the_resumed_run_is_complete(
    tmp_path: Path,
) -> None:
    """The resumed run goes on in a copy beside the finished one: interrupted, it leaves the
    finished run whole (summary.json marks it finished for sweep, load and eval) and its own
    checkpoint beside it; resumed again, it takes the run's place."""
    from mtlcli.sweep import run_state

    recipe, longer, run = interrupted_beside(tmp_path, {"epochs": 4}, resume=True)
    assert run_state(run, recipe) == "done" and not (replacement(run) / "summary.json").exists()
    summary = train_run(longer, run, resume=True)
    assert summary["epochs_run"] == 4 and summary["resumed"] and not replacement(run).exists()
    assert run_state(run, longer) == "done" and len((run / "metrics.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("loading", ["stream", "memory"])
def test_a_resumed_stream_keeps_its_shards_and_the_plan_checks_them_against_the_processes(
    tmp_path: Path, loading: str
) -> None:
    """train.shards: auto resumes a streamed run with the count it began with (1 here): 2
    processes cannot share it, and the plan says so before any work; in memory the count orders
    nothing and any process count may go on."""
    from mtlcli.errors import DataError
    from mtlcli.train.plan import resolve_plan

    path = tiny_recipe(tmp_path, loading=loading, shuffle_buffer=128)
    recipe, run = recipe_from_text(path.read_text(), "tiny.yaml"), tmp_path / "run"
    steps = iter(range(100))
    with pytest.raises(TrainingInterrupted):
        train_run(recipe, run, stop_requested=lambda: next(steps) == 2)
    if loading == "memory":
        assert resolve_plan(recipe, run, resume=True, world=2).shards == 1
        return
    with pytest.raises(DataError, match=r"train\.shards: 1 shards cannot be shared evenly by 2 processes"):
        resolve_plan(recipe, run, resume=True, world=2)


def test_resuming_a_finished_run_with_an_unwritable_tensorboard_folder_loses_nothing(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    recipe, run = tiny_recipe(tmp_path), tmp_path / "run"
    assert invoke("train", recipe, "--out", run, "--quiet").exit_code == 0
    (run / "tensorboard").write_text("not a folder")  # cannot hold event files (root writes anywhere else)
    before = contents(run)
    said = user_error(
        invoke("train", recipe, "--out", run, "--quiet", "--resume", "--set", "train.epochs=3",
               "--set", "train.loggers=[tensorboard]"),
        "tensorboard cannot write its event files",
    )  # fmt: skip
    assert "b'" not in said and contents(run) == before  # summary.json and the logs as they were


@pytest.mark.parametrize(
    "uri",
    ["nope://nowhere", "sqlite:////proc/forbidden/mlflow.db", "http://127.0.0.1:9"],
    ids=["unknown-scheme", "uncreatable-path", "no-server-on-localhost"],
)
def test_an_unusable_mlflow_store_is_one_message_before_any_work(
    tmp_path: Path, uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    recipe, run = tiny_recipe(tmp_path), tmp_path / "run"
    said = user_error(
        invoke("train", recipe, "--out", run, "--quiet", "--set", "train.loggers=[mlflow]"),
        "MLFLOW_TRACKING_URI",
        uri,
    )
    assert len(said.splitlines()) <= 4 and not run.exists()
    assert not (tmp_path / "cache").exists()  # said before any work: the data is not even prepared


def test_port_without_nproc_and_far_too_many_processes_are_refused(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path)
    user_error(invoke("train", recipe, "--out", tmp_path / "r", "--port", "29999"), "--port", "--nproc")
    many = 4 * (os.cpu_count() or 1) + 1
    user_error(invoke("train", recipe, "--out", tmp_path / "r", "--nproc", str(many)), f"--nproc {many}")
    assert not (tmp_path / "r").exists()


def test_train_says_and_returns_the_inputs_the_model_reads(tmp_path: Path) -> None:
    import json

    recipe = tiny_recipe(tmp_path)
    result = invoke("train", recipe, "--out", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    inputs = json.loads(result.stdout)["inputs"]
    assert inputs == {"categorical": ["user", "item"], "numeric": ["age"], "histories": []}
    assert "inputs: 2 categorical (user, item); 1 numeric (age); 0 histories" in result.stderr


def test_a_model_with_a_constant_output_is_warned_about() -> None:
    from mtlcli.train.run import training_warnings

    flat = [{"valid": {"a": {"auc": 0.5}, "b": {"auc": 0.5}, "r": {"rmse": 1.0}}} for _ in range(3)]
    (said,) = training_warnings(flat, ["a", "b", "r"], ["binary", "binary", "regression"])
    assert "constant" in said and "train.lr" in said and "a, b" in said
    learning = [*flat[:2], {"valid": {"a": {"auc": 0.61}, "b": {"auc": 0.5}, "r": {"rmse": 1.0}}}]
    assert training_warnings(learning, ["a", "b", "r"], ["binary", "binary", "regression"]) == []


def test_the_end_of_training_table_keeps_every_name_in_a_narrow_terminal() -> None:
    from rich.console import Console

    from mtlcli.cli.train_console import summary_table

    metrics = {"auc": 0.7, "gauc": 0.6, "logloss": 0.4, "loss": 0.4, "positives": 12.0, "rows": 100.0}
    summary = {"best_epoch": 2, "epochs_run": 3, "valid": {"click_through": metrics, "purchase_after_click": metrics}}
    console = Console(width=60, record=True)
    console.print(summary_table(summary))
    text = console.export_text()
    assert "…" not in text
    for name in ["click_through", "purchase_after_click", *metrics]:
        assert name in text.replace("\n", "").replace("│", "").replace(" ", "") or name in text


def test_a_rank_trains_the_plan_it_is_handed_and_reads_no_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `mtl train --nproc` hands its ranks: the plan, resolved once; a rank works nothing out again."""
    import json

    from mtlcli.recipe import load_recipe
    from mtlcli.train.plan import PLAN_VARIABLE, Plan, resolve_plan

    recipe = tiny_recipe(tmp_path)
    plan = resolve_plan(load_recipe(str(recipe)), tmp_path / "run", experiment="tiny")
    assert Plan.from_json(plan.to_json()).to_json() == plan.to_json()
    plan.write(tmp_path / "plan.json")
    recipe.unlink()  # a rank that read the recipe again would stop here
    monkeypatch.setenv(PLAN_VARIABLE, str(tmp_path / "plan.json"))
    result = invoke("train", recipe, "--out", tmp_path / "ignored", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["run_dir"] == str(tmp_path / "run") and not (tmp_path / "ignored").exists()
