"""Building blocks shared by the sharing schemes: embeddings, MLPs, expert pools, towers."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlcli.data.batch import Batch


class _Lookup(torch.autograd.Function):
    """Embedding lookup whose backward is one ``index_add_`` into a dense gradient.

    Same result as ``F.embedding``; on CPU its backward is several times faster than the
    default dense embedding backward for the small tables of tabular data.
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        ctx.save_for_backward(flat)
        ctx.rows = weight.shape[0]
        return weight.index_select(0, flat).view(*ids.shape, weight.shape[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (flat,) = ctx.saved_tensors
        dim = grad.shape[-1]
        weight_grad = grad.new_zeros(ctx.rows, dim).index_add_(0, flat, grad.reshape(-1, dim))
        return weight_grad, None


class FeatureEmbedding(nn.Module):
    """All categorical features in one embedding table (per-feature offsets), plus numerics.

    Input: a Batch. Output: float32 [B, F_cat * dim + F_num].
    """

    offsets: Tensor

    def __init__(self, cardinalities: list[int], n_numeric: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(max(sum(cardinalities), 1), dim)
        nn.init.normal_(self.table.weight, std=0.05)
        starts = [0]
        for size in cardinalities[:-1]:
            starts.append(starts[-1] + size)
        self.register_buffer("offsets", torch.tensor(starts, dtype=torch.long), persistent=False)
        self.n_categorical = len(cardinalities)
        self.out_dim = len(cardinalities) * dim + n_numeric

    def forward(self, batch: Batch) -> Tensor:
        if self.n_categorical == 0:
            return batch.numeric
        embedded = _Lookup.apply(self.table.weight, batch.categorical + self.offsets).flatten(1)
        return torch.cat([embedded, batch.numeric], dim=1)


def mlp(in_dim: int, units: list[int], dropout: float = 0.0, out_dim: int | None = None) -> nn.Sequential:
    """Linear -> ReLU (-> Dropout) for each width in ``units``; then a plain Linear to ``out_dim``."""
    layers: list[nn.Module] = []
    width = in_dim
    for size in units:
        layers += [nn.Linear(width, size), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    if out_dim is not None:
        layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class ExpertPool(nn.Module):
    """``n`` MLP experts over one input, run as batched matrix products rather than a loop.

    The first layer of all experts is a single Linear(in, n * units[0]); deeper layers are one
    batched matmul over stacked weights [n, h_in, h_out]. Input [B, in]; output [B, n, units[-1]].
    """

    def __init__(self, in_dim: int, n: int, units: list[int], dropout: float = 0.0) -> None:
        super().__init__()
        if not units:
            raise ValueError("an expert needs at least one hidden layer")
        self.n = n
        self.first = nn.Linear(in_dim, n * units[0])
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for h_in, h_out in itertools.pairwise(units):
            bound = 1.0 / math.sqrt(h_in)
            self.weights.append(nn.Parameter(torch.empty(n, h_in, h_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(n, 1, h_out).uniform_(-bound, bound)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out_dim = units[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.from_first_layer(self.first(x))

    def from_first_layer(self, pre: Tensor) -> Tensor:
        """The experts' outputs [B, n, h] from their first layer's pre-activations [B, n * units[0]]
        (lets a caller compute that layer inside a larger matmul)."""
        h = self.dropout(torch.relu(pre)).view(pre.shape[0], self.n, -1)
        if len(self.weights):
            h = h.transpose(0, 1)  # [n, B, h]
            for weight, bias in zip(self.weights, self.biases, strict=True):
                h = self.dropout(torch.relu(torch.baddbmm(bias, h, weight)))
            h = h.transpose(0, 1)
        return h


class Towers(nn.Module):
    """One MLP tower per task, each ending in a single output.

    Input: [B, d] shared by all towers, [B, T, d], or a sequence of T tensors [B, d]. Output [B, T].
    """

    def __init__(self, tasks: list[str], in_dim: int, units: list[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.nets = nn.ModuleDict({task: mlp(in_dim, units, dropout, out_dim=1) for task in tasks})

    def forward(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        if isinstance(x, Tensor) and x.dim() == 2:
            return torch.cat([self.nets[task](x) for task in self.tasks], dim=1)
        return torch.cat([self.nets[task](x[k]) for k, task in enumerate(self.tasks)], dim=1)
