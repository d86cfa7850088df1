"""The `mtl` command end to end on a tiny recipe: recipe check/show, preprocess, train, eval,
export, and the errors a user meets (exit code 2, one clear message, no traceback)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.main import get_command
from typer.testing import Result

from mtlcli import __version__
from mtlcli.cli.app import app
from mtlcli.export.bundle import load_bundle
from mtlcli.recipe import load_recipe
from mtlcli.train.run import load_run
from tests.helpers import invoke

ROWS = 300
EPOCHS = 2
RUN_FILES = {
    "recipe.yaml",
    "schema.json",
    "model.safetensors",
    "metrics.jsonl",
    "summary.json",
    "checkpoint.safetensors",
}
BUNDLE_FILES = {"model.safetensors", "recipe.yaml", "schema.json", "manifest.json"}


def write_tiny_data(path: Path) -> Path:
    """Two binary tasks that depend on the inputs (so both classes occur on every split)."""
    rng = random.Random(0)
    lines = ["user,item,age,click,buy"]
    for _ in range(ROWS):
        user, item, age = rng.randrange(12), rng.randrange(6), rng.gauss(35.0, 8.0)
        click = int(rng.random() < 0.15 + 0.1 * item)
        buy = int(click == 1 and rng.random() < (0.7 if age > 35 else 0.3))
        lines.append(f"u{user},i{item},{age:.2f},{click},{buy}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def recipe_text(source: Path, cache: Path, **train: Any) -> str:
    recipe = {
        "data": {"source": str(source), "split": {"by": "modulo"}, "cache_dir": str(cache)},
        "features": {"numeric": ["age"], "categorical": ["user", "item"]},
        "tasks": {"click": {"label": "click"}, "buy": {"label": "buy"}},
        "model": {"scheme": "mmoe", "embedding_dim": 2, "n_experts": 2, "expert_units": [4], "tower_units": [2]},
        "train": {"lr": 0.01, "epochs": EPOCHS, "batch_size": 64, "threads": 1, "early_stopping": None, **train},
    }
    return yaml.safe_dump(recipe, sort_keys=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def recipe(work: Path) -> Path:
    source = write_tiny_data(work / "tiny.csv")
    path = work / "tiny.yaml"
    path.write_text(recipe_text(source, work / "cache"), encoding="utf-8")
    return path


def succeeded(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def failed(result: Result, *expected: str) -> str:
    """A user error: exit code 2, each expected text on stderr, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    for text in expected:
        assert text in result.stderr, result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def trained(recipe: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    run = work / "run"
    result = succeeded(invoke("train", recipe, "--out", run, "--json"))
    return run, json.loads(result.stdout)  # stdout holds the JSON alone; progress goes to stderr


def valid_metrics(run: Path) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["valid"] for line in lines]


# --- recipe check / show ------------------------------------------------------------------------


def test_recipe_check_ok(recipe: Path) -> None:
    result = succeeded(invoke("recipe", "check", recipe))
    assert f"ok {recipe}" in result.stderr


def test_recipe_check_reports_every_problem(recipe: Path, tmp_path: Path) -> None:
    text = recipe.read_text().replace("epochs:", "epoch:").replace("scheme: mmoe", "scheme: mmoee")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    line = next(i for i, x in enumerate(text.splitlines(), 1) if "epoch:" in x)
    stderr = failed(
        invoke("recipe", "check", recipe, bad),
        f"ok {recipe}",
        f"{bad}:{line}: train.epoch: unknown key (did you mean 'epochs'?)",
        "model.scheme: unknown sharing scheme 'mmoee' (did you mean 'mmoe'?)",
        "2 problems",
    )
    assert stderr.count("error:") == 1

    as_json = invoke("recipe", "check", recipe, bad, "--json")
    assert as_json.exit_code == 2
    report = json.loads(as_json.stdout)
    assert report[str(recipe)] == {"valid": True}
    assert report[str(bad)]["valid"] is False
    assert "train.epoch" in report[str(bad)]["error"]


def test_recipe_check_missing_file(tmp_path: Path) -> None:
    failed(invoke("recipe", "check", tmp_path / "nope.yaml"), "file not found")


def test_recipe_show_prints_the_resolved_recipe(recipe: Path) -> None:
    expected = load_recipe(recipe).to_dict()
    shown = yaml.safe_load(succeeded(invoke("recipe", "show", recipe)).stdout)
    assert shown == expected
    assert shown["train"]["eval_batch_size"] == 65536  # defaults are filled in
    as_json = json.loads(succeeded(invoke("recipe", "show", recipe, "--json")).stdout)
    assert as_json == expected


def test_recipe_show_with_set_and_stdin(recipe: Path) -> None:
    failed(invoke("recipe", "show", "-", "--json"), "<stdin>", "the recipe is empty")  # nothing on stdin
    shown = json.loads(
        succeeded(
            invoke(
                "recipe",
                "show",
                "-",
                "--json",
                "--set",
                "train.lr=0.5",
                "-s",
                "model.n_experts=3",
                input=recipe.read_text(),
            )
        ).stdout
    )
    assert shown["train"]["lr"] == 0.5
    assert shown["model"]["n_experts"] == 3


