"""Per-task gradients on the shared parameters, for the gradient-balancing strategies.

A gradient strategy combines the tasks' gradients on the parameters that every task shares; the
parameters that belong to one task keep the ordinary gradient of the plain sum of the losses (one
backward pass, restricted to them). ``backward_with_shared`` does both halves: it asks the
strategy's ``combine`` for the per-task coefficients from the task gradients [T, P], writes the
combined gradient into the shared parameters and returns the coefficients for the metrics log.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mtlcli import distributed
from mtlcli.models.base import scheme
from mtlcli.models.blocks import trainable_tensors


def split_parameters(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(shared, task-specific) trainable tensors, from the scheme's ``parameter_groups()``; an
    embedding table that trains row-wise is represented by the rows of the last forward pass."""
    named = scheme(model).parameter_groups()
    shared = list(trainable_tensors(model, named["shared"]).values())
    own = [p for name, group in named.items() if name != "shared" for p in trainable_tensors(model, group).values()]
    return shared, own


def shared_task_gradients(losses: Tensor, shared: list[Tensor]) -> Tensor:
    """The gradient of each loss [T] on the shared parameters, flattened: [T, P].

    Keeps the graph (``retain_graph``) so that a later backward pass can still use it. A parameter
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


def assign_shared_gradient(vector: Tensor, shared: list[Tensor]) -> None:
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

    def by_coefficients(grads: Tensor, task_losses: Tensor, shared: list[Tensor]) -> tuple[Tensor, Tensor]:
        coefficients = on_host(combine, grads, task_losses)
        return coefficients @ grads, coefficients

    return backward_with_shared_update(losses, model, by_coefficients)


def backward_with_shared_update(
    losses: Tensor,
    model: nn.Module,
    update: Callable[[Tensor, Tensor, list[Tensor]], tuple[Tensor, Tensor]],
) -> Tensor:
    """``backward_with_shared`` for a rule that is no single combination of the task gradients
    (GradVac per parameter tensor): ``update(grads [T, P], losses [T], shared)`` returns the shared
    parameters' gradient [P] and the task weights [T] to report."""
    shared, own = split_parameters(model)
    if not shared:
        losses.sum().backward()
        return torch.ones_like(losses.detach())
    ranks = distributed.backward_ranks()
    grads = ranks.sum(shared_task_gradients(losses, shared))  # the global [T, P] on every rank
    combined, weights = update(grads, losses.detach(), shared)
    # each rank leaves 1/world of the combined gradient: the loop's sum over the ranks makes it whole
    assign_shared_gradient(combined / ranks.world, shared)
    if own:
        torch.autograd.backward(losses.sum(), inputs=own)
    return weights.detach()


def on_host(combine: Callable[[Tensor, Tensor], Tensor], grads: Tensor, losses: Tensor) -> Tensor:
    """The strategies combine on the CPU (their small [T] and [T, T] tensors live there): on a GPU
    the gradients are copied over and the coefficients brought back."""
    if grads.device.type == "cpu":
        return combine(grads, losses)
    return combine(grads.cpu(), losses.cpu()).to(grads.device)


def gram_factor(gram: Tensor) -> Tensor:
    """R [T, T] with R Rᵀ = ``gram`` (symmetric positive semi-definite), from its eigenvectors."""
    values, vectors = torch.linalg.eigh(gram.double())
    return (vectors * values.clamp_min(0).sqrt()).to(gram.dtype)


def backward_with_representation(
    losses: Tensor, model: nn.Module, combine: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """Like ``backward_with_shared``, but the coefficients come from the task gradients on the
    model's shared representation z (``Capabilities.shared_representation``, kept by the last
    forward pass) instead of on the shared parameters. Returns c [T].

    Each task's pass stops at z and also yields its task-specific parameters' gradients (only
    task k's loss reaches task k's parameters, so their sum over the tasks is the gradient of
    Σ_k L_k); then one pass from z down, seeded with Σ_k c_k ∂L_k/∂z, trains the shared parameters.
    The heads are traversed once per task and the shared part once.
    """
    shared, own = split_parameters(model)
    kept = scheme(model).capabilities.shared_representation
    if kept is None or not kept.enabled:
        raise RuntimeError(f"{type(model).__name__} keeps no shared representation (enable_representation first)")
    representation = kept.tensors
    if not shared or not representation:
        losses.sum().backward()
        return torch.ones_like(losses.detach())
    inputs = [*representation, *own]
    n_z = len(representation)
    rows: list[Tensor] = []
    z_grads: list[list[Tensor]] = []
    own_grads: list[Tensor | None] = [None] * len(own)
    for loss in losses:
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        per_z = [g if g is not None else torch.zeros_like(z) for g, z in zip(grads[:n_z], representation, strict=True)]
        z_grads.append(per_z)
        rows.append(torch.cat([g.reshape(-1) for g in per_z]))
        for i, g in enumerate(grads[n_z:]):
            if g is not None:
                before = own_grads[i]
                own_grads[i] = g if before is None else before + g
    ranks = distributed.backward_ranks()
    local = torch.stack(rows)
    # z holds this rank's rows only: the ranks exchange the T x T Gram matrix of the task gradients,
    # and combine reads a factor R of it (R Rᵀ = Σ_ranks G Gᵀ), which is all MGDA's min-norm needs
    coefficients = on_host(combine, gram_factor(ranks.sum(local @ local.T)) if ranks.active else local, losses.detach())
    coefficients = coefficients.detach()
    seeds = [sum(c * g[i] for c, g in zip(coefficients, z_grads, strict=True)) for i in range(n_z)]
    torch.autograd.backward(representation, grad_tensors=seeds, inputs=shared)
    for p, total in zip(own, own_grads, strict=True):
        if total is not None:
            p.grad = total if p.grad is None else p.grad + total
    return coefficients
