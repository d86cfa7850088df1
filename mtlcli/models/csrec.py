"""CSRec: contrastive sharing over sparse sharing's masks, trained by a step of its own.

Bai et al., "A Contrastive Sharing Model for Multi-Task Recommendation", WWW 2022, built to this
project's specification (docs/methods.md, "CSRec"; the formulas are in
``mtlcli.models.contrastive_sharing``). The network and its per-task masks are ``sparse_sharing``'s
(the same module, the same mask search, held inside). What CSRec adds is the training step
(``ContrastiveStep``, declared in its capabilities):

- ``update: alternate`` (default): step t trains task k = (t − 1) mod T alone on its subnet, its loss
  scaled by the weighting's w_k; ``joint``: every task each step;
- on the shared network's weights each task's gradient (of its loss times w_k, plus that of its
  contrastive subnet loss, weighed by λ alone) is scaled by its share π_k, from the moving average of its contributions; the
  scaled gradients are summed. π_k is 0 off task k's mask, so a task's step only moves its own subnet;
- the contrastive subnet loss against ``negatives`` masks drawn per task and step.

The contributions' averages, the negatives' generator state and the epoch's count of updates the
share rule changed are buffers, so a checkpoint carries them and a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, NonNegativeInt
from torch import Tensor, nn

from mtlcli.data.batch import Batch
from mtlcli.data.source import BatchSource
from mtlcli.models.base import Capabilities, InputSpec, register_scheme
from mtlcli.models.contrastive_sharing import (
    CONTRASTIVE_WEIGHT,
    IMPACT_DECAY,
    NEGATIVES,
    SWAP,
    TEMPERATURE,
    ContributionAverage,
    apply_shares,
    conflicting,
    contrastive_masks,
    contrastive_subnet_loss,
    contributions,
    layer_reliance,
    negative_masks,
    shares,
    wins,
)
from mtlcli.models.sparse_sharing import SparseSharing, SparseSharingParams
from mtlcli.models.views import Introspection
from mtlcli.train.losses import check_finite, task_loss_sums

if TYPE_CHECKING:
    from mtlcli.train.step import StepAt, StepDone, StepParts
from mtlcli.weighting.base import build_weighting, weightings_by_gradients

SHARE_CHANGED = "share_changed"  # the epoch record's count of weight updates the share rule scaled down


class CSRecParams(SparseSharingParams):
    update: Literal["alternate", "joint"] = "alternate"
    impact_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = IMPACT_DECAY
    negatives: NonNegativeInt = NEGATIVES
    swap: Annotated[float, Field(gt=0.0, le=1.0)] = SWAP
    contrastive_weight: NonNegativeFloat = CONTRASTIVE_WEIGHT
    temperature: Annotated[float, Field(gt=0.0)] = TEMPERATURE


class CSRec(nn.Module):
    """``sparse_sharing``'s network (``net``) with the state CSRec's step keeps. Output [B, T]."""

    draws: Tensor
    changed: Tensor

    def __init__(self, inputs: InputSpec, params: CSRecParams) -> None:
        super().__init__()
        own = {"update", "impact_decay", "negatives", "swap", "contrastive_weight", "temperature"}
        self.net = SparseSharing(inputs, **params.model_dump(exclude=own))
        self.tasks = self.net.tasks
        self.update, self.negatives, self.swap = params.update, params.negatives, params.swap
        self.contrastive_weight, self.temperature = params.contrastive_weight, params.temperature
        n_weights = sum(linear.weight.numel() for linear in self.net.linears())
        self.impact = ContributionAverage(len(self.tasks), n_weights, params.impact_decay)
        self.register_buffer("draws", torch.Generator().manual_seed(0).get_state())  # the negatives' generator
        self.register_buffer("changed", torch.zeros((), dtype=torch.long))  # this epoch's, so far

    def forward(self, batch: Batch) -> Tensor:
        out: Tensor = self.net(batch)
        return out

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            masks=self.net.masks,
            search=self.search,
            shared_representation=self.net.z,
            step=ContrastiveStep,
            mask_contest=self.mask_contest,
        )

    def search(self, train: BatchSource, batch_size: int, lr: float, seed: int) -> None:
        """``sparse_sharing``'s mask search (iterative magnitude pruning per task)."""
        self.net.search_masks(train, batch_size, lr, seed)

    def stacked_masks(self) -> list[Tensor]:
        """Per layer, the tasks' masks stacked: [T, out, in]."""
        masks = self.net.masks()
        return [torch.stack([masks[t][layer] for t in self.tasks]) for layer in range(len(self.net.bottom))]

    def task_shares(self) -> Tensor:
        """π [T, N] over the flattened shared weights, from the contributions' averages."""
        flat = torch.cat([m.flatten(1) for m in self.stacked_masks()], dim=1)
        return shares(self.impact.impact, flat)

    @torch.no_grad()
    def mask_contest(self, batch: Batch) -> list[dict[str, dict[str, float]]]:
        """Per layer: Δ_k on ``batch`` (the task's mean loss with that layer's shared weights
        removed from its subnet, minus with them; losses unweighted) and the share of the layer's
        conflicting weights each task wins (its share is 1 there)."""
        x = self.net.embedding(batch)
        binary = torch.tensor([t == "binary" for t in self.net.types])
        layer_masks = self.stacked_masks()
        per_layer_shares = self.task_shares().split([m[0].numel() for m in layer_masks], dim=1)
        reliance: list[dict[str, float]] = [{} for _ in layer_masks]
        for k, task in enumerate(self.tasks):
            tower = self.net.towers[task]

            def loss(masks: Sequence[Tensor], k: int = k, tower: nn.Module = tower) -> Tensor:
                return task_loss(tower(self.net.masked_hidden(x, masks)).squeeze(1), batch, k, binary, None)

            own = [m[k] for m in layer_masks]
            without = [contrastive_masks(m)[k] for m in layer_masks]
            for layer, delta in enumerate(layer_reliance(loss, own, without)):
                reliance[layer][task] = float(delta)
        return [
            {
                "reliance": reliance[layer],
                "wins": dict(zip(self.tasks, wins(pi, conflicting(masks).flatten()).tolist(), strict=True)),
            }
            for layer, (masks, pi) in enumerate(zip(layer_masks, per_layer_shares, strict=True))
        ]

    def introspect(self, batch: Batch) -> Introspection:
        """No gates or mixing matrices; the masks are given by ``capabilities.masks``."""
        return Introspection()

    def last_shared_layer(self) -> list[Tensor]:
        return self.net.last_shared_layer()

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        return {
            group: {f"net.{name}": p for name, p in params.items()}
            for group, params in self.net.parameter_groups().items()
        }


