"""The training loop: epochs, batches, the weighting strategy's update, evaluation, early stopping.

Reporting (progress bars, metrics.jsonl, checkpoints) observes the loop through ``Observer``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlcli import distributed
from mtlcli.data.batch import Batch
from mtlcli.data.source import BatchSource
from mtlcli.distributed import model_device
from mtlcli.errors import MtlError
from mtlcli.models.base import enable_representation, scheme
from mtlcli.models.blocks import sparse_embeddings, trainable_tensors
from mtlcli.recipe.schema import EarlyStopping, LrSchedule, TrainSection
from mtlcli.train.metrics import task_metrics
from mtlcli.weighting.base import WeightingStrategy
from mtlcli.weighting.gradients import shared_task_gradients

REPORT_EVERY = 25  # steps between progress callbacks


class Observer(Protocol):
    def on_start(self, epochs: int, steps_per_epoch: int) -> None: ...

    def on_step(self, epoch: int, step: int) -> None: ...

    def on_epoch(self, record: dict[str, Any], model: nn.Module, improved: bool) -> None: ...

    def on_checkpoint(
        self, state: LoopState, model: nn.Module, optimizer: torch.optim.Optimizer, strategy: WeightingStrategy
    ) -> None: ...

    def on_gradients(self, record: dict[str, Any]) -> None: ...


class NullObserver:
    def on_start(self, epochs: int, steps_per_epoch: int) -> None:
        return None

    def on_step(self, epoch: int, step: int) -> None:
        return None

    def on_epoch(self, record: dict[str, Any], model: nn.Module, improved: bool) -> None:
        return None

    def on_checkpoint(
        self, state: LoopState, model: nn.Module, optimizer: torch.optim.Optimizer, strategy: WeightingStrategy
    ) -> None:
        return None

    def on_gradients(self, record: dict[str, Any]) -> None:
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


def task_losses(logits: Tensor, batch: Batch, binary: Tensor, pos_weight: Tensor | None = None) -> Tensor:
    """Per-task mean loss over each task's masked rows: BCE for binary (positive rows weighted by
    ``pos_weight`` [T] when given), MSE for regression. [T]."""
    sums, counts = task_loss_sums(logits, batch, binary, pos_weight)
    return sums / counts.clamp_min(1.0)


def task_loss_sums(
    logits: Tensor, batch: Batch, binary: Tensor, pos_weight: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Each task's loss summed over its masked rows [T], and the count of those rows [T]."""
    labels = batch.labels
    if bool(binary.all()):
        per_row = F.binary_cross_entropy_with_logits(logits, labels, reduction="none", pos_weight=pos_weight)
    elif not bool(binary.any()):
        per_row = (logits - labels) ** 2
    else:
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none", pos_weight=pos_weight)
        per_row = torch.where(binary, bce, (logits - labels) ** 2)
    mask = batch.label_mask.to(per_row.dtype)
    return (per_row * mask).sum(0), mask.sum(0)


@torch.no_grad()
def predict_logits(model: nn.Module, data: BatchSource, batch_size: int) -> Tensor:
    """Model outputs for a whole split, in eval mode: [N, T]."""
    return _predict(model, data, batch_size)[0]


