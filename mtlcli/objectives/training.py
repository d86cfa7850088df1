"""CrossDistil as a training objective over any scheme that declares its task towers
(``Capabilities.task_towers``): the teachers and calibrators it owns, the two-update step, the
per-epoch record. The formulas are in ``mtlcli.objectives.crossdistil``; the [spec] choices in
docs/methods.md ("CrossDistil").

Each step trains two parameter groups in turn:

1. the student update: the task losses through the run's weighting plus the distillation terms
   β · BCE(ŷ_k, p_T,k) on task k's rows, teachers frozen (their probabilities computed without
   a graph);
2. the teacher update, on a new forward pass through the updated shared layers: each teacher's
   quadruplet loss on its augmented order (k, partner of k), which also trains the shared layers
   below h_k; the calibrators' losses (scores detached); with ``error_correction`` the student's
   feedback L_k(θ_S') after a one-step look-ahead of task k's tower on the distillation loss,
   which reaches the teacher tower only (its input and the calibration are detached). The task
   towers (the students) get no gradient in this update.

A partner whose training labels correlate negatively with the task's enters the order flipped
(1 − y) unless ``orient_partner`` is false: the order then still agrees with the task's own.

On several processes the step keeps the invariant of ``mtlcli.distributed``: the pairwise terms
are computed on the global batch's rows gathered through the exchange (``Exchange.batch_rows``:
the same value and pairs on every rank, the gradient reaching the rank's own rows), the per-row
means use the global counts, and after each backward pass the model's and the teachers'
gradients are summed over the ranks.

The teachers' parameters are the optimizer group ``objective``; the model group's state is shared
by both updates (the shared layers move in both). Bundles carry the model only.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlcli.data.batch import Batch
from mtlcli.data.source import BatchSource
from mtlcli.errors import MtlError
from mtlcli.explain.correlation import pearson
from mtlcli.models.base import repeated_pass, scheme
from mtlcli.models.blocks import trainable_tensors
from mtlcli.models.views import TaskTowers
from mtlcli.objectives.crossdistil import (
    Calibrator,
    choose_partners,
    distill_weight,
    error_correction_loss,
    level_masks,
    level_pairs,
    pairwise_accuracy,
    quadruplet_loss,
)
from mtlcli.recipe.schema import ObjectiveSection
from mtlcli.train.exchange import Exchange
from mtlcli.train.losses import check_finite, task_loss_sums
from mtlcli.train.step import StepAt, StepDone, StepParts
from mtlcli.weighting.base import WeightingStrategy, weightings_by_gradients
from mtlcli.weighting.gradients import shared_task_gradients

# (y_k, y_partner) of each level of k's augmented order; y_partner is 1 − the label where flipped
LEVEL_NAMES = ("11", "10", "01", "00")
PAIR_NAMES = [f"{LEVEL_NAMES[q]}>{LEVEL_NAMES[r]}" for q, r in level_pairs()]


class Teachers(nn.Module):
    """One teacher tower per task, shaped as the task's own tower (freshly initialised) but without
    biases, and one calibrator per task.

    The quadruplet loss reads only differences of scores. A bias on the score, or on a hidden unit
    active on every row of the batch, moves every score alike and cancels exactly: its gradient is
    rounding noise alone, which Adam scales into full steps (and one process and several drift
    apart). The calibrator's shift b gives the teacher's probabilities their offset."""

    def __init__(self, students: nn.ModuleDict, tasks: list[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.towers = nn.ModuleDict({t: without_biases(fresh_copy(students[t])) for t in tasks})
        self.calibrators = nn.ModuleDict({t: Calibrator() for t in tasks})

    def calibrator(self, task: str) -> Calibrator:
        return cast(Calibrator, self.calibrators[task])

    def scores(self, inputs: list[Tensor]) -> Tensor:
        """Ranking scores r [B, T] from the task towers' inputs (T x [B, H_k])."""
        return torch.cat([self.towers[t](inputs[k]) for k, t in enumerate(self.tasks)], dim=1)

    def calibrated(self, scores: Tensor) -> Tensor:
        """Calibrated logits a·r + b [B, T] from scores [B, T]."""
        return torch.stack([self.calibrator(t)(scores[:, k]) for k, t in enumerate(self.tasks)], dim=1)


