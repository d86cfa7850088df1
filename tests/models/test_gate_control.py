"""DEPHN's gate control (mtlcli/models/gate_control.py): each formula against values worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from mtlcli.data.batch import SplitTensors
from mtlcli.explain.correlation import pearson
from mtlcli.models import SCHEMES, InputSpec, build_model
from mtlcli.models.base import scheme
from mtlcli.models.blocks import FieldLayout
from mtlcli.models.gate_control import (
    FieldMapping,
    GateControl,
    GateControlSettings,
    LabelCorrelation,
    controlled_gate_logits,
    gate_coefficients,
    gate_difference,
    label_moments,
    pearson_from_moments,
    virtual_gradient,
)
from mtlcli.recipe.schema import TrainSection
from mtlcli.train.loop import NullObserver, fit
from mtlcli.weighting import WEIGHTINGS, build_weighting
from tests.helpers import census_bundle, click_buy_split


def test_field_mapping_scales_each_field() -> None:
    mapping = FieldMapping(FieldLayout(n_categorical=2, dim=2, n_numeric=1))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    assert torch.equal(mapping(x), x)  # s starts at 1: the flat input
    with torch.no_grad():
        mapping.scales.copy_(torch.tensor([2.0, 0.5, 3.0]))
    out = mapping(x)
    assert out.shape == (1, 5)
    assert out[0].tolist() == [2.0, 4.0, 1.5, 2.0, 15.0]
    out.sum().backward()
    assert mapping.scales.grad is not None
    # d/ds_f of Σ φ(x) is the sum of field f's entries
    assert mapping.scales.grad.tolist() == [3.0, 7.0, 5.0]
    assert list(mapping.state_dict()) == ["scales"]


def test_the_virtual_gradient_scales_the_gate_path_only() -> None:
    torch.manual_seed(0)
    gate, expert = nn.Linear(3, 4), nn.Linear(3, 4)
    x = torch.randn(5, 3)

    def grads(coefficient: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gate.zero_grad()
        expert.zero_grad()
        logits = virtual_gradient(gate(x), coefficient)  # [B, n]
        loss = (torch.softmax(logits, -1) * expert(x)).sum()
        loss.backward()
        assert gate.weight.grad is not None and expert.weight.grad is not None
        return loss.detach(), gate.weight.grad.clone(), expert.weight.grad.clone()

    loss1, gate1, expert1 = grads(1.0)
    loss3, gate3, expert3 = grads(torch.tensor(3.0))
    assert torch.equal(loss1, loss3)  # the forward pass is the identity
    assert torch.allclose(gate3, 3.0 * gate1, rtol=1e-6, atol=0.0)
    assert torch.equal(expert3, expert1)
    assert torch.equal(virtual_gradient(x, 2.0), x)
    with pytest.raises(ValueError, match="one number per gate"):
        virtual_gradient(x, torch.ones(3))


def test_a_controlled_gate_scales_its_own_and_its_mappings_gradients_only() -> None:
    torch.manual_seed(0)
    layout = FieldLayout(n_categorical=2, dim=2, n_numeric=1)
    gate, mapping = nn.Linear(5, 3), FieldMapping(layout)
    with torch.no_grad():
        mapping.scales.uniform_(0.5, 1.5)
    x = torch.randn(4, 5, dtype=torch.float64)
    gate.double()
    mapping.double()
    target = torch.randn(4, 3, dtype=torch.float64)

    def grads(coefficient: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        gate.zero_grad()
        mapping.zero_grad()
        leaf = x.clone().requires_grad_()
        logits = controlled_gate_logits(gate, mapping, leaf, torch.tensor(coefficient, dtype=torch.float64))
        ((torch.softmax(logits, -1) * target).sum()).backward()
        assert gate.weight.grad is not None and mapping.scales.grad is not None and leaf.grad is not None
        return logits.detach(), gate.weight.grad.clone(), mapping.scales.grad.clone(), leaf.grad

    logits1, gate1, scales1, x1 = grads(1.0)
    logits4, gate4, scales4, x4 = grads(4.0)
    assert torch.equal(logits4, logits1)
    assert torch.equal(logits1, gate(mapping(x)).detach())  # gate(φ(x))
    assert torch.allclose(gate4, 4.0 * gate1, rtol=1e-12, atol=0.0)
    assert torch.allclose(scales4, 4.0 * scales1, rtol=1e-12, atol=0.0)
    assert torch.allclose(x4, x1, rtol=1e-12, atol=1e-15)  # the shared input's gradient is not scaled


def test_gate_difference_is_the_mean_total_variation_to_the_other_gates() -> None:
    mean_gates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    # TV(0,1) = 1, TV(0,2) = TV(1,2) = 0.5
    assert gate_difference(mean_gates).tolist() == [0.75, 0.75, 0.5]
    alike = torch.tensor([[0.2, 0.3, 0.5], [0.2, 0.3, 0.5]])
    assert gate_difference(alike).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="two tasks"):
        gate_difference(torch.tensor([[1.0, 0.0]]))


LABELS = torch.tensor(
    [
        [1.0, 1.0, 1.0],
        [0.0, 0.0, 1.0],
        [1.0, 0.0, 1.0],
        [0.0, 0.0, 1.0],
        [1.0, 9.0, 1.0],  # task 1 unobserved here: its 9 must not count
        [7.0, 1.0, 1.0],  # task 0 unobserved here
    ]
)
MASK = torch.tensor([[True] * 3] * 4 + [[True, False, True], [False, True, True]])


def test_pearson_on_the_rows_both_tasks_observe() -> None:
    rho, defined = pearson_from_moments(label_moments(LABELS, MASK))
    # x = (1, 0, 1, 0), y = (1, 0, 0, 0): cov 0.5, var 1 and 0.75 -> 0.5 / sqrt(0.75)
    assert rho[0, 1].item() == pytest.approx(0.5 / math.sqrt(0.75), abs=1e-12)
    assert rho[1, 0].item() == pytest.approx(rho[0, 1].item(), abs=1e-12)
    assert rho[0, 1].item() == pytest.approx(pearson(LABELS[:4, 0], LABELS[:4, 1]), abs=1e-12)
    assert bool(defined[0, 1]) and not bool(defined[0, 2]) and not bool(defined[1, 2])  # task 2 is constant
    assert rho[0, 2].item() == 0.0
    # moments are sums: two halves of a batch give the whole batch's moments
    halves = label_moments(LABELS[:3], MASK[:3]) + label_moments(LABELS[3:], MASK[3:])
    assert torch.equal(halves, label_moments(LABELS, MASK))


def test_label_correlation_is_a_moving_average_kept_in_the_state_dict() -> None:
    tracker = LabelCorrelation(3, decay=0.9)
    first = tracker.update(label_moments(LABELS, MASK))
    r = 0.5 / math.sqrt(0.75)
    # the first defined batch sets the average; a pair never seen (task 2's) counts 0
    assert first.tolist() == pytest.approx([r / 2, r / 2, 0.0], abs=1e-12)
    anti = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])  # ρ_01 = -1, ρ_02 = -0.5
    second = tracker.update(label_moments(anti, torch.ones(3, 3, dtype=torch.bool)))
    smoothed = 0.9 * r + 0.1 * 1.0
    rho_12 = pearson(anti[:, 1], anti[:, 2])
    assert rho_12 is not None
    assert second.tolist() == pytest.approx(
        [(smoothed + 0.5) / 2, (smoothed + abs(rho_12)) / 2, (0.5 + abs(rho_12)) / 2], abs=1e-12
    )
    # a batch on which nothing is defined leaves the average
    flat = tracker.update(label_moments(torch.ones(3, 3), torch.ones(3, 3, dtype=torch.bool)))
    assert torch.equal(flat, second)
    restored = LabelCorrelation(3, decay=0.9)
    restored.load_state_dict(tracker.state_dict())
    assert set(tracker.state_dict()) == {"average", "seen"}
    assert torch.equal(restored.task_correlation(), second)


def test_lambda_responds_to_gate_difference_and_to_correlation_within_its_clip() -> None:
    def lam(d: float, c: float) -> float:
        return gate_coefficients(torch.tensor([d]), torch.tensor([c])).item()

    # λ = clip(exp(5 (0.5 (1 - c) - d)), 0.1, 10)
    assert lam(0.5, 0.0) == pytest.approx(1.0)  # the difference wanted for uncorrelated tasks
    assert lam(0.25, 0.5) == pytest.approx(1.0)
    assert lam(0.6, 0.0) == pytest.approx(math.exp(-0.5))  # more different than wanted: slower
    assert lam(0.3, 0.0) == pytest.approx(math.exp(1.0))  # more alike than wanted: faster
    assert lam(0.2, 0.8) == pytest.approx(math.exp(-0.5))  # correlated tasks want alike gates
    assert lam(0.2, 0.2) == pytest.approx(math.exp(1.0))
    assert lam(0.0, 0.0) == 10.0  # exp(2.5) = 12.2, clipped
    assert lam(1.0, 1.0) == pytest.approx(0.1)  # exp(-5) = 0.0067, clipped
    per_task = gate_coefficients(torch.tensor([0.5, 0.6]), torch.tensor([0.0, 0.0]), kappa=2.0, delta=0.5)
    assert per_task.tolist() == pytest.approx([1.0, math.exp(-0.2)])


# --- wired into the expert schemes (model.gate_control) -------------------------------------------

TASKS = ["click", "buy", "view"]
INPUTS = InputSpec(cardinalities=[50, 8], n_numeric=2, tasks=TASKS, task_types=["binary"] * 3)
HETERO = {"n_experts": 4, "expert_kinds": ["mlp", "mlp", "fm", "cross"]}
SCHEME_CASES = [("mmoe", HETERO), ("cgc", {"shared_expert_kinds": ["mlp", "fm", "cross", "mlp"]}), ("ple", {})]


def three_tasks(n: int, seed: int) -> SplitTensors:
    """click and buy as ``click_buy_split`` gives them (buy observed where clicked), and view, a
    coin flip weakly tied to click."""
    two = click_buy_split(InputSpec([50, 8], 2, TASKS[:2], ["binary"] * 2), n, seed, every=3, buy_space=True)
    gen = torch.Generator().manual_seed(seed + 100)
    view = torch.where(
        torch.rand(n, generator=gen) < 0.7, two.labels[:, 0], (torch.rand(n, generator=gen) < 0.5).float()
    )
    labels = torch.cat([two.labels, view.unsqueeze(1)], 1)
    mask = torch.cat([two.label_mask, torch.ones(n, 1, dtype=torch.bool)], 1)
    return SplitTensors(two.categorical, two.numeric, labels, mask)


def build(name: str, extra: dict[str, Any], control: Any) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, SCHEMES.get(name).params(**extra, gate_control=control), INPUTS)


def test_the_option_takes_true_false_or_settings_and_refuses_the_rest() -> None:
    params = SCHEMES.get("mmoe").params
    assert params().gate_control is None and params(gate_control=False).gate_control is None
    assert params(gate_control=True).gate_control == GateControlSettings()
    assert params(gate_control={"kappa": 2}).gate_control == GateControlSettings(kappa=2.0)
    for name in ("cgc", "ple"):
        assert SCHEMES.get(name).params(gate_control=True).gate_control == GateControlSettings()
    with pytest.raises(ValidationError, match="Extra inputs"):
        params(gate_control={"kapa": 2})
    with pytest.raises(ValidationError, match=r"lambda_min .* is above lambda_max"):
        params(gate_control={"lambda_min": 5, "lambda_max": 2})
    with pytest.raises(ValidationError, match="corr_decay"):
        params(gate_control={"corr_decay": 1.0})
    with pytest.raises(ValidationError, match="omoe has one gate for every task"):
        SCHEMES.get("omoe").params(gate_control=True)
    assert SCHEMES.get("omoe").params(gate_control=False).gate_control is False


@pytest.mark.parametrize(("name", "extra"), SCHEME_CASES, ids=[c[0] for c in SCHEME_CASES])
def test_off_builds_nothing_and_on_draws_the_same_initial_weights(name: str, extra: dict[str, Any]) -> None:
    off, on = build(name, extra, False), build(name, extra, True)
    plain = off.state_dict()
    assert not any("control" in key for key in plain)  # off: the model of before, key for key
    for key, value in on.state_dict().items():
        if key in plain:
            assert torch.equal(value, plain[key]), key  # the same random draws for every other weight
        else:
            assert ".control." in f".{key}", key
    batch = next(three_tasks(64, 1).batches(64))
    off.eval(), on.eval()
    with torch.no_grad():  # s starts at 1: the mapping is the flat input, so the outputs agree
        assert torch.equal(on(batch), off(batch))
    groups = scheme(on).parameter_groups()
    owned = {task: [k for k in names if ".mapping." in k] for task, names in groups.items()}
    for task in TASKS:  # task k's field scales are task k's, as its gate is
        assert owned[task] == [k for k in owned[task] if f".mapping.{task}." in k] and len(owned[task]) == 1


def test_a_training_step_scales_each_gate_by_its_own_lambda_from_its_batch() -> None:
    settings = GateControlSettings(kappa=3.0)
    model = build("mmoe", HETERO, settings.model_dump())
    plain = build("mmoe", HETERO, settings.model_dump())
    batch = next(three_tasks(96, 2).batches(96))
    model.train(), plain.train()
    control = cast(GateControl, model.control)
    loss = model(batch).sum()
    # λ by hand from this batch: its mean gates and its labels' correlation (the first batch sets the average)
    with torch.no_grad():
        x = model.embedding(batch)
        gates = torch.stack([torch.softmax(model.gates[t](x), -1).double().mean(0) for t in TASKS])
        rho, _ = pearson_from_moments(label_moments(batch.labels, batch.label_mask))
        c = (rho.abs().sum(1) - rho.diagonal().abs()) / 2
        expected = gate_coefficients(gate_difference(gates), c, kappa=3.0)
    assert torch.allclose(control.coefficients, expected, rtol=1e-6, atol=0.0)
    assert int(control.steps) == 1 and (expected != 1.0).all() and len(set(expected.tolist())) == 3
    loss.backward()
    with torch.no_grad():  # a model without λ: gate control's plain gradients
        cast(GateControl, plain.control).eval()
    plain(batch).sum().backward()
    for k, task in enumerate(TASKS):
        scaled, base = model.gates[task].weight.grad, plain.gates[task].weight.grad
        assert torch.allclose(scaled, float(expected[k]) * base, rtol=1e-4, atol=1e-7), task
        s_scaled = model.control.mapping[task].scales.grad
        s_base = plain.control.mapping[task].scales.grad
        assert torch.allclose(s_scaled, float(expected[k]) * s_base, rtol=1e-4, atol=1e-7), task
    others = dict(plain.named_parameters())
    for name, param in model.named_parameters():  # the embedding, experts and towers learn as without λ
        if not name.startswith(("gates.", "control.")):
            assert param.grad is not None and torch.allclose(param.grad, others[name].grad, rtol=1e-4, atol=1e-7), name
    before = {k: v.clone() for k, v in control.state_dict().items()}
    model.eval()
    with torch.no_grad():
        model(batch)
    model.train()
    with torch.no_grad():
        model(batch)
    for key, value in control.state_dict().items():  # evaluation and gradient-free passes leave λ alone
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(("name", "extra"), SCHEME_CASES, ids=[c[0] for c in SCHEME_CASES])
def test_lambda_is_in_each_epoch_record_and_leaves_one(name: str, extra: dict[str, Any]) -> None:
    model = build(name, extra, True)
    strategy = build_weighting("equal", WEIGHTINGS.get("equal").params(), TASKS)
    settings = TrainSection(epochs=2, batch_size=64, early_stopping=None, lr=0.01, seed=3)
    result = fit(
        model, strategy, three_tasks(449, 1), three_tasks(100, 2), settings, TASKS, ["binary"] * 3, NullObserver()
    )
    for record in result.history:
        entry = record["gate_control"]
        assert set(entry) == {"lambda", "difference", "correlation", "target"}
        lam = [entry["lambda"][t] for t in TASKS]
        assert all(0.1 <= v <= 10.0 for v in lam) and any(abs(v - 1.0) > 0.01 for v in lam), lam
        assert len({round(v, 9) for v in lam}) == 3, lam  # three tasks: each gate its own λ
    assert 0 < entry["correlation"]["click"] < 1


def test_gate_control_resumes_mid_epoch_to_the_same_weights(tmp_path: Path) -> None:
    """The correlation's moving average, λ and its epoch sums are in the checkpoint: a run
    interrupted mid-epoch and resumed ends with the uninterrupted run's weights and records."""
    from mtlcli.train.checkpoint import load_checkpoint
    from mtlcli.train.loop import TrainingInterrupted, make_optimizer
    from tests.train.test_resume import CheckpointTo

    settings = TrainSection(epochs=3, batch_size=32, early_stopping=None, lr=0.01)
    data = three_tasks(300, 4)

    def fresh() -> tuple[nn.Module, Any, torch.optim.Optimizer]:
        model = build("mmoe", HETERO, True)
        strategy = build_weighting("equal", WEIGHTINGS.get("equal").params(), TASKS)
        return model, strategy, make_optimizer(settings, list(model.parameters()), [])

    model, strategy, optimizer = fresh()
    reference = fit(model, strategy, data, data, settings, TASKS, ["binary"] * 3, NullObserver(), optimizer)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    path, steps = tmp_path / "checkpoint.safetensors", iter(range(10_000))
    model, strategy, optimizer = fresh()
    with pytest.raises(TrainingInterrupted):
        fit(
            model, strategy, data, data, settings, TASKS, ["binary"] * 3, CheckpointTo(path), optimizer,
            stop_requested=lambda: next(steps) == 14,
        )  # fmt: skip
    model, strategy, optimizer = fresh()
    state = load_checkpoint(path, model, optimizer, strategy)
    resumed = fit(model, strategy, data, data, settings, TASKS, ["binary"] * 3, NullObserver(), optimizer, state)
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert [r["gate_control"] for r in resumed.history] == [r["gate_control"] for r in reference.history]


