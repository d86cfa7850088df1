"""train.lr_schedule and train.clip_grad_norm: the learning-rate curve by hand, and in training."""

from __future__ import annotations

import math

import pytest
import torch

from mtlcli.recipe.schema import LrSchedule, TrainSection
from mtlcli.train.loop import NullObserver, fit
from mtlcli.train.optimizer import lr_factor


def test_lr_factors_by_hand() -> None:
    cosine = LrSchedule(kind="cosine", warmup_steps=2, min_ratio=0.1)
    # 12 steps: warm-up 0.5, 1.0; then cosine from 1 (step 2) to 0.1 (step 11, the last)
    assert lr_factor(cosine, 0, 12, 4) == pytest.approx(0.5)
    assert lr_factor(cosine, 2, 12, 4) == pytest.approx(1.0)
    assert lr_factor(cosine, 11, 12, 4) == pytest.approx(0.1)
    middle = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4.5 / 9))
    assert lr_factor(cosine, 6.5, 12, 4) == pytest.approx(middle)  # type: ignore[arg-type]
    linear = LrSchedule(kind="linear", min_ratio=0.0)
    assert [lr_factor(linear, s, 5, 5) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    step = LrSchedule(kind="step", every_epochs=2, gamma=0.5)
    assert [lr_factor(step, s, 40, 4) for s in (0, 7, 8, 15, 16)] == pytest.approx([1, 1, 0.5, 0.5, 0.25])
    assert lr_factor(LrSchedule(), 123, 200, 10) == 1.0
    warm_only = LrSchedule(warmup_steps=4)
    assert [lr_factor(warm_only, s, 10, 5) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_a_bare_schedule_name_is_its_kind() -> None:
    assert TrainSection.model_validate({"lr_schedule": "cosine"}).lr_schedule.kind == "cosine"


def tiny() -> tuple[torch.nn.Module, object, object]:
    from mtlcli.data.batch import SplitTensors
    from mtlcli.models import SCHEMES, InputSpec, build_model
    from mtlcli.weighting import WEIGHTINGS, build_weighting

    inputs = InputSpec(cardinalities=[4], n_numeric=2, tasks=["a", "b"], task_types=["binary", "binary"])
    gen = torch.Generator().manual_seed(0)
    n = 256
    cats = torch.randint(0, 4, (n, 1), generator=gen)
    numeric = torch.randn(n, 2, generator=gen)
    labels = torch.stack([(cats[:, 0] < 2).float(), (numeric[:, 0] > 0).float()], 1)
    data = SplitTensors(cats, numeric, labels, torch.ones(n, 2, dtype=torch.bool))
    torch.manual_seed(0)
    model = build_model("shared_bottom", SCHEMES.get("shared_bottom").params(), inputs)
    return model, build_weighting("equal", WEIGHTINGS.get("equal").params(), inputs.tasks), data


def test_training_follows_the_schedule_and_logs_the_lr() -> None:
    model, strategy, data = tiny()
    settings = TrainSection.model_validate(
        {"epochs": 4, "batch_size": 64, "lr": 0.01, "early_stopping": None, "lr_schedule": {"kind": "linear"}}
    )
    result = fit(model, strategy, data, data, settings, ["a", "b"], ["binary"] * 2, NullObserver())  # type: ignore[arg-type]
    lrs = [r["lr"] for r in result.history]
    # 4 steps per epoch, 16 in all: the last step of epoch e is step 4e - 1 of 0..15
    assert lrs == pytest.approx([0.01 * (1 - (4 * e - 1) / 15) for e in (1, 2, 3, 4)])


def test_gradient_clipping_bounds_every_update() -> None:
    """With SGD (no momentum effect on the first step) the first update is lr x the clipped
    gradient: its norm is at most lr x clip_grad_norm, and without clipping it is larger."""
    assert first_update(0.01) == pytest.approx(0.1 * 0.01, rel=1e-4)
    assert first_update(None) > 0.1 * 0.05


def test_the_first_update_already_uses_the_scheduled_lr() -> None:
    """Warm-up over 4 steps: update 1 takes 1/4 of lr (the schedule is applied before the step,
    not after it); clipping fixes the gradient's norm, so the update's norm is lr/4 x 0.01."""
    assert first_update(0.01, warmup=4) == pytest.approx(0.1 / 4 * 0.01, rel=1e-4)


def first_update(clip: float | None, warmup: int = 0) -> float:
    """The norm of the first SGD update (no momentum yet) on the tiny data, lr 0.1."""
    model, strategy, data = tiny()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    one_step = type(data)(data.categorical[:64], data.numeric[:64], data.labels[:64], data.label_mask[:64])  # type: ignore[attr-defined]
    settings = TrainSection.model_validate(
        {
            "epochs": 1,
            "batch_size": 64,
            "lr": 0.1,
            "optimizer": "sgd",
            "early_stopping": None,
            "clip_grad_norm": clip,
            "lr_schedule": {"kind": "constant", "warmup_steps": warmup},
        }
    )
    fit(model, strategy, one_step, one_step, settings, ["a", "b"], ["binary"] * 2, NullObserver())  # type: ignore[arg-type]
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return float((after - before).norm())
