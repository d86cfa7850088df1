"""Dynamic Weight Average (DWA).

Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019:

    w_k(t) = K · exp(r_k(t-1) / τ) / Σ_i exp(r_i(t-1) / τ),   r_k(t-1) = L_k(t-1) / L_k(t-2)

with L_k(t) the mean training loss of task k over epoch t, K the number of tasks and τ the
``temperature``. The first two epochs, which have no two previous losses, use w_k = 1.
"""

from __future__ import annotations

import torch
from pydantic import PositiveFloat
from torch import Tensor

from mtlcli.weighting.base import FixedWeights, StrategyCapabilities, WeightingParams, register_weighting


class DWAParams(WeightingParams):
    temperature: PositiveFloat = 2.0


def dwa_weights(previous: Tensor, before: Tensor, temperature: float) -> Tensor:
    """K · softmax(r / τ) with r = previous / before (epoch mean losses [T])."""
    ratio = previous / before.clamp_min(1e-12)
    return len(ratio) * torch.softmax(ratio / temperature, dim=0)


class DWA(FixedWeights):
    """Backward on the weighted sum (as ``FixedWeights``), with weights that change each epoch."""

    def __init__(self, n_tasks: int, temperature: float) -> None:
        super().__init__(torch.ones(n_tasks))
        self.temperature = temperature
        self.history: list[Tensor] = []

    @property
    def capabilities(self) -> StrategyCapabilities:
        return StrategyCapabilities(end_epoch=self.end_epoch, state=self)  # the last epochs' losses

    def end_epoch(self, epoch: int, mean_losses: Tensor) -> None:
        self.history = [*self.history[-1:], mean_losses.detach().clone()]
        if len(self.history) == 2:
            self.weights = dwa_weights(self.history[1], self.history[0], self.temperature)

    def state_dict(self) -> dict[str, Tensor]:
        """The loss history and the current weights, for checkpoints (resume)."""
        return {
            "history": torch.stack(self.history) if self.history else torch.zeros(0, len(self.weights)),
            "weights": self.weights,
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.history = list(state["history"].unbind(0))
        self.weights = state["weights"].clone()


@register_weighting("dwa", DWAParams, "dynamic weight average from the last two epochs' losses (CVPR 2019)")
def build(params: DWAParams, tasks: list[str]) -> DWA:
    return DWA(len(tasks), params.temperature)
