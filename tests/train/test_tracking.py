"""train.track_gradients: gradient cosines and loss weights sampled every N steps."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mtlcli.data.batch import SplitTensors
from mtlcli.models import SCHEMES, InputSpec, build_model
from mtlcli.recipe.schema import TrainSection
from mtlcli.train.loop import NullObserver, fit
from mtlcli.weighting import WEIGHTINGS, build_weighting
from tests.numerics import assert_kernel_close


class Collect(NullObserver):
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def on_gradients(self, record: dict[str, Any]) -> None:
        self.records.append(record)


@pytest.mark.numerics  # cosines from a GEMM: symmetric on every kernel
def test_tracked_samples_hold_cosines_norms_and_weights() -> None:
    inputs = InputSpec(cardinalities=[4], n_numeric=2, tasks=["a", "b"], task_types=["binary", "binary"])
    gen = torch.Generator().manual_seed(0)
    n = 160
    cats = torch.randint(0, 4, (n, 1), generator=gen)
    numeric = torch.randn(n, 2, generator=gen)
    labels = torch.stack([(numeric[:, 0] > 0).float(), (numeric[:, 0] < 0).float()], 1)  # opposed tasks
    data = SplitTensors(cats, numeric, labels, torch.ones(n, 2, dtype=torch.bool))
    torch.manual_seed(0)
    model = build_model("shared_bottom", SCHEMES.get("shared_bottom").params(bottom_units=[8], tower_units=[]), inputs)
    strategy = build_weighting("static", WEIGHTINGS.get("static").params(weights={"b": 0.5}), inputs.tasks)
    observer = Collect()
    settings = TrainSection(epochs=2, batch_size=16, early_stopping=None, track_gradients=3)
    fit(model, strategy, data, data, settings, inputs.tasks, inputs.task_types, observer)
    assert [r["step"] for r in observer.records] == list(range(3, 21, 3))  # 10 steps per epoch
    assert [r["epoch"] for r in observer.records] == [1, 1, 1, 2, 2, 2]
    for record in observer.records:
        cosine = record["gradient_cosine"]
        assert cosine["a"]["a"] == pytest.approx(1.0, abs=1e-12)  # computed in float64
        assert cosine["a"]["b"] == cosine["b"]["a"]  # symmetric by construction, whatever the GEMM kernel
        assert -1.0 - 1e-6 <= cosine["a"]["b"] <= 1.0 + 1e-6
        assert record["weights"] == {"a": 1.0, "b": 0.5}
        assert record["gradient_norm"]["a"] > 0


def test_cosine_matches_a_direct_computation() -> None:
    from mtlcli.train.loop import gradient_record

    grads = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    record = gradient_record(grads, torch.ones(2), ["a", "b"], 1, 1, 1)
    assert record["gradient_cosine"]["a"]["b"] == pytest.approx(0.5)
    assert record["gradient_norm"]["a"] == pytest.approx(2**0.5)


@pytest.mark.numerics  # the loop's gradients against a direct autograd pass over the same rows
def test_the_first_sample_is_each_tasks_own_gradient_at_the_initial_weights() -> None:
    """One step over all rows (track every step): the sample's norms and cosine equal those of
    ∇L_a and ∇L_b on the shared parameters of the initial model, and opposed tasks conflict."""
    from mtlcli.train.loop import task_losses

    inputs = InputSpec(cardinalities=[4], n_numeric=2, tasks=["a", "b", "c"], task_types=["binary"] * 3)
    gen = torch.Generator().manual_seed(0)
    n = 128
    numeric = torch.randn(n, 2, generator=gen)
    labels = torch.stack([(numeric[:, 0] > 0), (numeric[:, 0] < 0), (numeric[:, 1] > 0)], 1).float()
    data = SplitTensors(torch.randint(0, 4, (n, 1), generator=gen), numeric, labels, torch.ones(n, 3, dtype=torch.bool))

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(
            "shared_bottom", SCHEMES.get("shared_bottom").params(bottom_units=[8], tower_units=[4]), inputs
        )

    observer = Collect()
    settings = TrainSection(epochs=1, batch_size=n, early_stopping=None, track_gradients=1)
    fit(model(), build_weighting("equal", WEIGHTINGS.get("equal").params(), inputs.tasks), data, data, settings,
        inputs.tasks, inputs.task_types, observer)  # fmt: skip
    (record,) = observer.records
    fresh = model()
    shared = list(fresh.parameter_groups()["shared"].values())  # type: ignore[operator]
    losses = task_losses(fresh(data.all()), data.all(), torch.ones(3, dtype=torch.bool))
    grads = [torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)]) for loss in losses]
    norms = [float(g.norm()) for g in grads]
    assert_kernel_close(list(record["gradient_norm"].values()), norms, what="tracked norms")
    cosine = float(grads[0] @ grads[1] / (grads[0].norm() * grads[1].norm()))
    assert_kernel_close(record["gradient_cosine"]["a"]["b"], cosine, floor=1.0, what="tracked cosine")
    assert record["gradient_cosine"]["a"]["b"] < 0  # a and b are opposite labels: their gradients conflict
