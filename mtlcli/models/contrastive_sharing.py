"""CSRec's contrastive sharing: the mathematical core, as plain functions and one module (the
scheme ``csrec`` and its training step, in ``mtlcli.models.csrec``, use them).

Bai et al., "A Contrastive Sharing Model for Multi-Task Recommendation", WWW 2022
(doi:10.1145/3485447.3512043).

What the paper states [paper]: as in sparse sharing, task k trains the subnet W ⊙ M_k of one shared
network, chosen by its binary mask M_k. Parameters kept by two or more masks receive conflicting
gradients. A *contrastive mask* measures how much each parameter contributes to each task, and a
conflicting parameter is updated relying more on the task it affects more. Training *alternates*
between the tasks. The survey's summary adds a pairwise loss at the subnet level, between the
task's own subnet (the positive) and several generated negative subnets.

The exact forms are not available to the project; these are its own [spec] choices
(docs/methods.md, "CSRec"):

- ``conflicting``: C, the entries kept by two masks or more; ``contrastive_masks``: M̄_k = M_k ⊙ (1 − C),
  task k's subnet without what it shares;
- ``contributions``: I_{k,j} = |w_j · ∂L_k/∂w_j|, the first-order estimate of how much L_k changes when
  w_j is removed. ``ContributionAverage`` smooths it per task by a moving average (decay
  ``IMPACT_DECAY``); a task's first update sets its average;
- ``shares``: π_{k,j} = I_{k,j} / max_{k' ∈ tasks(j)} I_{k',j} ∈ [0, 1] on task k's entries (0 off them).
  An entry of one task only, or one where every contribution is 0, gets share 1: that task's
  gradient unscaled; ``apply_shares`` scales per-task gradients by them and counts the entries
  whose update the rule changed;
- ``negative_masks``: a negative subnet swaps a share ρ of M_k's kept entries with as many pruned
  ones (rounded to nearest, per layer, uniformly from a given generator), keeping the density;
- ``contrastive_subnet_loss``: λ · mean over negatives of −log σ((L_neg − L_pos) / τ);
- ``reliance``, ``layer_reliance``: Δ_k = L_k(W ⊙ M̄_k) − L_k(W ⊙ M_k), in total and per layer (only
  that layer's shared entries removed), for explain; ``wins``: the share of conflicting entries
  where a task has share 1.

Within one step the order is: the step's loss and its gradient on W (under the task's mask, so
zero off it), ``contributions`` from that gradient, ``ContributionAverage.update``, ``shares``
from the updated average, ``apply_shares``. A task's own contribution is thus measured before its
first share is taken.

Masks and their derived tensors are float 0/1 (as ``sparse_sharing`` stores them) stacked over
tasks: [T, ...] with ``...`` one layer's weight shape (or all layers flattened into one vector).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMPACT_DECAY = 0.9  # the contribution's moving-average decay [spec]
SWAP = 0.1  # ρ: the share of kept entries a negative subnet swaps [spec]
NEGATIVES = 2  # negative subnets per task [spec]
CONTRASTIVE_WEIGHT = 0.1  # λ [spec]
TEMPERATURE = 1.0  # τ [spec]


def conflicting(masks: Tensor) -> Tensor:
    """C: bool [...], the entries two or more tasks' masks keep. masks: [T, ...] (0/1)."""
    return (masks > 0).sum(0) >= 2


def contrastive_masks(masks: Tensor) -> Tensor:
    """M̄_k = M_k ⊙ (1 − C) for every task: [T, ...], same dtype as ``masks``."""
    return masks * (~conflicting(masks)).to(masks.dtype)


def contributions(weight: Tensor, grads: Tensor) -> Tensor:
    """I_{k,j} = |w_j · ∂L_k/∂w_j|. weight: [...]; grads: [T, ...] (task k's gradient in row k;
    zero off its mask). Output [T, ...], detached."""
    return (weight.detach().unsqueeze(0) * grads.detach()).abs()


class ContributionAverage(nn.Module):
    """The moving average of each task's contributions over the flattened shared weights.

    Buffers (saved with a checkpoint): ``impact`` [T, N], the averaged I; ``updates`` int64 [T],
    how many times each task's contributions have been folded in (0 = none yet: the next sets it).
    """

    impact: Tensor
    updates: Tensor

    def __init__(self, n_tasks: int, n_weights: int, decay: float = IMPACT_DECAY) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the contribution's decay is in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("impact", torch.zeros(n_tasks, n_weights))
        self.register_buffer("updates", torch.zeros(n_tasks, dtype=torch.long))

    @torch.no_grad()
    def update(self, task: int, contribution: Tensor) -> Tensor:
        """Fold task ``task``'s contributions [N] into its average; returns the averages [T, N]."""
        new = contribution.to(self.impact.dtype)
        if int(self.updates[task]) == 0:
            self.impact[task] = new
        else:
            self.impact[task] = self.decay * self.impact[task] + (1.0 - self.decay) * new
        self.updates[task] += 1
        return self.impact