@torch.no_grad()
def _predict(model: nn.Module, data: BatchSource, batch_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Outputs [N, T] for a split, in order, with its labels, masks and groups, gathered batch by
    batch (a streamed split is never whole in memory: only N x T scores and labels are kept)."""
    was_training = model.training
    model.eval()
    ranks = distributed.current()  # on several ranks, each scores its slice of every batch
    device = model_device(model)
    outs, labels, masks, groups = [], [], [], []
    for batch in data.batches(batch_size, rank=ranks.rank, world=ranks.world):
        outs.append(model(batch.to(device)).cpu())
        labels.append(batch.labels)
        masks.append(batch.label_mask)
        if batch.groups is not None:
            groups.append(batch.groups)
    model.train(was_training)
    tasks = len(scheme(model).tasks)
    out = torch.cat(outs) if outs else torch.zeros((0, tasks))
    label = torch.cat(labels) if labels else torch.zeros((0, tasks))
    mask = torch.cat(masks) if masks else torch.zeros((0, tasks), dtype=torch.bool)
    group = torch.cat(groups) if groups else None
    if ranks.active:  # the ranks' rows, in rank order (metrics do not depend on the order)
        out, label, mask = ranks.gather(out), ranks.gather(label), ranks.gather(mask)
        group = ranks.gather(group) if group is not None else None
    return out, label, mask, group


def evaluate(
    model: nn.Module,
    data: BatchSource,
    tasks: list[str],
    types: list[str],
    batch_size: int,
    pos_weight: Tensor | None = None,
) -> dict[str, Any]:
    """Per-task metrics on a split, plus each task's mean loss under ``loss`` (the training loss,
    with ``pos_weight``)."""
    logits, labels, mask, groups = _predict(model, data, batch_size)
    metrics = task_metrics(logits, labels, mask, tasks, types, groups)
    binary = torch.tensor([t == "binary" for t in types])
    nothing = torch.zeros((len(labels), 0))
    losses = task_losses(logits, Batch(nothing.long(), nothing, labels, mask), binary, pos_weight)
    for k, task in enumerate(tasks):
        metrics[task]["loss"] = float(losses[k])
    return metrics


@dataclass
class LoopState:
    """Everything besides the model, optimizer and strategy that training needs to go on exactly
    where it stopped: checkpoints save it, ``--resume`` restores it.

    ``epoch`` is the epoch in progress (1-based) and ``step`` the batches of it already done;
    ``shuffle_state`` is the shuffling generator's state at the start of that epoch, so an
    interrupted epoch replays the same order and skips the done batches.
    """

    epoch: int = 1
    step: int = 0
    shuffle_state: Tensor | None = None
    torch_rng: Tensor | None = None
    loss_sum: Tensor | None = None
    weight_sum: Tensor | None = None
    epoch_seconds: float = 0.0
    samples: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    best_state: dict[str, Tensor] | None = None
    stopped_early: bool = False


class EarlyStopper:
    """Tracks the validation score and the best weights (in ``state``); says when patience has run out."""

    def __init__(self, settings: EarlyStopping | None, tasks: list[str], state: LoopState) -> None:
        self.settings = settings
        self.tasks = tasks
        self.state = state

    def score(self, metrics: dict[str, Any]) -> float:
        if self.settings is None:
            return 0.0
        names = self.tasks if self.settings.task == "mean" else [self.settings.task]
        values = [metrics[t].get(self.settings.metric) for t in names]
        if any(v is None or math.isnan(v) for v in values):
            return -math.inf
        mean = sum(values) / len(values)
        return mean if self.settings.metric in ("auc", "gauc") else -mean

    def update(self, epoch: int, metrics: dict[str, Any], model: nn.Module) -> tuple[bool, bool]:
        """Record an epoch; returns (improved, stop)."""
        state = self.state
        score = self.score(metrics)
        margin = self.settings.min_delta if self.settings else 0.0
        improved = self.settings is None or state.best_state is None or score > state.best_score + margin
        if improved:
            state.best_score, state.best_epoch, state.bad_epochs = score, epoch, 0
            state.best_state = copy.deepcopy(model.state_dict())
        else:
            state.bad_epochs += 1
        stop = self.settings is not None and state.bad_epochs >= self.settings.patience
        return improved, stop


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


MODEL_GROUP, STRATEGY_GROUP = "model", "strategy"


def make_optimizer(
    settings: TrainSection,
    model_params: list[nn.Parameter],
    strategy_params: list[nn.Parameter],
    strategy_lr: float | None = None,
) -> torch.optim.Optimizer:
    """``train.optimizer`` over named parameter groups, each saying how the loop treats it:

    - ``model``: the model's parameters, at ``train.lr`` under ``train.lr_schedule``, with
      ``train.weight_decay`` and clipped by ``train.clip_grad_norm``;
    - ``strategy`` (when the weighting has parameters: uncertainty's log-variances, GradNorm's
      weights): a constant learning rate of their own (``strategy_lr``, the weighting's ``lr``;
      default ``train.lr``), no weight decay, no clipping. Weight decay would pull a log-variance
      toward 0 (σ = 1) and GradNorm's weights toward 0, and neither is a model weight to regularise.

    Each group carries ``name``, ``base_lr``, ``scheduled`` and ``clipped``; checkpoints key the
    optimizer state by group name (``mtlcli.train.checkpoint``), so further groups can be added.
    """
    groups: list[dict[str, Any]] = [
        {"name": MODEL_GROUP, "params": model_params, "lr": settings.lr, "base_lr": settings.lr,
         "weight_decay": settings.weight_decay, "scheduled": True, "clipped": True},
    ]  # fmt: skip
    if strategy_params:
        lr = strategy_lr if strategy_lr is not None else settings.lr
        groups.append(
            {"name": STRATEGY_GROUP, "params": strategy_params, "lr": lr, "base_lr": lr,
             "weight_decay": 0.0, "scheduled": False, "clipped": False}
        )  # fmt: skip
    if settings.optimizer == "adam":
        return torch.optim.Adam(groups, lr=settings.lr, fused=True)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr, fused=True)
    if settings.optimizer == "adagrad":
        return torch.optim.Adagrad(groups, lr=settings.lr, foreach=True)
    return torch.optim.SGD(groups, lr=settings.lr, momentum=0.9, foreach=True)


def gradient_record(
    grads: Tensor, weights: Tensor, tasks: list[str], epoch: int, step_in_epoch: int, step: int
) -> dict[str, Any]:
    """One ``train.track_gradients`` sample: cosine between the tasks' gradients on the shared
    parameters (grads [T, P]), their norms, and the loss weights of the step."""
    g = grads.double()  # float64 and symmetrised, as explain's cosines
    norms = g.norm(dim=1)
    unit = g / norms.clamp_min(1e-12).unsqueeze(1)
    dots = unit @ unit.T
    cosine = ((dots + dots.T) / 2).tolist()
    return {
        "kind": "gradients",
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "step": step,
        "gradient_cosine": {a: {b: cosine[i][j] for j, b in enumerate(tasks)} for i, a in enumerate(tasks)},
        "gradient_norm": dict(zip(tasks, norms.tolist(), strict=True)),
        "weights": dict(zip(tasks, weights.detach().tolist(), strict=True)),
    }


class TrainingDiverged(distributed.SameOnEveryRank):
    """A task's loss became NaN or infinite (the loss values are global: every rank sees it)."""


