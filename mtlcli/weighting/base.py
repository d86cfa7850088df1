"""The loss-weighting contract and registry.

A strategy turns the per-task losses of one step into gradients on the model (it calls
backward itself, so strategies that need per-task gradients on the shared parameters can) and
returns the per-task weights it applied, for the metrics log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from mtlcli.registry import Component, Registry

WEIGHTINGS: Registry[Component] = Registry("weighting strategy")


class WeightingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def own_lr(self) -> float | None:
        """The constant learning rate of the strategy's own parameters (None: ``train.lr``)."""
        return None


class Stateful(Protocol):
    """State a strategy keeps besides its parameters (a step count, loss history, a generator),
    saved in checkpoints so that a resumed run continues exactly."""

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


class SeededDraws:
    """A strategy's random draws: a torch generator seeded once, whose state is its checkpointed
    state (``Stateful``), so that a resumed run draws what it would have drawn."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"].to(torch.uint8))


@dataclass(frozen=True)
class StrategyCapabilities:
    """What a strategy does beyond ``backward``, declared by the strategy itself (its
    ``capabilities``); the training loop and checkpoints ask here and never probe.

    - ``parameters``: learnable parameters of the strategy itself (their own optimizer group);
    - ``end_epoch(epoch, mean_losses [T])``: called after each training epoch;
    - ``state``: state to checkpoint (``Stateful``);
    - ``needs_representation``: ``backward`` reads the scheme's shared representation (MGDA-UB),
      which the loop then has the model keep;
    - ``task_gradients``: ``backward`` takes per-task gradients (``autograd.grad``) and on several
      processes sums them itself over ``distributed.backward_ranks()``. DDP's hooks never see such gradients,
      so the loop runs these strategies' steps on the bare model; the others' plain backward
      pass goes through ``DistributedDataParallel``.
    """

    parameters: tuple[nn.Parameter, ...] = ()
    end_epoch: Callable[[int, Tensor], None] | None = None
    state: Stateful | None = None
    needs_representation: bool = False
    task_gradients: bool = False


class WeightingStrategy(Protocol):
    def backward(self, losses: Tensor, model: nn.Module) -> Tensor:
        """Accumulate gradients for one step from ``losses`` [T]; return the weights used [T]."""
        ...

    @property
    def capabilities(self) -> StrategyCapabilities: ...


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


def weightings_by_gradients(tasks: list[str]) -> tuple[list[str], list[str]]:
    """The registered weightings split by what they declare (``task_gradients``, each built with
    its default parameters over ``tasks``): (those that combine the tasks' gradients themselves,
    those that weigh the losses). For refusals that name both sides without naming any weighting
    in their own code."""
    combining: list[str] = []
    weighing: list[str] = []
    for name in WEIGHTINGS.names():
        strategy = build_weighting(name, WEIGHTINGS.get(name).params(), tasks)
        (combining if strategy.capabilities.task_gradients else weighing).append(name)
    return combining, weighing


class FixedWeights:
    """Backward on a fixed weighted sum: sum_k w_k * L_k. The base of the loss-only strategies."""

    def __init__(self, weights: Tensor) -> None:
        self.weights = weights

    @property
    def capabilities(self) -> StrategyCapabilities:
        return StrategyCapabilities()

    def backward(self, losses: Tensor, model: nn.Module) -> Tensor:
        (losses * self.weights.to(losses.device)).sum().backward()
        return self.weights
