"""The optimizer's named parameter groups: the model's, and the weighting's own parameters with a
constant learning rate of their own, no weight decay and no clipping; and how checkpoints keep them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mtlcli.data.batch import SplitTensors
from mtlcli.errors import ArtifactError
from mtlcli.models import SCHEMES, InputSpec, build_model
from mtlcli.recipe.schema import TrainSection
from mtlcli.train.checkpoint import load_checkpoint, save_checkpoint
from mtlcli.train.loop import LoopState, NullObserver, fit, make_optimizer
from mtlcli.weighting import WEIGHTINGS, build_weighting

INPUTS = InputSpec(cardinalities=[4], n_numeric=2, tasks=["a", "b"], task_types=["binary", "binary"])


def model_and(weighting: str, **params: object):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = build_model("shared_bottom", SCHEMES.get("shared_bottom").params(bottom_units=[4], tower_units=[]), INPUTS)
    return model, build_weighting(weighting, WEIGHTINGS.get(weighting).params(**params), INPUTS.tasks)


def tiny(n: int = 64) -> SplitTensors:
    gen = torch.Generator().manual_seed(0)
    numeric = torch.randn(n, 2, generator=gen)
    labels = torch.stack([(numeric[:, 0] > 0), (numeric[:, 1] > 0)], 1).float()
    return SplitTensors(torch.randint(0, 4, (n, 1), generator=gen), numeric, labels, torch.ones(n, 2, dtype=torch.bool))


def test_groups_are_named_and_the_strategy_group_has_no_decay() -> None:
    model, strategy = model_and("uncertainty")
    optimizer = make_optimizer(
        TrainSection(weight_decay=0.1), list(model.parameters()), list(strategy.capabilities.parameters)
    )
    model_group, own = optimizer.param_groups
    assert (model_group["name"], model_group["weight_decay"], model_group["scheduled"], model_group["clipped"]) == (
        "model", 0.1, True, True,
    )  # fmt: skip
    assert (own["name"], own["weight_decay"], own["scheduled"], own["clipped"]) == ("strategy", 0.0, False, False)
    assert own["params"] == list(strategy.capabilities.parameters)
    equal_model, equal = model_and("equal")
    assert (
        len(
            make_optimizer(
                TrainSection(), list(equal_model.parameters()), list(equal.capabilities.parameters)
            ).param_groups
        )
        == 1
    )


def test_weight_decay_no_longer_pulls_uncertainty_log_variances_toward_zero() -> None:
    """At s = log L the uncertainty loss exp(-s)·L + s is stationary in s, so s must stay put
    however strong the model's weight decay is; the model's weights do decay."""
    model, strategy = model_and("uncertainty", init_log_variance=math.log(2.0))
    (s,) = list(strategy.capabilities.parameters)
    settings = TrainSection(weight_decay=0.5, lr=0.1)
    optimizer = make_optimizer(settings, list(model.parameters()), list(strategy.capabilities.parameters))
    weight = model.bottom[0].weight
    before = weight.detach().clone()
    for _ in range(5):
        optimizer.zero_grad(set_to_none=True)
        losses = torch.full((2,), 2.0) + 0.0 * model.bottom[0].weight.sum()  # L_k = 2, no gradient on the model
        strategy.backward(losses, model)
        optimizer.step()
    # (under decay Adam would move s by ~lr = 0.1 a step toward 0)
    assert s.tolist() == pytest.approx([math.log(2.0)] * 2, abs=1e-6)
    assert float(weight.detach().abs().sum()) < float(before.abs().sum())  # the model's weights did decay


def test_the_strategy_lr_is_its_own_constant_and_its_gradient_is_not_clipped() -> None:
    """SGD, cosine schedule, clipping at 1e-6: the model group's lr follows the schedule and its
    gradient is clipped; uncertainty's s gets the plain step of its own lr."""
    model, strategy = model_and("uncertainty", lr=0.05)
    (s,) = list(strategy.capabilities.parameters)
    settings = TrainSection.model_validate(
        {"optimizer": "sgd", "lr": 0.01, "epochs": 2, "batch_size": 64, "early_stopping": None,
         "lr_schedule": {"kind": "cosine", "min_ratio": 0.1}, "clip_grad_norm": 1e-6}
    )  # fmt: skip
    optimizer = make_optimizer(
        settings, list(model.parameters()), list(strategy.capabilities.parameters), strategy_lr=0.05
    )
    data = tiny()
    fit(model, strategy, data, data, settings, INPUTS.tasks, INPUTS.task_types, NullObserver(), optimizer)
    model_group, own = optimizer.param_groups
    assert own["lr"] == 0.05  # not scheduled
    assert model_group["lr"] == pytest.approx(0.01 * 0.1)  # the cosine schedule's end
    # s started at 0; two SGD steps (momentum 0.9) of lr 0.05 on gradients 1 - L_k ≈ 0.3 move it by
    # about 0.05·(0.3 + 1.9·0.3) ≈ 0.02; clipped at 1e-6 it could move at most ~1e-7.
    assert float(s.detach().abs().min()) > 1e-3


