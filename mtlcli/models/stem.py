"""Shared and Task-specific EMbeddings (STEM-Net).

Su, Pan, Wang, Xiao, Quan, Chen, Jiang, "STEM: Unleashing the Power of Embeddings for Multi-task
Recommendation", AAAI 2024. Besides a shared embedding table E_s, every task t has its own table
E_t. Task t's experts read E_t(x), the shared experts read E_s(x). Task t's gate reads
E_t(x) + E_s(x) and mixes every expert, the other tasks' with their gradient stopped (All Forward,
Task-specific Backward):

    h_t = sum_i g_{t,i} e_i,  e = [sg(experts_1), ..., experts_t, ..., sg(experts_T), shared experts],
    g_t = softmax(W_t (E_t(x) + E_s(x)))

so every task reads every table forward while its loss trains only its own table and experts and
the shared ones. Each task's tower reads h_t.
"""

from __future__ import annotations

from typing import cast

import torch
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from mtlcli.data.batch import Batch
from mtlcli.errors import MtlError
from mtlcli.models.base import Capabilities, Dropout, InputSpec, ModelParams, group_by_prefix, register_scheme
from mtlcli.models.blocks import ExpertKind, Experts, FeatureEmbedding, Towers
from mtlcli.models.views import GateRecord, Introspection, SharedRepresentation, TaskTowers

SHARED = "shared"


class STEMParams(ModelParams):
    n_shared_experts: PositiveInt = 1
    n_task_experts: PositiveInt = 1
    expert_units: list[PositiveInt] = Field(default=[16], min_length=1)
    tower_units: list[PositiveInt] = [8]
    dropout: Dropout = 0.0


class STEM(nn.Module):
    """T + 1 embedding tables -> per-table experts -> per-task gates over every expert (other
    tasks' stopped) -> towers.

    Shared representation: the shared table's embedding as the task gates read it and the shared
    experts' outputs (task t's table, experts, gate and tower are reached by task t's loss alone)."""

    def __init__(
        self,
        inputs: InputSpec,
        embedding_dim: int,
        n_shared_experts: int,
        n_task_experts: int,
        expert_units: list[int],
        tower_units: list[int],
        dropout: float,
    ) -> None:
        super().__init__()
        self.tasks = list(inputs.tasks)
        self.tables = nn.ModuleDict(
            {name: FeatureEmbedding.for_inputs(inputs, embedding_dim) for name in [*self.tasks, SHARED]}
        )
        width = cast(FeatureEmbedding, self.tables[SHARED]).out_dim
        mlp: list[ExpertKind] = ["mlp"]
        self.task_experts = nn.ModuleDict(
            {t: Experts(width, mlp * n_task_experts, expert_units, dropout) for t in self.tasks}
        )
        self.shared_experts = Experts(width, mlp * n_shared_experts, expert_units, dropout)
        every = len(self.tasks) * n_task_experts + n_shared_experts
        self.gates = nn.ModuleDict({t: nn.Linear(width, every) for t in self.tasks})
        self.towers = Towers(self.tasks, expert_units[-1], tower_units, dropout)
        self.n_task, self.n_shared = n_task_experts, n_shared_experts
        self.z = SharedRepresentation()

    def mix(self, batch: Batch) -> tuple[list[Tensor], Tensor]:
        """Each task's mixture T x [B, H] and every task's gate weights [B, T, T m + m_s]."""
        embedded = {name: table(batch) for name, table in self.tables.items()}
        own = {t: self.task_experts[t](embedded[t]) for t in self.tasks}  # [B, m, H] each
        shared_in = self.z.alias(embedded[SHARED])
        shared = self.z.alias(self.shared_experts(embedded[SHARED]))  # [B, m_s, H]
        self.z.keep(shared_in, shared)
        detached = {t: e.detach() for t, e in own.items()}
        mixtures, gates = [], []
        for task in self.tasks:
            experts = torch.cat([*(own[t] if t == task else detached[t] for t in self.tasks), shared], dim=1)
            gate = torch.softmax(self.gates[task](embedded[task] + shared_in), dim=-1)
            mixtures.append((gate.unsqueeze(-1) * experts).sum(1))
            gates.append(gate)
        return mixtures, torch.stack(gates, dim=1)

    def forward(self, batch: Batch) -> Tensor:
        return self.towers(self.mix(batch)[0])

    def task_inputs(self, batch: Batch) -> list[Tensor]:
        return self.mix(batch)[0]

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(shared_representation=self.z, task_towers=TaskTowers(self.task_inputs, self.towers.nets))

    def table_usage(self, gates: Tensor) -> Tensor:
        """How much each task's gate takes from the experts of each table: [B, T, T + 1] (the
        tasks' tables in task order, then the shared one), each row summing to 1."""
        tasks = gates[..., : len(self.tasks) * self.n_task].unflatten(-1, (len(self.tasks), self.n_task)).sum(-1)
        return torch.cat([tasks, gates[..., len(self.tasks) * self.n_task :].sum(-1, keepdim=True)], dim=-1)

    def introspect(self, batch: Batch) -> Introspection:
        """Gate ``gate``/``<task>``: weights [B, T m + m_s] over every task's experts (``<task>.<i>``,
        task order) and the shared ones; gate ``table``/``<task>``: the same summed per embedding
        table [B, T + 1] (``<task>``, ..., ``shared``): how much of its mixture each task reads
        from each table."""
        gates = self.mix(batch)[1]
        experts = [f"{t}.{i}" for t in self.tasks for i in range(self.n_task)]
        experts += [f"{SHARED}.{i}" for i in range(self.n_shared)]
        usage = self.table_usage(gates)
        return Introspection(
            [GateRecord("gate", t, gates[:, k], experts) for k, t in enumerate(self.tasks)]
            + [GateRecord("table", t, usage[:, k], [*self.tasks, SHARED]) for k, t in enumerate(self.tasks)]
        )

    def last_shared_layer(self) -> list[Tensor]:
        """The shared experts' output layers: every task's gate mixes them."""
        return self.shared_experts.last_layer()

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        prefixes = {t: [f"tables.{t}.", f"task_experts.{t}.", f"gates.{t}.", f"towers.nets.{t}."] for t in self.tasks}
        return group_by_prefix(self, prefixes)


@register_scheme("stem", STEMParams, "embeddings: shared and per-task tables, all read, own trained (AAAI 2024)")
def build(params: STEMParams, inputs: InputSpec) -> STEM:
    if SHARED in inputs.tasks:
        raise MtlError(
            f"tasks: stem names its shared embedding table {SHARED!r}, and a task has that name", "rename the task"
        )
    return STEM(inputs, **params.model_dump())