class TrainingInterrupted(MtlError):
    """Training stopped on request (SIGINT / SIGTERM) after saving a checkpoint."""


def fit(
    model: nn.Module,
    strategy: WeightingStrategy,
    train: BatchSource,
    valid: BatchSource,
    settings: TrainSection,
    tasks: list[str],
    types: list[str],
    observer: Observer,
    optimizer: torch.optim.Optimizer | None = None,
    state: LoopState | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    pos_weight: Tensor | None = None,
) -> FitResult:
    """Train ``model`` with ``strategy``; afterwards the model holds the best epoch's weights.

    Pass the ``optimizer`` and ``state`` of a checkpoint to continue an interrupted run. When
    ``stop_requested()`` turns true, the current step finishes, ``observer.on_checkpoint`` saves
    the state and TrainingInterrupted is raised.
    """
    abilities = strategy.capabilities
    optimizer = optimizer or make_optimizer(settings, list(model.parameters()), list(abilities.parameters))
    if abilities.needs_representation:
        enable_representation(model)
    state = state or LoopState()
    shuffle = torch.Generator().manual_seed(settings.seed)
    if state.torch_rng is not None:
        torch.set_rng_state(state.torch_rng)
    stopper = EarlyStopper(settings.early_stopping, tasks, state)
    binary = torch.tensor([t == "binary" for t in types])
    steps_per_epoch = train.steps(settings.batch_size)
    observer.on_start(settings.epochs, steps_per_epoch)
    every = settings.checkpoint_every
    track = settings.track_gradients
    schedule = settings.lr_schedule
    scheduled = schedule.kind != "constant" or schedule.warmup_steps > 0
    total_steps = settings.epochs * steps_per_epoch
    clipped = [p for group in optimizer.param_groups if group.get("clipped", True) for p in group["params"]]
    shared_named = scheme(model).parameter_groups()["shared"] if track else {}
    row_wise = sparse_embeddings(model)
    ranks = distributed.current()
    own_parameters = list(abilities.parameters)
    device = model_device(model)
    binary = binary.to(device)
    # a plain backward pass goes through DDP (its all-reduce overlaps the backward pass); a
    # strategy that takes per-task gradients exchanges them itself, on the bare model
    ddp = ranks.active and not abilities.task_gradients
    forward = distributed.data_parallel(model, ranks) if ddp else model
    checked = False
    while state.epoch <= settings.epochs and not state.stopped_early:
        epoch = state.epoch
        if state.shuffle_state is not None:
            shuffle.set_state(state.shuffle_state)
        state.shuffle_state = shuffle.get_state()
        if state.step == 0:
            state.loss_sum, state.weight_sum = torch.zeros(len(tasks)), torch.zeros(len(tasks))
            state.epoch_seconds = 0.0
        assert state.loss_sum is not None and state.weight_sum is not None
        model.train()
        started = time.perf_counter()
        for batch in train.batches(settings.batch_size, True, shuffle, state.step, ranks.rank, ranks.world):
            batch = batch.to(device)
            optimizer.zero_grad(set_to_none=True)
            # the global batch's mean losses, with this rank's part as gradient (alone: the batch's)
            losses = distributed.global_losses(*task_loss_sums(forward(batch), batch, binary, pos_weight), ranks)
            if not bool(torch.isfinite(losses).all()):
                bad = [t for t, ok in zip(tasks, torch.isfinite(losses).tolist(), strict=True) if not ok]
                raise TrainingDiverged(
                    f"the loss of task {', '.join(bad)} became NaN or infinite at epoch {epoch}, step {state.step + 1}",
                    "lower train.lr, check the labels and numeric transforms; the last checkpoint is kept",
                )
            global_step = (epoch - 1) * steps_per_epoch + state.step + 1
            tracked = track and global_step % track == 0
            shared = list(trainable_tensors(model, shared_named).values()) if tracked else []
            grads = ranks.sum(shared_task_gradients(losses, shared)) if shared else None
            weights = strategy.backward(losses, model)
            if ddp and not checked:  # on the first step of this process (a resumed run's too)
                distributed.check_all_used(model)
                checked = True
            distributed.sum_gradients(model, own_parameters, ranks, summed_by_ddp=ddp)
            if scheduled:
                factor = lr_factor(schedule, global_step - 1, total_steps, steps_per_epoch)
                for group in optimizer.param_groups:
                    if group.get("scheduled", True):
                        group["lr"] = group.get("base_lr", settings.lr) * factor
            if settings.clip_grad_norm is not None:
                rows = [m.rows for _, m in row_wise if m.rows is not None]
                torch.nn.utils.clip_grad_norm_([*clipped, *rows], settings.clip_grad_norm)
            optimizer.step()
            for _, embedding in row_wise:  # tables that train row-wise, at the model's current lr
                embedding.update_rows(optimizer.param_groups[0]["lr"])
            state.loss_sum += losses.detach().cpu()
            state.weight_sum += weights.detach().cpu()
            state.step += 1
            if grads is not None:
                observer.on_gradients(gradient_record(grads, weights, tasks, epoch, state.step, global_step))
            if state.step % REPORT_EVERY == 0:
                observer.on_step(epoch, state.step)
            interrupted = ranks.any(stop_requested())  # every rank stops at the same step
            if interrupted or (every and state.step % every == 0 and state.step < steps_per_epoch):
                now = time.perf_counter()
                state.epoch_seconds += now - started
                started = now
                state.torch_rng = torch.get_rng_state()
                observer.on_checkpoint(state, model, optimizer, strategy)
                if interrupted:
                    raise TrainingInterrupted(
                        f"training interrupted at epoch {epoch}, step {state.step}; checkpoint saved"
                    )
        elapsed = state.epoch_seconds + time.perf_counter() - started
        state.samples += len(train)
        state.seconds += elapsed
        mean_losses = state.loss_sum / steps_per_epoch
        if abilities.end_epoch is not None:
            abilities.end_epoch(epoch, mean_losses)
        valid_metrics = evaluate(model, valid, tasks, types, settings.eval_batch_size, pos_weight)
        improved, stop = stopper.update(epoch, valid_metrics, model)
        state.stopped_early = stop and epoch < settings.epochs
        record = {
            "epoch": epoch,
            "train_loss": dict(zip(tasks, mean_losses.tolist(), strict=True)),
            "weights": dict(zip(tasks, (state.weight_sum / steps_per_epoch).tolist(), strict=True)),
            "valid": valid_metrics,
            "seconds": elapsed,
            "samples_per_second": len(train) / elapsed if elapsed > 0 else 0.0,
            "lr": optimizer.param_groups[0]["lr"],
            "best_epoch": state.best_epoch,
        }
        state.history.append(record)
        observer.on_epoch(record, model, improved)
        state.epoch, state.step = epoch + 1, 0
        state.shuffle_state = shuffle.get_state()
        state.torch_rng = torch.get_rng_state()
        observer.on_checkpoint(state, model, optimizer, strategy)
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    best = state.history[state.best_epoch - 1]["valid"] if state.history else {}
    return FitResult(state.history, state.best_epoch, state.stopped_early, state.samples, state.seconds, best)
