"""GradVac: gradient vaccine, toward each task pair's usual gradient similarity.

Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving Multi-task
Optimization in Massively Multilingual Models", ICLR 2021, Algorithm 1. Each ordered task pair
(i, j) keeps a target similarity φ̂_ij (0 at the start). On the shared parameters, each task
gradient g_i starts as g_i' = g_i; for every other task j, in a random order drawn anew for each i
and each step, with φ_ij = cos(g_i', g_j): if φ_ij < φ̂_ij, g_i' is moved toward g_j until their
cosine is φ̂_ij,

    g_i' ← g_i' + ||g_i'|| (φ̂_ij √(1 − φ_ij²) − φ_ij √(1 − φ̂_ij²)) / (||g_j|| √(1 − φ̂_ij²)) · g_j

and in every case the target follows φ̂_ij ← (1 − β) φ̂_ij + β φ_ij (``beta``). The update is
Σ_i g_i'. Task-specific parameters get their ordinary gradient; the order comes from a generator
seeded with ``seed``. With φ̂ = 0 the rule is PCGrad's projection, so GradVac generalises it from
"not conflicting" to "as aligned as usual".

Every g_i' is a combination Σ_j C_ij g_j of the raw gradients, so the procedure runs on the K × K
Gram matrix, and the logged weights are c_j = Σ_i C_ij. The paper applies the rule per parameter
group at a chosen granularity, each group with its own targets: ``granularity: whole`` (the
default) makes the shared parameters one group; ``parameter`` makes each shared parameter tensor a
group, with its own φ̂ per (task pair, tensor) and its own C; the order is drawn once per i and
step for all the groups (docs/methods.md).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from mtlcli.weighting.base import StrategyCapabilities, WeightingParams, register_weighting
from mtlcli.weighting.gradients import backward_with_shared, backward_with_shared_update

EPS = 1e-12


class GradVacParams(WeightingParams):
    beta: Annotated[float, Field(gt=0.0, le=1.0)] = 0.01
    seed: int = 0
    granularity: Literal["whole", "parameter"] = "whole"


def gradvac_coefficients(gram: Tensor, targets: Tensor, beta: float, generator: torch.Generator) -> Tensor:
    """C [T, T] with g_i' = Σ_j C_ij g_j, from the Gram matrix [T, T]; updates ``targets`` [T, T]
    (φ̂) in place."""
    n = gram.shape[0]
    coef = torch.eye(n, dtype=gram.dtype)
    for i in range(n):
        for j in torch.randperm(n, generator=generator).tolist():
            if j == i or gram[j, j] <= 0:
                continue
            norm_i = math.sqrt(max(float(coef[i] @ gram @ coef[i]), 0.0))
            norm_j = math.sqrt(float(gram[j, j]))
            cos = float(coef[i] @ gram[:, j]) / max(norm_i * norm_j, EPS)
            target = float(targets[i, j])
            if cos < target:
                coef[i, j] += (
                    norm_i
                    * (target * math.sqrt(max(1 - cos**2, 0.0)) - cos * math.sqrt(max(1 - target**2, 0.0)))
                    / max(norm_j * math.sqrt(max(1 - target**2, 0.0)), EPS)
                )
            targets[i, j] = (1 - beta) * target + beta * cos
    return coef


def gradvac_group_coefficients(grams: Tensor, targets: Tensor, beta: float, generator: torch.Generator) -> Tensor:
    """C [S, T, T] with g_{s,i}' = Σ_j C_sij g_{s,j} for each of S parameter groups, from their Gram
    matrices [S, T, T]; updates ``targets`` [S, T, T] (φ̂ per group) in place. One order per i for
    all the groups; each step of it runs on every group at once."""
    n_groups, n, _ = grams.shape
    coef = torch.eye(n, dtype=grams.dtype).repeat(n_groups, 1, 1)
    for i in range(n):
        for j in torch.randperm(n, generator=generator).tolist():
            if j == i:
                continue
            row = coef[:, i]  # [S, T]
            norm_i = torch.einsum("st,stu,su->s", row, grams, row).clamp_min(0).sqrt()
            norm_j = grams[:, j, j].clamp_min(0).sqrt()
            cos = torch.einsum("st,st->s", row, grams[:, :, j]) / (norm_i * norm_j).clamp_min(EPS)
            target = targets[:, i, j]
            sin, sin_target = (1 - cos**2).clamp_min(0).sqrt(), (1 - target**2).clamp_min(0).sqrt()
            step = norm_i * (target * sin - cos * sin_target) / (norm_j * sin_target).clamp_min(EPS)
            present = grams[:, j, j] > 0  # a group task j does not reach is left as it is
            coef[:, i, j] += torch.where(present & (cos < target), step, torch.zeros_like(step))
            targets[:, i, j] = torch.where(present, (1 - beta) * target + beta * cos, target)
    return coef


class GradVac:
    def __init__(self, n_tasks: int, beta: float, seed: int, granularity: str = "whole") -> None:
        self.beta = beta
        self.granularity = granularity
        # whole: [T, T]; parameter: [S, T, T], one block per shared tensor, made at the first step
        self.targets = torch.zeros(n_tasks, n_tasks, dtype=torch.float64)
        if granularity == "parameter":
            self.targets = torch.zeros(0, n_tasks, n_tasks, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)

    def combine(self, grads: Tensor, losses: Tensor) -> Tensor:
        gram = (grads @ grads.T).double()
        return gradvac_coefficients(gram, self.targets, self.beta, self.generator).sum(0).to(grads.dtype)

    @property
    def capabilities(self) -> StrategyCapabilities:
        return StrategyCapabilities(state=self, task_gradients=True)  # the targets and the order's generator

    def backward(self, losses: Tensor, model: nn.Module) -> Tensor:
        if self.granularity == "whole":
            return backward_with_shared(losses, model, self.combine)
        return self.backward_per_parameter(losses, model)

    def backward_per_parameter(self, losses: Tensor, model: nn.Module) -> Tensor:
        """The rule on each shared tensor apart; returns the coefficients averaged over the
        tensors, weighted by their sizes (no single c gives the update here)."""
        return backward_with_shared_update(losses, model, self.update_per_parameter)

    def update_per_parameter(self, grads: Tensor, losses: Tensor, shared: list[Tensor]) -> tuple[Tensor, Tensor]:
        sizes = [p.numel() for p in shared]
        pieces = grads.split(sizes, dim=1)
        grams = torch.stack([piece @ piece.T for piece in pieces]).double().cpu()
        if self.targets.shape[0] != len(shared):
            self.targets = torch.zeros_like(grams)
        coefficients = gradvac_group_coefficients(grams, self.targets, self.beta, self.generator).sum(1)
        coefficients = coefficients.to(device=grads.device, dtype=grads.dtype)  # [S, T]
        update = torch.cat([c @ piece for c, piece in zip(coefficients, pieces, strict=True)])
        weights = torch.tensor(sizes, dtype=grads.dtype, device=grads.device) @ coefficients / sum(sizes)
        return update, weights

    def state_dict(self) -> dict[str, Tensor]:
        return {"targets": self.targets, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.targets = state["targets"].clone().double()
        self.generator.set_state(state["generator"].to(torch.uint8))


@register_weighting("gradvac", GradVacParams, "task gradients steered to each pair's usual similarity (ICLR 2021)")
def build(params: GradVacParams, tasks: list[str]) -> GradVac:
    return GradVac(len(tasks), params.beta, params.seed, params.granularity)
