"""`mtl report`: one self-contained HTML5 page (strictly valid, no external URL, no script, under
2 MB) on census runs, compared side by side and against a single-task baseline."""

from __future__ import annotations

import html
import re
from pathlib import Path

import html5lib
import pytest
from typer.testing import CliRunner

from mtlcli.cli.app import app

SETTINGS = ["train.epochs=3", "train.early_stopping=null", "train.threads=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.conftest import CENSUS, REPO

    if not CENSUS.is_file():
        pytest.skip(f"census data not found at {CENSUS}")
    base = tmp_path_factory.mktemp("report")
    out = {}
    for name, recipe in [("mmoe", "census-mmoe"), ("ple", "census-ple"), ("single", "census-single-task")]:
        sets = [p for s in [*SETTINGS, f"data.cache_dir={base / 'cache'}"] for p in ("--set", s)]
        result = CliRunner().invoke(
            app, ["train", str(REPO / "recipes" / f"{recipe}.yaml"), "--out", str(base / name), "--quiet", *sets]
        )
        assert result.exit_code == 0, result.output
        out[name] = base / name
    return out


def check_page(page: str) -> None:
    html5lib.HTMLParser(strict=True).parse(page)  # raises on any parse error
    assert len(page.encode()) < 2 * 1024 * 1024
    assert not re.search(r"https?://|<script|<link|src=", page, re.IGNORECASE), "the page must need nothing outside it"


def test_a_census_run_against_its_single_task_baseline(runs: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    result = CliRunner().invoke(
        app, ["report", str(runs["mmoe"]), "--baseline", str(runs["single"]), "--out", str(target)]
    )
    assert result.exit_code == 0, result.output
    page = target.read_text()
    check_page(page)
    assert "MTL gain on test over single" in page
    assert page.count("<svg") == 5  # train loss and valid AUC for each task, the loss weights
    assert "gate: mean weight per gate and expert" in page and "label correlation" in page
    assert "computed for this page on" in page  # no saved explain.json
    assert html.escape((runs["mmoe"] / "recipe.yaml").read_text()) in page


def test_runs_side_by_side_and_a_saved_explain_report(runs: dict[str, Path], tmp_path: Path) -> None:
    explained = CliRunner().invoke(app, ["explain", str(runs["ple"]), "--json", "--max-rows", "2000"])
    assert explained.exit_code == 0, explained.output
    (runs["ple"] / "explain.json").write_text(explained.stdout)
    result = CliRunner().invoke(app, ["report", str(runs["mmoe"]), str(runs["ple"]), "--out", "-"])
    assert result.exit_code == 0, result.output
    page = result.stdout
    check_page(page)
    assert "<th>mmoe</th><th>ple</th>" in page and "MTL gain" not in page
    assert "from the run&#x27;s saved explain.json" in page
    assert "level1" in page  # PLE's gate groups, read from the saved report
    retrained = CliRunner().invoke(app, ["train", str(runs["ple"] / "recipe.yaml"), "--out", str(runs["ple"]),
                                         "--force", "--quiet", "--set", "train.epochs=1"])  # fmt: skip
    assert retrained.exit_code == 0, "--force still replaces a run that holds a saved explain.json"


def test_a_missing_run_is_named(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and "nothing" in result.output
    assert not (tmp_path / "r.html").exists()
