"""The step is a component: a scheme that declares its own step (``Capabilities.step``) trains
census through `mtl train`'s library path with it, and the loop never names it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mtlcli.data.batch import Batch
from mtlcli.models.base import SCHEMES, Capabilities, InputSpec, register_scheme
from mtlcli.models.mmoe import MMoE, MMoEParams
from mtlcli.recipe import load_recipe
from mtlcli.train.losses import task_loss_sums
from mtlcli.train.run import train_run
from mtlcli.train.step import StepAt, StepDone, StepParts


class CountingStep:
    """Its own step (the default's work, written out): forward, global losses, the weighting's
    backward through the exchange, the optimizer's step; counts its calls."""

    made: list[CountingStep] = []

    def __init__(self, parts: StepParts) -> None:
        self.parts, self.calls = parts, 0
        CountingStep.made.append(self)

    def __call__(self, batch: Batch, at: StepAt) -> StepDone:
        p = self.parts
        self.calls += 1
        p.optimizer.zero_grad()
        losses = p.exchange.losses(*task_loss_sums(p.model(batch), batch, p.binary, p.pos_weight))
        weights = p.exchange.backward(p.strategy, losses, p.model)
        p.optimizer.step(at.number)
        return StepDone(losses.detach(), weights.detach(), None)


class ToyStepMMoE(MMoE):
    capabilities = Capabilities(step=CountingStep)


@pytest.fixture
def toy_step() -> Iterator[str]:
    @register_scheme("toy_step", MMoEParams, "MMoE trained by a step of its own (a test fixture)")
    def build(params: MMoEParams, inputs: InputSpec) -> ToyStepMMoE:
        return ToyStepMMoE(inputs, **params.model_dump())

    CountingStep.made.clear()
    yield "toy_step"
    SCHEMES.remove("toy_step")


def test_a_declared_step_trains_census_for_an_epoch(toy_step: str, tmp_path: Path, census_file: Path) -> None:
    from tests.conftest import REPO

    sets = ["train.epochs=1", "train.early_stopping=null", "train.threads=1", f"data.cache_dir={tmp_path}/cache",
            f"data.source={census_file}", f"model.scheme={toy_step}"]  # fmt: skip
    summary = train_run(load_recipe(str(REPO / "recipes" / "census-mmoe.yaml"), sets), tmp_path / "run")
    (step,) = CountingStep.made
    assert step.calls == 59  # census train rows / 1024, every one through the declared step
    assert summary["scheme"] == "toy_step" and summary["valid"]["income"]["auc"] > 0.8
    assert (tmp_path / "run" / "summary.json").is_file() and torch.isfinite(torch.tensor(summary["train_seconds"]))
