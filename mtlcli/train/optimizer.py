"""One optimizer for a run: the dense parameter groups, the tables that train row-wise, the
learning-rate schedule and the gradient clipping, behind one ``step()``.

The dense groups are one torch optimizer (``make_optimizer``: the model's parameters and the
weighting's own); a table that trains row-wise keeps its lazy-Adam moments beside its rows
(``FeatureEmbedding.update_rows``) and is stepped here at the model group's learning rate.
Checkpoints save both (``mtlcli.train.checkpoint``: the groups by name, the rows by table).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mtlcli.models.blocks import FeatureEmbedding, sparse_embeddings
from mtlcli.recipe.schema import LrSchedule, TrainSection
from mtlcli.weighting.base import WeightingStrategy

if TYPE_CHECKING:
    from mtlcli.objectives.base import TrainingObjective

MODEL_GROUP, STRATEGY_GROUP, OBJECTIVE_GROUP = "model", "strategy", "objective"


def make_optimizer(
    settings: TrainSection,
    model_params: list[nn.Parameter],
    strategy_params: list[nn.Parameter],
    strategy_lr: float | None = None,
    objective_params: list[nn.Parameter] | None = None,
    objective_lr: float | None = None,
) -> torch.optim.Optimizer:
    """``train.optimizer`` over named parameter groups, each saying how the step treats it:

    - ``model``: the model's parameters, at ``train.lr`` under ``train.lr_schedule``, with
      ``train.weight_decay`` and clipped by ``train.clip_grad_norm``;
    - ``strategy`` (when the weighting has parameters: uncertainty's log-variances, GradNorm's
      weights): a constant learning rate of their own (``strategy_lr``, the weighting's ``lr``;
      default ``train.lr``), no weight decay, no clipping. Weight decay would pull a log-variance
      toward 0 (σ = 1) and GradNorm's weights toward 0, and neither is a model weight to regularise;
    - ``objective`` (when the training objective has parameters: CrossDistil's teachers and
      calibrators): at ``objective_lr`` (default ``train.lr``) under the schedule, clipped, no
      weight decay.

    Each group carries ``name``, ``base_lr``, ``scheduled`` and ``clipped``; checkpoints key the
    optimizer state by group name (``mtlcli.train.checkpoint``), so further groups can be added.
    """
    groups = [param_group(MODEL_GROUP, model_params, settings.lr, settings.weight_decay, scheduled=True, clipped=True)]
    if strategy_params:
        lr = strategy_lr if strategy_lr is not None else settings.lr
        groups.append(param_group(STRATEGY_GROUP, strategy_params, lr, 0.0, scheduled=False, clipped=False))
    if objective_params:
        lr = objective_lr if objective_lr is not None else settings.lr
        groups.append(param_group(OBJECTIVE_GROUP, objective_params, lr, 0.0, scheduled=True, clipped=True))
    if settings.optimizer == "adam":
        return torch.optim.Adam(groups, lr=settings.lr, fused=True)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr, fused=True)
    if settings.optimizer == "adagrad":
        return torch.optim.Adagrad(groups, lr=settings.lr, foreach=True)
    return torch.optim.SGD(groups, lr=settings.lr, momentum=0.9, foreach=True)


def param_group(
    name: str, params: list[nn.Parameter], lr: float, weight_decay: float, *, scheduled: bool, clipped: bool
) -> dict[str, Any]:
    """One named group of ``make_optimizer`` starting at ``lr``, which is also its ``base_lr``
    (the rate the schedule scales when the group is ``scheduled``)."""
    return {"name": name, "params": params, "lr": lr, "base_lr": lr, "weight_decay": weight_decay,
            "scheduled": scheduled, "clipped": clipped}  # fmt: skip


def lr_factor(schedule: LrSchedule, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The factor on ``train.lr`` for update number ``step`` (0-based, counted over the run)."""
    warm = (step + 1) / schedule.warmup_steps if step < schedule.warmup_steps else 1.0
    if schedule.kind == "step":
        return warm * schedule.gamma ** ((step // steps_per_epoch) // schedule.every_epochs)
    if schedule.kind == "constant":
        return warm
    span = max(1, total_steps - 1 - schedule.warmup_steps)
    progress = min(1.0, max(0.0, (step - schedule.warmup_steps) / span))
    low = schedule.min_ratio
    if schedule.kind == "cosine":
        return warm * (low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    return warm * (1.0 - (1.0 - low) * progress)


class TrainingOptimizer:
    """The dense groups (``dense``: one torch optimizer), the row-wise tables, the schedule and the
    clipping of one run. A step that updates some parameters only (alternating updates) leaves the
    others' gradients unset: the dense step passes them by (their moments wait too)."""

    def __init__(
        self,
        dense: torch.optim.Optimizer,
        settings: TrainSection,
        tables: list[tuple[str, FeatureEmbedding]],
        steps_per_epoch: int,
    ) -> None:
        self.dense, self.settings, self.tables, self.steps_per_epoch = dense, settings, tables, steps_per_epoch
        schedule = settings.lr_schedule
        self.scheduled = schedule.kind != "constant" or schedule.warmup_steps > 0
        self.clipped = [p for group in dense.param_groups if group.get("clipped", True) for p in group["params"]]

    @classmethod
    def build(
        cls,
        settings: TrainSection,
        model: nn.Module,
        strategy: WeightingStrategy,
        steps_per_epoch: int,
        strategy_lr: float | None = None,
        dense: torch.optim.Optimizer | None = None,
        objective: TrainingObjective | None = None,
    ) -> TrainingOptimizer:
        """The run's optimizer over ``model``, ``strategy``'s own parameters and the training
        ``objective``'s (``dense``: the torch optimizer of a checkpoint already loaded, else a new one)."""
        own = list(strategy.capabilities.parameters)
        extra, extra_lr = (objective.parameters(), objective.lr) if objective is not None else ([], None)
        dense = dense or make_optimizer(settings, list(model.parameters()), own, strategy_lr, extra, extra_lr)
        return cls(dense, settings, sparse_embeddings(model), steps_per_epoch)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.dense.param_groups

    @property
    def lr(self) -> float:
        """The model group's learning rate now."""
        return float(self.dense.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return self.dense.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dense.load_state_dict(state)

    def zero_grad(self) -> None:
        self.dense.zero_grad(set_to_none=True)

    def step(self, number: int) -> None:
        """Update number ``number`` (1-based, over the run): the scheduled groups' learning rate,
        clipping of the model's gradients (the row-wise tables' rows included), the dense step,
        then each row-wise table at the model's learning rate."""
        settings = self.settings
        if self.scheduled:
            total = settings.epochs * self.steps_per_epoch
            factor = lr_factor(settings.lr_schedule, number - 1, total, self.steps_per_epoch)
            for group in self.dense.param_groups:
                if group.get("scheduled", True):
                    group["lr"] = group.get("base_lr", settings.lr) * factor
        if settings.clip_grad_norm is not None:
            rows = [m.rows for _, m in self.tables if m.rows is not None]
            torch.nn.utils.clip_grad_norm_([*self.clipped, *rows], settings.clip_grad_norm)
        self.dense.step()
        for _, table in self.tables:
            table.update_rows(self.lr)
