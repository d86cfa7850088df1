"""Sparse sharing: each task uses a subnetwork of one shared network, given by a binary mask.

Sun, Shao, Li, Liu, Yan, Qiu, Huang, "Learning Sparse Sharing Architectures for Multiple Tasks",
AAAI 2020. For each task, iterative magnitude pruning finds a mask over the shared network's
weights (a lottery-ticket style search): train the network on that task alone for a warm-up,
prune the smallest-magnitude surviving weights of every layer, rewind the weights to their
initial values, repeat until the target density; then all tasks train together, each through its
own mask. Where masks overlap the tasks share weights; elsewhere each weight serves some tasks only.

Here the masked network is the bottom MLP over the shared feature embedding (the embedding and the
biases are shared unmasked); each task has its own tower. Masks are persistent buffers, so they are
saved with the model and restored with a checkpoint.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from typing import Annotated, cast

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from mtlcli.data.batch import Batch
from mtlcli.data.source import BatchSource
from mtlcli.models.base import Capabilities, Dropout, InputSpec, ModelParams, group_by_prefix, register_scheme
from mtlcli.models.blocks import FeatureEmbedding, mlp
from mtlcli.models.views import Introspection, SharedRepresentation


class SparseSharingParams(ModelParams):
    bottom_units: list[PositiveInt] = Field(default=[128, 64], min_length=1)
    tower_units: list[PositiveInt] = [32]
    density: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    prune_rate: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    warmup_steps: PositiveInt = 200
    dropout: Dropout = 0.0


class SparseSharing(nn.Module):
    """embedding -> per task: bottom MLP with weights W ⊙ M_task -> task tower -> logit. Output [B, T].

    Shared representation: each task's masked bottom output (its tower's input)."""

    def __init__(
        self,
        inputs: InputSpec,
        embedding_dim: int,
        bottom_units: list[int],
        tower_units: list[int],
        density: float,
        prune_rate: float,
        warmup_steps: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.tasks = list(inputs.tasks)
        self.types = list(inputs.task_types)
        self.density, self.prune_rate, self.warmup_steps = density, prune_rate, warmup_steps
        self.embedding = FeatureEmbedding.for_inputs(inputs, embedding_dim)
        widths = [self.embedding.out_dim, *bottom_units]
        self.bottom = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        for k in range(len(self.tasks)):
            for layer, linear in enumerate(self.linears()):
                self.register_buffer(f"mask_{k}_{layer}", torch.ones_like(linear.weight))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.towers = nn.ModuleDict({t: mlp(bottom_units[-1], tower_units, dropout, out_dim=1) for t in self.tasks})
        self.z = SharedRepresentation()

    def linears(self) -> list[nn.Linear]:
        return [cast(nn.Linear, module) for module in self.bottom]

    def mask(self, k: int, layer: int) -> Tensor:
        mask: Tensor = getattr(self, f"mask_{k}_{layer}")
        return mask

    def task_hidden(self, x: Tensor, k: int) -> Tensor:
        """Task k's pass through the shared network under its masks: the input of its tower."""
        return self.masked_hidden(x, [self.mask(k, layer) for layer in range(len(self.bottom))])

    def masked_hidden(self, x: Tensor, masks: Sequence[Tensor]) -> Tensor:
        """The shared network's pass with each layer's weight under the given mask (one per layer,
        the weight's shape): [B, in] -> [B, last bottom width]."""
        h = x
        for linear, mask in zip(self.linears(), masks, strict=True):
            h = self.dropout(torch.relu(F.linear(h, linear.weight * mask, linear.bias)))
        return h

    def task_output(self, x: Tensor, k: int) -> Tensor:
        return self.towers[self.tasks[k]](self.task_hidden(x, k)).squeeze(1)

    def forward(self, batch: Batch) -> Tensor:
        x = self.embedding(batch)
        hidden = [self.task_hidden(x, k) for k in range(len(self.tasks))]
        self.z.keep(*hidden)
        return torch.stack([self.towers[t](h).squeeze(1) for t, h in zip(self.tasks, hidden, strict=True)], dim=1)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(masks=self.masks, search=self.search_masks, shared_representation=self.z)

    def masks(self) -> dict[str, list[Tensor]]:
        """Each task's binary masks over the bottom layers' weights."""
        return {t: [self.mask(k, layer) for layer in range(len(self.bottom))] for k, t in enumerate(self.tasks)}

    def search_masks(self, train: BatchSource, batch_size: int, lr: float, seed: int) -> None:
        """Iterative magnitude pruning per task (warm-up on the task alone, prune, rewind), then
        rewind every weight to its initial value and keep the masks."""
        initial = copy.deepcopy({k: v for k, v in self.state_dict().items() if "mask_" not in k})
        rounds = max(0, math.ceil(math.log(self.density) / math.log(1.0 - self.prune_rate) - 1e-9))
        generator = torch.Generator().manual_seed(seed)
        for k in range(len(self.tasks)):
            for _ in range(rounds):
                self.load_state_dict(initial, strict=False)
                self._warm_up(k, train, batch_size, lr, generator)
                self._prune(k)
        self.load_state_dict(initial, strict=False)
        self.zero_grad(set_to_none=True)

    def _warm_up(self, k: int, train: BatchSource, batch_size: int, lr: float, generator: torch.Generator) -> None:
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        binary = self.types[k] == "binary"
        steps = 0
        self.train()
        while steps < self.warmup_steps:
            for batch in train.batches(batch_size, shuffle=True, generator=generator):
                z = self.task_output(self.embedding(batch), k)
                y, keep = batch.labels[:, k], batch.label_mask[:, k]
                if not bool(keep.any()):
                    continue
                loss = F.binary_cross_entropy_with_logits(z[keep], y[keep]) if binary else F.mse_loss(z[keep], y[keep])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                if steps >= self.warmup_steps:
                    break

    @torch.no_grad()
    def _prune(self, k: int) -> None:
        for layer, linear in enumerate(self.linears()):
            mask = self.mask(k, layer)
            alive = int(mask.sum())
            floor = math.ceil(self.density * mask.numel())
            keep = max(floor, alive - math.floor(self.prune_rate * alive))
            if keep >= alive:
                continue
            scores = (linear.weight.abs() * mask).flatten()
            scores[mask.flatten() == 0] = -1.0
            order = torch.argsort(scores, descending=True, stable=True)
            new = torch.zeros_like(scores)
            new[order[:keep]] = 1.0
            mask.copy_(new.view_as(mask))

    def introspect(self, batch: Batch) -> Introspection:
        """No gates or mixing matrices; the task masks are given by ``masks()``."""
        return Introspection()

    def last_shared_layer(self) -> list[Tensor]:
        """The shared network's last layer (W, which each task uses through its mask)."""
        return [self.linears()[-1].weight]

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        return group_by_prefix(self, {t: [f"towers.{t}."] for t in self.tasks})


@register_scheme(
    "sparse_sharing",
    SparseSharingParams,
    "sparse sharing: per-task binary masks over one network, found by pruning (AAAI 2020)",
)
def build(params: SparseSharingParams, inputs: InputSpec) -> SparseSharing:
    return SparseSharing(inputs, **params.model_dump())