def test_gradnorm_and_uncertainty_take_an_lr_and_others_refuse_it() -> None:
    assert WEIGHTINGS.get("gradnorm").params(lr=0.025).own_lr() == 0.025
    assert WEIGHTINGS.get("uncertainty").params().own_lr() is None
    assert WEIGHTINGS.get("equal").params().own_lr() is None
    with pytest.raises(ValidationError):
        WEIGHTINGS.get("gradnorm").params(lr=0.0)
    with pytest.raises(ValidationError):
        WEIGHTINGS.get("pcgrad").params(lr=0.1)


def trained_checkpoint(path: Path, weighting: str) -> None:
    model, strategy = model_and(weighting)
    settings = TrainSection(epochs=1, batch_size=16, early_stopping=None)
    optimizer = make_optimizer(settings, list(model.parameters()), list(strategy.capabilities.parameters))
    fit(model, strategy, tiny(), tiny(), settings, INPUTS.tasks, INPUTS.task_types, NullObserver(), optimizer)
    save_checkpoint(path, LoopState(epoch=2), model, optimizer, strategy, {})


def restored(path: Path, weighting: str) -> torch.optim.Optimizer:
    model, strategy = model_and(weighting)
    optimizer = make_optimizer(TrainSection(), list(model.parameters()), list(strategy.capabilities.parameters))
    load_checkpoint(path, model, optimizer, strategy)
    return optimizer


def test_a_checkpoint_of_the_one_group_format_is_migrated(tmp_path: Path) -> None:
    """Version 1 kept one group over [model..., strategy...] keyed by global index: the same order
    as the groups now, so its Adam moments load into the right parameters."""
    path = tmp_path / "v2.safetensors"
    trained_checkpoint(path, "uncertainty")
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    tensors = load_file(str(path))
    sizes = {"model": len(list(model_and("uncertainty")[0].parameters())), "strategy": 1}
    old = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            group, local, slot = key[len("optim.") :].split(".", 2)
            index = int(local) + (sizes["model"] if group == "strategy" else 0)
            old[f"optim.{index}.{slot}"] = value
        else:
            old[key] = value
    del metadata["checkpoint_version"], metadata["optimizer"]
    save_file(old, str(tmp_path / "v1.safetensors"), metadata=metadata)
    new, migrated = restored(path, "uncertainty"), restored(tmp_path / "v1.safetensors", "uncertainty")
    assert [g["name"] for g in migrated.param_groups] == ["model", "strategy"]
    assert migrated.param_groups[1]["weight_decay"] == 0.0
    ours, theirs = new.state_dict()["state"], migrated.state_dict()["state"]
    assert ours.keys() == theirs.keys() and len(ours) == sizes["model"] + 1
    for index in ours:
        for slot in ours[index]:
            assert torch.equal(ours[index][slot], theirs[index][slot]), (index, slot)


def test_a_checkpoint_whose_groups_do_not_fit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    trained_checkpoint(path, "uncertainty")
    with pytest.raises(ArtifactError, match=r"optimizer groups \(model, strategy\) do not fit this run's \(model\)"):
        restored(path, "equal")
