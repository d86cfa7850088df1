"""CSRec as a scheme: it trains census end to end through its own step, its masks and share rule are
live (not inert), the two update modes differ, a resumed run ends exactly where an uninterrupted one
does, and gradient strategies that combine tasks' gradients are refused at recipe check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mtlcli.data.batch import SplitTensors
from mtlcli.data.store import Prepared
from mtlcli.errors import RecipeError
from mtlcli.models import SCHEMES, InputSpec, build_model
from mtlcli.models.csrec import SHARE_CHANGED, CSRec
from mtlcli.recipe import load_recipe
from mtlcli.recipe.schema import TrainSection
from mtlcli.train.loop import FitResult, NullObserver, TrainingInterrupted, fit, make_optimizer
from mtlcli.train.run import loaded_run, train_run
from mtlcli.weighting import WEIGHTINGS, build_weighting
from mtlcli.weighting.base import weightings_by_gradients
from tests.helpers import gradient_weighting, three_opposed_tasks
from tests.train.test_resume import CheckpointTo


def census_run(tmp: Path, census: Path, update: str) -> tuple[dict[str, Any], list[dict[str, Any]], CSRec, Prepared]:
    from tests.conftest import REPO

    sets = ["train.epochs=1", "train.early_stopping=null", "train.threads=1", f"data.cache_dir={tmp / 'cache'}",
            f"data.source={census}", "model.warmup_steps=20", f"model.update={update}"]  # fmt: skip
    summary = train_run(load_recipe(str(REPO / "recipes" / "census-csrec.yaml"), sets), tmp / update)
    records = [json.loads(line) for line in (tmp / update / "metrics.jsonl").read_text().splitlines()]
    loaded, prepared = loaded_run(tmp / update)  # as `mtl eval` loads it
    assert isinstance(loaded.model, CSRec)
    return summary, records, loaded.model, prepared


@pytest.fixture(scope="module")
def census_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]], CSRec, Prepared]]:
    from tests.conftest import CENSUS

    if not CENSUS.is_file():
        pytest.skip(f"census data not found at {CENSUS}")
    tmp = tmp_path_factory.mktemp("csrec")
    return {update: census_run(tmp, CENSUS, update) for update in ("alternate", "joint")}


def test_census_trains_with_live_masks_and_share_rule(census_runs: dict[str, Any]) -> None:
    for update, (summary, records, model, _) in census_runs.items():
        assert summary["scheme"] == "csrec"
        assert summary["valid"]["income"]["auc"] > 0.85 and summary["valid"]["marital"]["auc"] > 0.95, update
        masks = model.net.masks()
        income, marital = (torch.cat([m.flatten() for m in masks[t]]) for t in ("income", "marital"))
        assert float(income.mean()) < 1.0 and float(marital.mean()) < 1.0, "masks differ from all-ones"
        assert not torch.equal(income, marital), "the tasks' masks differ"
        assert records[0]["tallies"][SHARE_CHANGED] > 0, f"{update}: the share rule changed no update"


def test_alternate_and_joint_differ(census_runs: dict[str, Any]) -> None:
    alternate, joint = (census_runs[u][1][0] for u in ("alternate", "joint"))
    assert alternate["train_loss"] != joint["train_loss"]
    # alternating: each task trains every other step, so its weight averages about one half
    assert alternate["weights"]["income"] == pytest.approx(0.5, abs=0.02)
    assert joint["weights"]["income"] == pytest.approx(1.0)


@pytest.mark.parametrize("weighting", ["toy_combining", *weightings_by_gradients(["a", "b"])[0]])
def test_gradient_combining_weightings_are_refused(weighting: str, census_file: Path) -> None:
    """Every weighting that declares ``task_gradients`` is refused, a new one named nowhere else
    too, and the message lists the registry's weightings of each kind."""
    from tests.conftest import REPO

    with gradient_weighting("toy_combining"), pytest.raises(RecipeError) as caught:
        load_recipe(str(REPO / "recipes" / "census-csrec.yaml"), [f"loss.weighting={weighting}"])
    text = str(caught.value)
    assert "model.scheme" in text and "csrec defines its own update" in text and weighting in text
    refused, choose = text.split("choose a loss weighting")
    assert "toy_combining" in refused and "pcgrad" in refused and "toy_combining" not in choose
    assert "uncertainty" in choose and "pcgrad" not in choose


def test_loss_weightings_are_accepted(census_file: Path) -> None:
    from tests.conftest import REPO

    for weighting in ("equal", "uncertainty", "dwa", "rlw"):
        load_recipe(str(REPO / "recipes" / "census-csrec.yaml"), [f"loss.weighting={weighting}"])


