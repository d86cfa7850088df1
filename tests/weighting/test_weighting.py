"""Contract tests over every registered weighting strategy, and each strategy's definition."""

from __future__ import annotations

import pytest
import torch

from mtlcli.data.batch import SplitTensors
from mtlcli.models import SCHEMES, InputSpec, build_model
from mtlcli.models.base import scheme as scheme_of
from mtlcli.recipe import recipe_from_text
from mtlcli.recipe.schema import TrainSection
from mtlcli.train.loop import NullObserver, fit
from mtlcli.weighting import WEIGHTINGS, build_weighting
from mtlcli.weighting.static import StaticParams
from tests.helpers import click_buy_split, two_regressions

TASKS = ["click", "buy"]
INPUTS = InputSpec(cardinalities=[5, 8], n_numeric=2, tasks=TASKS, task_types=["binary", "binary"])


def tiny_split(n: int, seed: int) -> SplitTensors:
    return click_buy_split(INPUTS, n, seed, every=2)


@pytest.mark.parametrize("weighting", WEIGHTINGS.names())
def test_strategy_gives_gradients_and_finite_weights(weighting: str) -> None:
    torch.manual_seed(0)
    model = build_model("mmoe", SCHEMES.get("mmoe").params(), INPUTS)
    strategy = build_weighting(weighting, WEIGHTINGS.get(weighting).params(), TASKS)
    losses = torch.stack([model(tiny_split(32, 0).all())[:, k].pow(2).mean() for k in range(2)])
    weights = strategy.backward(losses, model)
    assert weights.shape == (2,)
    assert torch.isfinite(weights).all()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("scheme", SCHEMES.names())
@pytest.mark.parametrize("weighting", WEIGHTINGS.names())
def test_every_scheme_trains_with_every_strategy(scheme: str, weighting: str) -> None:
    torch.manual_seed(0)
    model = build_model(scheme, SCHEMES.get(scheme).params(), INPUTS)
    strategy = build_weighting(weighting, WEIGHTINGS.get(weighting).params(), TASKS)
    settings = TrainSection(epochs=3, batch_size=64, early_stopping=None, lr=0.01)
    result = fit(
        model, strategy, tiny_split(1024, 1), tiny_split(128, 2), settings, TASKS, ["binary"] * 2, NullObserver()
    )
    assert len(result.history) == 3
    for record in result.history:
        assert all(torch.isfinite(torch.tensor(v)) for v in record["train_loss"].values())
        assert set(record["weights"]) == set(TASKS)
    assert_every_task_learns(result.history, f"{scheme} + {weighting}")


def assert_every_task_learns(history: list[dict], what: str) -> None:  # type: ignore[type-arg]
    """Each task's mean training loss in the last epoch is below the first epoch's."""
    first, last = history[0]["train_loss"], history[-1]["train_loss"]
    for task in TASKS:
        assert last[task] < first[task], (
            f"{what}: {task}'s training loss did not fall ({first[task]:.4f} -> {last[task]:.4f})"
        )


def test_equal_is_the_plain_sum() -> None:
    model = torch.nn.Linear(1, 1)
    strategy = build_weighting("equal", WEIGHTINGS.get("equal").params(), TASKS)
    x = torch.tensor([[2.0]])
    losses = torch.stack([model(x).sum(), 3 * model(x).sum()])
    assert torch.equal(strategy.backward(losses, model), torch.ones(2))
    assert model.weight.grad is not None
    assert model.weight.grad.item() == pytest.approx(2.0 + 6.0)


def test_static_weights_scale_each_task_and_default_to_one() -> None:
    model = torch.nn.Linear(1, 1)
    strategy = build_weighting("static", StaticParams(weights={"buy": 0.25}), TASKS)
    x = torch.tensor([[2.0]])
    losses = torch.stack([model(x).sum(), model(x).sum()])
    assert strategy.backward(losses, model).tolist() == [1.0, 0.25]
    assert model.weight.grad is not None
    assert model.weight.grad.item() == pytest.approx(2.0 * 1.0 + 2.0 * 0.25)


def test_static_weights_must_name_tasks() -> None:
    with pytest.raises(Exception, match=r"loss\.weights\.y3: unknown task 'y3'"):
        recipe_from_text(two_regressions("{weighting: static, weights: {y3: 2.0}}"))


@pytest.mark.parametrize("scheme", SCHEMES.names())
def test_every_scheme_trains_with_mgda_upper_bound(scheme: str) -> None:
    torch.manual_seed(0)
    model = build_model(scheme, SCHEMES.get(scheme).params(), INPUTS)
    strategy = build_weighting("mgda", WEIGHTINGS.get("mgda").params(upper_bound=True), TASKS)
    settings = TrainSection(epochs=3, batch_size=64, early_stopping=None, lr=0.01)
    if scheme == "dtrn":  # no representation shared by every task: refused with a message
        from mtlcli.errors import MtlError

        with pytest.raises(MtlError, match="has none"):
            fit(model, strategy, tiny_split(64, 1), tiny_split(32, 2), settings, TASKS, ["binary"] * 2, NullObserver())
        return
    result = fit(
        model, strategy, tiny_split(1024, 1), tiny_split(128, 2), settings, TASKS, ["binary"] * 2, NullObserver()
    )
    for record in result.history:
        assert all(torch.isfinite(torch.tensor(v)) for v in record["train_loss"].values())
        assert sum(record["weights"].values()) == pytest.approx(1.0) or scheme_of(model).capabilities.baseline
    assert_every_task_learns(result.history, f"{scheme} + mgda upper_bound")
