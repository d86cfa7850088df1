"""The training loop: epochs, batches, the weighting strategy's update, evaluation, early stopping.

Reporting (progress bars, metrics.jsonl, checkpoints) observes the loop through ``Observer``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mtlcli import distributed
from mtlcli.data.batch import Batch
from mtlcli.data.source import BatchSource
from mtlcli.distributed import SINGLE, Ranks, model_device
from mtlcli.errors import MtlError
from mtlcli.models.base import enable_representation, scheme
from mtlcli.recipe.schema import EarlyStopping, TrainSection
from mtlcli.train.exchange import Exchange
from mtlcli.train.losses import TrainingDiverged, task_loss_sums, task_losses
from mtlcli.train.metrics import task_metrics
from mtlcli.train.observers import NullObserver, Observer
from mtlcli.train.optimizer import TrainingOptimizer, lr_factor, make_optimizer
from mtlcli.train.step import DefaultStep, Step, StepAt, StepDone, StepParts
from mtlcli.weighting.base import WeightingStrategy

if TYPE_CHECKING:
    from mtlcli.objectives.base import TrainingObjective

__all__ = [  # the loss, the observers and the optimizer's builders are imported from here too
    "EarlyStopper", "FitResult", "LoopState", "NullObserver", "Observer", "TrainingDiverged",
    "TrainingInterrupted", "build_parts", "evaluate", "fit", "gradient_record", "lr_factor",
    "make_optimizer", "predict_logits", "task_loss_sums", "task_losses", "train_loop",
]  # fmt: skip

REPORT_EVERY = 25  # steps between progress callbacks


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


@torch.no_grad()
def predict_logits(model: nn.Module, data: BatchSource, batch_size: int) -> Tensor:
    """Model outputs for a whole split, in eval mode: [N, T]."""
    return _predict(model, data, batch_size, SINGLE)[0]


@torch.no_grad()
def _predict(
    model: nn.Module, data: BatchSource, batch_size: int, ranks: Ranks
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Outputs [N, T] for a split, in order, with its labels, masks and groups, gathered batch by
    batch (a streamed split is never whole in memory: only N x T scores and labels are kept); on
    several ranks each scores its slice of every batch."""
    was_training = model.training
    model.eval()
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
    ranks: Ranks = SINGLE,
) -> dict[str, Any]:
    """Per-task metrics on a split, plus each task's mean loss under ``loss`` (the training loss,
    with ``pos_weight``)."""
    logits, labels, mask, groups = _predict(model, data, batch_size, ranks)
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

    def begin_epoch(self, shuffle: torch.Generator, tasks: int) -> None:
        """The shuffling generator at this epoch's start (an interrupted epoch replays its order);
        fresh sums unless the epoch is under way."""
        if self.shuffle_state is not None:
            shuffle.set_state(self.shuffle_state)
        self.shuffle_state = shuffle.get_state()
        if self.step == 0:
            self.loss_sum, self.weight_sum = torch.zeros(tasks), torch.zeros(tasks)
            self.epoch_seconds = 0.0

    def count(self, done: StepDone) -> None:
        assert self.loss_sum is not None and self.weight_sum is not None
        self.loss_sum += done.losses.cpu()
        self.weight_sum += done.weights.cpu()
        self.step += 1

    def lap(self, started: float) -> float:
        """Add the time since ``started`` to the epoch's; returns now (a checkpoint is taken)."""
        now = time.perf_counter()
        self.epoch_seconds += now - started
        self.torch_rng = torch.get_rng_state()
        return now

    def next_epoch(self, shuffle: torch.Generator) -> None:
        self.epoch, self.step = self.epoch + 1, 0
        self.shuffle_state = shuffle.get_state()
        self.torch_rng = torch.get_rng_state()


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


class TrainingInterrupted(MtlError):
    """Training stopped on request (SIGINT / SIGTERM) after saving a checkpoint."""


def build_parts(
    model: nn.Module,
    strategy: WeightingStrategy,
    settings: TrainSection,
    tasks: list[str],
    types: list[str],
    steps_per_epoch: int,
    pos_weight: Tensor | None = None,
    strategy_lr: float | None = None,
    ranks: Ranks | None = None,
    dense: torch.optim.Optimizer | None = None,
    objective: TrainingObjective | None = None,
) -> StepParts:
    """The components a step works with: the run's optimizer (around ``dense``, a torch optimizer
    made by the caller, when given) and the exchange, chosen from ``ranks`` (the run's; by default
    those this process joined) and the strategy's declared capabilities; ``objective`` (the
    recipe's training objective) gets its own optimizer group and makes the step."""
    if strategy.capabilities.needs_representation:
        enable_representation(model)
    device = model_device(model)
    optimizer = TrainingOptimizer.build(settings, model, strategy, steps_per_epoch, strategy_lr, dense, objective)
    own_step = objective is not None or scheme(model).capabilities.step is not None
    exchange = Exchange.choose(ranks or distributed.current(), strategy, own_step)
    binary = torch.tensor([t == "binary" for t in types], device=device)
    return StepParts(model, strategy, optimizer, exchange, settings, tasks, binary, pos_weight, device, objective)


