"""Static weighting: fixed per-task weights from the recipe, sum_k w_k L_k (unlisted tasks: 1)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import NonNegativeFloat

from mtlcli.registry import did_you_mean
from mtlcli.weighting.base import FixedWeights, WeightingParams, register_weighting


class StaticParams(WeightingParams):
    weights: dict[str, NonNegativeFloat] = {}


def check(params: StaticParams, recipe: Any) -> list[tuple[str, str]]:
    tasks = list(recipe.tasks)
    return [
        (f"weights.{name}", f"unknown task {name!r}{did_you_mean(name, tasks)}; tasks: {', '.join(tasks)}")
        for name in params.weights
        if name not in tasks
    ]


@register_weighting("static", StaticParams, "fixed per-task weights given in the recipe", check)
def build(params: StaticParams, tasks: list[str]) -> FixedWeights:
    return FixedWeights(torch.tensor([float(params.weights.get(t, 1.0)) for t in tasks]))