@pytest.mark.parametrize("update", ["alternate", "joint"])
def test_a_resumed_run_ends_with_the_uninterrupted_weights(update: str, tmp_path: Path) -> None:
    """Interrupted mid-epoch and resumed from the checkpoint: the contributions' averages, the
    negatives' generator and the epoch's count come back with the model, so every weight and
    buffer is bitwise the uninterrupted run's."""
    inputs, data = three_opposed_tasks(torch.Generator().manual_seed(0))
    settings = TrainSection(epochs=3, batch_size=32, early_stopping=None, lr=0.01)

    def fresh() -> tuple[torch.nn.Module, Any, Any]:
        torch.manual_seed(0)
        params = SCHEMES.get("csrec").params(bottom_units=[16, 8], tower_units=[4], update=update)
        model = build_model("csrec", params, inputs)
        draw = torch.Generator().manual_seed(1)
        with torch.no_grad():  # overlapping masks of 60 % density, as a search would leave
            for masks in model.net.masks().values():
                for mask in masks:
                    mask.copy_((torch.rand(mask.shape, generator=draw) < 0.6).float())
        strategy = build_weighting("uncertainty", WEIGHTINGS.get("uncertainty").params(), inputs.tasks)
        optimizer = make_optimizer(settings, list(model.parameters()), list(strategy.capabilities.parameters))
        return model, strategy, optimizer

    def run(model: Any, strategy: Any, optimizer: Any, **kw: Any) -> FitResult:
        observer = kw.pop("observer", NullObserver())
        return fit(model, strategy, data, data, settings, inputs.tasks, inputs.task_types, observer, optimizer, **kw)

    model, strategy, optimizer = fresh()
    run(model, strategy, optimizer)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    assert int(model.changed) > 0

    from mtlcli.train.checkpoint import load_checkpoint

    path = tmp_path / "checkpoint.safetensors"
    steps = iter(range(10_000))
    model, strategy, optimizer = fresh()
    with pytest.raises(TrainingInterrupted):
        run(model, strategy, optimizer, observer=CheckpointTo(path), stop_requested=lambda: next(steps) == 14)
    model, strategy, optimizer = fresh()
    state = load_checkpoint(path, model, optimizer, strategy)
    assert (state.epoch, state.step) == (2, 5)
    run(model, strategy, optimizer, state=state)
    for name, value in model.state_dict().items():  # same machine, batches and kernels: bitwise
        assert torch.equal(value, reference[name]), f"{name} differs after resume"


def test_explain_reports_each_layer_with_reliance_and_wins(census_runs: dict[str, Any], tmp_path: Path) -> None:
    """Per layer: each mask's density (the mask's mean), the pairwise IoU, the share of weights kept
    by both tasks, Δ_k (finite, the kernel's per-layer figure) and the conflicts each task wins."""
    from mtlcli.explain.masks import mask_report, read_masks

    model = census_runs["alternate"][2]
    masks = model.net.masks()
    batch = next(iter(census_runs["alternate"][3].load("valid").batches(2048)))
    report = mask_report(model, batch)
    assert report is not None
    for index, figures in enumerate(report["per_layer"]):
        income, marital = masks["income"][index].bool(), masks["marital"][index].bool()
        assert figures["density"]["income"] == pytest.approx(float(income.float().mean()))
        both, either = float((income & marital).sum()), float((income | marital).sum())
        assert figures["overlap"]["income"]["marital"] == pytest.approx(both / either)
        assert figures["conflicting"] == pytest.approx(both / income.numel())
        assert all(torch.isfinite(torch.tensor(d)) for d in figures["reliance"].values())
        assert sum(figures["wins"].values()) >= 1.0 - 1e-6, "every conflicting weight is won by some task"
    assert any(d != 0 for f in report["per_layer"] for d in f["reliance"].values()), "Δ_k is live"
    lines = read_masks(report)
    assert len(lines) == 1 + len(report["per_layer"]) and "conflicts won" in lines[1]


def test_several_processes_exchange_by_collectives_not_ddp() -> None:
    """csrec's step runs its forward passes on the bare model and sums the model's gradients
    through the exchange (DDP would leave them unsummed); the equivalence of 2 ranks with one
    process is in tests/test_distributed.py."""
    from mtlcli.distributed import Ranks
    from mtlcli.models.csrec import ContrastiveStep
    from mtlcli.train.loop import build_parts

    inputs = InputSpec(cardinalities=[4], n_numeric=1, tasks=["a", "b"], task_types=["binary"] * 2)
    model = build_model("csrec", SCHEMES.get("csrec").params(bottom_units=[4], tower_units=[2]), inputs)
    strategy = build_weighting("equal", WEIGHTINGS.get("equal").params(), inputs.tasks)
    settings = TrainSection(epochs=1, batch_size=8, early_stopping=None)
    assert build_parts(model, strategy, settings, inputs.tasks, inputs.task_types, 1).exchange.kind == "none"
    parts = build_parts(model, strategy, settings, inputs.tasks, inputs.task_types, 1, ranks=Ranks(0, 2))
    assert parts.exchange.kind == "collectives"
    ContrastiveStep(parts)  # built without a refusal


