"""Per-task gradients on the shared parameters, for the gradient-balancing strategies.

A gradient strategy combines the tasks' gradients on the parameters that every task shares; the
parameters that belong to one task keep the ordinary gradient of the plain sum of the losses (one
backward pass, restricted to them). ``backward_with_shared`` does both halves: it asks the
strategy's ``combine`` for the per-task coefficients from the task gradients [T, P], writes the
combined gradient into the shared parameters and returns the coefficients for the metrics log.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(shared, task-specific) trainable parameters, from ``model.parameter_groups()``.

    A module without ``parameter_groups`` (a plain layer in a test) counts as all shared.
    """
    groups = getattr(model, "parameter_groups", None)
    if groups is None:
        return [p for p in model.parameters() if p.requires_grad], []
    named = groups()
    shared = [p for p in named["shared"].values() if p.requires_grad]
    own = [p for name, group in named.items() if name != "shared" for p in group.values() if p.requires_grad]
    return shared, own


def shared_task_gradients(losses: Tensor, shared: Sequence[Tensor]) -> Tensor:
    """The gradient of each loss [T] on the shared parameters (or on any tensors of the graph, such
    as a scheme's shared representation), flattened: [T, P].

    Keeps the graph (``retain_graph``) so that a later backward pass can still use it. A tensor
    that a loss does not reach gets a zero gradient.
    """
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, shared, strict=True)]
            )
        )
    return torch.stack(rows)


def assign_shared_gradient(vector: Tensor, shared: list[nn.Parameter]) -> None:
    """Add the flat gradient ``vector`` [P] to the ``.grad`` of the shared parameters."""
    offset = 0
    for p in shared:
        piece = vector[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is None:
            p.grad = piece.clone()
        else:
            p.grad += piece


def backward_with_shared(losses: Tensor, model: nn.Module, combine: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """One step's gradients: shared parameters get Σ_k c_k g_k with c = ``combine(grads [T, P], losses [T])``,
    task-specific parameters the gradient of Σ_k L_k. Returns c [T] (the coefficient of each task's gradient).
    """
    shared, own = split_parameters(model)
    if not shared:
        losses.sum().backward()
        return torch.ones_like(losses.detach())
    grads = shared_task_gradients(losses, shared)
    coefficients = combine(grads, losses.detach())
    assign_shared_gradient(coefficients @ grads, shared)
    if own:
        torch.autograd.backward(losses.sum(), inputs=own)
    return coefficients.detach()


def backward_with_representation(
    losses: Tensor, model: nn.Module, combine: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """Like ``backward_with_shared``, but the coefficients come from the task gradients on the
    model's shared representation z (``SharedRepresentation``, kept by the last forward pass)
    instead of on the shared parameters: one cheap gradient per task on z, then one backward pass
    of Σ_k c_k L_k into the shared parameters. Returns c [T].
    """
    shared, own = split_parameters(model)
    representation = getattr(model, "representation", None)
    if representation is None:
        raise RuntimeError(f"{type(model).__name__} kept no shared representation (keep_representation is off)")
    if not shared or not representation:
        losses.sum().backward()
        return torch.ones_like(losses.detach())
    grads = shared_task_gradients(losses, representation)
    coefficients = combine(grads, losses.detach())
    torch.autograd.backward((coefficients.detach() * losses).sum(), inputs=shared, retain_graph=bool(own))
    if own:
        torch.autograd.backward(losses.sum(), inputs=own)
    return coefficients.detach()