def fresh_copy(module: nn.Module) -> nn.Module:
    """A module of ``module``'s shape with newly initialised parameters (from the global RNG)."""
    twin = copy.deepcopy(module)
    for part in twin.modules():
        if isinstance(part, nn.Linear):
            part.reset_parameters()
    return twin


def without_biases(tower: nn.Module) -> nn.Module:
    """``tower`` with the biases of its Linear layers removed."""
    for part in tower.modules():
        if isinstance(part, nn.Linear):
            part.register_parameter("bias", None)
    return tower


class CrossDistil:
    """The objective (``TrainingObjective``): teachers and calibrators, the pair sampler's
    generator, each task's partner, and the epoch's running sums (checkpointed with the rest)."""

    def __init__(
        self, section: ObjectiveSection, towers: TaskTowers, tasks: list[str], partners: dict[str, str],
        flipped: dict[str, bool], warmup_steps: int, seed: int, device: torch.device,
    ) -> None:  # fmt: skip
        self.section, self.towers, self.tasks, self.partners = section, towers, list(tasks), partners
        self.partner_index = [tasks.index(partners[t]) for t in tasks]
        self.flipped = [flipped.get(t, False) for t in tasks]
        self.warmup_steps = warmup_steps
        self.teachers = Teachers(towers.towers, tasks).to(device)
        self.generator = torch.Generator().manual_seed(seed)
        n, pairs = len(tasks), len(PAIR_NAMES)
        self.sums: dict[str, Tensor] = {
            "steps": torch.zeros(()), "distill": torch.zeros(n), "quadruplet": torch.zeros(n),
            "correct": torch.zeros(n, pairs, dtype=torch.float64), "pairs": torch.zeros(n, pairs, dtype=torch.float64),
        }  # fmt: skip

    @property
    def lr(self) -> float | None:
        return self.section.lr

    def parameters(self) -> list[nn.Parameter]:
        return list(self.teachers.parameters())

    def make_step(self, parts: StepParts) -> CrossDistilStep:
        return CrossDistilStep(self, parts)

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"teachers.{k}": v for k, v in self.teachers.state_dict().items()}
        state.update({f"sums.{k}": v for k, v in self.sums.items()})
        state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        teachers = {k[9:]: v for k, v in state.items() if k.startswith("teachers.")}
        unknown = sorted(set(teachers) - set(self.teachers.state_dict()))
        if unknown:
            raise ValueError(
                f"the checkpoint has teacher parameters this version's teachers lack ({unknown[0]}): it was "
                "written by an earlier version, whose teacher towers had biases; train again"
            )
        self.teachers.load_state_dict(teachers)
        for key in self.sums:
            self.sums[key] = state[f"sums.{key}"].to(self.sums[key].dtype)
        self.generator.set_state(state["generator"].to(torch.uint8))

    def end_epoch(self) -> dict[str, Any]:
        """The epoch's record: each task's partner (and whether its label enters flipped), mean distillation term (β included) and mean
        quadruplet loss, and the teachers' share of correctly ordered pairs per level pair of the
        augmented order (levels named by (y_task, y_partner); over every training batch, before
        each teacher update); the sums start again."""
        sums, steps = self.sums, max(1.0, float(self.sums["steps"]))
        accuracy = sums["correct"] / sums["pairs"].clamp_min(1.0)
        record = {
            "kind": "crossdistil",
            "partners": dict(self.partners),
            "partner_flipped": dict(zip(self.tasks, self.flipped, strict=True)),
            "distill_loss": {t: float(sums["distill"][k]) / steps for k, t in enumerate(self.tasks)},
            "quadruplet_loss": {t: float(sums["quadruplet"][k]) / steps for k, t in enumerate(self.tasks)},
            "pairwise_accuracy": {
                t: {name: float(accuracy[k, i]) for i, name in enumerate(PAIR_NAMES) if sums["pairs"][k, i] > 0}
                for k, t in enumerate(self.tasks)
            },
        }
        for key, value in sums.items():
            sums[key] = torch.zeros_like(value)
        return record

    def student_logits(self, inputs: list[Tensor]) -> Tensor:
        """The task towers' logits [B, T] from their inputs."""
        return torch.cat([self.towers.towers[t](inputs[k]) for k, t in enumerate(self.tasks)], dim=1)

    def teacher_loss(
        self, inputs: list[Tensor], batch: Batch, beta: float, student_lr: float, exchange: Exchange
    ) -> Tensor:
        """The teachers' update loss over every task (quadruplet + calibration + error correction),
        counting the epoch's quadruplet losses and pairwise accuracies. inputs: T x [B_rank, H_k].
        The quadruplet and error-correction terms pair rows across the global batch: they are
        computed on the ranks' rows gathered (``Exchange.batch_rows``), the same value and pairs
        on every rank, each rank's gradient reaching its own rows; the calibration is a mean over
        the global rows (``Exchange.losses``)."""
        own_labels, own_mask = batch.labels, batch.label_mask
        own_scores = self.teachers.scores(inputs)
        scores, labels = exchange.batch_rows(own_scores), exchange.batch_rows(own_labels)
        mask = exchange.batch_rows(own_mask)
        sums = [
            bce_sum(self.teachers.calibrator(t)(own_scores[:, k].detach()), own_labels[:, k], own_mask[:, k])
            for k, t in enumerate(self.tasks)
        ]
        total = exchange.losses(torch.stack(sums), own_mask.sum(0).to(own_scores.dtype)).sum()
        for k in range(len(self.tasks)):
            j = self.partner_index[k]
            partner = 1.0 - labels[:, j] if self.flipped[k] else labels[:, j]
            levels = level_masks(labels[:, k], partner, mask[:, k] & mask[:, j])
            quad = quadruplet_loss(scores[:, k], levels, self.section.max_pairs, self.generator)
            total = total + quad
            if self.section.error_correction and beta > 0:
                total = total + self.feedback(
                    k, inputs[k].detach(), labels[:, k], mask[:, k], beta, student_lr, exchange
                )
            self.count_order(k, scores[:, k].detach(), levels, quad.detach())
        return total

    def feedback(
        self, k: int, inputs: Tensor, labels: Tensor, rows: Tensor, beta: float, lr: float, exchange: Exchange
    ) -> Tensor:
        """Task k's error-correction term: its tower's loss after a look-ahead step on the
        distillation loss, differentiable in the teacher tower only (the tower in eval mode), over
        the global batch (inputs [B_rank, H]: this rank's; labels, rows [B]: the global batch's)."""
        task = self.tasks[k]
        student, calibrator = self.towers.towers[task], self.teachers.calibrator(task)
        score = exchange.batch_rows(self.teachers.towers[task](inputs).reshape(-1))
        probs = torch.sigmoid(calibrator.scale().detach() * score + calibrator.shift.detach())
        was_training = student.training
        student.eval()
        params = dict(student.named_parameters())
        loss = error_correction_loss(student, params, exchange.batch_rows(inputs), probs, labels, rows, lr, beta)
        student.train(was_training)
        return loss

    def count_order(self, k: int, scores: Tensor, levels: Tensor, quad: Tensor) -> None:
        """Add task k's quadruplet loss and its correctly ordered pairs to the epoch's sums."""
        sums = self.sums
        sums["quadruplet"][k] += float(quad)
        sizes = levels.sum(1).tolist()
        shares = pairwise_accuracy(scores, levels)
        for i, (q, r) in enumerate(level_pairs()):
            share = shares.get((q, r))
            if share is not None:
                count = float(sizes[q] * sizes[r])
                sums["correct"][k, i] += share * count
                sums["pairs"][k, i] += count


