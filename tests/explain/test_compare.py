"""`mtl compare`: runs told apart by their names, and differences judged against the seeds' spread
(or said to be beyond what one seed can tell)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mtlcli.explain.compare import compare_results, readings, short_names
from tests.cli.test_cli import invoke, recipe_text, succeeded, write_tiny_data


def result(name: str, key: str, seed: int, auc: float) -> dict[str, Any]:
    return {"run_dir": name, "scheme": "mmoe", "tasks": {"click": {"auc": auc}}, "recipe_key": key, "seed": seed}


def test_names_keep_paths_apart() -> None:
    paths = ["runs/a/seed0/mmoe", "runs/b/seed0/mmoe", "runs/b/seed1/mmoe"]
    assert short_names(paths) == {p: p.removeprefix("runs/") for p in paths}
    assert short_names(["runs/ple", "other/ple", "x"]) == {"runs/ple": "runs/ple", "other/ple": "other/ple", "x": "x"}
    assert short_names(["a/b", "b"]) == {"a/b": "a/b", "b": "b"}
    assert short_names(["runs/one", "runs/two"]) == {"runs/one": "one", "runs/two": "two"}


def test_a_gain_inside_the_seeds_spread_is_called_so() -> None:
    baseline = result("stl", "stl", 0, 0.780)
    runs = [result(f"mmoe{s}", "m", s, v) for s, v in enumerate([0.770, 0.795, 0.778])]  # mean +0.001, std 0.013
    out = compare_results(runs, baseline)
    (group,) = out["groups"]
    assert group["seeds"] == [0, 1, 2] and group["gain"]["click"]["mean"] == pytest.approx(0.001)
    lines = readings(out)
    assert any("click +0.0010 ± 0.0128 (within the seeds' spread)" in line for line in lines), lines


def test_groups_are_compared_against_their_spread() -> None:
    runs = [result(f"a{s}", "a", s, v) for s, v in enumerate([0.80, 0.82])]
    runs += [result(f"b{s}", "b", s, v) for s, v in enumerate([0.70, 0.71])]
    lines = readings(compare_results(runs, None))
    assert any("a0's group leads b0's by 0.1050 auc, beyond the seeds' spread" in line for line in lines), lines


def test_one_seed_per_run_cannot_tell() -> None:
    out = compare_results([result("mmoe", "m", 0, 0.781)], result("stl", "s", 0, 0.780))
    assert any("a single seed cannot tell" in line for line in readings(out))


def test_the_cli_shows_whole_names_and_the_seed_groups(tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(recipe_text(write_tiny_data(tmp_path / "tiny.csv"), tmp_path / "cache"), encoding="utf-8")
    runs = []
    for group, seed in (("first", 0), ("first", 1), ("second", 0)):
        run = tmp_path / "a-rather-long-directory-name-for-runs" / group / f"seed{seed}" / "mmoe-equal-weighting"
        lr = "0.01" if group == "first" else "0.02"
        succeeded(
            invoke("train", recipe, "--out", run, "--quiet", "--set", f"train.seed={seed}", "--set", f"train.lr={lr}")
        )
        runs.append(run)
    shown = succeeded(invoke("compare", *runs[:2], "--baseline", runs[2]))
    text = " ".join(shown.stderr.split())
    for name in ("first/seed0/mmoe-equal-weighting", "first/seed1/mmoe-equal-weighting"):
        assert name in "".join(shown.stderr.split()), shown.stderr  # whole, though folded in a narrow table
    assert "seeds 0, 1" in text and "the seeds' spread" in text
