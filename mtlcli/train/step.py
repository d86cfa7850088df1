"""One training step as a component. ``DefaultStep``: the forward pass, the global losses, the
weighting's backward pass through the exchange, the optimizer's step. A scheme that trains
otherwise (parameter groups updated in turn, tasks in turn) declares its own step maker in its
capabilities (``Capabilities.step``); the loop asks for it and never knows its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from mtlcli.data.batch import Batch
from mtlcli.models.base import scheme
from mtlcli.models.blocks import trainable_tensors
from mtlcli.recipe.schema import TrainSection
from mtlcli.train.exchange import Exchange
from mtlcli.train.losses import check_finite, task_loss_sums
from mtlcli.weighting.base import WeightingStrategy
from mtlcli.weighting.gradients import shared_task_gradients

if TYPE_CHECKING:  # the optimizer's module imports the models, whose schemes import this one
    from mtlcli.objectives.base import TrainingObjective
    from mtlcli.train.optimizer import TrainingOptimizer


@dataclass(frozen=True)
class StepParts:
    """The built components a step works with. ``binary`` [T] marks the binary tasks,
    ``pos_weight`` [T] (or None) weighs their positive rows; ``objective`` the recipe's training
    objective (CrossDistil), which then makes the step."""

    model: nn.Module
    strategy: WeightingStrategy
    optimizer: TrainingOptimizer
    exchange: Exchange
    settings: TrainSection
    tasks: list[str]
    binary: Tensor
    pos_weight: Tensor | None
    device: torch.device
    objective: TrainingObjective | None = None


@dataclass(frozen=True)
class StepAt:
    """Where a step is: its epoch, its number in the epoch and over the run (1-based)."""

    epoch: int
    in_epoch: int
    number: int


@dataclass(frozen=True)
class StepDone:
    """A step's global losses [T] and weights [T] (detached), and the tasks' gradients on the
    shared parameters [T, P] when ``train.track_gradients`` sampled this step. ``tallies``: what a
    scheme's own step counts over the epoch so far (name -> count); the epoch's record carries the
    epoch's last step's."""

    losses: Tensor
    weights: Tensor
    gradients: Tensor | None
    tallies: dict[str, float] = field(default_factory=dict)


class Step(Protocol):
    def __call__(self, batch: Batch, at: StepAt) -> StepDone:
        """Train on one batch (on the model's device)."""
        ...


class DefaultStep:
    """Forward (through the exchange), the global losses, the weighting's backward pass, one
    optimizer step; every ``train.track_gradients`` steps the tasks' gradients on the shared
    parameters, summed over the ranks, are taken first."""

    def __init__(self, parts: StepParts) -> None:
        self.parts = parts
        self.forward = parts.exchange.bind(parts.model)
        track = parts.settings.track_gradients
        self.track = track or 0
        self.shared = scheme(parts.model).parameter_groups()["shared"] if track else {}
        self.terms = scheme(parts.model).capabilities.loss_terms

    def __call__(self, batch: Batch, at: StepAt) -> StepDone:
        p = self.parts
        p.optimizer.zero_grad()
        losses, balanced = self.global_losses(batch)
        check_finite(balanced, p.tasks, at)
        grads = None
        if self.track and at.number % self.track == 0:
            shared = list(trainable_tensors(p.model, self.shared).values())
            grads = p.exchange.ranks.sum(shared_task_gradients(balanced, shared)) if shared else None
        weights = p.exchange.backward(p.strategy, balanced, p.model)
        p.optimizer.step(at.number)
        return StepDone(losses.detach(), weights.detach(), grads)

    def global_losses(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The global batch's mean task losses [T], with this rank's part as gradient (alone: the
        batch's), and what the weighting balances [T]: the same, plus each of the scheme's own loss
        terms (``Capabilities.loss_terms``) on its task; both from one exchange of the sums."""
        p = self.parts
        logits = self.forward(batch)
        sums, counts = task_loss_sums(logits, batch, p.binary, p.pos_weight)
        terms = self.terms(logits, batch) if self.terms is not None else None
        if terms is None:
            losses = p.exchange.losses(sums, counts)
            return losses, losses
        tasks = len(p.tasks)
        both = p.exchange.losses(torch.cat([sums, terms[0]]), torch.cat([counts, terms[1]]))
        losses = both[:tasks]
        return losses, losses + both[tasks:]