def test_recipe_components_lists_the_registries() -> None:
    listing = json.loads(succeeded(invoke("recipe", "components", "--json")).stdout)
    assert {"mmoe", "shared_bottom"} <= set(listing["schemes"])
    assert {"equal", "static"} <= set(listing["weightings"])


# --- preprocess ---------------------------------------------------------------------------------


def test_preprocess_json(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "encoded"
    first = json.loads(succeeded(invoke("preprocess", recipe, "--out", out, "--json", "--quiet")).stdout)
    assert first["directory"] == str(out)
    assert first["reused"] is False
    assert {name: split["rows"] for name, split in first["splits"].items()} == {"train": 180, "valid": 60, "test": 60}
    assert {p.name for p in out.iterdir()} == {"schema.json", "train.parquet", "valid.parquet", "test.parquet"}
    again = json.loads(succeeded(invoke("preprocess", recipe, "--out", out, "--json")).stdout)
    assert again["reused"] is True
    forced = json.loads(succeeded(invoke("preprocess", recipe, "--out", out, "--json", "--force")).stdout)
    assert forced["reused"] is False


def test_preprocess_data_error(recipe: Path, tmp_path: Path) -> None:
    failed(
        invoke("preprocess", recipe, "--out", tmp_path / "x", "--set", "tasks.click.label=clik"),
        "column 'clik' is not in the data (did you mean 'click'?)",
    )
    assert not (tmp_path / "x").exists()


# --- train / eval / export ----------------------------------------------------------------------


def test_train_writes_a_run_directory(trained: tuple[Path, dict[str, Any]]) -> None:
    run, summary = trained
    assert {p.name for p in run.iterdir()} == RUN_FILES
    assert summary["train_samples_per_second"] > 0
    assert summary["epochs_run"] == EPOCHS
    assert summary["tasks"] == ["click", "buy"]
    assert summary["train_rows"] == 180
    assert json.loads((run / "summary.json").read_text()) == summary
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == EPOCHS
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, EPOCHS + 1))
    assert load_recipe(run / "recipe.yaml").to_dict() == load_recipe(run.parent / "tiny.yaml").to_dict()
    assert json.loads((run / "schema.json").read_text())["splits"]["train"]["rows"] == 180
    for task in ("click", "buy"):
        assert 0.0 <= summary["valid"][task]["auc"] <= 1.0
        assert summary["valid"][task]["n"] == 60


def test_eval_json(trained: tuple[Path, dict[str, Any]]) -> None:
    run, summary = trained
    result = json.loads(succeeded(invoke("eval", run, "--split", "test", "--json")).stdout)
    assert result["split"] == "test"
    assert set(result["tasks"]) == {"click", "buy"}
    for metrics in result["tasks"].values():
        assert {"auc", "logloss", "n", "positive_rate"} <= set(metrics)
        assert metrics["n"] == 60
        assert 0.0 <= metrics["auc"] <= 1.0
        assert metrics["logloss"] > 0.0
        assert 0.0 < metrics["positive_rate"] < 1.0
    # with no early stopping the saved model is the last epoch's, which the summary reports on valid
    valid = json.loads(succeeded(invoke("eval", run, "--split", "valid", "--json")).stdout)
    for task in ("click", "buy"):
        assert valid["tasks"][task]["auc"] == pytest.approx(summary["valid"][task]["auc"])
        assert valid["tasks"][task]["logloss"] == pytest.approx(summary["valid"][task]["logloss"], rel=1e-5)


def test_eval_human_table_goes_to_stderr(trained: tuple[Path, dict[str, Any]]) -> None:
    run, _ = trained
    result = succeeded(invoke("eval", run))
    assert result.stdout == ""
    assert "click" in result.stderr
    assert "auc" in result.stderr


def test_eval_bad_split(trained: tuple[Path, dict[str, Any]]) -> None:
    result = invoke("eval", trained[0], "--split", "tset")
    assert result.exit_code == 2
    assert "tset" in result.output
    assert "Traceback" not in result.output


def test_eval_re_encodes_when_the_cache_is_gone(recipe: Path, tmp_path: Path) -> None:
    source = shutil.copy(recipe.parent / "tiny.csv", tmp_path / "tiny.csv")
    own = tmp_path / "own.yaml"
    own.write_text(recipe_text(Path(source), tmp_path / "cache"))
    run = tmp_path / "run"
    succeeded(invoke("train", own, "--out", run, "--quiet"))
    before = json.loads(succeeded(invoke("eval", run, "--json")).stdout)
    shutil.rmtree(tmp_path / "cache")
    after = json.loads(succeeded(invoke("eval", run, "--json")).stdout)
    assert after == before
    # source data that changed since training is refused, cached encoding or not
    Path(source).write_text(Path(source).read_text().replace("u1,", "u99,"))
    failed(invoke("eval", run), "source data changed since this model was trained")
    shutil.rmtree(tmp_path / "cache")
    failed(invoke("eval", run), "source data changed since this model was trained")


