"""DIN's unit in training, before and after its rework (issue 27), side by side in one process:
MMoE without histories, with attention histories through the unit as it was at commit ac94c61
(``baseline``, kept here for this comparison only), as commit 66d7b8b had it (``previous``) and
through ``mtlcli.models.blocks._PackedDin`` (``attention``), each its own model, step and data, in interleaved rounds on one thread (see
benchmarks/sequence_speed.py, whose variants and data this reuses). Also the unit alone, forward
and backward, at MovieLens' sizes. Run by hand from the repository root (minutes):

    python benchmarks/din_speed.py --lengths 50 200 --movielens /tmp/movielens
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `mtlcli` when run as a script
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sequence_speed, movielens

import sequence_speed as speed

from mtlcli.models import blocks
from mtlcli.models.blocks import AttentionPooling, packed_layout, segment_sum

_threshold_backward = torch.ops.aten.threshold_backward


class BaselineDin(torch.autograd.Function):
    """DIN's unit as commit ac94c61 had it (for comparison only; see mtlcli.models.blocks._PackedDin).

    The unit's first layer on [k, q, k - q, k * q] is linear: W·[...] = A·k + C·(k * q) + B·q with
    A = W_k + W_{k-q}, B = W_q - W_{k-q}, C = W_{k*q}. Per item: h = [k * q_r, k]·[C, A]^T + c_r
    with c = q·B^T + b1 once per row; weight s = w2·PReLU_a(h) + b2; pooled_r = sum_r s·k.
    Inputs: keys [N, d], queries [B, d], ``weights`` [36, 2d] = [C, A], ``query_part`` [36, d] = B,
    b1 [36], a [1], w2 [36], b2 [1]. Outputs pooled [B, d] and the weights applied [N]: s, or with
    ``normalise`` p = exp(s) / sum_r exp(s) (softmax over the row's items, pooled_r = sum_r p·k;
    its backward gs = p·(gp - sum_r p·gp) before the unit's). No tensor of
    four times the key width, nothing over padding; few passes over the [N, 36] hidden layer:
    the backward pass reads h once for the PReLU's gradient (PReLU's own backward kernel is
    slow on CPU) and folds the rank-one parts into the products.
    """

    @staticmethod
    def forward(
        ctx: Any,
        keys: Tensor,
        queries: Tensor,
        weights: Tensor,
        query_part: Tensor,
        b1: Tensor,
        slope: Tensor,
        w2: Tensor,
        b2: Tensor,
        rows: Tensor,
        bounds: Tensor,
        normalise: bool = False,
    ) -> tuple[Tensor, Tensor]:
        dim = keys.shape[1]
        per_row = torch.addmm(b1, queries, query_part.t())  # [B, 36]
        q = queries.index_select(0, rows)  # [N, d]
        x = torch.empty(keys.shape[0], 2 * dim, dtype=keys.dtype, device=keys.device)
        torch.mul(keys, q, out=x[:, :dim])
        x[:, dim:] = keys
        h = torch.addmm(per_row.index_select(0, rows), x, weights.t())  # [N, 36]
        # PReLU(h) = h + (a - 1)·min(h, 0), so s = w2·h + (a - 1)·u + b2 with u = w2·min(h, 0),
        # and w2·h is a product of the narrow x: one pass over h for min(h, 0), kept for backward
        negative = h.clamp(max=0.0)
        u = negative @ w2  # [N]
        linear = torch.addmv((per_row @ w2).index_select(0, rows), x, weights.t() @ w2)  # w2·h [N]
        s = (linear + b2).add_(u * (slope - 1))
        if normalise:  # shifted by each row's largest score
            top = s.new_zeros(queries.shape[0]).scatter_reduce_(0, rows, s, "amax", include_self=False)
            e = torch.exp(s - top.index_select(0, rows))
            s = e / segment_sum(e.unsqueeze(1), bounds).squeeze(1).index_select(0, rows)
        ctx.normalise = normalise
        pooled = segment_sum(keys, bounds, s)
        ctx.save_for_backward(
            keys, queries, q, x, h, negative, u, s, per_row, weights, query_part, slope, w2, rows, bounds
        )
        return pooled, s

    @staticmethod
    def backward(ctx: Any, grad: Tensor, grad_s: Tensor | None) -> tuple[Tensor | None, ...]:
        keys, queries, q, x, h, negative, u, s, per_row, weights, query_part, slope, w2, rows, bounds = (
            ctx.saved_tensors
        )
        dim = keys.shape[1]
        g = grad.index_select(0, rows)  # [N, d]
        gs = (g * keys).sum(1)  # dL/ds [N] (dL/dp when normalised)
        if grad_s is not None:
            gs = gs + grad_s
        if ctx.normalise:  # through the softmax: p·(gp - sum_r p·gp); s holds p
            spread = segment_sum((s * gs).unsqueeze(1), bounds).squeeze(1).index_select(0, rows)
            gs = s * (gs - spread)
        a = slope.view(())
        row_gs = segment_sum(gs.unsqueeze(1), bounds)  # [B, 1]
        xs = x.t() @ gs  # [2d]
        # d s / d w2 = PReLU(h) = h + (a - 1)·min(h, 0), with h^T gs = [C, A]·(x^T gs) + c^T (row sums of gs)
        grad_w2 = torch.addmv(weights @ xs + per_row.t() @ row_gs.squeeze(1), negative.t(), gs, alpha=a - 1)
        grad_slope = (u @ gs).view(1)
        # dL/dh = (gs ⊗ w2) · PReLU'(h) = (T + a·gs ⊗ 1) · w2 with T = (1 - a)·gs where h > 0
        t = _threshold_backward((gs * (1 - a)).unsqueeze(1).expand_as(h), h, 0.0)
        scaled = w2.unsqueeze(1) * weights  # [36, 2d]
        grad_weights = w2.unsqueeze(1) * torch.addmm(a * xs.unsqueeze(0), t.t(), x)
        gx = torch.addmm(torch.outer(a * gs, scaled.sum(0)), t, scaled)  # [N, 2d]
        grad_c = torch.addmm(segment_sum(t, bounds), row_gs, a * torch.ones_like(w2).unsqueeze(0)) * w2  # [B, 36]
        product = gx[:, :dim]
        grad_keys = torch.addcmul(gx[:, dim:], product, q).addcmul_(g, s.unsqueeze(1))
        grad_queries = torch.addmm(segment_sum(product * keys, bounds), grad_c, query_part)
        return (
            grad_keys,
            grad_queries,
            grad_weights,
            grad_c.t() @ queries,
            grad_c.sum(0),
            grad_slope,
            grad_w2,
            gs.sum().view(1),
            None,
            None,
            None,
        )


class PreviousDin(torch.autograd.Function):
    """DIN's unit as commit 66d7b8b had it (for comparison only; see mtlcli.models.blocks._PackedDin).

    The unit's first layer on [k, q, k - q, k * q] is linear: W·[...] = A·k + C·(k * q) + B·q with
    A = W_k + W_{k-q}, B = W_q - W_{k-q}, C = W_{k*q}. Per item: h = [k * q_r, k]·[C, A]^T + c_r
    with c = q·B^T + b1 once per row; weight s = w2·PReLU_a(h) + b2; pooled_r = sum_r s·k.
    Inputs: keys [N, d], queries [B, d], ``weights`` [36, 2d] = [C, A], ``query_part`` [36, d] = B,
    b1 [36], a [1], w2 [36], b2 [1]. Outputs pooled [B, d] and the weights applied [N]: s, or with
    ``normalise`` p = exp(s) / sum_r exp(s) (softmax over the row's items, pooled_r = sum_r p·k;
    its backward gs = p·(gp - sum_r p·gp) before the unit's).

    The [N, 36] hidden layer is the cost: it is written once (the product, then its ReLU in
    place) and its 0/1 pattern once, and otherwise only read by products. PReLU_a(h) =
    a·h + (1 - a)·R with R = ReLU(h), so s = a·(w2·h) + (1 - a)·(w2·R) + b2, where w2·h is a
    product of the narrow x. Backward, with gs = dL/ds and E = [h > 0]: dL/dh = gs ⊗ w2 ⊙
    (a + (1 - a)·E), whose rank-one part folds into products of x and whose other part is
    diag(gs)·E·diag(w2): each product with it reads E once and scales a narrow factor by gs
    (E^T·(gs·x), gs·(E·W'), the row sums of E weighted by gs), so the backward pass writes no
    [N, 36] tensor.
    """

    @staticmethod
    def forward(
        ctx: Any,
        keys: Tensor,
        queries: Tensor,
        weights: Tensor,
        query_part: Tensor,
        b1: Tensor,
        slope: Tensor,
        w2: Tensor,
        b2: Tensor,
        rows: Tensor,
        bounds: Tensor,
        normalise: bool = False,
    ) -> tuple[Tensor, Tensor]:
        a = slope.view(())
        per_row = torch.addmm(b1, queries, query_part.t())  # [B, 36]
        q = queries.index_select(0, rows)  # [N, d]
        x = torch.cat([keys * q, keys], dim=1)  # [N, 2d]
        relu = torch.mm(x, weights.t()).add_(per_row.index_select(0, rows)).relu_()  # R [N, 36]
        above = torch.sign(relu)  # E: 1 where h > 0, else 0
        linear = torch.addmv((per_row @ w2).index_select(0, rows), x, weights.t() @ w2)  # w2·h [N]
        rectified = relu @ w2  # w2·R [N]
        s = (linear * a).add_(rectified * (1 - a)).add_(b2)
        if normalise:  # shifted by each row's largest score
            top = s.new_zeros(queries.shape[0]).scatter_reduce_(0, rows, s, "amax", include_self=False)
            e = torch.exp(s - top.index_select(0, rows))
            s = e / segment_sum(e.unsqueeze(1), bounds).squeeze(1).index_select(0, rows)
        ctx.normalise = normalise
        pooled = segment_sum(keys, bounds, s)
        ctx.save_for_backward(
            keys,
            queries,
            q,
            x,
            relu,
            above,
            linear,
            rectified,
            s,
            per_row,
            weights,
            query_part,
            slope,
            w2,
            rows,
            bounds,
        )
        return pooled, s

    @staticmethod
    def backward(ctx: Any, grad: Tensor, grad_s: Tensor | None) -> tuple[Tensor | None, ...]:
        (
            keys,
            queries,
            q,
            x,
            relu,
            above,
            linear,
            rectified,
            s,
            per_row,
            weights,
            query_part,
            slope,
            w2,
            rows,
            bounds,
        ) = ctx.saved_tensors
        dim = keys.shape[1]
        a = slope.view(())
        g = grad.index_select(0, rows)  # [N, d]
        gs = (g * keys).sum(1)  # dL/ds [N] (dL/dp when normalised)
        if grad_s is not None:
            gs = gs + grad_s
        if ctx.normalise:  # through the softmax: p·(gp - sum_r p·gp); s holds p
            spread = segment_sum((s * gs).unsqueeze(1), bounds).squeeze(1).index_select(0, rows)
            gs = s * (gs - spread)
        row_gs = segment_sum(gs.unsqueeze(1), bounds).squeeze(1)  # [B]
        xs = x.t() @ gs  # x^T gs [2d]
        # dL/dW = dL/dh^T x = a·w2 ⊗ x^T gs + (1 - a)·diag(w2)·E^T·(gs·x)
        masked = above.t() @ (x * gs.unsqueeze(1))  # [36, 2d]
        grad_weights = (masked * (1 - a)).add_(xs.unsqueeze(0) * a).mul_(w2.unsqueeze(1))
        # dL/dx = dL/dh·W = gs·(E·((1 - a)·diag(w2)·W) + a·w2^T W)
        gx = torch.addmm(a * (w2 @ weights), above, (1 - a) * w2.unsqueeze(1) * weights).mul_(gs.unsqueeze(1))
        # dL/dc [B, 36]: the row sums of dL/dh
        grad_c = segment_sum(above, bounds, gs).mul_(1 - a).add_(row_gs.unsqueeze(1) * a).mul_(w2)
        # dL/dw2 = PReLU(h)^T gs = a·h^T gs + (1 - a)·R^T gs, h^T gs = W·x^T gs + c^T (row sums of gs)
        grad_w2 = (weights @ xs + per_row.t() @ row_gs).mul_(a).add_((relu.t() @ gs).mul_(1 - a))
        grad_slope = (gs @ (linear - rectified)).view(1)  # w2·min(h, 0) = w2·h - w2·R
        product = gx[:, :dim]
        grad_keys = torch.addcmul(gx[:, dim:], product, q).addcmul_(g, s.unsqueeze(1))
        grad_queries = torch.addmm(segment_sum(product * keys, bounds), grad_c, query_part)
        return (
            grad_keys,
            grad_queries,
            grad_weights,
            grad_c.t() @ queries,
            grad_c.sum(0),
            grad_slope,
            grad_w2,
            gs.sum().view(1),
            None,
            None,
            None,
        )


class Split:
    """A unit of the earlier interface ([C, A], B and b1 apart) called as the package calls its
    unit now: W = [C, A, B, b1] split back."""

    def __init__(self, unit: Any) -> None:
        self.unit = unit

    def apply(
        self,
        keys: Tensor,
        queries: Tensor,
        weights: Tensor,
        slope: Tensor,
        w2: Tensor,
        b2: Tensor,
        rows: Tensor,
        bounds: Tensor,
        normalise: bool = False,
    ) -> Any:
        dim = keys.shape[1]
        pair, query_part, b1 = weights.split([2 * dim, dim, 1], dim=1)
        return self.unit.apply(keys, queries, pair, query_part, b1.view(-1), slope, w2, b2, rows, bounds, normalise)


class WithUnit(speed.Variant):
    """A variant whose steps run DIN's unit ``unit`` in place of the package's."""

    def __init__(self, recipe: Any, unit: Any) -> None:
        super().__init__(recipe)
        self.unit = unit

    def run(self, steps: int) -> tuple[float, float, int]:
        shipped = blocks._PackedDin
        blocks._PackedDin = self.unit
        try:
            return super().run(steps)
        finally:
            blocks._PackedDin = shipped


def unit_alone(dim: int, per_row: int, rounds: int = 31) -> dict[str, float]:
    """Milliseconds (CPU, median) of one forward and backward pass of each unit on 512 rows of
    about ``per_row`` items, keys of width ``dim``."""
    torch.manual_seed(0)
    lengths = torch.randint(0, 2 * per_row + 1, (512,))
    history = packed_layout(torch.zeros(int(lengths.sum()), dtype=torch.long), lengths)
    unit = AttentionPooling(dim)
    keys = torch.randn(int(lengths.sum()), dim, requires_grad=True)
    queries = torch.randn(512, dim, requires_grad=True)
    times: dict[str, list[float]] = {"baseline": [], "previous": [], "attention": []}
    shipped = blocks._PackedDin
    for _ in range(rounds):
        for name, fn in (("baseline", Split(BaselineDin)), ("previous", Split(PreviousDin)), ("attention", shipped)):
            blocks._PackedDin = fn
            start = time.process_time()
            unit.packed(keys, history, queries).sum().backward()
            times[name].append(time.process_time() - start)
    blocks._PackedDin = shipped
    return {name: statistics.median(t[3:]) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--movielens", type=Path, help="also MovieLens-100k, built in this folder")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--skip-generated", action="store_true", help="MovieLens-100k only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"unit alone, N ≈ 10k items, d 16: {unit_alone(16, 20)} ms; d 8: {unit_alone(8, 20)} ms", flush=True)
    print("| data | history length | variant | samples/s (CPU) | ratio | samples/s (wall) | ratio |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        cases = [] if args.skip_generated else [("generated", length) for length in args.lengths]
        if args.movielens is not None:
            cases += [("MovieLens-100k", length) for length in args.lengths]
        for data, length in cases:

            def recipe(pooling: str, data: str = data, length: int = length) -> Any:
                if data == "generated":
                    return speed.generated(length, pooling, args.rows, Path(tmp) / "cache")
                return speed.movielens(args.movielens, length, pooling)

            variants = {
                "none": speed.Variant(recipe("none")),
                "baseline": WithUnit(recipe("attention"), Split(BaselineDin)),
                "previous": WithUnit(recipe("attention"), Split(PreviousDin)),
                "attention": WithUnit(recipe("attention"), blocks._PackedDin),
            }
            speeds = speed.side_by_side(variants, args.rounds)
            base_cpu, base_wall = speeds["none"]
            for name, (cpu, wall) in speeds.items():
                print(
                    f"| {data} | {length} | {name} | {cpu:,.0f} | {cpu / base_cpu:.2f} "
                    f"| {wall:,.0f} | {wall / base_wall:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
