"""`mtl explain` and `mtl compare`: the reports checked against direct computations, models routed
by construction, every registered scheme, the PNG plots and the comparison's seesaw mark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from mtlcli.cli.app import app
from mtlcli.data.batch import SplitTensors
from mtlcli.explain import ExplainOptions, explain_model, explain_run
from mtlcli.explain.compare import compare_results
from mtlcli.explain.correlation import pearson
from mtlcli.models import SCHEMES
from mtlcli.models.base import scheme as scheme_of
from mtlcli.models.mmoe import MMoE
from mtlcli.train.run import encoded_data, load_run
from tests.models.test_models import INPUTS, TASKS, TYPES, build, make_batch
from tests.numerics import assert_kernel_close

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST = ExplainOptions(grad_batches=4, grad_batch_size=64)
runner = CliRunner()


def split_of(n: int = 256, seed: int = 0) -> SplitTensors:
    batch = make_batch(n, seed)
    return SplitTensors(batch.categorical, batch.numeric, batch.labels, batch.label_mask)


@pytest.fixture(scope="module")
def census_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import CENSUS, REPO

    if not CENSUS.is_file():
        pytest.skip(f"census data not found at {CENSUS}")
    work = tmp_path_factory.mktemp("explain")
    run = work / "mmoe"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        result = runner.invoke(
            app,
            [
                "train",
                "recipes/census-mmoe.yaml",
                "--out",
                str(run),
                "--set",
                "train.epochs=2",
                "--set",
                "train.threads=1",
                "--set",
                f"data.cache_dir={work / 'cache'}",
                "--quiet",
            ],
        )
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def census_report(census_run: Path) -> dict[str, Any]:
    return explain_run(census_run, "valid", ExplainOptions(grad_batches=8))


# --- census MMoE -----------------------------------------------------------------------------------


def test_label_correlation_matches_a_direct_computation(census_run: Path, census_report: dict[str, Any]) -> None:
    loaded = load_run(census_run)
    labels = encoded_data(census_run, loaded).load("valid").labels
    direct = float(torch.corrcoef(labels.double().T)[0, 1])
    reported = census_report["label_correlation"]["income"]["marital"]
    assert reported == pytest.approx(direct, abs=1e-9)
    assert reported == pytest.approx(-0.18, abs=0.02)  # -0.179 on the whole file
    assert census_report["label_correlation"]["marital"]["income"] == reported
    income, marital = labels[:, 0] > 0.5, labels[:, 1] > 0.5
    given = census_report["conditional_positive_rate"]["income"]["marital"]
    assert given == pytest.approx(float(marital[income].double().mean()))


def test_census_gates_are_softmax_rows_and_the_report_says_which_experts(
    census_run: Path, census_report: dict[str, Any]
) -> None:
    loaded = load_run(census_run)
    data = encoded_data(census_run, loaded).load("valid")
    for gate in loaded.model.introspect(data.all()).gates:
        assert torch.allclose(gate.weights.sum(1), torch.ones(len(data)), atol=1e-5), gate.row
    gate = census_report["gates"]["gate"]
    assert gate["experts"] == [str(i) for i in range(8)]
    assert set(gate["weights"]) == {"income", "marital"}
    for task in ("income", "marital"):
        assert sum(gate["weights"][task]) == pytest.approx(1.0, abs=1e-5)
        assert 0.0 <= gate["entropy"][task] <= 1.0
    assert gate["max_sum_error"] < 1e-5
    assert census_report["readings"]["gates"][0].startswith("gate: income leans on expert")


@pytest.mark.numerics  # the cosine matrix from a GEMM: symmetric and 1 on the diagonal on every kernel
def test_census_gradient_cosine_of_a_task_with_itself_is_one(census_report: dict[str, Any]) -> None:
    cosine = census_report["gradient_cosine"]
    for task in ("income", "marital"):
        assert cosine[task][task] == pytest.approx(1.0, abs=1e-12)  # float64 over float32 gradients
        assert census_report["gradient_conflict"][task][task] == 0.0
    assert -1.0 <= cosine["income"]["marital"] <= 1.0
    assert cosine["income"]["marital"] == cosine["marital"]["income"]
    assert set(census_report["gradient_cosine_by_layer"]) == {"embedding.table", "experts.pool.first"}
    assert census_report["gradient_batches"] == 8


def test_explain_cli_json_and_plots(census_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots"
    args = ["explain", str(census_run), "--max-rows", "2000", "--by", "sex", "--plot", str(plots), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows"] == 2000
    assert {"gates", "label_correlation", "gradient_cosine"} <= set(report)
    assert {v["value"] for v in report["gates_by"]["gates"]["gate"]} == {"Female", "Male"}
    names = {p.name for p in plots.iterdir()}
    assert {"gates_gate.png", "label_correlation.png", "gradient_cosine.png", "history.png"} <= names
    for png in plots.iterdir():
        assert png.read_bytes()[:8] == PNG_SIGNATURE, png


def test_explain_cli_tables_and_a_misspelt_feature(census_run: Path) -> None:
    result = runner.invoke(app, ["explain", str(census_run), "--max-rows", "1000"])
    assert result.exit_code == 0, result.output
    assert "label correlation" in result.stderr and "income~marital" in result.stderr
    assert result.stdout == ""
    bad = runner.invoke(app, ["explain", str(census_run), "--by", "sexx"])
    assert bad.exit_code == 2
    assert "did you mean 'sex'" in bad.stderr


def test_compare_cli_gains_against_a_single_task_baseline(census_run: Path, tmp_path: Path) -> None:
    """The gain of each task is the run's test AUC minus the baseline's, as `mtl eval` reports them,
    and the seesaw verdict follows the signs (a run compared with itself would show 0 by construction)."""
    from tests.conftest import REPO

    baseline = tmp_path / "single-task"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        settings = ["train.epochs=1", "train.threads=1", f"data.cache_dir={census_run.parent / 'cache'}"]
        args = ["train", "recipes/census-single-task.yaml", "--out", str(baseline), "--quiet"]
        trained = runner.invoke(app, [*args, *(part for s in settings for part in ("--set", s))])
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["compare", str(census_run), "--baseline", str(baseline), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["tasks"] == ["income", "marital"]
    assert out["baseline"]["scheme"] == "single_task"
    (run,) = out["runs"]
    assert run["scheme"] == "mmoe"
    ours, theirs = (
        json.loads(runner.invoke(app, ["eval", str(r), "--json"]).stdout)["tasks"] for r in (census_run, baseline)
    )
    for task in ("income", "marital"):
        gain = run["gain"][task]
        assert gain["metric"] == "auc"
        assert (gain["value"], gain["baseline"]) == (ours[task]["auc"], theirs[task]["auc"])
        assert gain["gain"] == ours[task]["auc"] - theirs[task]["auc"]
        assert gain["gain"] != 0.0
    assert run["improved"] == [t for t in out["tasks"] if run["gain"][t]["gain"] > out["tolerance"]]
    assert run["worsened"] == [t for t in out["tasks"] if run["gain"][t]["gain"] < -out["tolerance"]]
    assert run["seesaw"] is bool(run["improved"] and run["worsened"])


# --- models routed by construction -------------------------------------------------------------------


def test_a_forced_gate_is_collapsed_and_a_switched_off_expert_is_dead() -> None:
    torch.manual_seed(0)
    model = MMoE(INPUTS, embedding_dim=4, n_experts=4, expert_units=[8], tower_units=[4], dropout=0.0)
    with torch.no_grad():
        # Expert 3 is switched off for every task: zero output, and every gate routes away from it.
        model.experts.pool.first.weight[3 * 8 :] = 0.0
        model.experts.pool.first.bias[3 * 8 :] = 0.0
        for gate in model.gates.values():
            gate.bias[3] = -30.0
        # The click gate always picks expert 1.
        model.gates["click"].weight.zero_()
        model.gates["click"].bias.copy_(torch.tensor([0.0, 30.0, 0.0, -30.0]))
    report = explain_model(model, split_of(), TASKS, TYPES, FAST)
    gate = report["gates"]["gate"]
    assert gate["collapsed"] == {"click": "1", "like": None, "watch": None}
    assert gate["dead_experts"] == ["3"]
    assert gate["entropy"]["click"] == pytest.approx(0.0, abs=1e-6)
    assert any("collapsed onto expert 1" in w for w in report["warnings"])
    assert "expert 3 is dead" in report["readings"]["gates"][0]


# --- every registered scheme -------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES.names())
def test_every_scheme_is_explained(scheme: str) -> None:
    model = build(scheme)
    data = split_of()
    report = explain_model(model, data, TASKS, TYPES, FAST)
    introspected = model.introspect(make_batch(8))
    assert bool(report["gates"]) == bool(introspected.gates)
    assert bool(report["alpha"]) == bool(introspected.alphas)
    assert bool(report["gate_scales"]) == (scheme_of(model).capabilities.gate_scales is not None)
    for name, group in report["gates"].items():
        for row, weights in group["weights"].items():
            assert sum(w for w in weights if w is not None) == pytest.approx(1.0, abs=1e-5), (name, row)
            assert len(weights) == len(group["experts"])
    direct = float(torch.corrcoef(data.labels[:, :2].double().T)[0, 1])  # not the report's own pearson
    assert report["label_correlation"]["click"]["like"] == pytest.approx(direct, abs=1e-12)
    if report["shared_parameters"]:
        for task in TASKS:
            assert report["gradient_cosine"][task][task] == pytest.approx(1.0, abs=1e-6)
    else:
        assert scheme_of(model).capabilities.baseline  # only the baseline shares nothing
        assert report["gradient_cosine"] == {}
    json.dumps(report, allow_nan=False, default=lambda v: None)


def test_cgc_gates_line_up_task_and_shared_experts() -> None:
    report = explain_model(build("ple"), split_of(), TASKS, TYPES, FAST)
    level1, level2 = report["gates"]["level1.gate"], report["gates"]["level2.gate"]
    assert set(level1["weights"]) == {*TASKS, "shared"}
    assert level1["experts"][:2] == ["click.0", "click.1"] and level1["experts"][-1].startswith("shared.")
    click = level2["weights"]["click"]
    reachable = [e for e, w in zip(level2["experts"], click, strict=True) if w is not None]
    assert all(e.startswith(("click.", "shared.")) for e in reachable)


def test_masked_task_correlations_use_only_its_rows() -> None:
    data = split_of(300)
    mask = data.label_mask.clone()
    mask[::3, 1] = False  # "like" is observed on two rows in three
    data = SplitTensors(data.categorical, data.numeric, data.labels, mask)
    report = explain_model(build("mmoe"), data, TASKS, TYPES, FAST)
    both = mask[:, 0] & mask[:, 1]
    expected = pearson(data.labels[both, 0], data.labels[both, 1])
    assert report["label_correlation"]["click"]["like"] == pytest.approx(expected, abs=1e-12)
    assert report["gates"]["gate"]["rows"]["like"] == int(mask[:, 1].sum())


# --- compare ---------------------------------------------------------------------------------------------


def test_compare_marks_seesaw() -> None:
    def result(name: str, scheme: str, a: float, b: float) -> dict[str, Any]:
        return {"run_dir": name, "scheme": scheme, "tasks": {"income": {"auc": a}, "marital": {"auc": b}}}

    baseline = result("stl", "single_task", 0.930, 0.990)
    runs = [result("mmoe", "mmoe", 0.940, 0.985), result("ple", "ple", 0.935, 0.991)]
    out = compare_results(runs, baseline, tolerance=0.001)
    mmoe, ple = out["runs"]
    assert mmoe["seesaw"] is True and mmoe["improved"] == ["income"] and mmoe["worsened"] == ["marital"]
    assert mmoe["gain"]["income"]["gain"] == pytest.approx(0.010)
    assert ple["seesaw"] is False and ple["worsened"] == []
    assert out["best"] == {"income": "mmoe", "marital": "ple"}


@pytest.mark.numerics  # explain's gradients against a direct autograd pass
@pytest.mark.parametrize("scheme", ["shared_bottom", "mmoe"])
def test_gradient_cosines_and_norms_match_a_direct_computation(scheme: str) -> None:
    """One batch holding the whole split: the reported cosine of every pair and every norm are
    those of the tasks' own loss gradients on the shared parameters."""
    from mtlcli.train.loop import task_losses

    model = build(scheme)
    data = split_of(256)
    report = explain_model(model, data, TASKS, TYPES, ExplainOptions(grad_batches=1, grad_batch_size=256))
    model.eval()
    shared = list(model.parameter_groups()["shared"].values())  # type: ignore[operator]
    binary = torch.tensor([t == "binary" for t in TYPES])
    losses = task_losses(model(data.all()), data.all(), binary)
    grads = torch.stack(
        [torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)]) for loss in losses]
    ).double()
    unit = grads / grads.norm(dim=1, keepdim=True)
    for i, a in enumerate(TASKS):
        assert_kernel_close(report["gradient_norm"][a], float(grads[i].norm()), what=f"{a}'s gradient norm")
        for j, b in enumerate(TASKS):
            expected = float(unit[i] @ unit[j])
            assert_kernel_close(report["gradient_cosine"][a][b], expected, floor=1.0, what=f"cosine {a}~{b}")


def test_gate_entropy_is_one_for_uniform_weights_and_zero_for_one_expert() -> None:
    from mtlcli.explain.gates import normalised_entropy

    assert normalised_entropy(torch.full((3, 5), 0.2)).tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert normalised_entropy(torch.eye(4)).tolist() == pytest.approx([0.0] * 4, abs=1e-6)
    half = normalised_entropy(torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
    assert float(half[0]) == pytest.approx(0.5, abs=1e-6)  # log 2 / log 4
