"""Multi-gate Mixture-of-Experts (MMoE).

Ma, Zhao, Yi, Chen, Hong, Chi, "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts", KDD 2018. Shared experts f_i; for task k a softmax gate
g^k(x) = softmax(W_gk x) weighs them: f^k(x) = sum_i g^k(x)_i f_i(x); tower h^k gives y_k.

With ``expert_kinds`` the experts are heterogeneous (MLP, factorisation machine, cross network), as in
DEPHN: Kong, Su, Zhao, Hou, "DEPHN: Different Expression Parallel Heterogeneous Network using Virtual
Gradient Optimization for Multi-task Learning", IJCNN 2023 (arXiv:2307.12519).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlcli.data.batch import Batch
from mtlcli.models.base import (
    Capabilities,
    ExpertPoolParams,
    InputSpec,
    gated_capabilities,
    group_by_prefix,
    register_scheme,
)
from mtlcli.models.blocks import ExpertKind, Towers, embedded_experts
from mtlcli.models.gate_control import GateControl, GateControlOption, GateControlSettings, check_gate_control
from mtlcli.models.views import GateRecord, Introspection, SharedRepresentation, TaskTowers


class MMoEParams(ExpertPoolParams):
    gate_control: GateControlOption = None


class MMoE(nn.Module):
    """embedding -> experts [B, E, H] -> per-task softmax gate [B, E] -> mixture [B, H] -> tower.

    Shared representation: the embedded input as the gates read it, and the experts' outputs.

    With ``gate_control`` (DEPHN, ``gate_control.py``) task k's gate reads its field mapping
    φ_k(x), and in training its logits carry the step's λ_k."""

    def __init__(
        self,
        inputs: InputSpec,
        embedding_dim: int,
        n_experts: int,
        expert_units: list[int],
        tower_units: list[int],
        dropout: float,
        expert_kinds: list[ExpertKind] | None = None,
        cross_layers: int = 2,
        gate_control: GateControlSettings | None = None,
    ) -> None:
        super().__init__()
        self.tasks = list(inputs.tasks)
        pool = embedded_experts(inputs, embedding_dim, n_experts, expert_units, dropout, expert_kinds, cross_layers)
        self.embedding, self.experts = pool
        self.gates = nn.ModuleDict({t: nn.Linear(self.embedding.out_dim, n_experts) for t in self.tasks})
        self.towers = Towers(self.tasks, self.experts.out_dim, tower_units, dropout)
        self.z = SharedRepresentation()
        self.control = (
            GateControl(self.tasks, self.embedding.fields, gate_control) if gate_control is not None else None
        )

    def gate_weights(self, x: Tensor, batch: Batch | None = None) -> Tensor:
        """Softmax gate weights per task for embedded inputs x: [B, T, E], each row sums to 1 (with
        gate control, of the gates on their field mappings; a training forward pass then reads
        the labels of ``batch``, whose embedding x is)."""
        if self.control is None:
            return torch.stack([torch.softmax(self.gates[t](x), dim=-1) for t in self.tasks], dim=1)
        gates = [self.gates[t] for t in self.tasks]
        labels = (batch.labels, batch.label_mask) if batch is not None else None
        logits = self.control.gate_logits(gates, [x] * len(self.tasks), labels)
        return torch.stack([torch.softmax(z, dim=-1) for z in logits], dim=1)

    @property
    def capabilities(self) -> Capabilities:
        return gated_capabilities(self.z, self.control, TaskTowers(self.task_inputs, self.towers.nets))

    def task_inputs(self, batch: Batch) -> list[Tensor]:
        """Each task's mixture of the experts, what its tower reads: T x [B, H]."""
        x = self.embedding(batch)
        experts = self.experts(x)
        return [(gate.unsqueeze(-1) * experts).sum(1) for gate in self.gate_weights(x, batch).unbind(1)]

    def introspect(self, batch: Batch) -> Introspection:
        """Gate ``gate``/``<task>``: task k's softmax weights over the experts (numbered), [B, E]."""
        gates = self.gate_weights(self.embedding(batch), batch)
        experts = [str(i) for i in range(gates.shape[-1])]
        return Introspection([GateRecord("gate", t, gates[:, k], experts) for k, t in enumerate(self.tasks)])

    def forward(self, batch: Batch) -> Tensor:
        x = self.embedding(batch)
        if self.experts.pool is None or not self.experts.all_mlp or self.z.keeping() or self.control is not None:
            experts = self.experts(x)
            x_gates = self.z.alias(x)
            self.z.keep(x_gates, experts)
            mixed = [(gate.unsqueeze(-1) * experts).sum(1) for gate in self.gate_weights(x_gates, batch).unbind(1)]
            return self.towers(mixed)
        # The experts' first layer and every gate read the same x: one matmul computes them all.
        pool = self.experts.pool
        first = pool.first
        layers: list[nn.Linear] = [first, *(cast(nn.Linear, self.gates[t]) for t in self.tasks)]
        weight = torch.cat([layer.weight for layer in layers])
        bias = torch.cat([layer.bias for layer in layers])
        expert_pre, gate_pre = F.linear(x, weight, bias).split(
            [first.out_features, weight.shape[0] - first.out_features], 1
        )
        experts = pool.from_first_layer(expert_pre)  # [B, E, H]
        gates = torch.softmax(gate_pre.unflatten(1, (len(self.tasks), -1)), dim=-1)  # [B, T, E]
        mixed = [(gate.unsqueeze(-1) * experts).sum(1) for gate in gates.unbind(1)]  # T x [B, H]
        return self.towers(mixed)

    def last_shared_layer(self) -> list[Tensor]:
        """Every expert's output layer: the mixtures the towers read are made of them."""
        return self.experts.last_layer()

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        owned = {t: [f"towers.nets.{t}.", f"gates.{t}.", f"control.mapping.{t}."] for t in self.tasks}
        return group_by_prefix(self, owned)


def check(params: MMoEParams, recipe: Any) -> list[tuple[str, str]]:
    return check_gate_control(params.gate_control, list(recipe.tasks))


@register_scheme("mmoe", MMoEParams, "expert sharing: shared experts, one softmax gate per task (KDD 2018)", check)
def build(params: MMoEParams, inputs: InputSpec) -> MMoE:
    return MMoE(inputs, **params.model_dump(exclude={"gate_control"}), gate_control=params.gate_control)
