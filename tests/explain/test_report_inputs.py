"""`mtl report` on what a run directory may hold besides its model: a saved explain.json that is
damaged or belongs to another run, a damaged metrics.jsonl. Each is named in a warning and the
page is still made (the explain report computed again), never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.cli.test_cli import invoke, recipe_text, succeeded, write_tiny_data


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("report-inputs")
    recipe = work / "tiny.yaml"
    recipe.write_text(recipe_text(write_tiny_data(work / "tiny.csv"), work / "cache", epochs=2), encoding="utf-8")
    for name, seed in (("a", 0), ("b", 1)):
        succeeded(invoke("train", recipe, "--out", work / name, "--quiet", "--set", f"train.seed={seed}"))
    explained = succeeded(invoke("explain", work / "a", "--json"))
    (work / "a" / "explain.json").write_text(explained.stdout, encoding="utf-8")
    return work / "a", work / "b"


@pytest.fixture
def run(two_runs: tuple[Path, Path], tmp_path: Path) -> Path:
    """A copy of run a (with its saved explain.json) to damage."""
    return Path(shutil.copytree(two_runs[0], tmp_path / "a"))


def report(run: Path, tmp_path: Path) -> tuple[str, str]:
    """(page, stderr) of a report that must succeed."""
    result = succeeded(invoke("report", run, "--out", tmp_path / "page.html"))
    assert "Traceback" not in result.output
    return (tmp_path / "page.html").read_text(encoding="utf-8"), result.stderr


def test_a_good_saved_report_is_used(run: Path, tmp_path: Path) -> None:
    page, stderr = report(run, tmp_path)
    assert "from the run&#x27;s saved explain.json" in page
    assert "warning" not in stderr


def gates_row_wrong(data: dict) -> None:
    group = next(iter(data["gates"].values()))
    row = next(iter(group["weights"]))
    group["weights"][row] = group["weights"][row][:-1]


DAMAGE = {
    "not JSON": lambda path: path.write_text('{"gates": {', encoding="utf-8"),
    "not UTF-8": lambda path: path.write_bytes(b"\xff\xfe{}"),
    "a list": lambda path: path.write_text("[1, 2]", encoding="utf-8"),
    "missing keys": lambda path: edit(path, lambda d: d.pop("gates")),
    "no model hash": lambda path: edit(path, lambda d: d.pop("model_sha256")),
    "wrong types": lambda path: edit(path, lambda d: d.update(gates={"gate": {"experts": 3, "weights": "x"}})),
    "a weight as text": lambda path: edit(path, lambda d: d.update(label_correlation={"click": {"click": "high"}})),
    "a short gate row": lambda path: edit(path, gates_row_wrong),
    "ragged matrix": lambda path: edit(path, lambda d: d.update(gradient_cosine={"a": {"a": 1.0}, "b": {"c": 1.0}})),
    "readings of numbers": lambda path: edit(path, lambda d: d.update(readings={"gates": [1, 2]})),
}


def edit(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_saved_report_is_named_and_computed_again(run: Path, tmp_path: Path, damage: str) -> None:
    DAMAGE[damage](run / "explain.json")
    page, stderr = report(run, tmp_path)
    assert "explain.json" in stderr and "computed again" in stderr, stderr
    assert "computed for this page on" in page


def test_the_saved_report_of_another_run_is_not_shown_under_this_name(
    two_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    other = Path(shutil.copytree(two_runs[1], tmp_path / "b"))
    shutil.copy(two_runs[0] / "explain.json", other / "explain.json")
    page, stderr = report(other, tmp_path)
    assert "describes another model" in stderr and str(two_runs[0]) in stderr, stderr
    assert "computed for this page on" in page


def test_a_damaged_metrics_line_is_named(run: Path, tmp_path: Path) -> None:
    path = run / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([lines[0][:20], *lines[1:], '{"epoch": "two"}', "[]"]) + "\n", encoding="utf-8")
    page, stderr = report(run, tmp_path)
    for line in (1, len(lines) + 1, len(lines) + 2):
        assert f"metrics.jsonl:{line}" in stderr, stderr
    assert page.count("<svg") >= 1  # the good epochs still draw


@pytest.mark.parametrize("after", [0.15, 0.4, 0.8, 1.5])
def test_sigterm_at_any_moment_of_a_report_exits_130_and_leaves_no_page(
    two_runs: tuple[Path, Path], tmp_path: Path, after: float
) -> None:
    """While Python imports mtl, while typer builds the commands, while the run loads, while the
    page is computed: 130, one line, no traceback, no page and no temporary file."""
    import signal
    import subprocess
    import sys
    import time

    run = Path(shutil.copytree(two_runs[0], tmp_path / "run"))
    (run / "explain.json").unlink()
    process = subprocess.Popen(
        [sys.executable, "-m", "mtlcli", "report", str(run), "--out", str(tmp_path / "page.html")],
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(after)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    if process.returncode == 0 or "wrote" in err:  # the signal came once the page was written (on a slow
        pytest.skip(f"the report was done in {after} s")  # machine, while the interpreter exits: -15)
    assert process.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not [p.name for p in tmp_path.iterdir() if p.name != "run"]


def test_a_run_without_its_recipe_yaml_shows_the_models_recipe(run: Path, tmp_path: Path) -> None:
    import html

    saved = (run / "recipe.yaml").read_text(encoding="utf-8")
    (run / "recipe.yaml").unlink()
    page, _ = report(run, tmp_path)
    assert html.escape(saved) in page


def test_explain_names_a_damaged_history_line(run: Path) -> None:
    (run / "gradients.jsonl").write_text('{"kind": "gradients", "step": "x"}\n', encoding="utf-8")
    explained = json.loads(succeeded(invoke("explain", run, "--json")).stdout)
    assert any("gradients.jsonl:1: not a gradient record (step:" in w for w in explained["warnings"])
