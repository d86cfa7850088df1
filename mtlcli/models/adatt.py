"""Adaptive Task-to-Task Fusion Network (AdaTT), with shared experts (AdaTT-sp).

Li, Zhang, Yuan, Gao, Zhang, Yang, Liu, Yang, "AdaTT: Adaptive Task-to-Task Fusion Network for
Multitask Learning in Recommendations", KDD 2023. Every level l
has m experts per task (E^l_t, reading that task's previous output) and m_s shared experts
(reading the shared previous output); all of them stacked are E^l [B, T m + m_s, H]. Task t's
fusion unit adds a gated fusion of every expert to a linear fusion of its own (the residual):

    f^l_t = v^l_t^T E^l_t + g^l_t(f^{l-1}_t)^T E^l,   g^l_t = softmax(W^l_t f^{l-1}_t)

with learnt weights v^l_t [m]. Every level but the last also has a shared fusion unit,
f^l_s = softmax(W^l_s f^{l-1}_s)^T E^l, that the next level's shared experts read. The first level
reads the embedded input everywhere; each task's tower reads its f^L_t.
"""

from __future__ import annotations

from typing import Annotated, cast

import torch
from pydantic import Field, NonNegativeInt, PositiveInt
from torch import Tensor, nn

from mtlcli.data.batch import Batch
from mtlcli.models.base import Capabilities, Dropout, InputSpec, ModelParams, group_by_prefix, register_scheme
from mtlcli.models.blocks import ExpertKind, Experts, FeatureEmbedding, Towers
from mtlcli.models.views import GateRecord, Introspection, SharedRepresentation, TaskTowers


class AdaTTParams(ModelParams):
    levels: Annotated[int, Field(ge=1)] = 2
    n_task_experts: PositiveInt = 2
    n_shared_experts: NonNegativeInt = 1
    expert_units: list[PositiveInt] = Field(default=[16], min_length=1)
    tower_units: list[PositiveInt] = [8]
    dropout: Dropout = 0.0


class FusionLevel(nn.Module):
    """One AdaTT level: per-task and shared experts, each task's fusion unit and (``shared_unit``)
    the shared fusion unit."""

    def __init__(
        self,
        tasks: list[str],
        in_dim: int,
        n_task: int,
        n_shared: int,
        units: list[int],
        dropout: float,
        shared_unit: bool,
    ) -> None:
        super().__init__()
        self.tasks, self.n_task, self.n_shared = tasks, n_task, n_shared
        mlp: list[ExpertKind] = ["mlp"]
        self.task_experts = nn.ModuleDict({t: Experts(in_dim, mlp * n_task, units, dropout) for t in tasks})
        self.shared_experts = Experts(in_dim, mlp * n_shared, units, dropout) if n_shared else None
        every = len(tasks) * n_task + n_shared
        self.gates = nn.ModuleDict({t: nn.Linear(in_dim, every) for t in tasks})
        self.native = nn.ParameterDict({t: nn.Parameter(torch.ones(n_task)) for t in tasks})
        self.shared_gate = nn.Linear(in_dim, every) if shared_unit and n_shared else None

    def experts(self, task_inputs: list[Tensor], shared_input: Tensor) -> Tensor:
        """Every expert's output, stacked: [B, T m + m_s, H] (tasks in order, then the shared)."""
        outs = [self.task_experts[t](x) for t, x in zip(self.tasks, task_inputs, strict=True)]
        if self.shared_experts is not None:
            outs.append(self.shared_experts(shared_input))
        return torch.cat(outs, dim=1)

    def forward(
        self, task_inputs: list[Tensor], shared_input: Tensor, cut: list[Tensor] | None = None
    ) -> tuple[list[Tensor], Tensor, dict[str, Tensor]]:
        """Each task's output, the shared output (the shared input without a shared unit) and every
        gate's weights by row. With ``cut`` (the last level, its representation kept) the gates'
        inputs and the stacked experts are read through new nodes appended to ``cut``."""
        stacked = self.experts(task_inputs, shared_input)
        gate_inputs = task_inputs
        if cut is not None:
            gate_inputs = [x.view_as(x) for x in task_inputs]
            stacked = stacked.view_as(stacked)
            cut.extend([*gate_inputs, stacked])
        outputs, gates = [], {}
        for k, (task, x) in enumerate(zip(self.tasks, gate_inputs, strict=True)):
            gate = torch.softmax(self.gates[task](x), dim=-1)
            gates[task] = gate
            own = stacked[:, k * self.n_task : (k + 1) * self.n_task]
            native = (self.native[task].view(1, -1, 1) * own).sum(1)
            outputs.append(native + (gate.unsqueeze(-1) * stacked).sum(1))
        if self.shared_gate is None:
            return outputs, shared_input, gates
        gate = torch.softmax(self.shared_gate(shared_input), dim=-1)
        gates["shared"] = gate
        return outputs, (gate.unsqueeze(-1) * stacked).sum(1), gates


