"""PLE's dynamic loss weights: each task's weight decays geometrically.

Tang, Liu, Zhao, Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL)
Model for Personalized Recommendations", RecSys 2020 (joint loss optimisation):

    ω_k(t) = ω_k,0 · γ_k^t

t counts epochs (``per: epoch``; t = 0 in the first epoch) or optimisation steps (``per: step``;
t = 0 at the first step). ``initial`` gives ω_k,0 and ``rate`` gives γ_k per task; unlisted tasks
use 1.0 for both.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import NonNegativeFloat, PositiveFloat
from torch import Tensor, nn

from mtlcli.registry import did_you_mean
from mtlcli.weighting.base import StrategyCapabilities, WeightingParams, register_weighting


class PLEDecayParams(WeightingParams):
    initial: dict[str, NonNegativeFloat] = {}
    rate: dict[str, PositiveFloat] = {}
    per: Literal["epoch", "step"] = "epoch"


def check(params: PLEDecayParams, recipe: Any) -> list[tuple[str, str]]:
    tasks = list(recipe.tasks)
    return [
        (f"{key}.{name}", f"unknown task {name!r}{did_you_mean(name, tasks)}; tasks: {', '.join(tasks)}")
        for key, mapping in (("initial", params.initial), ("rate", params.rate))
        for name in mapping
        if name not in tasks
    ]


class PLEDecay:
    def __init__(self, initial: Tensor, rate: Tensor, per: str) -> None:
        self.initial, self.rate, self.per = initial, rate, per
        self.t = 0

    def current(self) -> Tensor:
        """ω(t) [T] for the current t."""
        return self.initial * self.rate**self.t

    @property
    def capabilities(self) -> StrategyCapabilities:
        return StrategyCapabilities(end_epoch=self.end_epoch, state=self)  # the step / epoch count

    def backward(self, losses: Tensor, model: nn.Module) -> Tensor:
        weights = self.current().to(losses.device, losses.dtype)
        (losses * weights).sum().backward()
        if self.per == "step":
            self.t += 1
        return weights

    def end_epoch(self, epoch: int, mean_losses: Tensor) -> None:
        if self.per == "epoch":
            self.t = epoch

    def state_dict(self) -> dict[str, Tensor]:
        return {"t": torch.tensor(self.t)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.t = int(state["t"])


@register_weighting("ple_decay", PLEDecayParams, "PLE's decaying weights ω_k,0·γ_k^t per epoch or step", check)
def build(params: PLEDecayParams, tasks: list[str]) -> PLEDecay:
    initial = torch.tensor([float(params.initial.get(t, 1.0)) for t in tasks], dtype=torch.float64)
    rate = torch.tensor([float(params.rate.get(t, 1.0)) for t in tasks], dtype=torch.float64)
    return PLEDecay(initial, rate, params.per)
