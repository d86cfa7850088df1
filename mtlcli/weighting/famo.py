"""FAMO: fast adaptive multitask optimisation.

Liu, Feng, Stone, Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023,
Algorithm 1. Task logits ξ ∈ R^K (0 at the start) give z = softmax(ξ); the model follows

    Σ_k w_k L_k,   w_k = c · z_k / L_k,   c = (Σ_i z_i / L_i)⁻¹

which is the gradient of c · Σ_k z_k log L_k: every task's log-loss falls at the rate z asks for,
with O(1) cost (one backward pass, no task gradients). After the step, with
δ_k = log L_k(θ_t) − log L_k(θ_{t+1}) the decrease of each log-loss, the logits follow the
gradient J_z(ξ)ᵀ δ + γ ξ (J_z the softmax's Jacobian), which raises the weight of the tasks whose
loss fell least; ``decay`` is γ.

Choices where the paper leaves room (docs/methods.md): L_k(θ_{t+1}) is this step's loss on the
next batch, not a second forward pass on the same batch (the strategy sees only each step's
losses); the logits' step is Adam's with learning rate ``lr`` (β), as in the authors'
experiments, computed here on the K logits (state checkpointed). The logged weights are w_k
(they sum to 1).
"""

from __future__ import annotations

import torch
from pydantic import NonNegativeFloat, PositiveFloat
from torch import Tensor, nn

from mtlcli.weighting.base import StrategyCapabilities, WeightingParams, register_weighting

EPS = 1e-8


class FAMOParams(WeightingParams):
    lr: PositiveFloat = 0.025  # β, the logits' learning rate
    decay: NonNegativeFloat = 0.001  # γ, the logits' weight decay


def famo_weights(logits: Tensor, losses: Tensor) -> Tensor:
    """w [T] with w_k = c z_k / L_k, z = softmax(ξ), c = 1 / Σ_i z_i / L_i."""
    z = torch.softmax(logits, dim=0)
    inverse = z / losses.clamp_min(EPS)
    return inverse / inverse.sum()


def famo_logit_gradient(logits: Tensor, before: Tensor, after: Tensor, decay: float) -> Tensor:
    """J_z(ξ)ᵀ δ + γ ξ with δ = log L(before) − log L(after) [T]."""
    delta = before.clamp_min(EPS).log() - after.clamp_min(EPS).log()
    z = torch.softmax(logits, dim=0)
    # J_z = diag(z) − z zᵀ is symmetric: J_zᵀ δ = z ⊙ (δ − z·δ)
    return z * (delta - z @ delta) + decay * logits


class Adam:
    """Adam on one small vector (β₁ 0.9, β₂ 0.999, ε 1e-8, bias-corrected)."""

    def __init__(self, n: int) -> None:
        self.m, self.v, self.t = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), 0

    def step(self, grad: Tensor, lr: float) -> Tensor:
        self.t += 1
        self.m = 0.9 * self.m + 0.1 * grad
        self.v = 0.999 * self.v + 0.001 * grad * grad
        m_hat, v_hat = self.m / (1 - 0.9**self.t), self.v / (1 - 0.999**self.t)
        return lr * m_hat / (v_hat.sqrt() + 1e-8)


class FAMO:
    def __init__(self, n_tasks: int, lr: float, decay: float) -> None:
        self.lr, self.decay = lr, decay
        self.logits = torch.zeros(n_tasks, dtype=torch.float64)
        self.adam = Adam(n_tasks)
        self.previous: Tensor | None = None

    @property
    def capabilities(self) -> StrategyCapabilities:
        return StrategyCapabilities(state=self)  # ξ, Adam's moments and the previous step's losses

    def backward(self, losses: Tensor, model: nn.Module) -> Tensor:
        current = losses.detach().double().cpu()
        if self.previous is not None:
            grad = famo_logit_gradient(self.logits, self.previous, current, self.decay)
            self.logits = self.logits - self.adam.step(grad, self.lr)
        self.previous = current
        weights = famo_weights(self.logits, current).to(losses.dtype).to(losses.device)
        (weights * losses).sum().backward()
        return weights

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "logits": self.logits,
            "m": self.adam.m,
            "v": self.adam.v,
            "t": torch.tensor(self.adam.t),
            "previous": self.previous if self.previous is not None else torch.zeros(0),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.logits = state["logits"].clone().double()
        self.adam.m, self.adam.v, self.adam.t = state["m"].clone(), state["v"].clone(), int(state["t"])
        self.previous = state["previous"].clone().double() if state["previous"].numel() else None


@register_weighting("famo", FAMOParams, "balanced log-loss decrease with O(1) cost (NeurIPS 2023)")
def build(params: FAMOParams, tasks: list[str]) -> FAMO:
    return FAMO(len(tasks), params.lr, params.decay)