def test_explain_shows_the_field_scales_and_lambda_per_epoch() -> None:
    from mtlcli.explain.gates import lambda_report, read_lambda
    from mtlcli.explain.report import ExplainOptions, explain_model

    model = build("mmoe", HETERO, True)
    with torch.no_grad():
        model.control.mapping["buy"].scales.copy_(torch.tensor([0.5, 2.0, 1.0, -1.5]))
    options = ExplainOptions(grad_batches=1, grad_batch_size=64)
    report = explain_model(model, three_tasks(128, 5), TASKS, ["binary"] * 3, options)
    scales = report["gate_control"]["field_scales"]
    assert scales["buy"] == {"categorical 0": 0.5, "categorical 1": 2.0, "numeric 0": 1.0, "numeric 1": -1.5}
    assert scales["click"] == dict.fromkeys(scales["buy"], 1.0)
    assert "buy's gate reads most categorical 1 2.00, numeric 1 -1.50" in report["readings"]["gate_control"][0]
    assert (
        explain_model(build("mmoe", HETERO, False), three_tasks(128, 5), TASKS, ["binary"] * 3, options)["gate_control"]
        is None
    )
    records = [
        {"epoch": 1, "train_loss": {}},
        {"epoch": 2, "gate_control": {"lambda": {"click": 2.0, "buy": 0.5}, "difference": {}, "correlation": {}}},
    ]
    lam = lambda_report(records, ["click", "buy"])
    assert lam is not None and lam["epochs"] == [2] and lam["lambda"] == {"click": [2.0], "buy": [0.5]}
    assert read_lambda(lam) == "gate control λ per epoch: click 2 -> 2, buy 0.5 -> 0.5"
    assert lambda_report(records[:1], ["click", "buy"]) is None


