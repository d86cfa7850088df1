"""Random loss weighting (RLW).

Lin, Ye, Zhang, Tsang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
Multi-Task Learning", TMLR 2022. Every step draws λ̃ ~ N(0, I_K) and uses λ = softmax(λ̃):

    L = Σ_k λ_k · L_k

As in the paper, the weights lie on the simplex (they sum to 1, not to K). The draws come from a
generator seeded with ``seed``, so a run is reproducible.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtlcli.weighting.base import SeededDraws, StrategyCapabilities, WeightingParams, register_weighting


class RLWParams(WeightingParams):
    seed: int = 0


class RLW:
    def __init__(self, n_tasks: int, seed: int) -> None:
        self.n_tasks = n_tasks
        self.draws = SeededDraws(seed)

    @property
    def capabilities(self) -> StrategyCapabilities:
        return StrategyCapabilities(state=self.draws)  # where the weights' draws are

    def backward(self, losses: Tensor, model: nn.Module) -> Tensor:
        weights = torch.softmax(torch.randn(self.n_tasks, generator=self.draws.generator), dim=0).to(losses.device)
        (losses * weights).sum().backward()
        return weights


@register_weighting("rlw", RLWParams, "random weights softmax(N(0, I)) drawn every step (TMLR 2022)")
def build(params: RLWParams, tasks: list[str]) -> RLW:
    return RLW(len(tasks), params.seed)