def make_step(parts: StepParts) -> Step:
    """The training objective's step, else the scheme's declared step, else the default one."""
    if parts.objective is not None:
        return parts.objective.make_step(parts)
    return (scheme(parts.model).capabilities.step or DefaultStep)(parts)


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
    """Train ``model`` with ``strategy`` (``build_parts``, ``make_step``, ``train_loop``).

    Pass the dense ``optimizer`` and ``state`` of a checkpoint to continue an interrupted run.
    """
    steps = train.steps(settings.batch_size)
    parts = build_parts(model, strategy, settings, tasks, types, steps, pos_weight, dense=optimizer)
    return train_loop(parts, make_step(parts), train, valid, types, observer, state or LoopState(), stop_requested)


def train_loop(
    parts: StepParts,
    step: Step,
    train: BatchSource,
    valid: BatchSource,
    types: list[str],
    observer: Observer,
    state: LoopState,
    stop_requested: Callable[[], bool] = lambda: False,
) -> FitResult:
    """Epochs of ``step`` over ``train``, each ending in evaluation on ``valid``, early stopping
    and a checkpoint; afterwards the model holds the best epoch's weights. When
    ``stop_requested()`` turns true (on any rank), the step finishes, ``observer.on_checkpoint``
    saves the state and TrainingInterrupted is raised."""
    settings, model, ranks, tasks = parts.settings, parts.model, parts.exchange.ranks, parts.tasks
    shuffle = torch.Generator().manual_seed(settings.seed)
    if state.torch_rng is not None:
        torch.set_rng_state(state.torch_rng)
    stopper = EarlyStopper(settings.early_stopping, tasks, state)
    steps_per_epoch, every = train.steps(settings.batch_size), settings.checkpoint_every
    observer.on_start(settings.epochs, steps_per_epoch)
    while state.epoch <= settings.epochs and not state.stopped_early:
        epoch = state.epoch
        state.begin_epoch(shuffle, len(tasks))
        model.train()
        started = time.perf_counter()
        tallies: dict[str, float] = {}
        for batch in train.batches(settings.batch_size, True, shuffle, state.step, ranks.rank, ranks.world):
            at = StepAt(epoch, state.step + 1, (epoch - 1) * steps_per_epoch + state.step + 1)
            done = step(batch.to(parts.device), at)
            state.count(done)
            tallies = done.tallies
            if done.gradients is not None:
                observer.on_gradients(
                    gradient_record(done.gradients, done.weights, tasks, epoch, at.in_epoch, at.number)
                )
            if state.step % REPORT_EVERY == 0:
                observer.on_step(epoch, state.step)
            interrupted = ranks.any(stop_requested())  # every rank stops at the same step
            if interrupted or (every and state.step % every == 0 and state.step < steps_per_epoch):
                started = state.lap(started)
                observer.on_checkpoint(state, model, parts.optimizer, parts.strategy)
                if interrupted:
                    raise TrainingInterrupted(
                        f"training interrupted at epoch {epoch}, step {state.step}; checkpoint saved"
                    )
        elapsed = state.epoch_seconds + time.perf_counter() - started
        record, improved = end_epoch(parts, state, stopper, valid, types, elapsed, len(train), steps_per_epoch)
        if tallies:  # the scheme's step's counts over the epoch
            record["tallies"] = dict(tallies)
        observer.on_epoch(record, model, improved)
        state.next_epoch(shuffle)
        observer.on_checkpoint(state, model, parts.optimizer, parts.strategy)
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    best = state.history[state.best_epoch - 1]["valid"] if state.history else {}
    return FitResult(state.history, state.best_epoch, state.stopped_early, state.samples, state.seconds, best)


def end_epoch(
    parts: StepParts,
    state: LoopState,
    stopper: EarlyStopper,
    valid: BatchSource,
    types: list[str],
    elapsed: float,
    rows: int,
    steps_per_epoch: int,
) -> tuple[dict[str, Any], bool]:
    """After an epoch's ``rows`` training rows: the strategy's epoch end, evaluation, early
    stopping; returns the epoch's record (appended to the history) and whether it improved."""
    assert state.loss_sum is not None and state.weight_sum is not None
    tasks, epoch, settings = parts.tasks, state.epoch, parts.settings
    state.samples += rows
    state.seconds += elapsed
    mean_losses = state.loss_sum / steps_per_epoch
    end = parts.strategy.capabilities.end_epoch
    if end is not None:
        end(epoch, mean_losses)
    ranks = parts.exchange.ranks
    valid_metrics = evaluate(parts.model, valid, tasks, types, settings.eval_batch_size, parts.pos_weight, ranks)
    improved, stop = stopper.update(epoch, valid_metrics, parts.model)
    state.stopped_early = stop and epoch < settings.epochs
    record = {
        "epoch": epoch,
        "train_loss": dict(zip(tasks, mean_losses.tolist(), strict=True)),
        "weights": dict(zip(tasks, (state.weight_sum / steps_per_epoch).tolist(), strict=True)),
        "valid": valid_metrics,
        "seconds": elapsed,
        "samples_per_second": rows / elapsed if elapsed > 0 else 0.0,
        "lr": parts.optimizer.lr,
        "best_epoch": state.best_epoch,
    }
    scheme_record = scheme(parts.model).capabilities.epoch_record  # e.g. gate control's λ
    if scheme_record is not None:
        record.update(scheme_record())
    if parts.objective is not None:
        record["objective"] = parts.objective.end_epoch()
    state.history.append(record)
    return record, improved
