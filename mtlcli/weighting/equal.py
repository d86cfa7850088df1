"""Equal weighting: the update follows the plain sum of the task losses, sum_k L_k."""

from __future__ import annotations

import torch

from mtlcli.weighting.base import FixedWeights, WeightingParams, register_weighting


class EqualParams(WeightingParams):
    pass


@register_weighting("equal", EqualParams, "sum of the task losses, all weights 1")
def build(params: EqualParams, tasks: list[str]) -> FixedWeights:
    return FixedWeights(torch.ones(len(tasks)))