def shares(impact: Tensor, masks: Tensor) -> Tensor:
    """π_{k,j} = I_{k,j} / max over the tasks that keep j of I_{k',j}, on task k's entries; 0 off them.

    impact: [T, ...] (non-negative); masks: [T, ...] (0/1). Output [T, ...] in [0, 1]. Where the
    maximum is 0 (a single task's entry with no contribution measured, or nothing measured), the
    share is 1.
    """
    kept = masks > 0
    own = torch.where(kept, impact, 0.0)
    top = own.max(0).values.unsqueeze(0)
    ratio = torch.where(top > 0, own / torch.where(top > 0, top, 1.0), 1.0)
    return torch.where(kept, ratio, 0.0)


def apply_shares(grads: Tensor, task_shares: Tensor) -> tuple[Tensor, int]:
    """The update of the shared weights from the tasks present: Σ_k π_k ⊙ g_k, and how many entries
    the rule changed (some task with a non-zero gradient there has a share below 1).

    grads: [T', ...], the gradients of the tasks in this step (one task when training alternates);
    task_shares: [T', ...], those tasks' rows of ``shares``. Output ([...], count).
    """
    changed = ((grads != 0) & (task_shares < 1)).any(0)
    return (task_shares * grads).sum(0), int(changed.sum())


def negative_masks(mask: Tensor, generator: torch.Generator, count: int = NEGATIVES, swap: float = SWAP) -> Tensor:
    """``count`` negative masks for one layer of one task: each turns n = round(ρ · kept) kept
    entries off and as many pruned entries on (n at most the pruned count), drawn uniformly
    without replacement, so each has the mask's density.

    mask: [...] (0/1); generator: the run's, so that a resumed run draws the same. Output
    [count, ...]. A mask with nothing pruned gives copies of itself.
    """
    flat = mask.reshape(-1)
    kept = torch.nonzero(flat > 0).squeeze(1)
    pruned = torch.nonzero(flat <= 0).squeeze(1)
    n = min(math.floor(swap * kept.numel() + 0.5), pruned.numel())
    device = generator.device
    negatives = []
    for _ in range(count):
        off = kept[torch.randperm(kept.numel(), generator=generator, device=device)[:n].to(flat.device)]
        on = pruned[torch.randperm(pruned.numel(), generator=generator, device=device)[:n].to(flat.device)]
        negative = flat.clone()
        negative[off] = 0.0
        negative[on] = 1.0
        negatives.append(negative.view_as(mask))
    return torch.stack(negatives)


def contrastive_subnet_loss(
    positive: Tensor, negatives: Tensor, weight: float = CONTRASTIVE_WEIGHT, temperature: float = TEMPERATURE
) -> Tensor:
    """λ · mean over negatives of −log σ((L_neg − L_pos) / τ): small when the task's own subnet does
    better than the perturbed ones. positive: L_k(pos), a scalar; negatives: L_k(neg) [N]. The
    gradient flows through both as given. Scalar."""
    return weight * F.softplus(-(negatives - positive) / temperature).mean()


SubnetLoss = Callable[[Sequence[Tensor]], Tensor]


@torch.no_grad()
def reliance(loss: SubnetLoss, masks: Sequence[Tensor], contrastive: Sequence[Tensor]) -> Tensor:
    """Δ_k = L_k(W ⊙ M̄_k) − L_k(W ⊙ M_k): how much task k loses without the weights it shares.

    loss: task k's loss on a batch with the shared network's layers masked by the given masks (one
    per layer); masks, contrastive: task k's M_k and M̄_k per layer. Scalar."""
    return loss(contrastive) - loss(masks)


@torch.no_grad()
def layer_reliance(loss: SubnetLoss, masks: Sequence[Tensor], contrastive: Sequence[Tensor]) -> list[Tensor]:
    """Δ_k per layer l: L_k with layer l alone under M̄_k (the others under M_k) − L_k under M_k."""
    base = loss(masks)
    return [loss([*masks[:layer], contrastive[layer], *masks[layer + 1 :]]) - base for layer in range(len(masks))]


def wins(task_shares: Tensor, conflict: Tensor) -> Tensor:
    """The share of conflicting entries where each task's share is 1 (the task the entry relies on
    most; a tie counts for every task in it): [T]; 0 when nothing conflicts.

    task_shares: [T, ...] (``shares``); conflict: bool [...] (``conflicting``)."""
    total = int(conflict.sum())
    if total == 0:
        return task_shares.new_zeros(task_shares.shape[0])
    return ((task_shares >= 1) & conflict.unsqueeze(0)).flatten(1).sum(1).to(task_shares.dtype) / total