class CrossDistilStep:
    """The two updates of a CrossDistil step (the module's docstring); every
    ``train.track_gradients`` steps the task losses' gradients on the shared parameters are taken
    first, as the default step takes them."""

    def __init__(self, objective: CrossDistil, parts: StepParts) -> None:
        self.objective, self.parts = objective, parts
        self.students = list(objective.towers.towers.parameters())
        self.track = parts.settings.track_gradients or 0
        shared = scheme(parts.model).parameter_groups()["shared"] if self.track else {}
        self.shared = list(trainable_tensors(parts.model, shared).values())
        # the backward passes run on the bare model (the exchange is never DDP for an objective's
        # step): its gradients are summed after each; row-wise tables take the ranks' rows
        self.exchange = parts.exchange
        parts.exchange.bind(parts.model)

    def __call__(self, batch: Batch, at: StepAt) -> StepDone:
        p, o = self.parts, self.objective
        beta = distill_weight(at.number - 1, o.warmup_steps, o.section.distill_weight)
        # (1) students: the task losses through the weighting, plus distillation; teachers frozen
        p.optimizer.zero_grad()
        inputs = o.towers.inputs(batch)
        logits = o.student_logits(inputs)
        losses = self.exchange.losses(*task_loss_sums(logits, batch, p.binary, p.pos_weight))
        check_finite(losses, p.tasks, at)
        tracked = self.track and at.number % self.track == 0 and self.shared
        grads = self.exchange.ranks.sum(shared_task_gradients(losses, self.shared)) if tracked else None
        with torch.no_grad():
            probs = torch.sigmoid(o.teachers.calibrated(o.teachers.scores(inputs)))
        mask = batch.label_mask
        sums = [bce_sum(logits[:, k], probs[:, k], mask[:, k]) for k in range(len(o.tasks))]
        distill = beta * self.exchange.losses(torch.stack(sums), mask.sum(0).to(logits.dtype))
        if beta > 0:
            distill.sum().backward(retain_graph=True)
        weights = self.exchange.backward(p.strategy, losses, p.model)
        p.optimizer.step(at.number)
        # (2) teachers (and the shared layers below them): students frozen
        p.optimizer.zero_grad()
        with repeated_pass(p.model):  # the same step: the scheme's step statistics stay as the first pass left them
            inputs = o.towers.inputs(batch)
        o.teacher_loss(inputs, batch, beta, p.optimizer.lr, self.exchange).backward()
        for param in self.students:
            param.grad = None
        self.exchange.sum_gradients(p.model, o.parameters())
        p.optimizer.step(at.number)
        o.sums["distill"] += distill.detach().cpu()
        o.sums["steps"] += 1
        return StepDone(losses.detach(), weights.detach(), grads)


