"""Uncertainty weighting: learned homoscedastic task uncertainty.

Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry
and Semantics", CVPR 2018. Each task has a learned log-variance s_k = log σ_k² and the update
follows

    L = Σ_k exp(-s_k) · L_k + s_k

which is twice the paper's regression form, 1/(2σ²)·L + log σ, used here for every task as in most
implementations (the paper's classification form halves only the s_k term). The s_k are
returned by ``parameters()``, which the optimiser trains in a group of their own (constant
``lr``, default ``train.lr``; no weight decay, no clipping); they start at
``init_log_variance``. The weights logged are exp(-s_k).
"""

from __future__ import annotations

import torch
from pydantic import PositiveFloat
from torch import Tensor, nn

from mtlcli.weighting.base import StrategyCapabilities, WeightingParams, register_weighting


class UncertaintyParams(WeightingParams):
    init_log_variance: float = 0.0
    lr: PositiveFloat | None = None  # the log-variances' own constant learning rate (default train.lr)

    def own_lr(self) -> float | None:
        return self.lr


class Uncertainty:
    def __init__(self, n_tasks: int, init: float) -> None:
        self.log_variance = nn.Parameter(torch.full((n_tasks,), float(init)))

    @property
    def capabilities(self) -> StrategyCapabilities:
        return StrategyCapabilities(parameters=(self.log_variance,))

    def backward(self, losses: Tensor, model: nn.Module) -> Tensor:
        s = self.log_variance
        (torch.exp(-s) * losses + s).sum().backward()
        return torch.exp(-s.detach())


@register_weighting("uncertainty", UncertaintyParams, "learned task uncertainty, exp(-s_k)·L_k + s_k (CVPR 2018)")
def build(params: UncertaintyParams, tasks: list[str]) -> Uncertainty:
    return Uncertainty(len(tasks), params.init_log_variance)
