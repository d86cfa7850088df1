"""GradNorm: learned weights that balance the tasks' gradient norms.

Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
Balancing in Deep Multitask Networks", ICML 2018, section 3. The model follows Σ_k w_k L_k with
learnable weights w_k (initially 1). W is the last shared layer; per step

    G_k = ||∇_W w_k L_k||,   L̃_k = L_k(t) / L_k(0),   r_k = L̃_k / mean_j L̃_j

and the weights (only they) get the gradient of

    L_grad = Σ_k | G_k − mean_j(G_j) · r_k^α |

with the target mean(G) · r_k^α held constant; ``alpha`` is the asymmetry α. After every update
the weights are renormalised to sum to K (and kept above a small positive floor). L_k(0) is the
loss of the first step.

W is the paper's "last shared layer of weights", declared by each scheme
(``MultiTaskModel.last_shared_layer``): the last shared layer whose output every task's head reads,
e.g. the bottom's last Linear in ``shared_bottom``, every expert's output layer in ``mmoe`` and
``omoe``, the last level's shared experts in ``cgc`` and ``ple``, every column's last Linear in
``cross_stitch``. When it is a few tensors, G_k is the norm of the gradient on all of them
together. The logged weights are w_k.
"""

from __future__ import annotations

from typing import cast

import torch
from pydantic import NonNegativeFloat, PositiveFloat
from torch import Tensor, nn

from mtlcli import distributed
from mtlcli.models.base import MultiTaskModel
from mtlcli.weighting.base import StrategyCapabilities, WeightingParams, register_weighting
from mtlcli.weighting.gradients import shared_task_gradients

FLOOR = 1e-3


class GradNormParams(WeightingParams):
    alpha: NonNegativeFloat = 1.5
    lr: PositiveFloat | None = None  # the weights' own constant learning rate (default train.lr)

    def own_lr(self) -> float | None:
        return self.lr


def balanced_parameters(model: nn.Module) -> list[Tensor]:
    """W: the scheme's last shared layer (empty when nothing is shared)."""
    return cast(MultiTaskModel, model).last_shared_layer()


def gradient_norms(losses: Tensor, layer: list[Tensor]) -> Tensor:
    """||∇_W L_k|| over all tensors of W together, per task [T] (0 where a loss does not reach W);
    on several ranks, the norm of the gradient summed over them."""
    return distributed.backward_ranks().sum(shared_task_gradients(losses, layer)).norm(dim=1)


def gradnorm_weight_gradient(weights: Tensor, norms: Tensor, ratios: Tensor, alpha: float) -> Tensor:
    """∂L_grad/∂w [T] given w [T], ||∇_W L_k|| [T] and the inverse training rates L_k(t)/L_k(0) [T]."""
    g = weights * norms
    r = ratios / ratios.mean().clamp_min(1e-12)
    target = g.mean() * r**alpha
    return torch.sign(g - target) * norms


class GradNorm:
    def __init__(self, n_tasks: int, alpha: float) -> None:
        self.alpha = alpha
        self.weights = nn.Parameter(torch.ones(n_tasks))
        self.initial: Tensor | None = None

    @property
    def capabilities(self) -> StrategyCapabilities:
        return StrategyCapabilities(parameters=(self.weights,), state=self, task_gradients=True)  # w_k; L_k(0)

    def backward(self, losses: Tensor, model: nn.Module) -> Tensor:
        with torch.no_grad():  # renormalise after the previous optimiser step
            self.weights.clamp_(min=FLOOR)
            self.weights.mul_(len(self.weights) / self.weights.sum())
        weights = self.weights.detach().clone()
        detached = losses.detach()
        if self.initial is None:
            self.initial = detached.clone()
        layer = [p for p in balanced_parameters(model) if p.requires_grad]
        if layer:
            norms = gradient_norms(losses, layer)
            ratios = detached / self.initial.to(detached.device).clamp_min(1e-12)
            grad = gradnorm_weight_gradient(weights, norms, ratios, self.alpha)
            self.weights.grad = grad if self.weights.grad is None else self.weights.grad + grad
        (weights * losses).sum().backward()
        return weights

    def state_dict(self) -> dict[str, Tensor]:
        """The first step's losses L_k(0) (empty before the first step); the weights are parameters."""
        return {"initial": self.initial if self.initial is not None else torch.zeros(0)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.initial = state["initial"].clone() if state["initial"].numel() else None


@register_weighting("gradnorm", GradNormParams, "weights learned to balance gradient norms (ICML 2018)")
def build(params: GradNormParams, tasks: list[str]) -> GradNorm:
    return GradNorm(len(tasks), params.alpha)