def bce_sum(logits: Tensor, targets: Tensor, rows: Tensor) -> Tensor:
    """The sum of the binary cross-entropy with logits over ``rows`` (targets may be soft): a
    rank's part of a mean over the global batch's rows. logits, targets: [B]; rows: bool [B]."""
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return torch.where(rows, losses, torch.zeros_like(losses)).sum()


def refuse_objective(weighting: str, strategy: WeightingStrategy, tasks: list[str]) -> None:
    """What CrossDistil cannot train with: a weighting that declares it combines per-task gradients
    (``task_gradients``; the student update adds the distillation's gradients beside the
    weighting's, which it would not see). The message lists the registry's weightings of each kind."""
    if strategy.capabilities.task_gradients:
        combining, weighing = weightings_by_gradients(tasks)
        raise MtlError(
            f"objective: crossdistil adds its distillation gradients beside the weighting's, and loss.weighting "
            f"{weighting!r} combines the tasks' gradients itself (the weightings that do: {', '.join(combining)})",
            f"use a loss-based weighting with crossdistil: {', '.join(weighing)}",
        )


def build_crossdistil(
    section: ObjectiveSection,
    model: nn.Module,
    scheme_name: str,
    tasks: list[str],
    types: list[str],
    train: BatchSource,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> CrossDistil:
    """The objective over ``model`` (on ``device``): the teachers shaped as its towers, each task's
    partner (the recipe's, else chosen on the training labels) and, with ``orient_partner``, the
    partner's label flipped (1 − y) where the two tasks' training labels correlate negatively; a
    one-epoch ramp by default."""
    towers = scheme(model).capabilities.task_towers
    if towers is None:
        raise MtlError(
            f"objective: crossdistil needs what each task's tower reads, which the scheme {scheme_name!r} "
            "does not declare",
            "use a scheme with task towers (mmoe, cgc, ple, shared_bottom), or drop the objective section",
        )
    rows, masks = [], []
    for batch in train.batches(batch_size):
        rows.append(batch.labels)
        masks.append(batch.label_mask)
    labels, mask = torch.cat(rows), torch.cat(masks)
    partners = choose_partners(labels, mask, tasks, types, section.partners)
    flipped = {}
    for k, task in enumerate(tasks):
        j = tasks.index(partners[task])
        both = mask[:, k] & mask[:, j]
        rho = pearson(labels[both, k], labels[both, j])
        flipped[task] = section.orient_partner and rho is not None and rho < 0
    warmup = section.warmup_steps if section.warmup_steps is not None else train.steps(batch_size)
    return CrossDistil(section, towers, tasks, partners, flipped, warmup, seed, device)
