"""CrossDistil's mathematical core, as plain functions and modules (the objective that trains
with them: ``mtlcli.objectives.training``).

Yang, Pan, Gao, Jiang, Liu, Chen, "Cross-Task Knowledge Distillation in Multi-Task
Recommendation", AAAI 2022 (arXiv:2202.09852).

What the paper states [paper]: a task's binary label cannot order two rows that share it, another
task's label can. *Augmented ranking tasks* built from a pair of tasks order rows by both labels.
*Teachers* trained on them with a ranking loss over the four label sets are *calibrated* into
probabilities and *distilled* into the task towers (the students). Teachers and students train
together, in two parameter groups updated in turn, and an *error-correction* mechanism lets the
teachers learn during this synchronous training.

The exact forms are not available to the project; these are its own [spec] choices
(docs/methods.md, "CrossDistil"):

- ``level_masks``: the four levels of an augmented order over the rows where both labels are
  observed. A⁺ (A first) is (1,1) ≻ (1,0) ≻ (0,1) ≻ (0,0); B⁺ is the same function with the
  labels swapped [paper: the orders; spec: the masks' layout];
- ``quadruplet_loss``: for each pair of non-empty levels q < q', the BPR term
  mean −log σ(r_i − r_j) over i ∈ S_q, j ∈ S_q'; the loss is the mean of the terms present. Over
  ``max_pairs`` pairs a term uses ``max_pairs`` pairs drawn uniformly, with replacement, from a
  given generator. The same generator state gives the same pairs, so a resumed run is exact;
- ``Calibrator``: p_T = σ(a·r + b), a = softplus(â) > 0 so calibration keeps the teacher's order.
  It is fitted by binary cross-entropy against y_A, on its own two parameters, with r detached
  (``calibration_loss``), by one Newton step on (a, b) per training step (``calibration_moments``,
  ``newton_update``) rather than by the optimizer: at the model's learning rate the shift moved
  a few thousandths a step and stayed far from the base rate's logit;
- ``distillation_loss`` and ``distill_weight``: the student adds β · BCE(ŷ_A, stop_grad(p_T)) on A's
  rows, with β ramped linearly from 0 to ``distill_weight`` over ``warmup_steps`` steps;
- ``choose_partners``: by default each task's partner is the other task whose labels correlate
  most with its own, in absolute value, on the rows where both are observed;
- ``error_correction_loss``: the student's ground-truth loss after a one-step look-ahead on the
  distillation loss, L_A(θ_S − η ∇_{θ_S} L_KD(θ_S, θ_T)). Its gradient with respect to the
  teacher's parameters (through a double backward) is the teacher's feedback, as in Meta Pseudo
  Labels (Pham et al., CVPR 2021);
- ``pairwise_accuracy``: for explain, the share of correctly ordered pairs of each level pair.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mtlcli.errors import MtlError
from mtlcli.explain.correlation import pearson
from mtlcli.train.metrics import auc

MAX_PAIRS = 4096  # pairs per level pair before sampling [spec]
DISTILL_WEIGHT = 0.5  # β after the ramp [spec]
CALIBRATION_STEP = 1.0  # the most a Newton step moves the calibrator's a or b [spec]
MIN_SCALE = 1e-3  # the calibrator's smallest scale a [spec]
CALIBRATION_DAMPING = 0.25  # the share of the Newton step taken each training step [spec]
LEVELS = 4

LevelPair = tuple[int, int]


def level_masks(first: Tensor, second: Tensor, observed: Tensor) -> Tensor:
    """The levels of the augmented order that ranks rows by ``first``'s label, then ``second``'s:
    bool [4, B], row q the rows of level q (0 the top), among the ``observed`` rows only.

    A⁺ = level_masks(y_A, y_B, m_A & m_B): (1,1), (1,0), (0,1), (0,0).
    B⁺ = level_masks(y_B, y_A, m_A & m_B): (1,1), (0,1), (1,0), (0,0) in (y_A, y_B).
    first, second: [B] binary labels (0/1); observed: bool [B].
    """
    a, b = first > 0.5, second > 0.5
    return torch.stack([a & b, a & ~b, ~a & b, ~a & ~b]) & observed.unsqueeze(0)


def level_pairs() -> list[LevelPair]:
    """Every pair of levels (q, q') with q above q': six pairs."""
    return [(q, r) for q in range(LEVELS) for r in range(q + 1, LEVELS)]


def _pair_indices(
    upper: Tensor, lower: Tensor, max_pairs: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Row indices (i, j), i from ``upper`` and j from ``lower`` [n] each: every pair when there are
    at most ``max_pairs``, else ``max_pairs`` pairs drawn uniformly with replacement."""
    if upper.numel() * lower.numel() <= max_pairs:
        i, j = torch.meshgrid(upper, lower, indexing="ij")
        return i.reshape(-1), j.reshape(-1)
    device = generator.device if generator is not None else upper.device
    pick_i = torch.randint(upper.numel(), (max_pairs,), generator=generator, device=device).to(upper.device)
    pick_j = torch.randint(lower.numel(), (max_pairs,), generator=generator, device=device).to(upper.device)
    return upper[pick_i], lower[pick_j]


def quadruplet_terms(
    scores: Tensor, levels: Tensor, max_pairs: int = MAX_PAIRS, generator: torch.Generator | None = None
) -> dict[LevelPair, Tensor]:
    """The BPR term of each pair of non-empty levels: mean over the pairs of −log σ(r_i − r_j).

    scores: r [B]; levels: bool [4, B] (``level_masks``). Level pairs with an empty side are left
    out. Draws from ``generator`` only for a level pair of more than ``max_pairs`` pairs.
    """
    rows = [torch.nonzero(level).squeeze(1) for level in levels]
    terms: dict[LevelPair, Tensor] = {}
    for q, r in level_pairs():
        if rows[q].numel() == 0 or rows[r].numel() == 0:
            continue
        i, j = _pair_indices(rows[q], rows[r], max_pairs, generator)
        terms[(q, r)] = F.softplus(scores[j] - scores[i]).mean()  # −log σ(r_i − r_j)
    return terms


def quadruplet_loss(
    scores: Tensor, levels: Tensor, max_pairs: int = MAX_PAIRS, generator: torch.Generator | None = None
) -> Tensor:
    """The teacher's ranking loss: the mean of ``quadruplet_terms`` (0, still attached to the
    scores' graph, when no level pair has rows on both sides). Scalar."""
    terms = quadruplet_terms(scores, levels, max_pairs, generator)
    if not terms:
        return scores.sum() * 0.0
    return torch.stack(list(terms.values())).mean()


def pairwise_accuracy(scores: Tensor, levels: Tensor) -> dict[LevelPair, float]:
    """For each pair of non-empty levels q < q', the share of pairs (i ∈ S_q, j ∈ S_q') that the
    scores order correctly (r_i > r_j; a tie counts one half). 0.5 is chance.

    scores: [B]; levels: bool [4, B]. Every pair counts (computed by ranks, not pair by pair).
    """
    shares: dict[LevelPair, float] = {}
    for q, r in level_pairs():
        upper, lower = scores[levels[q]], scores[levels[r]]
        if upper.numel() and lower.numel():
            labels = torch.cat([torch.ones_like(upper), torch.zeros_like(lower)])
            shares[(q, r)] = auc(torch.cat([upper, lower]), labels)
    return shares


class Calibrator(nn.Module):
    """p_T = σ(a·r + b) with a = softplus(â) > 0 and b free: a teacher's ranking score r [B] to
    a logit [B] (``forward``). Starts as the identity map (a = 1, b = 0) and is fitted by Newton
    steps (``newton_update``). Since a > 0 the calibrated probabilities order the rows exactly as
    the scores do."""

    def __init__(self) -> None:
        super().__init__()
        self.raw_scale = nn.Parameter(torch.tensor(math.log(math.e - 1.0)))  # softplus⁻¹(1)
        self.shift = nn.Parameter(torch.tensor(0.0))

    def scale(self) -> Tensor:
        return F.softplus(self.raw_scale)

    def forward(self, scores: Tensor) -> Tensor:
        return self.scale() * scores + self.shift


def calibration_loss(calibrator: Calibrator, scores: Tensor, labels: Tensor, rows: Tensor) -> Tensor:
    """BCE of the calibrated teacher against y_A on ``rows``, training the calibrator only: the
    scores are detached. scores, labels: [B]; rows: bool [B]. Scalar, 0 without rows."""
    logits = calibrator(scores.detach())
    return _bce(logits, labels, rows)


def calibration_moments(calibrator: Calibrator, scores: Tensor, labels: Tensor, rows: Tensor) -> Tensor:
    """The sums over ``rows`` of the calibration loss's gradient and Hessian with respect to
    (a, b), at the calibrator's current values: [g_a, g_b, h_aa, h_ab, h_bb] (float64, no graph).
    Sums, not means, so the ranks' parts add up to the global batch's (a Newton step is the same
    for sums and means). scores, labels: [B]; rows: bool [B]."""
    with torch.no_grad():
        r, y = scores.detach()[rows].double(), labels[rows].double()
        p = torch.sigmoid(calibrator.scale().double() * r + calibrator.shift.double())
        e, w = p - y, p * (1.0 - p)
        return torch.stack([(e * r).sum(), e.sum(), (w * r * r).sum(), (w * r).sum(), w.sum()])


def newton_update(
    calibrator: Calibrator, moments: Tensor, max_change: float = CALIBRATION_STEP, damping: float = 1.0
) -> None:
    """One Newton step on the calibration loss in (a, b) from ``calibration_moments``:
    (a, b) − damping · H⁻¹ g, shortened so that neither moves by more than ``max_change`` (a
    separable batch has a vanishing Hessian, and one batch should not throw the fit far). A
    damping below 1 averages the fit over the last few batches (one batch of a rare label holds
    few positives, and its own fit is noisy). a is kept at
    ``MIN_SCALE`` or above (a > 0 keeps the order). Writes â = softplus⁻¹(a) and b in place; no
    change when the Hessian is singular (no rows, or every probability 0 or 1)."""
    g_a, g_b, h_aa, h_ab, h_bb = moments.tolist()
    det = h_aa * h_bb - h_ab * h_ab
    if not det > 1e-12 * max(1.0, h_aa * h_bb) or not math.isfinite(det):
        return
    step_a = damping * (h_bb * g_a - h_ab * g_b) / det
    step_b = damping * (h_aa * g_b - h_ab * g_a) / det
    longest = max(abs(step_a), abs(step_b))
    if longest > max_change:
        step_a, step_b = step_a * max_change / longest, step_b * max_change / longest
    with torch.no_grad():
        scale = max(MIN_SCALE, float(calibrator.scale()) - step_a)
        calibrator.raw_scale.fill_(scale + math.log(-math.expm1(-scale)))  # softplus⁻¹
        calibrator.shift.sub_(step_b)


def distill_weight(step: int, warmup_steps: int, weight: float = DISTILL_WEIGHT) -> float:
    """β at ``step`` (0-based, counted before the step's update): weight · min(1, step / warmup_steps),
    0 at the first step; the full weight from the start when ``warmup_steps`` is 0. The
    specification's default ramp is one epoch: pass the epoch's number of steps."""
    if warmup_steps <= 0:
        return weight
    return weight * min(1.0, step / warmup_steps)


def distillation_loss(student_logits: Tensor, teacher_probs: Tensor, rows: Tensor, weight: float) -> Tensor:
    """β · BCE(ŷ_A, stop_grad(p_T)) on ``rows``: the student learns, the teacher does not.

    student_logits, teacher_probs: [B]; rows: bool [B] (A's sample space). Scalar, 0 without rows.
    """
    return weight * _bce(student_logits, teacher_probs.detach(), rows)


def _bce(logits: Tensor, targets: Tensor, rows: Tensor) -> Tensor:
    """Mean binary cross-entropy with logits over ``rows`` (targets may be soft); 0, attached to the
    graph, without rows."""
    if not bool(rows.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[rows], targets[rows])


def error_correction_loss(
    student: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Tensor,
    teacher_probs: Tensor,
    labels: Tensor,
    rows: Tensor,
    lr: float,
    weight: float,
) -> Tensor:
    """The teacher's feedback from its student: L_A(θ_S') with θ_S' = θ_S − η ∇_{θ_S} L_KD.

    L_KD = weight · BCE(student(inputs; θ_S), p_T) on ``rows``, where p_T = ``teacher_probs`` keeps
    its graph to the teacher θ_T. The look-ahead gradient is taken with ``create_graph``, so θ_S'
    depends on θ_T. The returned L_A = BCE(student(inputs; θ_S'), y_A) on ``rows`` therefore has a
    gradient with respect to θ_T through a double backward. Differentiate it with respect to the
    teacher's parameters only (the student is frozen in the teacher's update). Only the student
    tower takes part; pass its input detached when the layers below it should not move. The
    tower runs twice (at θ_S and at θ_S'): with dropout active the two passes draw different
    masks, so put the tower in eval mode for an exact look-ahead.

    student: the task tower, inputs [B, H] -> logits [B, 1] or [B]; params: its parameters by name
    (θ_S, e.g. ``dict(student.named_parameters())``); teacher_probs, labels: [B]; rows: bool [B];
    lr: η; weight: the distillation weight β of the step. Scalar.
    """
    names = list(params)
    current = [params[name] for name in names]
    logits = functional_call(student, dict(params), (inputs,)).reshape(-1)
    kd = weight * _bce(logits, teacher_probs, rows)
    grads = torch.autograd.grad(kd, current, create_graph=True, allow_unused=True)
    ahead = {
        name: value if grad is None else value - lr * grad
        for name, value, grad in zip(names, current, grads, strict=True)
    }
    ahead_logits = functional_call(student, ahead, (inputs,)).reshape(-1)
    return _bce(ahead_logits, labels, rows)


def choose_partners(
    labels: Tensor,
    mask: Tensor,
    tasks: list[str],
    types: list[str],
    chosen: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Each task's partner in its augmented task: ``chosen`` where given, else the other task whose
    labels correlate most with its own in absolute value on the rows both observe (the first in
    task order on a tie).

    labels: [N, T]; mask: bool [N, T] (the training split's). Raises ``MtlError`` naming the task
    when a task or a chosen partner is not binary, a chosen name is unknown or is the task itself,
    or no other task's correlation is defined.
    """
    regression = [t for t, kind in zip(tasks, types, strict=True) if kind != "binary"]
    if regression:
        raise MtlError(
            f"crossdistil: task {regression[0]!r} is a regression task; cross-task distillation "
            "orders rows by binary labels, so every task must be binary",
            "train the regression task without crossdistil, or drop it from the recipe's tasks",
        )
    if len(tasks) < 2:
        raise MtlError("crossdistil needs two binary tasks or more", "add a second binary task")
    given = dict(chosen or {})
    for task, partner in given.items():
        for name in (task, partner):
            if name not in tasks:
                raise MtlError(f"crossdistil: partners names {name!r}, which is not a task", f"tasks: {tasks}")
        if task == partner:
            raise MtlError(f"crossdistil: task {task!r} is given itself as partner", "choose another task")
    partners: dict[str, str] = {}
    for k, task in enumerate(tasks):
        if task in given:
            partners[task] = given[task]
            continue
        best: tuple[float, str] | None = None
        for j, other in enumerate(tasks):
            both = mask[:, k] & mask[:, j]
            rho = pearson(labels[both, k], labels[both, j]) if j != k else None
            if rho is not None and (best is None or abs(rho) > best[0]):
                best = (abs(rho), other)
        if best is None:
            raise MtlError(
                f"crossdistil: task {task!r} has no partner: its labels' correlation with every other task "
                "is undefined (no common rows, or a label constant on them)",
                f"name its partner under partners, e.g. {task}: <another task>",
            )
        partners[task] = best[1]
    return partners
