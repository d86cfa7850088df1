"""Adaptive Information Transfer Multi-task framework (AITM).

Xi, Chen, Yan, Zhang, Zhu, Zhuang, Chen, "Modeling the Sequential Dependence among Audience
Multi-step Conversions with Multi-task Learning in Targeted Display Advertising", KDD 2021.
The tasks form a funnel (impression -> click -> purchase ...), in the recipe's task order. Each
task t has a tower over the shared embedding giving q_t [B, d]. For t >= 2 the AIT module weighs
what the previous task transfers, p_{t-1} = g_{t-1}(z_{t-1}) (Linear -> ReLU), against q_t by
self-attention over the two:

    w_u = softmax_u(<h2(u), h3(u)> / sqrt(d)),  z_t = sum_u w_u h1(u),  u in {p_{t-1}, q_t},

with z_1 = q_1 and h1, h2, h3 one Linear layer each; task t's head maps z_t to its logit. The
behavioural expectation calibrator adds alpha * mean_rows max(p̂_t - p̂_{t-1}, 0) to the loss
(p̂ the predicted probabilities): a later step of the funnel should not be likelier than an
earlier one. It is declared as the scheme's loss term (``Capabilities.loss_terms``) on task t.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from mtlcli.data.batch import Batch
from mtlcli.models.base import Capabilities, Dropout, InputSpec, ModelParams, group_by_prefix, register_scheme
from mtlcli.models.blocks import FeatureEmbedding, last_linear, mlp
from mtlcli.models.views import GateRecord, Introspection, SharedRepresentation


class AITMParams(ModelParams):
    tower_units: list[PositiveInt] = Field(default=[64, 32], min_length=1)
    head_units: list[PositiveInt] = []
    calibrator_weight: Annotated[float, Field(ge=0.0)] = 0.6  # alpha of the calibrator (the paper's 0.6)
    dropout: Dropout = 0.0


class AIT(nn.Module):
    """Self-attention over what the previous task transfers and the task's own tower output.
    Input two [B, d]; output z [B, d] and the attention weights [B, 2] (transferred, own)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.value, self.query, self.key = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, transferred: Tensor, own: Tensor) -> tuple[Tensor, Tensor]:
        u = torch.stack([transferred, own], dim=1)  # [B, 2, d]
        weights = torch.softmax((self.query(u) * self.key(u)).sum(-1) * self.scale, dim=-1)  # [B, 2]
        return (weights.unsqueeze(-1) * self.value(u)).sum(1), weights


class AITM(nn.Module):
    """embedding -> one tower per task (q_t) -> AIT chain along the tasks -> one head per task.

    Shared representation: the embedded input as the last task's tower reads it, each earlier
    task's z_t as its head reads it, and z_{T-1} as the last transfer reads it (task T alone
    reaches its tower, AIT module, head and the transfer into it; everything else feeds a later
    task through the chain)."""

    def __init__(
        self,
        inputs: InputSpec,
        embedding_dim: int,
        tower_units: list[int],
        head_units: list[int],
        calibrator_weight: float,
        dropout: float,
    ) -> None:
        super().__init__()
        self.tasks = list(inputs.tasks)
        self.embedding = FeatureEmbedding.for_inputs(inputs, embedding_dim)
        dim = tower_units[-1]
        self.towers = nn.ModuleDict({t: mlp(self.embedding.out_dim, tower_units, dropout) for t in self.tasks})
        later = self.tasks[1:]
        self.transfers = nn.ModuleDict({t: nn.Sequential(nn.Linear(dim, dim), nn.ReLU()) for t in later})
        self.ait = nn.ModuleDict({t: AIT(dim) for t in later})
        self.heads = nn.ModuleDict({t: mlp(dim, head_units, dropout, out_dim=1) for t in self.tasks})
        self.alpha = calibrator_weight
        spaces = inputs.task_spaces or [None] * len(self.tasks)
        # calibrated pairs (t-1, t): both binary, and task t not already conditional on task t-1
        # (in t-1's positive space p̂_t is P(t | t-1), which no calibrator should bound by p̂_{t-1})
        self.pairs = [
            k
            for k in range(1, len(self.tasks))
            if inputs.task_types[k - 1] == inputs.task_types[k] == "binary" and spaces[k] != self.tasks[k - 1]
        ]
        self.z = SharedRepresentation()

    def run(self, batch: Batch) -> tuple[Tensor, list[Tensor]]:
        """Logits [B, T] and each later task's attention weights [B, 2] (transferred, own)."""
        x = self.embedding(batch)
        last = len(self.tasks) - 1
        cut: list[Tensor] = []
        columns, attention = [], []
        z_prev: Tensor | None = None
        for k, task in enumerate(self.tasks):
            x_task = self.z.alias(x) if k == last else x
            if k == last:
                cut.append(x_task)
            q = self.towers[task](x_task)
            if z_prev is None:
                z = q
            else:
                z_in = self.z.alias(z_prev) if k == last else z_prev
                if k == last:
                    cut.append(z_in)
                z, weights = self.ait[task](self.transfers[task](z_in), q)
                attention.append(weights)
            z_head = self.z.alias(z) if k < last else z
            if k < last:
                cut.append(z_head)
            columns.append(self.heads[task](z_head))
            z_prev = z
        self.z.keep(*cut)
        return torch.cat(columns, dim=1), attention

    def forward(self, batch: Batch) -> Tensor:
        return self.run(batch)[0]

    def calibrator(self, logits: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """The calibrator's sums over the batch's rows [T] (on the later task of each calibrated
        pair) and the rows counted [T]: alpha * sum_rows max(p̂_t - p̂_{t-1}, 0), every row."""
        sums = logits.new_zeros(len(self.tasks))
        counts = logits.new_zeros(len(self.tasks))
        if not self.pairs or self.alpha == 0:
            return sums, counts
        probs = torch.sigmoid(logits)
        index = torch.tensor(self.pairs, device=logits.device)
        excess = torch.relu(probs[:, index] - probs[:, index - 1]).sum(0)
        sums = sums.index_add(0, index, self.alpha * excess)
        counts = counts.index_fill(0, index, float(logits.shape[0]))
        return sums, counts

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(shared_representation=self.z, loss_terms=self.calibrator)

    def introspect(self, batch: Batch) -> Introspection:
        """Gate ``transfer``/``<task>`` (every task but the first): its AIT attention [B, 2] on
        what the previous task transfers and on its own tower's output."""
        _, attention = self.run(batch)
        return Introspection(
            [
                GateRecord("transfer", task, weights, [f"from {prev}", "own"])
                for prev, task, weights in zip(self.tasks[:-1], self.tasks[1:], attention, strict=True)
            ]
        )

    def last_shared_layer(self) -> list[Tensor]:
        """The first task's tower output layer: every later task reads it through the chain (with
        one task, only the embedding table is shared)."""
        if len(self.tasks) == 1:
            return [self.embedding.table.weight]
        return [last_linear(self.towers[self.tasks[0]]).weight]

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        prefixes: dict[str, list[str]] = {t: [f"heads.{t}."] for t in self.tasks}
        last = self.tasks[-1]
        prefixes[last] += [f"towers.{last}.", f"ait.{last}.", f"transfers.{last}."]
        return group_by_prefix(self, prefixes)


@register_scheme("aitm", AITMParams, "sequential tasks: adaptive information transfer + calibrator (KDD 2021)")
def build(params: AITMParams, inputs: InputSpec) -> AITM:
    return AITM(inputs, **params.model_dump())
