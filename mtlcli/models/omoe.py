"""One-gate Mixture-of-Experts (OMoE): shared experts, one softmax gate shared by all tasks.

The OMoE baseline of Ma, Zhao, Yi, Chen, Hong, Chi, "Modeling Task Relationships in Multi-task
Learning with Multi-gate Mixture-of-Experts", KDD 2018 (after Jacobs, Jordan, Nowlan, Hinton,
"Adaptive Mixtures of Local Experts", Neural Computation 1991): f(x) = sum_i g(x)_i f_i(x) with
g(x) = softmax(W_g x); every tower h^k reads the same mixture, y_k = h^k(f(x)).

``expert_kinds`` makes the experts heterogeneous, as in DEPHN (IJCNN 2023; see ``mmoe.py``).
"""

from __future__ import annotations

import torch
from pydantic import field_validator
from torch import Tensor, nn

from mtlcli.data.batch import Batch
from mtlcli.models.base import Capabilities, ExpertPoolParams, InputSpec, group_by_prefix, register_scheme
from mtlcli.models.blocks import ExpertKind, Towers, embedded_experts
from mtlcli.models.views import GateRecord, Introspection, SharedRepresentation


class OMoEParams(ExpertPoolParams):
    gate_control: bool = False

    @field_validator("gate_control")
    @classmethod
    def _no_task_gates(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "omoe has one gate for every task, and gate control adjusts each task's own gate: "
                "use scheme mmoe (a gate per task) with gate_control, or leave gate_control false"
            )
        return value


class OMoE(nn.Module):
    """embedding -> experts [B, E, H] -> one softmax gate [B, E] -> mixture [B, H] -> every tower.

    Shared representation: the mixture (the one gate is shared)."""

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
    ) -> None:
        super().__init__()
        self.tasks = list(inputs.tasks)
        pool = embedded_experts(inputs, embedding_dim, n_experts, expert_units, dropout, expert_kinds, cross_layers)
        self.embedding, self.experts = pool
        x_dim = self.embedding.out_dim
        self.gate = nn.Linear(x_dim, n_experts)
        self.towers = Towers(self.tasks, self.experts.out_dim, tower_units, dropout)
        self.z = SharedRepresentation()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(shared_representation=self.z)

    def introspect(self, batch: Batch) -> Introspection:
        """Gate ``gate``/``shared``: the one gate's softmax weights over the experts (numbered), [B, E]."""
        gate = torch.softmax(self.gate(self.embedding(batch)), dim=-1)
        return Introspection([GateRecord("gate", "shared", gate, [str(i) for i in range(gate.shape[-1])])])

    def forward(self, batch: Batch) -> Tensor:
        x = self.embedding(batch)
        gate = torch.softmax(self.gate(x), dim=-1)  # [B, E]
        mixed = (gate.unsqueeze(-1) * self.experts(x)).sum(1)
        self.z.keep(mixed)
        return self.towers(mixed)

    def last_shared_layer(self) -> list[Tensor]:
        """Every expert's output layer: the mixtures the towers read are made of them."""
        return self.experts.last_layer()

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        return group_by_prefix(self, {t: [f"towers.nets.{t}."] for t in self.tasks})


@register_scheme("omoe", OMoEParams, "expert sharing: shared experts, one softmax gate for all tasks (KDD 2018)")
def build(params: OMoEParams, inputs: InputSpec) -> OMoE:
    return OMoE(inputs, **params.model_dump(exclude={"gate_control"}))
