"""`mtl sweep`: grid parsing, one run per point, the summary over seeds, reuse, resume and errors."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from mtlcli.errors import MtlError
from mtlcli.sweep import expand, parse_grid, run_name, run_sweep, split_values
from mtlcli.train.loop import TrainingInterrupted
from tests.cli.test_cli import failed, invoke, recipe_text, succeeded, write_tiny_data


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(recipe_text(write_tiny_data(tmp_path / "tiny.csv"), tmp_path / "cache"), encoding="utf-8")
    return path


def test_values_split_at_top_level_commas_only() -> None:
    assert split_values("equal,pcgrad") == ["equal", "pcgrad"]
    assert split_values("[16, 8],[32],{a: 1, b: 2}") == ["[16, 8]", "[32]", "{a: 1, b: 2}"]
    assert split_values("'a,b', c") == ["'a,b'", "c"]


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (["loss.weighting"], "expected KEY=V1,V2"),
        (["=a,b"], "expected KEY=V1,V2"),
        (["train.seed=0,,1"], "an empty value"),
        (["train.seed=0,0"], "listed twice"),
        (["train.seed=0", "train.seed=1"], "given twice"),
        (["recipe=a,b"], "not a recipe key"),
        (["train.lr=" + "[" * 3000 + "]" * 3000 + ",1"], "nested deeper than"),
    ],
)
def test_malformed_grids_are_refused(grid: list[str], message: str) -> None:
    with pytest.raises(MtlError, match=message):
        parse_grid(grid)


def test_grid_values_read_as_the_recipe_reads_them() -> None:
    """yes and true are two values to a recipe (YAML 1.2 booleans): not 'the same value' twice."""
    (axis,) = parse_grid(["tasks.buy.label.positive=yes,true"])
    assert axis.values == ["yes", "true"]


def test_run_names_are_short_unique_and_safe() -> None:
    assert run_name({"loss.weighting": "pcgrad", "train.seed": "1"}) == "weighting=pcgrad_seed=1"
    assert run_name({"train.seed": "1", "data.synthetic.seed": "2"}) == "train.seed=1_data.synthetic.seed=2"
    assert run_name({"model.expert_units": "[16, 8]"}) == "expert_units=16-8"
    assert run_name({"loss.weights": "{a: 1, b: 2}"}) == "weights=a-1-b-2"


def test_the_scheme_is_an_axis_of_the_grid(recipe: Path) -> None:
    """--grid model.scheme=...: each point drops the file's scheme's own keys, with a note."""
    points = expand(str(recipe), parse_grid(["model.scheme=mmoe,shared_bottom,dtrn"]), [])
    assert [p.recipe.model.scheme for p in points] == ["mmoe", "shared_bottom", "dtrn"]
    assert points[0].notes == ()
    assert all("dropped mmoe's own keys n_experts, expert_units" in p.notes[0] for p in points[1:])


def test_an_invalid_grid_point_names_its_settings(recipe: Path) -> None:
    with pytest.raises(MtlError, match=r"(?s)grid point loss.weighting=pcgrd: .*did you mean .pcgrad."):
        expand(str(recipe), parse_grid(["loss.weighting=equal,pcgrd"]), [])


def test_sweep_trains_every_point_summarises_over_seeds_and_reuses_finished_runs(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = ["sweep", recipe, "-g", "loss.weighting=equal,uncertainty", "-g", "train.seed=0,1", "--out", out]
    result = json.loads(succeeded(invoke(*args, "--json")).stdout)
    names = {"weighting=equal_seed=0", "weighting=equal_seed=1", "weighting=uncertainty_seed=0"}
    assert names < {p.name for p in out.iterdir()}
    assert json.loads((out / "sweep.json").read_text()) == result
    assert result["grid"] == {"loss.weighting": ["equal", "uncertainty"], "train.seed": ["0", "1"]}
    assert result["replicate"] == ["train.seed"]
    assert len(result["runs"]) == 4 and not any(r["reused"] for r in result["runs"])
    # each run's figures are its own run's `mtl eval`
    first = result["runs"][0]
    evaluated = json.loads(succeeded(invoke("eval", first["run_dir"], "--split", "test", "--json")).stdout)
    assert first["tasks"] == evaluated["tasks"]
    # the summary row of a setting is the mean and std over its seeds
    assert [row["settings"] for row in result["summary"]] == [
        {"loss.weighting": "equal"},
        {"loss.weighting": "uncertainty"},
    ]
    for row in result["summary"]:
        members = [r for r in result["runs"] if r["name"] in row["runs"]]
        assert len(members) == 2
        values = [m["tasks"]["click"]["auc"] for m in members]
        assert row["tasks"]["click"]["auc"]["mean"] == pytest.approx(statistics.fmean(values))
        assert row["tasks"]["click"]["auc"]["std"] == pytest.approx(statistics.stdev(values))
    model = out / "weighting=equal_seed=0" / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    again = succeeded(invoke(*args, "--json"))
    assert all(r["reused"] for r in json.loads(again.stdout)["runs"])
    assert "finished, reused" in again.stderr
    assert model.stat().st_mtime_ns == stamp
    # another recipe into the same directory is refused, then retrained with --force
    changed = [*args, "--set", "train.lr=0.02"]
    failed(invoke(*changed), "holds a run of another recipe", "--force")
    assert not any(r["reused"] for r in json.loads(succeeded(invoke(*changed, "--force", "--json")).stdout)["runs"])


def test_an_interrupted_sweep_continues_where_it_stopped(recipe: Path, tmp_path: Path) -> None:
    points = expand(str(recipe), parse_grid(["train.seed=0,1"]), ["train.epochs=3"])
    reference = run_sweep(points, tmp_path / "whole", "test", ["train.seed"])
    calls = {"n": 0}

    def stop_in_the_second_run() -> bool:
        calls["n"] += 1
        return calls["n"] == 3 * 3 + 2  # steps 1..9 are the first run (3 epochs of 3 batches)

    with pytest.raises(TrainingInterrupted):
        run_sweep(points, tmp_path / "stopped", "test", ["train.seed"], stop_requested=stop_in_the_second_run)
    assert (tmp_path / "stopped" / "seed=0" / "summary.json").is_file()
    assert not (tmp_path / "stopped" / "seed=1" / "summary.json").is_file()
    states: list[str] = []
    resumed = run_sweep(points, tmp_path / "stopped", "test", ["train.seed"], on_start=lambda i, p, s: states.append(s))
    assert states == ["done", "partial"]
    partial = json.loads((tmp_path / "stopped" / "seed=1" / "summary.json").read_text())
    assert partial["resumed"] is True  # continued from its checkpoint, not trained again
    for a, b in zip(reference["runs"], resumed["runs"], strict=True):
        assert a["tasks"] == b["tasks"]


def test_bad_sweep_options(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    failed(invoke("sweep", recipe, "--grid", "train.seed", "--out", out), "expected KEY=V1,V2")
    failed(invoke("sweep", recipe, "--grid", "train.seed=0,1", "--out", out, "--replicate", "train.lr"), "--grid key")
    failed(invoke("sweep", recipe, "--grid", "train.lrr=0.1", "--out", out), "train.lrr", "did you mean")
    failed(invoke("sweep", "-", "--grid", "train.seed=0", "--out", out), "give a file")
    failed(invoke("sweep", recipe, "--out", out), "nothing to sweep")
    failed(invoke("sweep", recipe, recipe, "--out", out), "given twice")
    assert not out.exists()


def test_several_recipes_are_an_axis(recipe: Path, tmp_path: Path) -> None:
    import yaml

    other = tmp_path / "tiny-sb.yaml"
    spec = yaml.safe_load(recipe.read_text())
    spec["model"] = {"scheme": "shared_bottom", "embedding_dim": 2, "bottom_units": [4], "tower_units": [2]}
    other.write_text(yaml.safe_dump(spec), encoding="utf-8")
    out = tmp_path / "sweep"
    result = json.loads(
        succeeded(invoke("sweep", recipe, other, "-g", "train.seed=0,1", "--out", out, "--json")).stdout
    )
    assert [r["name"] for r in result["runs"]] == [
        "recipe=tiny_seed=0",
        "recipe=tiny_seed=1",
        "recipe=tiny-sb_seed=0",
        "recipe=tiny-sb_seed=1",
    ]
    assert [row["settings"] for row in result["summary"]] == [{"recipe": "tiny"}, {"recipe": "tiny-sb"}]
    schemes = {
        r["name"]: yaml.safe_load((Path(r["run_dir"]) / "recipe.yaml").read_text())["model"]["scheme"]
        for r in result["runs"]
    }
    assert schemes["recipe=tiny_seed=1"] == "mmoe" and schemes["recipe=tiny-sb_seed=0"] == "shared_bottom"