class AdaTT(nn.Module):
    """embedding -> ``levels`` fusion levels -> per-task towers.

    Shared representation: on the last level, each task's input as its gate reads it and the
    stacked experts as the fusion units read them (the last level's gates and native weights are
    its tasks'; its experts are mixed by every task's gate, so they are shared)."""

    def __init__(
        self,
        inputs: InputSpec,
        embedding_dim: int,
        levels: int,
        n_task_experts: int,
        n_shared_experts: int,
        expert_units: list[int],
        tower_units: list[int],
        dropout: float,
    ) -> None:
        super().__init__()
        self.tasks = list(inputs.tasks)
        self.embedding = FeatureEmbedding.for_inputs(inputs, embedding_dim)
        in_dims = [self.embedding.out_dim] + [expert_units[-1]] * (levels - 1)
        self.levels = nn.ModuleList(
            [
                FusionLevel(self.tasks, d, n_task_experts, n_shared_experts, expert_units, dropout, j < levels - 1)
                for j, d in enumerate(in_dims)
            ]
        )
        self.towers = Towers(self.tasks, expert_units[-1], tower_units, dropout)
        self.z = SharedRepresentation()

    def expert_names(self) -> list[str]:
        """The columns of every gate: ``<task>.<i>`` in task order, then ``shared.<i>``."""
        level = cast(FusionLevel, self.levels[0])
        return [f"{t}.{i}" for t in self.tasks for i in range(level.n_task)] + [
            f"shared.{i}" for i in range(level.n_shared)
        ]

    def extract(self, batch: Batch) -> tuple[list[Tensor], list[GateRecord]]:
        """The last level's task outputs T x [B, H] and every gate (group ``level<j>.gate``)."""
        x = self.embedding(batch)
        task_inputs, shared_input = [x] * len(self.tasks), x
        cut: list[Tensor] | None = [] if self.z.keeping() else None
        records: list[GateRecord] = []
        names = self.expert_names()
        last = len(self.levels) - 1
        for j, level in enumerate(self.levels):
            task_inputs, shared_input, gates = level(task_inputs, shared_input, cut if j == last else None)
            records += [GateRecord(f"level{j + 1}.gate", row, g, names) for row, g in gates.items()]
        if cut is not None:
            self.z.keep(*cut)
        return task_inputs, records

    def task_inputs(self, batch: Batch) -> list[Tensor]:
        return self.extract(batch)[0]

    def forward(self, batch: Batch) -> Tensor:
        return self.towers(self.extract(batch)[0])

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(shared_representation=self.z, task_towers=TaskTowers(self.task_inputs, self.towers.nets))

    def introspect(self, batch: Batch) -> Introspection:
        """Gate ``level<j>.gate``/``<task>`` (and ``shared`` on every level but the last): weights
        [B, T m + m_s] over every task's experts in task order, then the shared ones."""
        return Introspection(self.extract(batch)[1])

    def last_shared_layer(self) -> list[Tensor]:
        """The output layers of the last level's experts: every task's gate mixes all of them."""
        level = cast(FusionLevel, self.levels[-1])
        layers = [w for t in self.tasks for w in cast(Experts, level.task_experts[t]).last_layer()]
        return layers + (level.shared_experts.last_layer() if level.shared_experts is not None else [])

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """Task t owns its tower and the last level's gate and native weights of task t; every
        expert, and every earlier level's unit, reaches every task."""
        last = len(self.levels) - 1
        prefixes = {
            t: [f"towers.nets.{t}.", f"levels.{last}.gates.{t}.", f"levels.{last}.native.{t}"] for t in self.tasks
        }
        return group_by_prefix(self, prefixes)


@register_scheme("adatt", AdaTTParams, "expert fusion: per-task and shared experts fused per level (KDD 2023)")
def build(params: AdaTTParams, inputs: InputSpec) -> AdaTT:
    return AdaTT(inputs, **params.model_dump())