def task_loss(z: Tensor, batch: Batch, k: int, binary: Tensor, pos_weight: Tensor | None) -> Tensor:
    """Task k's mean loss over its labelled rows from its logits z [B] (as the step's losses)."""
    total, count = task_loss_sum(z, batch, k, binary, pos_weight)
    return total / count.clamp_min(1.0)


def task_loss_sum(z: Tensor, batch: Batch, k: int, binary: Tensor, pos_weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """Task k's loss summed over its labelled rows from its logits z [B], and their count (scalars)."""
    y, keep = batch.labels[:, k], batch.label_mask[:, k].to(z.dtype)
    if bool(binary[k]):
        weight = None if pos_weight is None else pos_weight[k]
        per_row = F.binary_cross_entropy_with_logits(z, y, reduction="none", pos_weight=weight)
    else:
        per_row = (z - y) ** 2
    return (per_row * keep).sum(), keep.sum()


class ContrastiveStep:
    """CSRec's training step (see the module's docstring).

    On several processes every value it decides from is the global batch's, so each rank takes
    the one-process step: the losses of the tasks' subnets and of their negatives are global means
    (one exchange of their sums and counts), the trained tasks' gradients on the shared weights
    and the tasks' row counts are summed over the ranks in one all-reduce before the contributions,
    the shares and the count of changed updates are computed from them; the rest of the model's
    gradients are summed by the exchange's backward pass (``collectives``: the forward pass is
    this step's own, not DDP's). The task in turn comes from the step's number and the negatives
    from one generator seeded alike, so both are the same on every rank."""

    def __init__(self, parts: StepParts) -> None:
        self.parts = parts
        self.model = cast(CSRec, parts.model)
        self.generator = torch.Generator()
        parts.exchange.bind(parts.model)  # row-wise tables take the union of the ranks' rows

    def __call__(self, batch: Batch, at: StepAt) -> StepDone:
        p, m = self.parts, self.model
        n_tasks = len(p.tasks)
        p.optimizer.zero_grad()
        x = m.net.embedding(batch)
        layer_masks = m.stacked_masks()
        hidden = [m.net.masked_hidden(x, [mask[k] for mask in layer_masks]) for k in range(n_tasks)]
        logits = torch.stack([m.net.towers[t](h).squeeze(1) for t, h in zip(p.tasks, hidden, strict=True)], dim=1)
        sums, counts = task_loss_sums(logits, batch, p.binary, p.pos_weight)
        trained = [(at.number - 1) % n_tasks] if m.update == "alternate" else list(range(n_tasks))
        negative_sums, negative_counts = self._negatives(x, batch, layer_masks, trained, at)
        every = p.exchange.losses(torch.cat([sums, negative_sums]), torch.cat([counts.to(sums.dtype), negative_counts]))
        losses, negatives = every[:n_tasks], every[n_tasks:].view(len(trained), len(negative_sums) // len(trained))
        check_finite(losses, p.tasks, at)
        chosen = torch.zeros(n_tasks, dtype=torch.bool, device=losses.device)
        chosen[trained] = True
        contrast = self._contrastive(losses, negatives, trained)

        shared = [linear.weight for linear in m.net.linears()]
        grads = [self._flat_grad(losses[k], shared) for k in trained]
        extra = [self._flat_grad(contrast[k], shared) for k in trained]
        if contrast.requires_grad:  # CSRec's own term, weighed by λ alone
            contrast.sum().backward(retain_graph=True)
        weights = p.exchange.backward(p.strategy, torch.where(chosen, losses, losses.detach()), m).detach()

        # the global batch's gradients [T', N] (the task's, the contrastive term's) and row counts [T]
        local = torch.cat([torch.stack(grads).flatten(), torch.stack(extra).flatten(), counts.to(sums.dtype)])
        summed = p.exchange.ranks.sum(local)
        size = len(trained) * grads[0].numel()
        global_grads = summed[:size].view(len(trained), -1)
        global_extra = summed[size : 2 * size].view(len(trained), -1)
        global_counts = summed[2 * size :]

        flat_weight = torch.cat([w.detach().flatten() for w in shared])
        for k, g in zip(trained, global_grads, strict=True):
            if bool(global_counts[k] > 0):  # a task without labelled rows in the batch measured nothing
                m.impact.update(k, contributions(flat_weight, g.unsqueeze(0))[0])
        pi = m.task_shares()
        scaled = torch.stack([weights[k] * g + c for k, g, c in zip(trained, global_grads, global_extra, strict=True)])
        update, count = apply_shares(scaled, pi[trained])
        offset = 0
        for w in shared:
            w.grad = update[offset : offset + w.numel()].view_as(w).clone()
            offset += w.numel()
        with torch.no_grad():
            if at.in_epoch == 1:
                m.changed.zero_()
            m.changed += count
        p.optimizer.step(at.number)
        from mtlcli.train.step import StepDone  # at run time: train.step imports the models and weightings

        return StepDone(losses.detach(), weights * chosen, None, {SHARE_CHANGED: float(m.changed)})

    def _negatives(
        self, x: Tensor, batch: Batch, layer_masks: list[Tensor], trained: list[int], at: StepAt
    ) -> tuple[Tensor, Tensor]:
        """Each trained task's negative subnets' loss sums and row counts on this rank's rows, task
        by task: [T' · negatives] each (empty without a contrastive term)."""
        p, m = self.parts, self.model
        if m.negatives == 0 or m.contrastive_weight == 0:
            empty = x.new_zeros(0)
            return empty, empty
        if at.number == 1:
            self.generator.manual_seed(p.settings.seed)
        else:
            self.generator.set_state(m.draws.cpu())
        sums, counts = [], []
        for k in trained:
            drawn = [negative_masks(mask[k], self.generator, m.negatives, m.swap) for mask in layer_masks]
            tower = m.net.towers[p.tasks[k]]
            for n in range(m.negatives):
                z = tower(m.net.masked_hidden(x, [d[n] for d in drawn])).squeeze(1)
                total, count = task_loss_sum(z, batch, k, p.binary, p.pos_weight)
                sums.append(total)
                counts.append(count)
        with torch.no_grad():
            m.draws.copy_(self.generator.get_state())
        return torch.stack(sums), torch.stack(counts)

    def _contrastive(self, losses: Tensor, negatives: Tensor, trained: list[int]) -> Tensor:
        """Each trained task's contrastive subnet loss (0 for the others): [T]. losses: the tasks'
        global losses [T]; negatives: the trained tasks' negatives' global losses [T', negatives]."""
        m = self.model
        out = [losses.new_zeros(())] * len(losses)
        if negatives.shape[1] == 0:
            return torch.stack(out)
        for row, k in enumerate(trained):
            out[k] = contrastive_subnet_loss(losses[k], negatives[row], m.contrastive_weight, m.temperature)
        return torch.stack(out)

    @staticmethod
    def _flat_grad(value: Tensor, shared: list[Tensor]) -> Tensor:
        """d value / d shared, flattened (zeros where it does not reach)."""
        if not value.requires_grad:
            return torch.cat([torch.zeros_like(w).flatten() for w in shared])
        grads = torch.autograd.grad(value, shared, retain_graph=True, allow_unused=True)
        return torch.cat(
            [(torch.zeros_like(w) if g is None else g).flatten() for g, w in zip(grads, shared, strict=True)]
        )


def check(params: CSRecParams, recipe: Any) -> list[tuple[str, str]]:
    """Gradient strategies that combine several tasks' gradients (declared ``task_gradients``) are
    refused: CSRec defines its own update of the shared weights."""
    tasks = list(recipe.tasks)
    strategy = build_weighting(recipe.loss.weighting, recipe.loss.params, tasks)
    if strategy.capabilities.task_gradients:
        combining, weighing = weightings_by_gradients(tasks)
        return [
            (
                "scheme",
                f"csrec defines its own update (each task's gradient scaled by its share of the weights it "
                f"shares, tasks in turn), so it cannot be combined with the gradient strategy "
                f"loss.weighting: {recipe.loss.weighting} (the weightings that combine the tasks' gradients "
                f"themselves: {', '.join(combining)}); choose a loss weighting: {', '.join(weighing)}",
            )
        ]
    return []


@register_scheme(
    "csrec",
    CSRecParams,
    "contrastive sharing: sparse sharing's masks, share-scaled updates, tasks in turn (WWW 2022)",
    check,
)
def build(params: CSRecParams, inputs: InputSpec) -> CSRec:
    return CSRec(inputs, params)
