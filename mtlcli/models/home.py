"""Hierarchy of Multi-Gate Experts (HoME).

Wang, Cao, Fu, Gai, Zhou, "HoME: Hierarchy of Multi-Gate Experts for Multi-Task Learning at
Kuaishou", arXiv 2408.05430 (2024). Three changes to an MMoE/CGC-style expert layer:

- expert normalisation & Swish: each expert layer is Linear -> normalisation -> Swish, so that
  the experts' outputs have alike distributions and the gates can weigh them fairly;
- hierarchy mask: the tasks are grouped into categories. A first (meta) level holds global shared
  experts and each category's experts; category c's gate mixes its own and the global ones into
  v_c, a global gate mixes every meta expert into v_s. The second level holds each task's
  experts (reading v_c of its category), each category's (reading v_c) and the global ones
  (reading v_s); task t's gate (reading v_c) mixes its own, its category's and the global ones;
- feature gates give each meta expert its own view of the input, x_e = x ⊙ 2σ(x A_e B_e)
  (low rank r, LoRA-like), and a self gate carries the meta level's representation past the
  second level: h_t = mix_t + σ(W_t v_c + b_t) ⊙ v_c. Task t's tower reads h_t.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from mtlcli.data.batch import Batch
from mtlcli.models.base import Capabilities, Dropout, InputSpec, ModelParams, group_by_prefix, register_scheme
from mtlcli.models.blocks import FeatureEmbedding, Towers
from mtlcli.models.views import GateRecord, Introspection, ScaleRecord, SharedRepresentation
from mtlcli.registry import did_you_mean

SHARED = "shared"


class HoMEParams(ModelParams):
    categories: dict[str, list[str]] | None = None  # category -> its tasks; default: every task its own
    n_shared_experts: PositiveInt = 1
    n_category_experts: PositiveInt = 1
    n_task_experts: PositiveInt = 1
    expert_units: list[PositiveInt] = Field(default=[16], min_length=1)
    feature_gate_rank: PositiveInt = 4
    tower_units: list[PositiveInt] = [8]
    dropout: Dropout = 0.0


class NormExperts(nn.Module):
    """``n`` experts, each layer Linear -> normalisation over its units (own gain and shift) ->
    Swish, run as batched products. Input [B, in] (one for all) or [B, n, in] (one each); output
    [B, n, units[-1]]."""

    def __init__(self, in_dim: int, n: int, units: list[int], dropout: float) -> None:
        super().__init__()
        self.n = n
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        self.gains, self.shifts = nn.ParameterList(), nn.ParameterList()
        for h_in, h_out in itertools.pairwise([in_dim, *units]):
            bound = 1.0 / math.sqrt(h_in)
            self.weights.append(nn.Parameter(torch.empty(n, h_in, h_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(n, h_out).uniform_(-bound, bound)))
            self.gains.append(nn.Parameter(torch.ones(n, h_out)))
            self.shifts.append(nn.Parameter(torch.zeros(n, h_out)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.units = list(units)

    def forward(self, x: Tensor) -> Tensor:
        h = x if x.dim() == 3 else x.unsqueeze(1).expand(-1, self.n, -1)
        layers = zip(self.weights, self.biases, self.gains, self.shifts, self.units, strict=True)
        for weight, bias, gain, shift, width in layers:
            h = torch.einsum("bni,nio->bno", h, weight) + bias
            h = F.layer_norm(h, (width,)) * gain + shift
            h = self.dropout(F.silu(h))
        return h

    def last_layer(self) -> Tensor:
        return self.weights[-1]


class FeatureGates(nn.Module):
    """Each of ``n`` experts' view of the input: x ⊙ 2σ(x A_e B_e), A_e [in, r], B_e [r, in]; B
    starts small, so every view starts near x itself. Input [B, in]; output scales [B, n, in]."""

    def __init__(self, in_dim: int, n: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(n, in_dim, rank) / math.sqrt(in_dim))
        self.up = nn.Parameter(0.01 * torch.randn(n, rank, in_dim))

    def forward(self, x: Tensor) -> Tensor:
        low = torch.einsum("bi,nir->bnr", x, self.down)
        return 2.0 * torch.sigmoid(torch.einsum("bnr,nri->bni", low, self.up))


def resolve_categories(categories: dict[str, list[str]] | None, tasks: list[str]) -> dict[str, list[str]]:
    return {t: [t] for t in tasks} if categories is None else categories


class HoME(nn.Module):
    """embedding -> feature-gated normalised meta experts -> category and global gates -> second
    level of task, category and global experts -> task gates (+ self gate) -> towers.

    Shared representation: each task's v_c as its experts, gate and self gate read it, and each
    category's and the global second-level experts' outputs as the task gates read them."""

    def __init__(
        self,
        inputs: InputSpec,
        embedding_dim: int,
        categories: dict[str, list[str]] | None,
        n_shared_experts: int,
        n_category_experts: int,
        n_task_experts: int,
        expert_units: list[int],
        feature_gate_rank: int,
        tower_units: list[int],
        dropout: float,
    ) -> None:
        super().__init__()
        self.tasks = list(inputs.tasks)
        groups = resolve_categories(categories, self.tasks)
        self.categories = list(groups)
        self.category_of = {t: c for c, members in groups.items() for t in members}
        self.embedding = FeatureEmbedding.for_inputs(inputs, embedding_dim)
        width, hidden = self.embedding.out_dim, expert_units[-1]
        n_s, n_c, n_t = n_shared_experts, n_category_experts, n_task_experts
        self.n_shared, self.n_category, self.n_task = n_s, n_c, n_t
        n_meta = n_s + len(self.categories) * n_c  # the global ones first, then each category's
        self.feature_gates = FeatureGates(width, n_meta, feature_gate_rank)
        self.meta_experts = NormExperts(width, n_meta, expert_units, dropout)
        self.meta_gates = nn.ModuleDict({c: nn.Linear(width, n_c + n_s) for c in self.categories})
        self.global_gate = nn.Linear(width, n_meta)
        self.shared_experts = NormExperts(hidden, n_s, expert_units, dropout)
        self.category_experts = nn.ModuleDict(
            {c: NormExperts(hidden, n_c, expert_units, dropout) for c in self.categories}
        )
        self.task_experts = nn.ModuleDict({t: NormExperts(hidden, n_t, expert_units, dropout) for t in self.tasks})
        self.task_gates = nn.ModuleDict({t: nn.Linear(hidden, n_t + n_c + n_s) for t in self.tasks})
        self.self_gates = nn.ModuleDict({t: nn.Linear(hidden, hidden) for t in self.tasks})
        self.towers = Towers(self.tasks, hidden, tower_units, dropout)
        fields = self.embedding.fields
        self.widths = [fields.dim] * fields.n_categorical + [1] * fields.n_numeric
        self.z = SharedRepresentation()

    def meta_names(self) -> list[str]:
        return [f"{SHARED}.{i}" for i in range(self.n_shared)] + [
            f"category {c}.{i}" for c in self.categories for i in range(self.n_category)
        ]

    def run(self, batch: Batch) -> tuple[Tensor, list[GateRecord], list[ScaleRecord]]:
        """Logits [B, T], every softmax gate and every multiplicative gate."""
        x = self.embedding(batch)
        views = self.feature_gates(x)  # [B, n_meta, D]
        meta = self.meta_experts(x.unsqueeze(1) * views)  # [B, n_meta, H]
        n_s, n_c = self.n_shared, self.n_category
        shared_meta = meta[:, :n_s]
        gates: list[GateRecord] = []
        scales = [
            ScaleRecord("feature", name, self.per_field(views[:, i]), None, 2.0)
            for i, name in enumerate(self.meta_names())
        ]
        v: dict[str, Tensor] = {}
        for j, c in enumerate(self.categories):
            own = meta[:, n_s + j * n_c : n_s + (j + 1) * n_c]
            gate = torch.softmax(self.meta_gates[c](x), dim=-1)
            v[c] = (gate.unsqueeze(-1) * torch.cat([own, shared_meta], dim=1)).sum(1)
            names = [f"category {c}.{i}" for i in range(n_c)] + [f"{SHARED}.{i}" for i in range(n_s)]
            gates.append(GateRecord("meta.gate", c, gate, names))
        gate = torch.softmax(self.global_gate(x), dim=-1)
        v_s = (gate.unsqueeze(-1) * meta).sum(1)
        gates.append(GateRecord("meta.gate", SHARED, gate, self.meta_names()))
        shared = self.z.alias(self.shared_experts(v_s))  # [B, n_s, H]
        by_category = {c: self.z.alias(self.category_experts[c](v[c])) for c in self.categories}
        read = {t: self.z.alias(v[self.category_of[t]]) for t in self.tasks}
        self.z.keep(*read.values(), *by_category.values(), shared)
        columns = []
        for task in self.tasks:
            c, v_c = self.category_of[task], read[task]
            experts = torch.cat([self.task_experts[task](v_c), by_category[c], shared], dim=1)
            gate = torch.softmax(self.task_gates[task](v_c), dim=-1)
            carried = torch.sigmoid(self.self_gates[task](v_c))
            columns.append((gate.unsqueeze(-1) * experts).sum(1) + carried * v_c)
            names = [f"{task}.{i}" for i in range(self.n_task)]
            names += [f"category {c}.{i}" for i in range(n_c)] + [f"{SHARED}.{i}" for i in range(n_s)]
            gates.append(GateRecord("task.gate", task, gate, names))
            scales.append(ScaleRecord("self", task, carried, [str(i) for i in range(carried.shape[1])], 1.0))
        return self.towers(columns), gates, scales

    def per_field(self, scales: Tensor) -> Tensor:
        """A feature gate's scales [B, D] averaged over each input field's units: [B, F]."""
        parts = scales.split(self.widths, dim=1)
        return torch.stack([p.mean(1) for p in parts], dim=1) if parts else scales[:, :0]

    def forward(self, batch: Batch) -> Tensor:
        return self.run(batch)[0]

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(shared_representation=self.z, gate_scales=lambda batch: self.run(batch)[2])

    def introspect(self, batch: Batch) -> Introspection:
        """Gate ``meta.gate``/``<category>`` over the category's meta experts and the global ones,
        ``meta.gate``/``shared`` over every meta expert; ``task.gate``/``<task>`` over the task's
        experts, its category's and the global second-level ones."""
        return Introspection(self.run(batch)[1])

    def last_shared_layer(self) -> list[Tensor]:
        """The global second-level experts' output layer: every task's gate mixes them."""
        return [self.shared_experts.last_layer()]

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """Task t owns its tower, its second-level experts, its gate and its self gate; the
        category parts feed every task of the category (and the meta ones every task, through
        the global gate), so they are shared."""
        prefixes = {
            t: [f"towers.nets.{t}.", f"task_experts.{t}.", f"task_gates.{t}.", f"self_gates.{t}."] for t in self.tasks
        }
        return group_by_prefix(self, prefixes)


def check(params: HoMEParams, recipe: Any) -> list[tuple[str, str]]:
    """Categories, when given, hold every task exactly once."""
    if params.categories is None:
        return []
    tasks = list(recipe.tasks)
    out = []
    seen: dict[str, str] = {}
    for category, members in params.categories.items():
        if not members:
            out.append((f"categories.{category}", "a category needs at least one task"))
        for task in members:
            if task not in tasks:
                out.append((f"categories.{category}", f"unknown task {task!r}{did_you_mean(task, tasks)}"))
            elif task in seen:
                out.append((f"categories.{category}", f"task {task!r} is already in category {seen[task]!r}"))
            else:
                seen[task] = category
    missing = [t for t in tasks if t not in seen]
    if missing:
        out.append(("categories", f"every task needs a category; missing: {', '.join(missing)}"))
    return out


@register_scheme(
    "home", HoMEParams, "expert hierarchy: normalised meta and task experts, feature/self gates (2024)", check
)
def build(params: HoMEParams, inputs: InputSpec) -> HoME:
    return HoME(inputs, **params.model_dump())
