"""`mtl explain` and `mtl report` on the seed methods: CrossDistil's teachers (read from the run's
checkpoint) against its students and their order of the augmented levels, its terms per epoch;
CSRec's masks and the updates its share rule changed; gate control's λ, d and d*. Hand-made
tensors for the figures, and three tiny runs for the wiring."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from mtlcli.explain.distillation import objective_history, read_objective, teacher_student_report
from mtlcli.explain.gates import lambda_report, read_lambda
from mtlcli.explain.history import read_tallies, tallies_report
from mtlcli.objectives.crossdistil import level_masks
from mtlcli.objectives.training import PAIR_NAMES
from tests.cli.test_cli import recipe_text, write_tiny_data
from tests.helpers import invoke

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# --- the figures, by hand -----------------------------------------------------------------------


def test_teacher_student_report_counts_ordered_pairs_and_aucs_by_hand() -> None:
    """Task a, partner b. Levels of a's order: (1,1) rows 0, 1; (1,0) row 2; (0,1) none; (0,0)
    rows 3, 4 (row 5 unobserved for b, so in no level). Teacher scores 5, 1, 3, 2, 1 (row 5: 9)."""
    labels = torch.tensor([[1, 1], [1, 1], [1, 0], [0, 0], [0, 0], [0, 1]], dtype=torch.float32)
    mask = torch.tensor([[True, True]] * 5 + [[True, False]])
    teachers = torch.tensor([[5.0, 0.0], [1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [9.0, 0.0]])
    students = torch.tensor([[4.0, 0.0], [3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 0.0], [5.0, 0.0]])
    levels = [level_masks(labels[:, 0], labels[:, 1], mask[:, 0] & mask[:, 1])]
    calibrated = torch.zeros(6, 1)  # p = 0.5 everywhere
    report = teacher_student_report(
        ["a"], students[:, :1], teachers[:, :1], labels, mask, levels, PAIR_NAMES, calibrated
    )
    shares = report["pairwise_accuracy"]["a"]
    # (1,1) > (1,0): 5>3 right, 1<3 wrong -> 1/2; (1,1) > (0,0): 5>2, 5>1, 1<2, 1=1 (half) -> 2.5/4;
    # (1,0) > (0,0): 3>2, 3>1 -> 1; the pairs with the empty level (0,1) are left out
    assert shares == pytest.approx({"11>10": 0.5, "11>00": 0.625, "10>00": 1.0})
    assert report["pair_counts"]["a"] == {"11>10": 2, "11>00": 4, "10>00": 2}
    # a's rows are all six: positives 0, 1, 2; the student ranks row 5 (a negative) first -> 6/9
    assert report["auc"]["a"]["student"] == pytest.approx(6 / 9)
    # teacher: positives 5, 1, 3 against negatives 2, 1, 9 -> (5: 2 + 3: 2 + 1: 0.5) / 9
    assert report["auc"]["a"]["teacher"] == pytest.approx(4.5 / 9)
    # pcoc: the mean probability over the positive rate (1/2); the teacher's 0.5 everywhere -> 1
    assert report["pcoc"]["a"]["teacher"] == pytest.approx(1.0)
    expected = float(torch.sigmoid(students[:, 0]).mean()) / 0.5
    assert report["pcoc"]["a"]["student"] == pytest.approx(expected)


def test_an_auc_of_one_class_is_none() -> None:
    labels, mask = torch.ones(4, 2), torch.ones(4, 2, dtype=torch.bool)
    levels = [level_masks(labels[:, 0], labels[:, 1], mask[:, 0])]
    report = teacher_student_report(["a"], torch.randn(4, 1), torch.randn(4, 1), labels, mask, levels, PAIR_NAMES)
    assert report["auc"]["a"] == {"student": None, "teacher": None}
    assert report["pairwise_accuracy"]["a"] == {} and "pcoc" not in report


def test_objective_history_takes_every_term_per_task_and_each_breakdown() -> None:
    records: list[dict[str, Any]] = [
        {"epoch": 1, "train_loss": {}},  # a run's record without the objective is skipped
        {
            "epoch": 2,
            "objective": {
                "kind": "crossdistil",
                "partners": {"a": "b"},  # names and flags are not terms
                "partner_flipped": {"a": True},
                "distill_loss": {"a": 0.2, "b": 0.1},
                "pairwise_accuracy": {"a": {"11>10": 0.6}},
            },
        },
        {"epoch": 3, "objective": {"kind": "crossdistil", "distill_loss": {"a": 0.3}, "pairwise_accuracy": {}}},
    ]
    history = objective_history(records)
    assert history is not None
    assert history["kind"] == "crossdistil" and history["epochs"] == [2, 3]
    assert history["terms"] == {"distill_loss": {"a": [0.2, 0.3], "b": [0.1, None]}}
    assert history["breakdowns"] == {"pairwise_accuracy": {"a": {"11>10": [0.6, None]}}}
    assert read_objective({"history": history}) == ["crossdistil distill loss per epoch: a 0.2 -> 0.3, b 0.1 -> 0.1"]
    assert objective_history(records[:1]) is None


def test_tallies_and_the_gate_difference_against_its_target() -> None:
    records: list[dict[str, Any]] = [
        {"epoch": 1, "tallies": {"share_changed": 1200.0}},
        {"epoch": 2, "tallies": {}},  # an epoch without counts is no point of the series
        {"epoch": 3, "tallies": {"share_changed": 900.0}},
    ]
    tallies = tallies_report(records)
    assert tallies == {"epochs": [1, 3], "counts": {"share_changed": [1200.0, 900.0]}}
    assert read_tallies(tallies).endswith("(1, 3): share changed 1,200, 900")
    assert tallies_report([{"epoch": 1}]) is None
    control = {"lambda": {"a": 0.1, "b": 3.0}, "difference": {"a": 0.9, "b": 0.1}, "correlation": {}}
    control["target"] = {"a": 0.4, "b": 0.3}
    report = lambda_report([{"epoch": 1, "gate_control": control}], ["a", "b"])
    assert report is not None and report["target"] == {"a": [0.4], "b": [0.3]}
    assert read_lambda(report).endswith("a d 0.900 vs d* 0.400 (slower), b d 0.100 vs d* 0.300 (faster)")


# --- three tiny runs ------------------------------------------------------------------------------

METHODS = {
    "crossdistil": ["objective={kind: crossdistil, warmup_steps: 2}"],
    "csrec": ["model.scheme=csrec", "model.bottom_units=[8]", "model.tower_units=[2]", "model.warmup_steps=4"],
    "gate_control": ["model.gate_control=true"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("seed-methods")
    recipe = work / "tiny.yaml"
    recipe.write_text(recipe_text(write_tiny_data(work / "tiny.csv"), work / "cache"), encoding="utf-8")
    out = {}
    for name, overrides in METHODS.items():
        sets = [part for value in overrides for part in ("--set", value)]
        result = invoke("train", recipe, "--out", work / name, "--quiet", *sets)
        assert result.exit_code == 0, result.output
        out[name] = work / name
    return out


def explained(run: Path) -> dict[str, Any]:
    result = invoke("explain", run, "--json", "--max-rows", "200")
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(result.stdout)
    return report


@pytest.fixture(scope="module")
def reports(runs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    return {name: explained(run) for name, run in runs.items()}


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_crossdistil_run_explains_its_teachers_from_the_checkpoint(
    runs: dict[str, Path], reports: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    run, report = runs["crossdistil"], reports["crossdistil"]
    objective = report["objective"]
    last = records(run)[-1]
    terms = objective["history"]["terms"]
    assert set(terms) == {"distill_loss", "quadruplet_loss", "calibration_loss"}
    assert all(v > 0 for by_task in terms.values() for values in by_task.values() for v in values)
    learned = objective["learned"]
    assert objective["epoch"] == last["epoch"] and learned["partners"] == {"click": "buy", "buy": "click"}
    for task in ("click", "buy"):  # the last epoch's students are the model's (no early stopping)
        assert learned["auc"][task]["student"] == pytest.approx(last["valid"][task]["auc"], abs=1e-6)
        assert learned["auc"][task]["teacher"] != pytest.approx(learned["auc"][task]["student"], abs=1e-9)
        assert set(learned["pairwise_accuracy"][task]) <= set(PAIR_NAMES)
        assert all(0.0 <= s <= 1.0 for s in learned["pairwise_accuracy"][task].values())
    assert any("teachers' share of correctly ordered pairs" in line for line in report["readings"]["objective"])
    # without the checkpoint the teachers are gone (bundles carry the students only): said, not failed
    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    (bare / "checkpoint.safetensors").unlink()
    report = explained(bare)
    assert report["objective"]["learned"] is None and report["objective"]["history"]["terms"]
    assert any("checkpoint.safetensors: not found" in w for w in report["warnings"])


def test_csrec_run_shows_its_masks_and_the_updates_its_share_rule_changed(
    runs: dict[str, Path], reports: dict[str, dict[str, Any]]
) -> None:
    run, report = runs["csrec"], reports["csrec"]
    assert report["tallies"]["counts"]["share_changed"] == [r["tallies"]["share_changed"] for r in records(run)]
    assert all(count > 0 for count in report["tallies"]["counts"]["share_changed"])
    density, overlap = report["masks"]["density"], report["masks"]["overlap"]
    assert all(0.0 < d < 1.0 for d in density.values()) and overlap["click"]["buy"] < 1.0
    assert report["objective"] is None and report["gate_control"] is None


def test_report_and_plots_show_the_seed_methods(
    runs: dict[str, Path], reports: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    from mtlcli.explain.plot import write_plots

    report = reports["gate_control"]
    control = report["gate_control"]["lambda"]
    assert set(control) == {"epochs", "lambda", "difference", "correlation", "target"}
    assert all(not math.isclose(v, 1.0) for values in control["lambda"].values() for v in values)
    page = tmp_path / "page.html"
    result = invoke("report", *runs.values(), "--out", page, "--max-rows", "200")
    assert result.exit_code == 0, result.output
    html = page.read_text(encoding="utf-8")
    headings = ["gate control", "teachers and students", "teachers' share of correctly ordered pairs per level pair"]
    headings += ["counted by the scheme's training step, per epoch", "masks: overlap (IoU of the kept weights)"]
    headings += ["masks: the weights the tasks share, per layer"]
    for heading in headings:  # the page's own sections (the readings say some of it too)
        assert f"{heading}</h3>" in html, heading
    changed = reports["csrec"]["tallies"]["counts"]["share_changed"][-1]
    assert f"<td>{changed:,.0f}</td>" in html
    every = report | {"tallies": reports["csrec"]["tallies"], "objective": reports["crossdistil"]["objective"]}
    written = {path.name for path in write_plots(every, tmp_path / "plots")}
    assert {"gate_control.png", "tallies.png", "crossdistil.png"} <= written
    for name in ("gate_control.png", "tallies.png", "crossdistil.png"):
        assert (tmp_path / "plots" / name).read_bytes().startswith(PNG_SIGNATURE)
