"""Cross-stitch networks (soft sharing): one column of layers per task, mixed after every hidden
layer by a learned T x T matrix of alpha coefficients.

Misra, Shrivastava, Gupta, Hebert, "Cross-stitch Networks for Multi-task Learning", CVPR 2016.
After hidden layer l the columns' activations h_1 .. h_T are replaced by
h~_k = sum_j alpha^l_{kj} h_j; the next layer of column k reads h~_k. Alpha starts near identity:
alpha_kk = 1 - a and alpha_kj = a / (T - 1) for j != k, with a = ``alpha_init_offdiag``.
"""

from __future__ import annotations

import itertools
from typing import Annotated, cast

import torch
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from mtlcli.data.batch import Batch
from mtlcli.models.base import Capabilities, Dropout, InputSpec, ModelParams, group_by_prefix, register_scheme
from mtlcli.models.blocks import FeatureEmbedding, Towers, last_linear
from mtlcli.models.views import AlphaRecord, Introspection, SharedRepresentation


class CrossStitchParams(ModelParams):
    column_units: list[PositiveInt] = Field(default=[64], min_length=1)
    tower_units: list[PositiveInt] = [8]
    dropout: Dropout = 0.0
    alpha_init_offdiag: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1


def initial_alpha(n_tasks: int, offdiag: float) -> Tensor:
    """[T, T]: 1 - offdiag on the diagonal, offdiag split evenly over each row's other entries."""
    if n_tasks == 1:
        return torch.ones(1, 1)
    other = offdiag / (n_tasks - 1)
    return torch.full((n_tasks, n_tasks), other) + torch.eye(n_tasks) * (1.0 - offdiag - other)


class CrossStitch(nn.Module):
    """embedding (shared) -> per-task columns, alpha-mixed after each hidden layer -> towers.

    Shared representation: the columns' last mixed outputs, one per task."""

    def __init__(
        self,
        inputs: InputSpec,
        embedding_dim: int,
        column_units: list[int],
        tower_units: list[int],
        dropout: float,
        alpha_init_offdiag: float,
    ) -> None:
        super().__init__()
        self.tasks = list(inputs.tasks)
        self.embedding = FeatureEmbedding.for_inputs(inputs, embedding_dim)
        widths = [self.embedding.out_dim, *column_units]
        self.columns = nn.ModuleDict(
            {t: nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths)) for t in self.tasks}
        )
        self.alphas = nn.ParameterList(
            nn.Parameter(initial_alpha(len(self.tasks), alpha_init_offdiag)) for _ in column_units
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.towers = Towers(self.tasks, column_units[-1], tower_units, dropout)
        self.z = SharedRepresentation()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(shared_representation=self.z)

    def introspect(self, batch: Batch) -> Introspection:
        """``layer<l>``: the T x T matrix after hidden layer l; row k mixes into column k."""
        return Introspection(
            alphas=[AlphaRecord(f"layer{layer}", alpha.detach().clone()) for layer, alpha in enumerate(self.alphas, 1)]
        )

    def forward(self, batch: Batch) -> Tensor:
        x = self.embedding(batch)
        h = [x] * len(self.tasks)
        for layer, alpha in enumerate(self.alphas):
            stacked = torch.stack(
                [
                    self.dropout(torch.relu(cast(nn.ModuleList, self.columns[t])[layer](h[k])))
                    for k, t in enumerate(self.tasks)
                ],
                dim=1,
            )  # [B, T, D]
            h = list(torch.einsum("kj,bjd->bkd", alpha, stacked).unbind(1))
        self.z.keep(*h)
        return self.towers(h)

    def last_shared_layer(self) -> list[Tensor]:
        """The last Linear of every column: after the alpha mixing every task's tower reads all of
        them (the alphas themselves are mixing coefficients, not a layer of weights)."""
        return [last_linear(self.columns[t]).weight for t in self.tasks]

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """Task k owns its tower. The columns are shared: every alpha-mixing step sends each task's
        gradient into every column (the paper's eq. 2), so no column is trained by one task alone."""
        return group_by_prefix(self, {t: [f"towers.nets.{t}."] for t in self.tasks})


@register_scheme(
    "cross_stitch", CrossStitchParams, "soft sharing: per-task columns mixed by learned alphas (CVPR 2016)"
)
def build(params: CrossStitchParams, inputs: InputSpec) -> CrossStitch:
    return CrossStitch(inputs, **params.model_dump())
