"""IMTL: impartial multi-task learning (the hybrid IMTL-L + IMTL-G).

Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial Multi-task Learning", ICLR 2021,
Algorithm 1. IMTL-L scales each loss by a learned s_k (0 at the start):

    L̂_k = e^{s_k} L_k − s_k

whose optimum in s_k makes every scaled loss e^{s_k} L_k equal to 1; the s_k train in the
optimiser's own group (``lr``, default ``train.lr``), each with the gradient e^{s_k} L_k − 1.
IMTL-G then makes the shared update's projection on every task's unit gradient equal: with g_k
the gradient of e^{s_k} L_k on the shared parameters, u_k = g_k / ||g_k||, D the rows g_1 − g_k
and U the rows u_1 − u_k (k = 2 … K),

    α_{2:K} = g_1 Uᵀ (D Uᵀ)⁻¹,   α_1 = 1 − Σ_{k≥2} α_k

and the shared update is Σ_k α_k g_k. Task-specific parameters get the gradient of Σ_k e^{s_k} L_k.
The paper's efficient variant takes g_k on the shared representation instead; here it is the
shared parameters, as for the other gradient weightings. (D Uᵀ)⁻¹ is a pseudo-inverse, so that a
zero or repeated task gradient leaves α finite. The logged weights are the coefficients of the
raw loss gradients, α_k e^{s_k}.
"""

from __future__ import annotations

import torch
from pydantic import PositiveFloat
from torch import Tensor, nn

from mtlcli.weighting.base import StrategyCapabilities, WeightingParams, register_weighting
from mtlcli.weighting.gradients import backward_with_shared


class IMTLParams(WeightingParams):
    lr: PositiveFloat | None = None  # the scales' own constant learning rate (default train.lr)

    def own_lr(self) -> float | None:
        return self.lr


def imtl_coefficients(gram: Tensor) -> Tensor:
    """α [T] of IMTL-G from the Gram matrix [T, T] of the (scaled) task gradients."""
    gram = gram.double()
    n = gram.shape[0]
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    inverse_norm = 1.0 / gram.diagonal().clamp_min(1e-24).sqrt()
    differences = torch.zeros(n - 1, n, dtype=torch.float64)  # row k-2: e_1 − e_k
    differences[:, 0] = 1.0
    differences[:, 1:] = -torch.eye(n - 1, dtype=torch.float64)
    g_u = gram * inverse_norm  # [a, b]: g_a · u_b
    d_u = differences @ g_u @ differences.T  # D Uᵀ
    g1_u = g_u[0] @ differences.T  # g_1 Uᵀ
    rest = g1_u @ torch.linalg.pinv(d_u)
    return torch.cat([1 - rest.sum(0, keepdim=True), rest])


class IMTL:
    def __init__(self, n_tasks: int) -> None:
        self.log_scale = nn.Parameter(torch.zeros(n_tasks))

    @property
    def capabilities(self) -> StrategyCapabilities:
        return StrategyCapabilities(parameters=(self.log_scale,), task_gradients=True)

    def combine(self, grads: Tensor, losses: Tensor) -> Tensor:
        return imtl_coefficients(grads @ grads.T).to(grads.dtype)

    def backward(self, losses: Tensor, model: nn.Module) -> Tensor:
        scale = self.log_scale.detach().to(losses.device).exp()
        grad = (scale * losses.detach() - 1).to(self.log_scale.device)  # ∂(e^s L − s)/∂s
        self.log_scale.grad = grad if self.log_scale.grad is None else self.log_scale.grad + grad
        alpha = backward_with_shared(scale * losses, model, self.combine)
        return alpha * scale


@register_weighting("imtl", IMTLParams, "learned loss scales and equal projections on every task (ICLR 2021)")
def build(params: IMTLParams, tasks: list[str]) -> IMTL:
    return IMTL(len(tasks))