@pytest.mark.parametrize(("name", "extra"), SCHEME_CASES, ids=[c[0] for c in SCHEME_CASES])
def test_a_gate_controlled_scheme_exports_to_onnx(name: str, extra: dict[str, Any], tmp_path: Path) -> None:
    """Serving runs the forward pass alone: the field mapping counts, λ does not."""
    pytest.importorskip("onnxruntime")
    from types import SimpleNamespace

    from mtlcli.export.bundle import export_onnx

    model = build(name, extra, True).eval()
    with torch.no_grad():  # move off the initial weights (s off 1) so that every part contributes
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    schema = SimpleNamespace(
        cardinalities=INPUTS.cardinalities, categorical=INPUTS.cardinalities, numeric=[None] * 2, tasks=TASKS,
        sequences=[],
    )  # fmt: skip
    report = export_onnx(model, schema, tmp_path / "model.onnx", check_rows=256)
    assert report["max_abs_diff"] <= report["tolerance"]
    batch = next(three_tasks(64, 1).batches(64))
    with torch.no_grad():
        served = model(batch)
        for mapping in model.control.mapping.values():
            mapping.scales.fill_(1.0)
        assert not torch.allclose(model(batch), served, rtol=1e-3, atol=1e-4)  # φ is in the served forward


@pytest.mark.slow
def test_census_lambda_leaves_one_differs_between_tasks_and_the_bundle_predicts(
    census_file: Path, in_repo: Path, tmp_path: Path
) -> None:
    """Three census tasks (income, marital, education) with gate control on heterogeneous MMoE,
    two epochs: λ leaves 1 and differs between the tasks in metrics.jsonl; the exported bundle
    (ONNX when available) scores the raw test rows as the run's model does."""
    import json

    import polars as pl

    from mtlcli.recipe import load_recipe
    from mtlcli.train.loop import predict_logits
    from mtlcli.train.run import encoded_data, load_run, train_run
    from tests.helpers import invoke
    from tests.numerics import assert_kernel_close

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"extends: {in_repo / 'recipes' / 'census-3task.yaml'}\n"
        "model: {scheme: mmoe, embedding_dim: 4, n_experts: 8, expert_units: [16], tower_units: [8],\n"
        "  expert_kinds: [mlp, mlp, mlp, mlp, fm, fm, cross, cross], gate_control: true}\n",
        encoding="utf-8",
    )
    overrides = [f"data.cache_dir={tmp_path / 'cache'}", "train.threads=1", "train.epochs=2"]
    train_run(load_recipe(recipe, overrides), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        lam = record["gate_control"]["lambda"]
        assert set(lam) == {"income", "marital", "education"}
        assert max(abs(v - 1.0) for v in lam.values()) > 0.1, lam  # the gates do not learn at the plain rate
        assert max(lam.values()) - min(lam.values()) > 0.05, lam  # nor all at one rate
    census_bundle(tmp_path / "run", tmp_path, census_file)
    predicted = invoke("predict", tmp_path / "bundle", "--input", tmp_path / "test.csv", "--output", tmp_path / "p.csv")
    assert predicted.exit_code == 0, predicted.output
    loaded = load_run(tmp_path / "run")
    expected = torch.sigmoid(
        predict_logits(loaded.model, encoded_data(tmp_path / "run", loaded).load("test"), 65536).double()
    )
    got = torch.from_numpy(pl.read_csv(tmp_path / "p.csv").select(["income", "marital", "education"]).to_numpy())
    assert_kernel_close(got, expected, floor=1.0, what="predict vs the run's test probabilities")
