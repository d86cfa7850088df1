"""Customized Gate Control (CGC): shared experts plus task-specific experts; each task's gate mixes
its own experts and the shared ones.

Tang, Liu, Zhao, Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL)
Model for Personalized Recommendations", RecSys 2020, section 4.1. Task k's output is
g^k(x) = w^k(x) S^k(x), where S^k(x) = [E_k,1(x) ... E_k,m_k(x), E_s,1(x) ... E_s,m_s(x)] stacks task
k's experts and the shared experts and w^k(x) = softmax(W_g^k x); y_k = t^k(g^k(x)).

This module also holds the extraction network that PLE (``ple.py``) stacks; CGC is one level of it.
With ``*_expert_kinds`` the experts are heterogeneous (MLP, factorisation machine, cross network), as in
DEPHN (Kong, Su, Zhao, Hou, IJCNN 2023, arXiv:2307.12519).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from pydantic import Field, PositiveInt, ValidationInfo, field_validator
from torch import Tensor, nn

from mtlcli.data.batch import Batch
from mtlcli.models.base import (
    Capabilities,
    Dropout,
    InputSpec,
    ModelParams,
    gated_capabilities,
    group_by_prefix,
    register_scheme,
)
from mtlcli.models.blocks import ExpertKind, Experts, FeatureEmbedding, FieldLayout, Towers, check_expert_kinds
from mtlcli.models.gate_control import GateControl, GateControlOption, GateControlSettings, check_gate_control
from mtlcli.models.views import GateRecord, Introspection, SharedRepresentation, TaskTowers


class CGCParams(ModelParams):
    n_shared_experts: PositiveInt = 4
    n_task_experts: PositiveInt = 2
    expert_units: list[PositiveInt] = Field(default=[16], min_length=1)
    tower_units: list[PositiveInt] = [8]
    dropout: Dropout = 0.0
    shared_expert_kinds: list[ExpertKind] | None = None
    task_expert_kinds: list[ExpertKind] | None = None
    cross_layers: PositiveInt = 2
    gate_control: GateControlOption = None

    @field_validator("shared_expert_kinds")
    @classmethod
    def _one_kind_per_shared_expert(
        cls, kinds: list[ExpertKind] | None, info: ValidationInfo
    ) -> list[ExpertKind] | None:
        return check_expert_kinds(kinds, info.data.get("n_shared_experts", 0), "n_shared_experts")

    @field_validator("task_expert_kinds")
    @classmethod
    def _one_kind_per_task_expert(cls, kinds: list[ExpertKind] | None, info: ValidationInfo) -> list[ExpertKind] | None:
        return check_expert_kinds(kinds, info.data.get("n_task_experts", 0), "n_task_experts")


class ExtractionLayer(nn.Module):
    """One CGC layer. Task k's experts read task k's input, the shared experts the shared input.

    Task k's gate (on task k's input) mixes [task k's experts, shared experts]; with
    ``shared_gate``, a gate on the shared input mixes [every task's experts in task order,
    shared experts] into the shared output (PLE's inner levels). Inputs and outputs [B, d].

    With ``control`` (gate control, on the first level, whose gates read the embedded input) task
    k's gate reads its field mapping, and gate difference compares the shared experts' columns.
    """

    def __init__(
        self,
        tasks: list[str],
        in_dim: int,
        n_shared: int,
        n_task: int,
        units: list[int],
        dropout: float,
        shared_gate: bool,
        shared_kinds: list[ExpertKind],
        task_kinds: list[ExpertKind],
        fields: FieldLayout | None,
        cross_layers: int,
        control: GateControlSettings | None = None,
    ) -> None:
        super().__init__()
        self.tasks = tasks
        self.shared_experts = Experts(in_dim, shared_kinds, units, dropout, fields, cross_layers)
        self.task_experts = nn.ModuleDict(
            {t: Experts(in_dim, task_kinds, units, dropout, fields, cross_layers) for t in tasks}
        )
        self.task_gates = nn.ModuleDict({t: nn.Linear(in_dim, n_task + n_shared) for t in tasks})
        self.shared_gate = nn.Linear(in_dim, len(tasks) * n_task + n_shared) if shared_gate else None
        self.out_dim = units[-1]
        if control is not None and fields is None:
            raise ValueError("gate control maps input fields: it needs the embedding layer's layout")
        self.control = (
            GateControl(tasks, fields, control, compared=n_shared) if control is not None and fields else None
        )

    def forward(
        self,
        task_inputs: list[Tensor],
        shared_input: Tensor,
        cut: list[Tensor] | None = None,
        role: str = "",
        labels: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[list[Tensor], Tensor, dict[str, Tensor]]:
        """Returns (task outputs, shared output, gate weights by name). Without a shared gate the
        shared output is the shared input, unused. ``labels`` (the batch's labels [B, T] and mask
        [B, T]): what gate control's training forward pass reads.

        With ``cut`` (a list) the layer appends its part of the shared representation, by ``role``:
        ``"own"`` (its task experts and gates are task-specific) the task inputs and the shared
        experts' outputs; ``"gates"`` (only its task gates are) the task inputs as the gates read
        them and each task's stacked experts; ``"shared"`` the shared experts' outputs.
        """
        shared = self.shared_experts(shared_input)  # [B, m_s, H]
        gate_inputs = task_inputs
        if cut is not None and role in ("own", "gates"):
            gate_inputs = [x.view_as(x) for x in task_inputs]
            cut.extend(gate_inputs)
            if role == "own":
                task_inputs = gate_inputs
        if cut is not None and role in ("own", "shared"):
            cut.append(shared)
        controlled = None
        if self.control is not None:
            controlled = self.control.gate_logits([self.task_gates[t] for t in self.tasks], gate_inputs, labels)
        outputs, gates, own = [], {}, []
        for k, (t, x, x_gate) in enumerate(zip(self.tasks, task_inputs, gate_inputs, strict=True)):
            experts = torch.cat([self.task_experts[t](x), shared], dim=1)  # [B, m_k + m_s, H]
            own.append(experts[:, : experts.shape[1] - shared.shape[1]])
            if cut is not None and role == "gates":
                experts = experts.view_as(experts)  # as task t's mixture reads them
                cut.append(experts)
            gate = torch.softmax(self.task_gates[t](x_gate) if controlled is None else controlled[k], dim=-1)
            gates[t] = gate
            outputs.append((gate.unsqueeze(-1) * experts).sum(1))
        if self.shared_gate is None:
            return outputs, shared_input, gates
        gate = torch.softmax(self.shared_gate(shared_input), dim=-1)
        gates["shared"] = gate
        every = torch.cat([*own, shared], dim=1)  # [B, T * m_k + m_s, H]
        return outputs, (gate.unsqueeze(-1) * every).sum(1), gates


class ExtractionNetwork(nn.Module):
    """embedding -> ``levels`` extraction layers (all but the last with a shared gate) -> towers.

    The first level reads the embedded input everywhere (so it may hold fm experts); deeper
    levels read the previous level's outputs and use MLP experts. Output [B, T].

    Shared representation: with one level (CGC), each task's input as its experts and gate read
    it and the shared experts' outputs; with more (PLE), each task's input as its gate on the
    second-to-last level reads it, the experts that gate mixes, and the last level's shared
    experts' outputs (see ``parameter_groups`` for why those are the boundaries).
    """

    def __init__(
        self,
        inputs: InputSpec,
        embedding_dim: int,
        levels: int,
        n_shared: int,
        n_task: int,
        expert_units: list[int],
        tower_units: list[int],
        dropout: float,
        shared_kinds: list[ExpertKind] | None = None,
        task_kinds: list[ExpertKind] | None = None,
        cross_layers: int = 2,
        gate_control: GateControlSettings | None = None,
    ) -> None:
        super().__init__()
        self.tasks = list(inputs.tasks)
        self.embedding = FeatureEmbedding.for_inputs(inputs, embedding_dim)
        layers = []
        in_dim = self.embedding.out_dim
        for level in range(levels):
            first = level == 0
            layers.append(
                ExtractionLayer(
                    self.tasks,
                    in_dim,
                    n_shared,
                    n_task,
                    expert_units,
                    dropout,
                    shared_gate=level < levels - 1,
                    shared_kinds=(shared_kinds if first and shared_kinds else ["mlp"] * n_shared),
                    task_kinds=(task_kinds if first and task_kinds else ["mlp"] * n_task),
                    fields=self.embedding.fields if first else None,
                    cross_layers=cross_layers,
                    control=gate_control if first else None,
                )
            )
            in_dim = expert_units[-1]
        self.levels = nn.ModuleList(layers)
        self.towers = Towers(self.tasks, in_dim, tower_units, dropout)
        self.z = SharedRepresentation()

    @property
    def control(self) -> GateControl | None:
        """Gate control of the first level's task gates (None without ``gate_control``)."""
        return cast(ExtractionLayer, self.levels[0]).control

    def run(self, batch: Batch) -> tuple[Tensor, list[GateRecord]]:
        """Logits [B, T] and every gate: group ``level<j>.gate``, row a task or ``shared``."""
        task_inputs, gates = self.extract(batch)
        return self.towers(task_inputs), gates

    def task_inputs(self, batch: Batch) -> list[Tensor]:
        """The last level's task outputs, what the towers read: T x [B, H]."""
        return self.extract(batch)[0]

    def extract(self, batch: Batch) -> tuple[list[Tensor], list[GateRecord]]:
        """The last level's task outputs T x [B, H] and every gate."""
        x = self.embedding(batch)
        task_inputs, shared_input = [x] * len(self.tasks), x
        gates: list[GateRecord] = []
        last = len(self.levels) - 1
        cut: list[Tensor] | None = [] if self.z.keeping() else None
        labels = (batch.labels, batch.label_mask)
        for j, layer in enumerate(self.levels):
            role = ("own" if last == 0 else "shared") if j == last else ("gates" if j == last - 1 else "")
            task_inputs, shared_input, level_gates = layer(task_inputs, shared_input, cut, role, labels)
            gates += [
                GateRecord(f"level{j + 1}.gate", row, g, self.expert_names(j + 1, row))
                for row, g in level_gates.items()
            ]
        if cut is not None:
            self.z.keep(*cut)
        return task_inputs, gates

    def forward(self, batch: Batch) -> Tensor:
        return self.run(batch)[0]

    @property
    def capabilities(self) -> Capabilities:
        return gated_capabilities(self.z, self.control, TaskTowers(self.task_inputs, self.towers.nets))

    def expert_names(self, level: int, row: str) -> list[str]:
        """The experts the columns of level ``level``'s (from 1) gate ``row`` (a task or ``shared``)
        weigh: ``<task>.<i>`` for task experts (every task's, in task order, for the shared gate),
        then ``shared.<i>``."""
        layer = cast(ExtractionLayer, self.levels[level - 1])
        shared = [f"shared.{i}" for i in range(layer.shared_experts.n)]
        owners = self.tasks if row == "shared" else [row]
        experts = cast(nn.ModuleDict, layer.task_experts)
        return [f"{t}.{i}" for t in owners for i in range(cast(Experts, experts[t]).n)] + shared

    def introspect(self, batch: Batch) -> Introspection:
        """Gate ``level<j>.gate``/``<task>``: [B, m_k + m_s] over task k's experts then the shared
        ones; ``level<j>.gate``/``shared`` (every level but the last): [B, T * m_k + m_s] over every
        task's experts in task order, then the shared ones. Rows sum to 1."""
        return Introspection(self.run(batch)[1])

    def last_shared_layer(self) -> list[Tensor]:
        """The output layer of the last level's shared experts: every task's gate there mixes them
        (the task experts of that level belong to one task each)."""
        return cast(ExtractionLayer, self.levels[-1]).shared_experts.last_layer()

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """Task k owns its tower and every task-k expert and gate that only task k's loss reaches.

        A level's shared gate mixes every task's experts of that level into the shared output,
        which all tasks use, so task experts of a level with a shared gate are trained by every
        task and are shared here; likewise task gates of a level whose next level has a shared
        gate (their output feeds that level's task experts). With one or two levels every task
        gate, and with one level (CGC) every task expert, belongs to its task. Gate control's
        field mapping of task k goes with task k's first-level gate, which reads it.
        """
        last = len(self.levels) - 1
        prefixes: dict[str, list[str]] = {t: [f"towers.nets.{t}."] for t in self.tasks}
        for j in range(len(self.levels)):
            for t in self.tasks:
                if j == last:
                    prefixes[t].append(f"levels.{j}.task_experts.{t}.")
                if j >= last - 1:
                    prefixes[t] += [f"levels.{j}.task_gates.{t}.", f"levels.{j}.control.mapping.{t}."]
        return group_by_prefix(self, prefixes)


def build_extraction(params: CGCParams, inputs: InputSpec, levels: int) -> ExtractionNetwork:
    return ExtractionNetwork(
        inputs,
        params.embedding_dim,
        levels,
        params.n_shared_experts,
        params.n_task_experts,
        params.expert_units,
        params.tower_units,
        params.dropout,
        params.shared_expert_kinds,
        params.task_expert_kinds,
        params.cross_layers,
        params.gate_control,
    )


def check(params: CGCParams, recipe: Any) -> list[tuple[str, str]]:
    return check_gate_control(params.gate_control, list(recipe.tasks))


@register_scheme(
    "cgc", CGCParams, "expert sharing: shared and task-specific experts, one gate per task (RecSys 2020)", check
)
def build(params: CGCParams, inputs: InputSpec) -> ExtractionNetwork:
    return build_extraction(params, inputs, levels=1)
