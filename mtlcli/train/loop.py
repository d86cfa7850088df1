"""The training loop: epochs, batches, the weighting strategy's update, evaluation, early stopping.

Reporting (progress bars, metrics.jsonl, checkpoints) observes the loop through ``Observer``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlcli.data.batch import Batch, SplitTensors
from mtlcli.recipe.schema import EarlyStopping, TrainSection
from mtlcli.train.metrics import task_metrics
from mtlcli.weighting.base import WeightingStrategy

REPORT_EVERY = 25  # steps between progress callbacks


class Observer(Protocol):
    def on_start(self, epochs: int, steps_per_epoch: int) -> None: ...

    def on_step(self, epoch: int, step: int) -> None: ...

    def on_epoch(self, record: dict[str, Any], model: nn.Module, improved: bool) -> None: ...


class NullObserver:
    def on_start(self, epochs: int, steps_per_epoch: int) -> None:
        return None

    def on_step(self, epoch: int, step: int) -> None:
        return None

    def on_epoch(self, record: dict[str, Any], model: nn.Module, improved: bool) -> None:
        return None


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    best_epoch: int
    stopped_early: bool
    train_samples: int
    train_seconds: float
    best_metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_per_second(self) -> float:
        return self.train_samples / self.train_seconds if self.train_seconds > 0 else 0.0


def task_losses(logits: Tensor, batch: Batch, binary: Tensor) -> Tensor:
    """Per-task mean loss over each task's masked rows: BCE for binary, MSE for regression. [T]."""
    labels = batch.labels
    if bool(binary.all()):
        per_row = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    elif not bool(binary.any()):
        per_row = (logits - labels) ** 2
    else:
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        per_row = torch.where(binary, bce, (logits - labels) ** 2)
    mask = batch.label_mask.to(per_row.dtype)
    return (per_row * mask).sum(0) / mask.sum(0).clamp_min(1.0)


@torch.no_grad()
def predict_logits(model: nn.Module, data: SplitTensors, batch_size: int) -> Tensor:
    """Model outputs for a whole split, in eval mode: [N, T]."""
    was_training = model.training
    model.eval()
    outs = [model(batch) for batch in data.batches(batch_size)]
    model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros((0, data.labels.shape[1]))


def evaluate(
    model: nn.Module, data: SplitTensors, tasks: list[str], types: list[str], batch_size: int
) -> dict[str, Any]:
    """Per-task metrics on a split, plus each task's mean loss under ``loss``."""
    logits = predict_logits(model, data, batch_size)
    metrics = task_metrics(logits, data.labels, data.label_mask, tasks, types)
    binary = torch.tensor([t == "binary" for t in types])
    losses = task_losses(logits, data.all(), binary)
    for k, task in enumerate(tasks):
        metrics[task]["loss"] = float(losses[k])
    return metrics


class EarlyStopper:
    """Tracks the validation score and the best weights; says when patience has run out."""

    def __init__(self, settings: EarlyStopping | None, tasks: list[str]) -> None:
        self.settings = settings
        self.tasks = tasks
        self.best_score = -math.inf
        self.best_epoch = 0
        self.best_state: dict[str, Tensor] | None = None
        self.bad_epochs = 0

    def score(self, metrics: dict[str, Any]) -> float:
        if self.settings is None:
            return 0.0
        names = self.tasks if self.settings.task == "mean" else [self.settings.task]
        values = [metrics[t].get(self.settings.metric) for t in names]
        if any(v is None or math.isnan(v) for v in values):
            return -math.inf
        mean = sum(values) / len(values)
        return mean if self.settings.metric == "auc" else -mean

    def update(self, epoch: int, metrics: dict[str, Any], model: nn.Module) -> tuple[bool, bool]:
        """Record an epoch; returns (improved, stop)."""
        score = self.score(metrics)
        margin = self.settings.min_delta if self.settings else 0.0
        improved = self.settings is None or self.best_state is None or score > self.best_score + margin
        if improved:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.bad_epochs += 1
        stop = self.settings is not None and self.bad_epochs >= self.settings.patience
        return improved, stop


def make_optimizer(settings: TrainSection, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    if settings.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=settings.lr, weight_decay=settings.weight_decay, foreach=True)
    return torch.optim.SGD(params, lr=settings.lr, weight_decay=settings.weight_decay, momentum=0.9, foreach=True)


def fit(
    model: nn.Module,
    strategy: WeightingStrategy,
    train: SplitTensors,
    valid: SplitTensors,
    settings: TrainSection,
    tasks: list[str],
    types: list[str],
    observer: Observer,
) -> FitResult:
    """Train ``model`` with ``strategy``; afterwards the model holds the best epoch's weights."""
    optimizer = make_optimizer(settings, [*model.parameters(), *strategy.parameters()])
    shuffle = torch.Generator().manual_seed(settings.seed)
    stopper = EarlyStopper(settings.early_stopping, tasks)
    binary = torch.tensor([t == "binary" for t in types])
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    observer.on_start(settings.epochs, steps_per_epoch)
    history: list[dict[str, Any]] = []
    samples, seconds, stopped = 0, 0.0, False
    for epoch in range(1, settings.epochs + 1):
        model.train()
        loss_sum = torch.zeros(len(tasks))
        weight_sum = torch.zeros(len(tasks))
        started = time.perf_counter()
        for step, batch in enumerate(train.batches(settings.batch_size, True, shuffle), start=1):
            optimizer.zero_grad(set_to_none=True)
            losses = task_losses(model(batch), batch, binary)
            weights = strategy.backward(losses, model)
            optimizer.step()
            loss_sum += losses.detach()
            weight_sum += weights.detach()
            if step % REPORT_EVERY == 0:
                observer.on_step(epoch, step)
        elapsed = time.perf_counter() - started
        samples += len(train)
        seconds += elapsed
        strategy.end_epoch(epoch, loss_sum / steps_per_epoch)
        valid_metrics = evaluate(model, valid, tasks, types, settings.eval_batch_size)
        improved, stopped = stopper.update(epoch, valid_metrics, model)
        stopped = stopped and epoch < settings.epochs
        record = {
            "epoch": epoch,
            "train_loss": dict(zip(tasks, (loss_sum / steps_per_epoch).tolist(), strict=True)),
            "weights": dict(zip(tasks, (weight_sum / steps_per_epoch).tolist(), strict=True)),
            "valid": valid_metrics,
            "seconds": elapsed,
            "samples_per_second": len(train) / elapsed if elapsed > 0 else 0.0,
            "best_epoch": stopper.best_epoch,
        }
        history.append(record)
        observer.on_epoch(record, model, improved)
        if stopped:
            break
    if stopper.best_state is not None:
        model.load_state_dict(stopper.best_state)
    best = history[stopper.best_epoch - 1]["valid"] if history else {}
    return FitResult(history, stopper.best_epoch, stopped, samples, seconds, best)