def test_the_step_scales_each_tasks_gradient_on_a_conflicting_weight_by_its_share() -> None:
    """One joint step without the contrastive loss: the masked weights' gradient is
    Σ_k π_k ⊙ ∂L_k/∂W with π from I_k = |W ⊙ ∂L_k/∂W| (first update: the average is I_k itself),
    computed here by hand from the tasks' separate gradients."""
    from mtlcli.models.csrec import ContrastiveStep
    from mtlcli.train.loop import build_parts
    from mtlcli.train.step import StepAt

    inputs = InputSpec(cardinalities=[5], n_numeric=2, tasks=["a", "b"], task_types=["binary", "binary"])
    torch.manual_seed(0)
    params = SCHEMES.get("csrec").params(bottom_units=[6], tower_units=[3], update="joint", negatives=0)
    model = build_model("csrec", params, inputs)
    assert isinstance(model, CSRec)
    draw = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for masks in model.net.masks().values():
            masks[0].copy_((torch.rand(masks[0].shape, generator=draw) < 0.7).float())
    gen = torch.Generator().manual_seed(1)
    cats, numeric = torch.randint(0, 5, (40, 1), generator=gen), torch.randn(40, 2, generator=gen)
    labels = torch.stack([(numeric[:, 0] > 0).float(), (numeric[:, 1] > 0.2).float()], 1)
    batch = next(iter(SplitTensors(cats, numeric, labels, torch.ones(40, 2, dtype=torch.bool)).batches(40)))
    weight = model.net.linears()[0].weight
    by_hand = []
    for k in range(2):
        model.zero_grad()
        z = model(batch)[:, k]
        torch.nn.functional.binary_cross_entropy_with_logits(z, labels[:, k]).backward()
        assert weight.grad is not None
        by_hand.append(weight.grad.clone())
    grads = torch.stack(by_hand)
    impact = (weight.detach() * grads).abs()
    masks = torch.stack([model.net.masks()[t][0] for t in ("a", "b")])
    kept = torch.where(masks > 0, impact, 0.0)
    top = kept.max(0).values
    pi = torch.where(masks > 0, torch.where(top > 0, kept / torch.where(top > 0, top, 1.0), 1.0), 0.0)
    expected = (pi * grads).sum(0)
    conflict = (masks > 0).all(0)
    assert bool(((pi < 1) & conflict & (grads != 0)).any()), "precondition: some share below 1"

    strategy = build_weighting("equal", WEIGHTINGS.get("equal").params(), inputs.tasks)
    settings = TrainSection(epochs=1, batch_size=40, early_stopping=None, lr=0.01)
    step = ContrastiveStep(build_parts(model, strategy, settings, inputs.tasks, inputs.task_types, 1))
    done = step(batch, StepAt(1, 1, 1))
    assert weight.grad is not None
    torch.testing.assert_close(weight.grad, expected, rtol=1e-5, atol=1e-7)
    assert done.tallies["share_changed"] == float(((pi < 1) & (grads != 0)).any(0).sum())


def test_a_task_without_labelled_rows_leaves_its_contributions_alone() -> None:
    """A batch where task b has no labelled rows (a sample space it is outside of) measures
    nothing for b: its moving average is not pulled towards 0."""
    from mtlcli.models.csrec import ContrastiveStep
    from mtlcli.train.loop import build_parts
    from mtlcli.train.step import StepAt

    inputs = InputSpec(cardinalities=[5], n_numeric=2, tasks=["a", "b"], task_types=["binary", "binary"])
    params = SCHEMES.get("csrec").params(bottom_units=[6], tower_units=[3], update="joint")
    model = build_model("csrec", params, inputs)
    assert isinstance(model, CSRec)
    gen = torch.Generator().manual_seed(1)
    cats, numeric = torch.randint(0, 5, (40, 1), generator=gen), torch.randn(40, 2, generator=gen)
    labels = torch.stack([(numeric[:, 0] > 0).float(), torch.zeros(40)], 1)
    mask = torch.stack([torch.ones(40, dtype=torch.bool), torch.zeros(40, dtype=torch.bool)], 1)
    batch = next(iter(SplitTensors(cats, numeric, labels, mask).batches(40)))
    strategy = build_weighting("equal", WEIGHTINGS.get("equal").params(), inputs.tasks)
    settings = TrainSection(epochs=1, batch_size=40, early_stopping=None, lr=0.01)
    ContrastiveStep(build_parts(model, strategy, settings, inputs.tasks, inputs.task_types, 1))(batch, StepAt(1, 1, 1))
    assert model.impact.updates.tolist() == [1, 0]
