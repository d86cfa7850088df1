"""The loss-weighting contract and registry.

A strategy turns the per-task losses of one step into gradients on the model (it calls
backward itself, so strategies that need per-task gradients on the shared parameters can) and
returns the per-task weights it applied, for the metrics log.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from mtlcli.registry import Component, Registry

WEIGHTINGS: Registry[Component] = Registry("weighting strategy")


class WeightingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def own_lr(self) -> float | None:
        """The constant learning rate of the strategy's own parameters (None: ``train.lr``)."""
        return None


class WeightingStrategy(Protocol):
    def backward(self, losses: Tensor, model: nn.Module) -> Tensor:
        """Accumulate gradients for one step from ``losses`` [T]; return the weights used [T]."""
        ...

    def end_epoch(self, epoch: int, mean_losses: Tensor) -> None:
        """Called after each training epoch with the epoch's mean loss per task [T]."""
        ...

    def parameters(self) -> list[nn.Parameter]:
        """Learnable parameters of the strategy itself (optimised with the model's)."""
        ...


P = TypeVar("P", bound=BaseModel)
Builder = Callable[[P, list[str]], WeightingStrategy]


def register_weighting(
    name: str, params: type[P], summary: str, check: Callable[[Any, Any], list[tuple[str, str]]] | None = None
) -> Callable[[Builder[P]], Builder[P]]:
    """Decorator for a strategy's ``build(params, tasks) -> WeightingStrategy`` function."""

    def decorate(build: Builder[P]) -> Builder[P]:
        WEIGHTINGS.add(name, Component(name, params, build, summary, check))
        return build

    return decorate


def build_weighting(name: str, params: Any, tasks: list[str]) -> WeightingStrategy:
    return WEIGHTINGS.get(name).build(params, tasks)  # type: ignore[no-any-return]


class FixedWeights:
    """Backward on a fixed weighted sum: sum_k w_k * L_k. The base of the loss-only strategies."""

    def __init__(self, weights: Tensor) -> None:
        self.weights = weights

    def backward(self, losses: Tensor, model: nn.Module) -> Tensor:
        (losses * self.weights).sum().backward()
        return self.weights

    def end_epoch(self, epoch: int, mean_losses: Tensor) -> None:
        return None

    def parameters(self) -> list[nn.Parameter]:
        return []