def test_export_bundle(trained: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    run, _ = trained
    bundle = tmp_path / "bundle"
    manifest = json.loads(succeeded(invoke("export", run, "--out", bundle, "--json")).stdout)
    assert {p.name for p in bundle.iterdir()} == BUNDLE_FILES
    assert manifest["bundle"] == str(bundle)
    assert manifest["tasks"] == ["click", "buy"]
    assert manifest["scheme"] == "mmoe"
    assert json.loads((bundle / "manifest.json").read_text())["files"] == manifest["files"]
    assert set(manifest["files"]) == BUNDLE_FILES - {"manifest.json"}
    loaded, original = load_bundle(bundle), load_run(run)
    weights, expected = loaded.model.state_dict(), original.model.state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in weights)
    failed(invoke("export", run, "--out", bundle), "exists and is not empty", "--force")
    succeeded(invoke("export", run, "--out", bundle, "--force"))


def test_train_refuses_a_non_empty_directory_unless_forced(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    failed(invoke("train", recipe, "--out", out, "--quiet"), "exists and is not empty", "--force")
    assert (out / "notes.txt").read_text() == "mine"
    # --force replaces runs only: a directory holding anything else is never deleted
    failed(invoke("train", recipe, "--out", out, "--quiet", "--force"), "only replaces an mtl run directory")
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    succeeded(invoke("train", recipe, "--out", out, "--quiet"))
    failed(invoke("train", recipe, "--out", out, "--quiet"), "exists and is not empty")
    succeeded(invoke("train", recipe, "--out", out, "--quiet", "--force"))
    assert {p.name for p in out.iterdir()} == RUN_FILES


def test_train_into_an_empty_existing_directory(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    succeeded(invoke("train", recipe, "--out", out, "--quiet"))
    assert {p.name for p in out.iterdir()} == RUN_FILES


def test_eval_on_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "something.txt").write_text("x")
    failed(invoke("eval", tmp_path), "not an mtl run directory", "model.safetensors")
    failed(invoke("eval", tmp_path / "missing"), "not a directory")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_model_file(trained: tuple[Path, dict[str, Any]], tmp_path: Path, damage: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    model = run / "model.safetensors"
    model.write_bytes(b"this is not a model" if damage == "garbage" else model.read_bytes()[:200])
    failed(invoke("eval", run), f"{model}: not a readable safetensors file", "corrupt or truncated")
    failed(invoke("export", run, "--out", tmp_path / "bundle"), "not a readable safetensors file")


@pytest.mark.parametrize("command", ["train", "preprocess", "check"])
def test_unknown_set_key(recipe: Path, tmp_path: Path, command: str) -> None:
    args: list[str | Path] = ["recipe", "check", recipe] if command == "check" else [command, recipe]
    if command == "train":
        args += ["--out", tmp_path / "run"]
    failed(
        invoke(*args, "--set", "train.epoch=1"), "train.epoch: unknown key (did you mean 'epochs'?) (set with --set)"
    )
    assert not (tmp_path / "run").exists()


def test_same_seed_same_metrics(recipe: Path, trained: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    run, _ = trained
    succeeded(invoke("train", recipe, "--out", tmp_path / "again", "--quiet"))
    assert valid_metrics(tmp_path / "again") == valid_metrics(run)
    succeeded(invoke("train", recipe, "--out", tmp_path / "other", "--quiet", "--set", "train.seed=1"))
    assert valid_metrics(tmp_path / "other") != valid_metrics(run)


def test_train_recipe_from_stdin(recipe: Path, tmp_path: Path) -> None:
    succeeded(invoke("preprocess", recipe))  # the recipe file's cache, which the same recipe on stdin finds
    result = succeeded(invoke("train", "-", "--out", tmp_path / "run", "--json", "--quiet", input=recipe.read_text()))
    summary = json.loads(result.stdout)
    assert summary["epochs_run"] == EPOCHS
    assert summary["data_reused"] is True  # the same data part as the recipe file: the cache is shared
    assert (tmp_path / "run" / "model.safetensors").is_file()


# --- help and version ---------------------------------------------------------------------------


def command_paths() -> list[list[str]]:
    paths: list[list[str]] = [[]]

    def walk(command: Any, prefix: list[str]) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            paths.append([*prefix, name])
            walk(sub, [*prefix, name])

    walk(get_command(app), [])
    return paths


def test_every_command_is_covered_by_help() -> None:
    names = {" ".join(p) for p in command_paths()}
    assert {"recipe check", "recipe show", "preprocess", "train", "eval", "export"} <= names


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "mtl")
def test_help(path: list[str]) -> None:
    result = succeeded(invoke(*path, "--help"))
    assert "Usage:" in result.output
    assert "Traceback" not in result.output


def test_version() -> None:
    assert succeeded(invoke("--version")).stdout.strip() == f"mtl {__version__}"
    done = subprocess.run(
        [sys.executable, "-m", "mtlcli", "--version"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"mtl {__version__}"


def test_predict_on_a_run_directory_says_to_export_it(trained: tuple[Path, dict[str, Any]]) -> None:
    run, _ = trained
    failed(invoke("predict", run, "-", input="u1,i1,30\n"), "a training run, not a bundle", "mtl export")
