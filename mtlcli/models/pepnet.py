"""Parameter and Embedding Personalized Network (PEPNet).

Chang, Zhang, Hui, Leng, Niu, Song, Gai, "PEPNet: Parameter and Embedding Personalized Network
for Infusing with Personalized Prior Information", KDD 2023. A Gate NU is two layers,
delta = gamma * sigmoid(W2 ReLU(W1 x + b1) + b2) with gamma = 2, so a gate scales by (0, 2).

- EPNet scales the embedding E [B, D] field by field: delta_domain = GateNU(E(F_d) ⊕ sg(E)), where
  F_d are the domain (scenario) features and sg stops the gradient; O_ep = delta_domain ⊗ E.
- PPNet scales the input of every layer of every task's tower: with the prior
  O_prior = E(F_prior) (user, item, ... embeddings), layer l's gate reads O_prior ⊕ sg(O_ep) and
  gives each task t its delta^l_t; task t's tower computes H^{l+1} = f((delta^l_t ⊗ H^l) W^l + b^l)
  from H^0 = O_ep (the output layer's input is gated too).

Each Gate NU of PPNet gives every task's scales from one hidden layer; its output layer is kept
per task (the paper's one output layer, split by its columns: the same function).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from pydantic import Field, PositiveFloat, PositiveInt
from torch import Tensor, nn

from mtlcli.data.batch import Batch
from mtlcli.errors import MtlError
from mtlcli.models.base import Capabilities, Dropout, InputSpec, ModelParams, group_by_prefix, register_scheme
from mtlcli.models.blocks import FeatureEmbedding, last_linear
from mtlcli.models.views import Introspection, ScaleRecord, SharedRepresentation
from mtlcli.registry import did_you_mean


class PEPNetParams(ModelParams):
    prior: list[str] = []  # categorical features whose embeddings personalise the towers (PPNet)
    domain: list[str] | None = None  # categorical features of EPNet's gate (default: the prior's)
    gate_units: PositiveInt = 32
    gamma: PositiveFloat = 2.0
    tower_units: list[PositiveInt] = Field(default=[64, 32], min_length=1)
    dropout: Dropout = 0.0


class GateNU(nn.Module):
    """gamma * sigmoid(W2 ReLU(W1 x + b1) + b2): [B, in] -> [B, out] in (0, gamma); ``hidden``
    gives the first layer alone and ``scales`` the second on it."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, gamma: float) -> None:
        super().__init__()
        self.first = nn.Linear(in_dim, hidden)
        self.second = nn.Linear(hidden, out_dim)
        self.gamma = gamma

    def hidden(self, x: Tensor) -> Tensor:
        return torch.relu(self.first(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.gamma * torch.sigmoid(self.second(self.hidden(x)))


def feature_columns(names: list[str], known: list[str], key: str) -> list[int]:
    """The columns of categorical features ``names``; a clear error naming ``model.<key>`` when one is not a feature."""
    missing = [n for n in names if n not in known]
    if missing:
        name = missing[0]
        raise MtlError(
            f"model.{key}: {name!r} is not a categorical feature of this run's data{did_you_mean(name, known)}",
            f"name categorical features in model.{key}; the data has: {', '.join(known) or '(none)'}",
        )
    return [known.index(n) for n in names]


class PEPNet(nn.Module):
    """embedding -> EPNet's field scales -> one tower per task, each layer's input scaled by PPNet.

    Shared representation: O_ep as the towers read it and each PPNet gate's hidden layer as the
    tasks' output layers read it (everything above belongs to one task)."""

    def __init__(
        self,
        inputs: InputSpec,
        embedding_dim: int,
        prior: list[str],
        domain: list[str] | None,
        gate_units: int,
        gamma: float,
        tower_units: list[int],
        dropout: float,
    ) -> None:
        super().__init__()
        self.tasks = list(inputs.tasks)
        self.embedding = FeatureEmbedding.for_inputs(inputs, embedding_dim)
        known = list(inputs.categorical_names)
        self.prior = feature_columns(prior, known, "prior")
        self.domain = feature_columns(prior if domain is None else domain, known, "domain")
        fields = self.embedding.fields
        n_numeric = fields.n_numeric
        # the width of every field of E: embeddings (features, then histories), then numbers
        self.widths = [fields.dim] * fields.n_categorical + [1] * n_numeric
        self.field_names = (
            [known[i] if i < len(known) else f"categorical {i}" for i in range(len(inputs.cardinalities))]
            + [f"history {i}" for i in range(len(inputs.sequences))]
            + [f"numeric {i}" for i in range(n_numeric)]
        )
        width = self.embedding.out_dim
        d = embedding_dim
        self.epnet = GateNU(len(self.domain) * d + width, gate_units, len(self.widths), gamma)
        sizes = [width, *tower_units]
        self.ppnet = nn.ModuleList([nn.Linear(len(self.prior) * d + width, gate_units) for _ in sizes])
        self.scales = nn.ModuleDict(
            {t: nn.ModuleList([nn.Linear(gate_units, size) for size in sizes]) for t in self.tasks}
        )
        self.towers = nn.ModuleDict(
            {
                t: nn.ModuleList([nn.Linear(a, b) for a, b in zip(sizes, [*tower_units, 1], strict=True)])
                for t in self.tasks
            }
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.gamma = gamma
        self.z = SharedRepresentation()

    def fields_of(self, x: Tensor, columns: list[int]) -> Tensor:
        """The embeddings of categorical feature columns ``columns`` in E [B, D] -> [B, len * d]."""
        d = self.embedding.fields.dim
        return torch.cat([x[:, c * d : (c + 1) * d] for c in columns], dim=1) if columns else x[:, :0]

    def run(self, batch: Batch) -> tuple[Tensor, Tensor, list[list[Tensor]]]:
        """Logits [B, T], EPNet's field scales [B, F] and PPNet's scales: per task, per layer [B, n_l]."""
        x = self.embedding(batch)
        field_scales = self.epnet(torch.cat([self.fields_of(x, self.domain), x.detach()], dim=1))
        widths = torch.tensor(self.widths, device=x.device)
        o_ep = x * field_scales.repeat_interleave(widths, dim=1, output_size=x.shape[1])
        prior = torch.cat([self.fields_of(x, self.prior), o_ep.detach()], dim=1)
        hidden = [torch.relu(layer(prior)) for layer in self.ppnet]
        o_towers = self.z.alias(o_ep)
        hidden = [self.z.alias(h) for h in hidden]
        self.z.keep(o_towers, *hidden)
        columns, scales = [], []
        for task in self.tasks:
            outs = cast(nn.ModuleList, self.scales[task])
            gates = [self.gamma * torch.sigmoid(out(h)) for out, h in zip(outs, hidden, strict=True)]
            h_task = o_towers
            layers = cast(nn.ModuleList, self.towers[task])
            for j, (layer, gate) in enumerate(zip(layers, gates, strict=True)):
                h_task = layer(gate * h_task)
                if j < len(layers) - 1:
                    h_task = self.dropout(torch.relu(h_task))
            columns.append(h_task)
            scales.append(gates)
        return torch.cat(columns, dim=1), field_scales, scales

    def forward(self, batch: Batch) -> Tensor:
        return self.run(batch)[0]

    def gate_scales(self, batch: Batch) -> list[ScaleRecord]:
        """Group ``embedding``/``shared``: EPNet's scale of each input field [B, F]; group
        ``layer<l>``/``<task>`` (from 1; the last is the output layer's input): PPNet's scale of
        each input unit of task t's tower layer l [B, n_l]. Every scale lies in (0, gamma)."""
        _, fields, scales = self.run(batch)
        records = [ScaleRecord("embedding", "shared", fields, None, self.gamma)]
        for task, gates in zip(self.tasks, scales, strict=True):
            records += [
                ScaleRecord(f"layer{j + 1}", task, gate, [str(i) for i in range(gate.shape[1])], self.gamma)
                for j, gate in enumerate(gates)
            ]
        return records

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(shared_representation=self.z, gate_scales=self.gate_scales)

    def introspect(self, batch: Batch) -> Introspection:
        """No softmax gates: PEPNet's gates scale (``gate_scales``)."""
        return Introspection()

    def last_shared_layer(self) -> list[Tensor]:
        """EPNet's output layer: every tower reads the embedding it scales."""
        return [last_linear(self.epnet).weight]

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        return group_by_prefix(self, {t: [f"towers.{t}.", f"scales.{t}."] for t in self.tasks})


def check(params: PEPNetParams, recipe: Any) -> list[tuple[str, str]]:
    """Prior and domain features named against an explicit categorical list (``auto`` is checked
    when the model is built, against the data's features)."""
    listed = recipe.features.categorical
    if not isinstance(listed, dict):
        return []
    named = {"prior": params.prior, "domain": params.domain or []}
    return [
        (key, f"{name!r} is not a categorical feature{did_you_mean(name, list(listed))}")
        for key, names in named.items()
        for name in names
        if name not in listed
    ]


@register_scheme(
    "pepnet", PEPNetParams, "personalised gates: embeddings and tower units scaled by a prior (KDD 2023)", check
)
def build(params: PEPNetParams, inputs: InputSpec) -> PEPNet:
    return PEPNet(inputs, **params.model_dump())
