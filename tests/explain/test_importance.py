"""Per-task permutation importance (`mtl explain --importance`): a planted input that decides one
task and is noise for the other ranks first for that task and near zero for the other, for a
binary and a regression task, with a behaviour history among the inputs; groups shuffle their
inputs together."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from typer.testing import CliRunner

from mtlcli.cli.app import app
from mtlcli.data.batch import SplitTensors
from mtlcli.errors import MtlError
from mtlcli.explain import ExplainOptions, explain_run
from mtlcli.explain.importance import Input, input_groups, shuffled


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``signal`` decides the binary task ``a``; ``level`` the regression task ``b``; the rest is noise."""
    base = tmp_path_factory.mktemp("importance")
    rng = np.random.default_rng(0)
    n = 6000
    signal = rng.integers(0, 2, n)
    level = rng.normal(size=n)
    frame = pl.DataFrame(
        {
            "signal": np.where(signal == 1, "yes", "no"),
            "level": level,
            "colour": rng.choice(["red", "green", "blue"], n),
            "size": rng.normal(size=n),
            "seen": ["|".join(f"i{j}" for j in rng.integers(0, 20, 4)) for _ in range(n)],
            "a": (signal ^ (rng.random(n) < 0.1)).astype(np.int8),
            "b": 2.0 * level + 0.1 * rng.normal(size=n),
        }
    )
    frame.write_csv(base / "data.csv")
    recipe = {
        "data": {"source": str(base / "data.csv"), "split": {"by": "random", "valid": 0.25, "test": 0.1},
                 "cache_dir": str(base / "cache")},
        "features": {"categorical": ["signal", "colour"], "numeric": ["level", "size"],
                     "sequences": {"seen": {"max_len": 4}}},
        "tasks": {"a": {"label": "a"}, "b": {"type": "regression", "label": "b"}},
        "model": {"scheme": "mmoe", "embedding_dim": 4, "n_experts": 2, "expert_units": [16], "tower_units": [8]},
        "train": {"epochs": 6, "batch_size": 256, "lr": 0.01, "early_stopping": None, "threads": 1},
    }  # fmt: skip
    (base / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = CliRunner().invoke(app, ["train", str(base / "recipe.yaml"), "--out", str(base / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    return base / "run"


def test_a_planted_input_ranks_first_for_its_task_and_near_zero_for_the_other(run: Path) -> None:
    report = explain_run(run, "valid", ExplainOptions(importance=True, grad_batches=1))["importance"]
    a, b = report["importance"]["a"], report["importance"]["b"]
    assert report["metric"] == {"a": "auc", "b": "rmse"}
    assert next(iter(a)) == "signal" and a["signal"]["drop"] > 0.2, a
    assert next(iter(b)) == "level" and b["level"]["drop"] > 0.5, b  # RMSE up by more than 0.5
    assert abs(a["level"]["drop"]) < 0.02 and abs(b["signal"]["drop"]) < 0.05 * b["level"]["drop"], (a, b)
    for noise in ("colour", "size", "seen"):  # the history is an input like the others
        assert abs(a[noise]["drop"]) < 0.02 and abs(b[noise]["drop"]) < 0.05 * b["level"]["drop"], noise
    assert report["repeats"] == 3 and all(v["std"] >= 0 for v in a.values())


def test_a_group_is_shuffled_as_one_input(run: Path) -> None:
    options = ExplainOptions(importance=True, importance_repeats=2, groups=("both=sig*,level",), grad_batches=1)
    report = explain_run(run, "valid", options)["importance"]
    assert report["groups"] == {"both": ["signal", "level"]}
    for task in ("a", "b"):
        assert next(iter(report["importance"][task])) == "both"
        assert "signal" not in report["importance"][task] and "level" not in report["importance"][task]


def test_the_cli_prints_json_and_tables(run: Path) -> None:
    result = CliRunner().invoke(app, ["explain", str(run), "--importance", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert next(iter(json.loads(result.stdout)["importance"]["importance"]["a"])) == "signal"
    shown = CliRunner().invoke(app, ["explain", str(run), "--importance", "--repeats", "1"])
    assert shown.exit_code == 0 and "a relies most on signal" in shown.output
    plots = run.parent / "plots"
    drawn = CliRunner().invoke(app, ["explain", str(run), "--importance", "--repeats", "1", "--plot", str(plots)])
    assert drawn.exit_code == 0 and {"importance_a.png", "importance_b.png"} <= {p.name for p in plots.iterdir()}
    refused = CliRunner().invoke(app, ["explain", str(run), "--group", "x=signal"])
    assert refused.exit_code == 2 and "add --importance" in refused.output


def test_a_shuffle_moves_a_history_with_its_length_and_nothing_else() -> None:
    data = SplitTensors(
        torch.arange(8).view(4, 2),
        torch.arange(4.0).view(4, 1),
        torch.zeros(4, 1),
        torch.ones(4, 1, dtype=torch.bool),
        sequences=torch.arange(24).view(4, 2, 3),
        sequence_lengths=torch.tensor([[1, 2], [3, 1], [2, 2], [0, 3]]),
    )
    order = torch.tensor([3, 2, 1, 0])
    out = shuffled(data, [Input("h", "sequence", 1), Input("c", "categorical", 0)], order)
    assert out.sequences is not None and out.sequence_lengths is not None and data.sequences is not None
    assert torch.equal(out.sequences[:, 1], data.sequences[order, 1])
    assert torch.equal(out.sequences[:, 0], data.sequences[:, 0])
    assert out.sequence_lengths[:, 1].tolist() == [3, 2, 1, 2] and out.sequence_lengths[:, 0].tolist() == [1, 3, 2, 0]
    assert out.categorical[:, 0].tolist() == [6, 4, 2, 0] and torch.equal(out.categorical[:, 1], data.categorical[:, 1])
    assert torch.equal(out.numeric, data.numeric) and torch.equal(data.categorical, torch.arange(8).view(4, 2))


@pytest.mark.parametrize(
    ("specs", "expect"),
    [
        (["nogroup"], "expected NAME=PATTERN"),
        (["g=zz*"], "no input of this run"),
        (["g=signal", "g=level"], "'g' is given twice"),
        (["level=signal"], "'level' is the name of an input"),
    ],
)
def test_bad_groups_are_named(specs: list[str], expect: str) -> None:
    inputs: list[Any] = [Input("signal", "categorical", 0), Input("level", "numeric", 0)]
    with pytest.raises(MtlError, match=expect):
        input_groups(inputs, specs)
