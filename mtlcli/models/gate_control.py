"""DEPHN's gate-strength control: the pieces, as plain modules and functions (not wired into any
scheme or the training loop yet).

Kong, Su, Zhao, Hou, "DEPHN: Different Expression Parallel Heterogeneous Network using Virtual
Gradient Optimization for Multi-task Learning", IJCNN 2023 (arXiv:2307.12519).

What the paper states [paper]: each task's gate reads a *feature explicit mapping* of the input, a
*virtual gradient coefficient* acts during training, and the *learning intensity of each gate* is
adjusted from the *difference between the gates' values* and the *correlation between the tasks*.

The exact forms are not available to the project; these are the project's own [spec] choices
(docs/methods.md, "Gate control (DEPHN)"):

- ``FieldMapping``: task k's gate reads φ_k(x) = concat_f (s_{k,f} · e_f), one learned scalar per
  task and input field, initialised to 1 (the gate then starts as it would on the flat input);
- ``virtual_gradient``: the identity in the forward pass; the gradient that flows back through gate
  k's logits is multiplied by λ_k ("virtual": the gradient changes, the prediction does not).
  ``controlled_gate_logits`` confines it to the gate and its mapping: the gate's input passes
  through the inverse coefficient, so the shared embedding's gradient is not scaled;
- ``gate_difference``: d_k, the mean over the other tasks j of the total-variation distance
  ½ Σ_e |ḡ_k,e − ḡ_j,e| between batch-mean gate distributions (0 identical, 1 disjoint);
- ``LabelCorrelation``: c_k, the mean over j ≠ k of |ρ_kj|, the Pearson correlation of the two
  tasks' labels on the rows where both are observed, smoothed over steps by an exponential moving
  average (decay ``CORR_DECAY``); the first batch on which a pair's ρ is defined sets its average,
  a batch on which it is undefined (under two common rows, a constant label) leaves it, and a pair
  never seen counts 0;
- ``gate_coefficients``: λ_k = clip(exp(κ · (δ · (1 − c_k) − d_k)), λ_min, λ_max). δ · (1 − c_k)
  is the difference the gates "should" have (weakly related tasks route apart); a gate more alike
  the others than that learns faster (λ > 1), one more different learns slower (λ < 1).

λ is a control signal, computed without gradient. For a run on several processes to match one
process, d and c are computed from sums over the global batch: ``gate_difference`` takes the
batch-mean gates and ``LabelCorrelation.update`` the label moments of ``label_moments``, both of
which are sums a caller can all-reduce before dividing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mtlcli.models.blocks import FieldLayout

DELTA = 0.5  # δ: the gate difference wanted between two uncorrelated tasks [spec]
KAPPA = 5.0  # κ: how sharply λ responds to a gap between wanted and actual difference [spec]
LAMBDA_MIN, LAMBDA_MAX = 0.1, 10.0  # λ's clip [spec]
CORR_DECAY = 0.99  # the label correlation's moving-average decay per step [spec]


class FieldMapping(nn.Module):
    """Each task's explicit re-weighting of the input fields: φ_k(x) = concat_f (s_{k,f} · e_f).

    The fields are those of ``FeatureEmbedding``'s layout: ``n_categorical`` embeddings of width
    ``dim`` (pooled histories included), then ``n_numeric`` numbers, each number one field of
    width 1. ``scales`` [T, F] (F = n_categorical + n_numeric) starts at 1.

    Input: the flat embedding x [B, D] with D = n_categorical · dim + n_numeric.
    Output: [B, T, D], row k being φ_k(x).
    """

    widths: Tensor

    def __init__(self, fields: FieldLayout, n_tasks: int) -> None:
        super().__init__()
        n_fields = fields.n_categorical + fields.n_numeric
        self.scales = nn.Parameter(torch.ones(n_tasks, n_fields))
        widths = [fields.dim] * fields.n_categorical + [1] * fields.n_numeric
        self.register_buffer("widths", torch.tensor(widths, dtype=torch.long), persistent=False)
        self.out_dim = fields.n_categorical * fields.dim + fields.n_numeric

    def forward(self, x: Tensor) -> Tensor:
        per_column = self.scales.repeat_interleave(self.widths, dim=1)  # [T, D]
        return x.unsqueeze(1) * per_column.unsqueeze(0)

    def task(self, x: Tensor, k: int) -> Tensor:
        """φ_k(x) alone: [B, D]."""
        return x * self.scales[k].repeat_interleave(self.widths)


class _VirtualGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by a coefficient."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, coefficient: Tensor) -> Tensor:
        ctx.save_for_backward(coefficient)
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (coefficient,) = ctx.saved_tensors
        return grad * coefficient, None


def virtual_gradient(logits: Tensor, coefficient: Tensor | float) -> Tensor:
    """``logits`` unchanged in the forward pass; in the backward pass the gradient reaching
    ``logits`` is multiplied by ``coefficient`` (λ_k), so everything upstream of them (the gate,
    its field mapping, and their own inputs) learns from gate k at λ_k times the rate.

    logits: [B, n] (any shape); coefficient: a number or a 0-d tensor (no gradient flows to it).
    """
    factor = torch.as_tensor(coefficient, dtype=logits.dtype, device=logits.device).detach()
    if factor.dim() != 0:
        raise ValueError(f"the virtual gradient's coefficient is one number per gate, got shape {list(factor.shape)}")
    out: Tensor = _VirtualGradient.apply(logits, factor)
    return out


def controlled_gate_logits(gate: nn.Module, mapping: FieldMapping, x: Tensor, k: int, coefficient: Tensor) -> Tensor:
    """Gate k's logits gate(φ_k(x)), with λ_k acting on the gate and its field mapping only.

    The logits pass through ``virtual_gradient`` with λ_k, and x passes through it with 1/λ_k
    before the mapping. The gate's and s_k's gradients are then λ_k times their plain values,
    and the gradient reaching x (the embedding that the experts share) through this gate is its
    plain value, to rounding.

    gate: [B, D] -> [B, E]; x: the flat embedding [B, D]; coefficient: λ_k, a 0-d tensor (> 0).
    Output [B, E].
    """
    shielded = virtual_gradient(x, 1.0 / coefficient)
    return virtual_gradient(gate(mapping.task(shielded, k)), coefficient)


def gate_difference(mean_gates: Tensor) -> Tensor:
    """d_k: the mean over the other tasks j of the total-variation distance ½ Σ_e |ḡ_k,e − ḡ_j,e|.

    mean_gates: [T, E], row k the batch mean of task k's softmax gate (each row sums to 1; every
    gate weighs the same E experts, column for column). Output [T] in [0, 1]. Needs T ≥ 2.
    """
    n_tasks = mean_gates.shape[0]
    if n_tasks < 2:
        raise ValueError("the gate difference compares a task's gate with the others': it needs two tasks or more")
    g = mean_gates.detach()
    distance = 0.5 * (g.unsqueeze(1) - g.unsqueeze(0)).abs().sum(-1)  # [T, T], zero diagonal
    return distance.sum(1) / (n_tasks - 1)


def label_moments(labels: Tensor, mask: Tensor) -> Tensor:
    """The sums Pearson's ρ needs for every pair of tasks on their common rows, in float64:
    [6, T, T] = (n, Σx, Σy, Σx², Σy², Σxy), where for pair (k, j) the rows are those observed for
    both, x is task k's label and y task j's. Sums: add them over the processes of one global batch.

    labels: [B, T] (values under a false mask are ignored); mask: bool [B, T].
    """
    m = mask.double()
    x = torch.where(mask, labels.double(), 0.0)
    both = m.T @ m  # n: rows observed for k and j
    sum_x = x.T @ m  # Σ over common rows of x_k
    sum_x2 = (x * x).T @ m
    sum_xy = x.T @ x
    return torch.stack([both, sum_x, sum_x.T, sum_x2, sum_x2.T, sum_xy])


def pearson_from_moments(moments: Tensor) -> tuple[Tensor, Tensor]:
    """Pearson's ρ of every pair from ``label_moments``: (ρ [T, T], defined bool [T, T]); ρ is 0
    where undefined (under two common rows or a constant label on them)."""
    n, sx, sy, sxx, syy, sxy = moments.unbind(0)
    safe_n = n.clamp(min=1.0)
    cov = sxy - sx * sy / safe_n
    var_x = (sxx - sx * sx / safe_n).clamp(min=0.0)
    var_y = (syy - sy * sy / safe_n).clamp(min=0.0)
    denominator = torch.sqrt(var_x * var_y)
    scale = torch.maximum(sxx.abs(), syy.abs()).clamp(min=1.0)
    defined = (n >= 2) & (var_x > 1e-12 * scale) & (var_y > 1e-12 * scale)
    rho = torch.where(defined, cov / torch.where(defined, denominator, 1.0), 0.0)
    return rho.clamp(-1.0, 1.0), defined


class LabelCorrelation(nn.Module):
    """c_k, from the moving average of |ρ_kj| over steps (see the module docstring).

    Buffers (saved with a checkpoint, so a resumed run continues the same average):
    ``average`` float64 [T, T], the smoothed |ρ|; ``seen`` bool [T, T], whether a pair's ρ has been
    defined on some batch.
    """

    average: Tensor
    seen: Tensor

    def __init__(self, n_tasks: int, decay: float = CORR_DECAY) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the correlation's decay is in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("average", torch.zeros(n_tasks, n_tasks, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(n_tasks, n_tasks, dtype=torch.bool))

    @torch.no_grad()
    def update(self, moments: Tensor) -> Tensor:
        """Fold one global batch's ``label_moments`` [6, T, T] into the average; returns c [T]."""
        rho, defined = pearson_from_moments(moments.to(self.average.device))
        size = rho.abs()
        blended = torch.where(self.seen, self.decay * self.average + (1.0 - self.decay) * size, size)
        self.average.copy_(torch.where(defined, blended, self.average))
        self.seen |= defined
        return self.task_correlation()

    def task_correlation(self) -> Tensor:
        """c_k = mean over j ≠ k of the smoothed |ρ_kj| (a pair never seen counts 0): [T]."""
        n_tasks = self.average.shape[0]
        if n_tasks < 2:
            raise ValueError("a task's correlation with the others needs two tasks or more")
        off_diagonal = ~torch.eye(n_tasks, dtype=torch.bool, device=self.average.device)
        values = torch.where(self.seen & off_diagonal, self.average, 0.0)
        return values.sum(1) / (n_tasks - 1)


def gate_coefficients(
    difference: Tensor,
    correlation: Tensor,
    delta: float = DELTA,
    kappa: float = KAPPA,
    low: float = LAMBDA_MIN,
    high: float = LAMBDA_MAX,
) -> Tensor:
    """λ_k = clip(exp(κ · (δ · (1 − c_k) − d_k)), low, high).

    difference: d [T] (``gate_difference``); correlation: c [T] (``LabelCorrelation``). Output [T].
    """
    target = delta * (1.0 - correlation)
    return torch.exp(kappa * (target - difference)).clamp(low, high)
