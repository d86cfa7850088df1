"""Building blocks shared by the sharing schemes: embeddings, MLPs, expert pools, towers, gates."""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from torch import Tensor, nn

from mtlcli.data.batch import Batch
from mtlcli.kernels import bag_sums_backward

if TYPE_CHECKING:
    from mtlcli.models.base import InputSpec


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


SORTED_ROWS = 1 << 16  # a table of at most this many rows gets the gradient of its bags id by id (bag_gradient)


def bag_gradient(ids: Tensor, of_id: Tensor, grads: Tensor, rows: int) -> Tensor:
    """The gradient [rows, d] of a table whose rows ``ids`` [N] were read into bags, bag
    ``of_id`` [N] of each, bags' gradient ``grads`` [K, d]: sum over i of grads[of_id[i]] into
    row ids[i].

    On CPU with at most ``SORTED_ROWS`` rows the ids are put in order (NumPy's stable sort of
    16-bit keys, a radix sort) and each row's gradient is one bag of the bags' gradients
    (``embedding_bag``): half the time of ``index_add_``, whose cost per id is that of a scatter
    of d single floats; the order of the additions within a row is the ids' order either way.
    """
    if ids.device.type != "cpu" or rows > SORTED_ROWS:
        return grads.new_zeros(rows, grads.shape[1]).index_add_(0, ids, grads.index_select(0, of_id))
    keys = ids.numpy()
    order = torch.from_numpy(np.argsort(keys.astype(np.uint16), kind="stable"))
    bounds = torch.zeros(rows + 1, dtype=torch.long)
    torch.cumsum(torch.from_numpy(np.bincount(keys, minlength=rows)), 0, out=bounds[1:])
    return nn.functional.embedding_bag(
        of_id.index_select(0, order), grads, bounds, mode="sum", include_last_offset=True
    )


class _LookupBags(torch.autograd.Function):
    """``_Lookup`` of ``ids`` and, in the same pass, the row sums of bags of ids: bag k holds
    ``bag_ids[bounds[k]:bounds[k + 1]]`` -> (rows [*ids.shape, d], sums [K, d]).

    The sums are one ``embedding_bag`` (the rows are never gathered into an [N, d] tensor); the
    backward pass is the bags' gradient into the table (``kernels.bag_sums_backward``, one pass
    over the items, or without the compiled kernel ``bag_gradient``: the same sums in the same
    order) and the looked-up rows' added to it by ``index_add_``, as ``_Lookup``'s.
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, ids: Tensor, bag_ids: Tensor, bounds: Tensor) -> tuple[Tensor, Tensor]:
        flat = ids.reshape(-1)
        ctx.save_for_backward(flat, bag_ids, bounds)
        ctx.rows = weight.shape[0]
        looked = weight.index_select(0, flat).view(*ids.shape, weight.shape[1])
        sums = nn.functional.embedding_bag(bag_ids, weight, bounds, mode="sum", include_last_offset=True)
        return looked, sums

    @staticmethod
    def backward(ctx: Any, grad: Tensor, bag_grad: Tensor) -> tuple[Tensor, None, None, None]:
        flat, bag_ids, bounds = ctx.saved_tensors
        weight_grad = bag_sums_backward(bag_ids, bounds, bag_grad, ctx.rows)
        if weight_grad is None:  # no compiled kernel here
            bags = torch.arange(bounds.shape[0] - 1, device=bounds.device)
            of_item = bags.repeat_interleave(bounds.diff(), output_size=bag_ids.shape[0])
            weight_grad = bag_gradient(bag_ids, of_item, bag_grad.contiguous(), ctx.rows)
        return weight_grad.index_add_(0, flat, grad.reshape(-1, grad.shape[-1])), None, None, None


@dataclass(frozen=True)
class SequenceInput:
    """A behaviour history as the embedding sees it: its ids index the rows of categorical feature
    ``shares`` (its index) or, when None, ``cardinality`` rows of its own; ``pooling`` is
    ``mean``, ``sum`` or ``attention`` against categorical feature ``target`` (its index), whose
    ``weights`` are DIN's unit's scores as they are (``din``) or normalised by a softmax over the
    row's items (``softmax``)."""

    cardinality: int
    pooling: str
    shares: int | None = None
    target: int | None = None
    weights: str = "din"


# a history is pooled from counts per id [B, V] when B·V is at most this many times the items present
# (about where both ways cost the same on one CPU thread: a dense product per count, a gather and a
# scatter per item)
COUNTS_PER_ITEM = 8
ATTENTION_UNITS = 36  # the hidden width of DIN's activation unit (Zhou et al., KDD 2018, Figure 2)


@dataclass(frozen=True)
class Packed:
    """One behaviour history of a batch without its padding: the ids present, row by row.

    ids [N] (embedding rows), rows [N] (each id's batch row, ascending), bounds [B + 1] (row b's
    ids are ids[bounds[b]:bounds[b + 1]]), lengths [B], and where each id sits in the padded
    [B, L] layout (positions [N], for reports).
    """

    ids: Tensor
    rows: Tensor
    bounds: Tensor
    lengths: Tensor
    positions: Tensor
    padded_len: int


def exporting() -> bool:
    """Whether the model is being traced for export (ONNX): the padded layout traces to plain
    operators, the packed one to sparse products that ONNX lacks."""
    return bool(torch.onnx.is_in_onnx_export() or torch.jit.is_tracing())


def pack_history(ids: Tensor, lengths: Tensor) -> Packed:
    """A history of padded ids [B, L] with lengths [B] as its present ids only, so that what
    follows costs by the items present rather than by L."""
    batch_size, longest = ids.shape
    present = torch.arange(longest, device=ids.device) < lengths.unsqueeze(1)  # [B, L]
    positions = present.view(-1).nonzero().squeeze(1)
    bounds = torch.zeros(batch_size + 1, dtype=torch.long, device=ids.device)
    torch.cumsum(lengths, 0, out=bounds[1:])
    rows = torch.arange(batch_size, device=ids.device).repeat_interleave(lengths, output_size=positions.shape[0])
    return Packed(ids.reshape(-1).index_select(0, positions), rows, bounds, lengths, positions, longest)


def packed_layout(ids: Tensor, lengths: Tensor, longest: int | None = None) -> Packed:
    """Ids [N] already packed (a history of ``Batch.history_ids``) with lengths [B] as ``Packed``:
    the padded layout's width is ``longest`` or the longest history (at least 1)."""
    width = longest if longest is not None else max(1, int(lengths.max())) if lengths.numel() else 1
    bounds = torch.zeros(lengths.shape[0] + 1, dtype=torch.long, device=ids.device)
    torch.cumsum(lengths, 0, out=bounds[1:])
    rows = torch.arange(lengths.shape[0], device=ids.device).repeat_interleave(lengths, output_size=ids.shape[0])
    positions = rows * width + torch.arange(ids.shape[0], device=ids.device) - bounds.index_select(0, rows)
    return Packed(ids, rows, bounds, lengths, positions, width)


def packed_counts(ids: list[Tensor], lengths: Tensor, vocabularies: list[int]) -> list[Tensor]:
    """How often each id [0, V_k) occurs in each row of histories k: their packed ids [N_k] with
    lengths [B, K] -> float32 [B, V_k] each, all counted by one scatter of ones into one
    zero-filled tensor (cell base_k + b·V_k + id)."""
    batch_size = lengths.shape[0]
    cells_of = [batch_size * v for v in vocabularies]
    first = torch.tensor(list(itertools.accumulate(cells_of, initial=0))[:-1], device=lengths.device)
    widths = torch.tensor(vocabularies, device=lengths.device)
    bases = (torch.arange(batch_size, device=lengths.device) * widths.unsqueeze(1) + first.unsqueeze(1)).view(-1)
    cells = bases.repeat_interleave(lengths.t().reshape(-1), output_size=sum(i.shape[0] for i in ids))
    for piece, local in zip(cells.split([i.shape[0] for i in ids]), ids, strict=True):
        piece.add_(local)
    counts = torch.zeros(sum(cells_of), device=lengths.device)
    counts.scatter_add_(0, cells, counts.new_ones(1).expand(cells.shape[0]))
    return [part.view(batch_size, v) for part, v in zip(counts.split(cells_of), vocabularies, strict=True)]


def softmax_present(scores: Tensor, counts: Tensor) -> Tensor:
    """The weight of each item of a row when DIN's scores are softmax-normalised over the items
    present: scores [..., V] and how often each occurs [..., V] (a 0/1 mask for a padded
    history) -> exp(s_v) / sum_u counts_u·exp(s_u) where counts_v > 0, 0 elsewhere (a row with no
    items: all 0). Shifted by the row's largest present score, so the present sum is >= 1 and
    its clamp only meets empty rows; plain operators (exports to ONNX)."""
    present = counts > 0
    shifted = scores.masked_fill(~present, torch.finfo(scores.dtype).min)
    top = shifted.amax(-1, keepdim=True).detach()  # a softmax does not depend on the shift
    e = torch.exp(shifted - top) * present.to(scores.dtype)
    return e / (e * counts).sum(-1, keepdim=True).clamp_min(1.0)


def segment_sum(values: Tensor, bounds: Tensor, weights: Tensor | None = None) -> Tensor:
    """Row sums of packed ``values`` [N, k] (times ``weights`` [N]) -> [B, k], as one sparse-dense
    product (rows of ones, or of the weights, over each row's slice)."""
    n = values.shape[0]
    columns = torch.arange(n, device=values.device)
    weights = weights if weights is not None else values.new_ones(n)
    with warnings.catch_warnings():  # CSR is marked beta; the product is what we need
        warnings.simplefilter("ignore")
        matrix = torch.sparse_csr_tensor(
            bounds, columns, weights, size=(bounds.shape[0] - 1, n), check_invariants=False
        )
        return matrix @ values


class _PackedDin(torch.autograd.Function):
    """DIN's activation unit and weighted sum over packed keys, forward and backward by hand.

    The unit's first layer on [k, q, k - q, k * q] is linear in x = [k * q_r, k, q_r, 1]:
    h = W·x with W = [C, A, B, b1] (A = W_k + W_{k-q}, B = W_q - W_{k-q}, C = W_{k*q}), so one
    product [N, 3d + 1]·[3d + 1, 36] gives the hidden layer, the row's part included (no [N, 36]
    gather or sum). Weight s = w2·PReLU_a(h) + b2; pooled_r = sum_r s·k. Inputs: keys [N, d],
    queries [B, d], ``weights`` [36, 3d + 1] = W, a [1], w2 [36], b2 [1]. Outputs pooled [B, d]
    and the weights applied [N]: s, or with ``normalise`` p = exp(s) / sum_r exp(s) (softmax over
    the row's items, pooled_r = sum_r p·k; its backward gs = p·(gp - sum_r p·gp) before the unit's).

    The [N, 36] hidden layer is the cost: it is written once (the product, then its ReLU R in
    place), read by two vector products (w2·h, w2·R: PReLU_a(h) = R + a·min(h, 0) with
    w2·min(h, 0) = w2·h - w2·R, kept [N] for dL/da) and kept as its 0/1 pattern E in R's place.
    The backward pass writes F = gs·PReLU'(h) = gs·(a + (1 - a)·E) (gs = dL/ds) in one pass and
    reads it in two narrow products and its row sums G [B, 36]: dL/dh = F·diag(w2), so
    dL/dW = diag(w2)·F^T x, whose row columns [q, 1] are G^T·[q, 1] (the items' [k * q, k] by
    product), and dL/d[k * q, k] = F·diag(w2)·[C, A] per item, dL/dq's part through B
    G·diag(w2)·B per row; dL/dw2 = PReLU(h)^T gs = (h ⊙ PReLU'(h))^T gs is the row-wise dot of W
    with F^T x (h = W·x), so nothing else reads the layer.
    """

    @staticmethod
    def forward(
        ctx: Any,
        keys: Tensor,
        queries: Tensor,
        weights: Tensor,
        slope: Tensor,
        w2: Tensor,
        b2: Tensor,
        rows: Tensor,
        bounds: Tensor,
        normalise: bool = False,
    ) -> tuple[Tensor, Tensor]:
        dim = keys.shape[1]
        a = slope.view(())
        per_row = torch.cat([queries, queries.new_ones(queries.shape[0], 1)], 1).index_select(0, rows)
        x = torch.cat([keys, keys, per_row], 1)  # one write, then k * q in place
        x[:, :dim].mul_(x[:, 2 * dim : 3 * dim])
        relu = torch.mm(x, weights.t())  # h [N, 36]
        linear = relu @ w2  # w2·h [N]
        rectified = relu.relu_() @ w2  # w2·R [N]
        above = relu.sign_()  # E = [h > 0], in R's place (the backward pass needs no more of h)
        below = linear.sub_(rectified)  # w2·min(h, 0), PReLU's slope's factor
        s = (below * a).add_(rectified).add_(b2)  # w2·PReLU(h) + b2
        if normalise:  # shifted by each row's largest score
            top = s.new_zeros(queries.shape[0]).scatter_reduce_(0, rows, s, "amax", include_self=False)
            e = torch.exp(s - top.index_select(0, rows))
            s = e / segment_sum(e.unsqueeze(1), bounds).squeeze(1).index_select(0, rows)
        ctx.normalise = normalise
        pooled = segment_sum(keys, bounds, s)
        ctx.save_for_backward(keys, queries, x, above, below, s, weights, slope, w2, rows, bounds)
        return pooled, s

    @staticmethod
    def backward(ctx: Any, grad: Tensor, grad_s: Tensor | None) -> tuple[Tensor | None, ...]:
        keys, queries, x, above, below, s, weights, slope, w2, rows, bounds = ctx.saved_tensors
        dim = keys.shape[1]
        a = slope.view(())
        g = grad.index_select(0, rows)  # [N, d]
        gs = (g * keys).sum(1)  # dL/ds [N] (dL/dp when normalised)
        if grad_s is not None:
            gs = gs + grad_s
        if ctx.normalise:  # through the softmax: p·(gp - sum_r p·gp); s holds p
            spread = segment_sum((s * gs).unsqueeze(1), bounds).squeeze(1).index_select(0, rows)
            gs = s * (gs - spread)
        # F = gs·PReLU'(h) = gs·(a + (1 - a)·E) [N, 36], one pass; dL/dh = F·diag(w2)
        f = torch.addcmul((gs * a).unsqueeze(1), above, (gs * (1 - a)).unsqueeze(1))
        # F^T x: the items' columns [k * q, k] by one product, the row's [q, 1] from F's row sums G
        per_row = segment_sum(f, bounds)  # G [B, 36]
        table = torch.cat([queries, queries.new_ones(queries.shape[0], 1)], 1)
        masked = torch.cat([f.t() @ x[:, : 2 * dim], per_row.t() @ table], 1)  # [36, 3d + 1]
        grad_weights = masked * w2.unsqueeze(1)
        grad_w2 = (weights * masked).sum(1)  # PReLU(h)^T gs = (h·PReLU'(h))^T gs, h = W·x
        grad_slope = (gs @ below).view(1)
        scaled = w2.unsqueeze(1) * weights[:, : 3 * dim]
        gx = f @ scaled[:, : 2 * dim]  # dL/d[k * q, k] [N, 2d]
        product = gx[:, :dim]
        grad_keys = torch.addcmul(gx[:, dim:], product, x[:, 2 * dim : 3 * dim]).addcmul_(g, s.unsqueeze(1))
        grad_queries = torch.addmm(segment_sum(product * keys, bounds), per_row, scaled[:, 2 * dim :])
        return (grad_keys, grad_queries, grad_weights, grad_slope, grad_w2, gs.sum().view(1), None, None, None)


def packed_report(weights: Tensor, history: Packed, batch_size: int) -> Tensor:
    """DIN's weights of a packed history's items [N] where they sit in the padded layout [B, L]."""
    report = weights.new_zeros(batch_size * history.padded_len)
    return report.index_copy_(0, history.positions, weights).view(batch_size, history.padded_len)  # B may be 0


def counted_report(weights: Tensor, ids: Tensor, lengths: Tensor, width: int | None) -> Tensor:
    """DIN's weights per (row, id) [B, V] of a counted history whose packed ids are ``ids`` [N]
    (lengths [B]) as each item's weight in the padded layout [B, L] (a gather per padded place;
    L is ``width`` or the longest history)."""
    width = width or max([1, *lengths.tolist()])
    real = torch.arange(width, device=lengths.device) < lengths.unsqueeze(1)
    padded = torch.zeros_like(real, dtype=torch.long).masked_scatter_(real, ids.long())
    return weights.gather(1, padded) * real


class AttentionPooling(nn.Module):
    """DIN's activation unit: the weight of history item k for candidate q is
    MLP([k, q, k - q, k * q]) (PReLU), and the pooled history is sum_k weight_k * k over the real
    items, without a softmax (Zhou et al., KDD 2018: keeping the intensity of the user's interest).
    With ``normalise`` the scores are softmax-normalised over the row's real items instead
    (``softmax_present``: the weights sum to 1, an empty history pools to 0), so that the pooled
    vector does not grow with the history's length. Same parameters either way.
    Input keys [..., L, d], mask [..., L], query [..., d]; output [..., d]. ``packed`` is the same
    on a history without its padding (what training runs)."""

    def __init__(self, dim: int, normalise: bool = False) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(4 * dim, ATTENTION_UNITS), nn.PReLU(), nn.Linear(ATTENTION_UNITS, 1))
        self.normalise = normalise
        self._report: Tensor | Callable[[], Tensor] | None = None  # last_weights, or how to build them

    @property
    def last_weights(self) -> Tensor | None:
        """The weights [B, L] of the last forward pass (0 on padding), for reports: training's
        passes keep what builds them and build them only when read."""
        if callable(self._report):
            self._report = self._report()
        return self._report

    def report_later(self, build: Callable[[], Tensor]) -> None:
        """Keep how to build ``last_weights`` (training's passes: built only when read)."""
        self._report = build

    def forward(self, keys: Tensor, mask: Tensor, query: Tensor) -> Tensor:
        q = query.unsqueeze(-2).expand_as(keys)
        weights = self.score(torch.cat([keys, q, keys - q, keys * q], dim=-1)).squeeze(-1)
        weights = softmax_present(weights, mask) if self.normalise else weights * mask
        self._report = weights.detach()
        return (weights.unsqueeze(-1) * keys).sum(-2)

    def pair_weights(self, keys: Tensor, queries: Tensor) -> Tensor:
        """The weight of every (candidate, item) pair of two small vocabularies: candidates'
        embeddings [Vq, d], items' [V, d] -> [Vq, V]."""
        k = keys.unsqueeze(0).expand(queries.shape[0], -1, -1)
        q = queries.unsqueeze(1).expand_as(k)
        return cast(Tensor, self.score(torch.cat([k, q, k - q, k * q], dim=-1)).squeeze(-1))

    def packed(self, keys: Tensor, history: Packed, query: Tensor) -> Tensor:
        """Keys [N, d] of a packed history, the candidates [B, d] -> pooled [B, d]."""
        first, act, second = cast(tuple[nn.Linear, nn.PReLU, nn.Linear], tuple(self.score))
        w_k, w_q, w_diff, w_prod = first.weight.split(keys.shape[1], dim=1)
        pooled, weights = _PackedDin.apply(
            keys,
            query,
            torch.cat([w_prod, w_k + w_diff, w_q - w_diff, first.bias.unsqueeze(1)], dim=1),
            act.weight,
            second.weight.view(-1),
            second.bias,
            history.rows,
            history.bounds,
            self.normalise,
        )
        self.report_later(functools.partial(packed_report, weights.detach(), history, query.shape[0]))
        return cast(Tensor, pooled)


@dataclass(frozen=True)
class FieldLayout:
    """How FeatureEmbedding lays out its output: F_cat embeddings of ``dim``, then F_num values."""

    n_categorical: int
    dim: int
    n_numeric: int


class FeatureEmbedding(nn.Module):
    """All categorical features in one embedding table (per-feature offsets), plus numerics.

    Input: a Batch. Output: float32 [B, F_cat * dim + S * dim + F_num]: the features' embeddings,
    then each behaviour history pooled into one vector (``sequences``: a history's ids use the rows
    of the feature it shares, or rows of its own after the features'), then the numbers. For the
    field layout (FM experts) a pooled history is one more field.

    With ``use_sparse_rows()`` the table trains row-wise, so that a step costs O(rows in the
    batch · dim) whatever the vocabulary: the table is no longer trained by the optimizer; each
    forward pass with gradients gathers the batch's distinct rows into ``rows`` (a leaf [U, dim]
    that collects their gradient; ``row_ids`` [U] says which they are), and ``update_rows(lr)``
    applies lazy Adam to exactly those rows (moments per row, as ``torch.optim.SparseAdam``; rows
    a batch does not touch do not move).
    """

    offsets: Tensor
    seq_offsets: Tensor
    row_mv: Tensor  # [rows, 2, dim]: each row's Adam moments m and v
    row_steps: Tensor

    def __init__(
        self, cardinalities: list[int], n_numeric: int, dim: int, sequences: Sequence[SequenceInput] = ()
    ) -> None:
        super().__init__()
        own = [s.cardinality for s in sequences if s.shares is None]
        self.table = nn.Embedding(max(sum(cardinalities) + sum(own), 1), dim)
        nn.init.normal_(self.table.weight, std=0.05)
        if not cardinalities and not sequences:  # a one-row placeholder that no batch reads: not
            self.table.weight.requires_grad_(False)  # trained (DDP wants every trainable parameter used)
        starts = [0]
        for size in cardinalities:
            starts.append(starts[-1] + size)
        self.register_buffer("offsets", torch.tensor(starts[:-1], dtype=torch.long), persistent=False)
        seq_starts, next_own = [], starts[-1]
        for seq in sequences:
            if seq.shares is not None:
                seq_starts.append(starts[seq.shares])
            else:
                seq_starts.append(next_own)
                next_own += seq.cardinality
        self.register_buffer("seq_offsets", torch.tensor(seq_starts, dtype=torch.long), persistent=False)
        # each history's vocabulary as rows [start, start + size) of the table, and its target's
        self.vocabularies = [
            (start, cardinalities[seq.shares] if seq.shares is not None else seq.cardinality)
            for start, seq in zip(seq_starts, sequences, strict=True)
        ]
        self.targets = [
            (starts[seq.target], cardinalities[seq.target]) if seq.target is not None else (0, 0) for seq in sequences
        ]
        self.sequences = list(sequences)
        self.attention = nn.ModuleDict(
            {
                str(i): AttentionPooling(dim, normalise=seq.weights == "softmax")
                for i, seq in enumerate(sequences)
                if seq.pooling == "attention"
            }
        )
        self.n_categorical = len(cardinalities)
        self.dim = dim
        fields = len(cardinalities) + len(self.sequences)
        self.out_dim = fields * dim + n_numeric
        self.fields = FieldLayout(fields, dim, n_numeric)
        self.sparse = False
        self.rows: Tensor | None = None
        self.row_ids: Tensor | None = None
        self.union: Callable[[Tensor], Tensor] | None = None  # see share_rows
        self.betas, self.eps = (0.9, 0.999), 1e-8

    @classmethod
    def for_inputs(cls, inputs: InputSpec, dim: int) -> FeatureEmbedding:
        """The embedding of a scheme's inputs: every categorical feature, history and number."""
        return cls(inputs.cardinalities, inputs.n_numeric, dim, inputs.sequences)

    def use_sparse_rows(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        """Train the table row-wise with lazy Adam (see the class docstring)."""
        self.sparse, self.betas, self.eps = True, betas, eps
        self.table.weight.requires_grad_(False)
        weight = self.table.weight
        # each row's first and second moments side by side: one gather and one scatter per step
        # for both, where two tables took two of each (rows of a large table miss the cache)
        self.register_buffer("row_mv", weight.new_zeros((weight.shape[0], 2, weight.shape[1])), persistent=False)
        self.register_buffer("row_steps", torch.zeros((), dtype=torch.long), persistent=False)

    def share_rows(self, union: Callable[[Tensor], Tensor] | None) -> None:
        """On several processes (set by the training's exchange): ``union`` maps this rank's
        sorted distinct ids [U] to those of every rank, so that every rank steps the same rows."""
        self.union = union

    def forward(self, batch: Batch) -> Tensor:
        if self.n_categorical == 0 and not self.sequences:
            return batch.numeric
        if self.sequences and not exporting():
            return torch.cat([*self._packed(batch), batch.numeric], dim=1)
        batch = batch.padded()
        fields, keys, mask = self.lookup(batch)
        parts = [fields.flatten(1)]
        if keys is not None and mask is not None:
            parts += [self._pool(i, keys[:, i], mask[:, i], fields) for i in range(len(self.sequences))]
        return torch.cat([*parts, batch.numeric], dim=1)

    def _table_ids(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The rows to read and, per batch row, the indices into them [B, F_cat (+ S·L)]: the
        table and the ids, or in a row-wise training step the batch's distinct rows (a leaf that
        collects their gradient, see the class docstring) and each id's place among them."""
        ids = (batch.categorical + self.offsets).flatten(1)
        if self.sequences:
            if batch.sequences is None or batch.sequence_lengths is None:
                raise ValueError("this model reads behaviour histories and the batch has none")
            history = batch.sequences + self.seq_offsets.view(1, -1, 1)
            ids = torch.cat([ids, history.flatten(1)], dim=1)
        if not (self.sparse and torch.is_grad_enabled()):
            return self.table.weight, ids
        if self.union is not None:  # every rank holds the rows of every rank's batch: the same rows everywhere
            unique = self.union(torch.unique(ids))
            inverse = torch.searchsorted(unique, ids.reshape(-1))
        else:
            unique, inverse = torch.unique(ids, return_inverse=True)
        rows = self.table.weight.index_select(0, unique).requires_grad_()
        self.rows, self.row_ids = rows, unique
        return rows, inverse.view(ids.shape)

    def lookup(self, batch: Batch) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The embeddings before pooling: the features' [B, F_cat, d], and with histories their
        ids' [B, S, L, d] and the mask of real ids [B, S, L] (float, 1 = real)."""
        batch = batch.padded()
        weight, ids = self._table_ids(batch)
        looked = _Lookup.apply(weight, ids)
        fields = looked[:, : self.n_categorical]
        if not self.sequences:
            return fields, None, None
        assert batch.sequences is not None and batch.sequence_lengths is not None
        batch_size, longest = looked.shape[0], batch.sequences.shape[2]
        keys = looked[:, self.n_categorical :].view(batch_size, len(self.sequences), longest, self.dim)
        positions = torch.arange(longest, device=keys.device)
        mask = (positions.view(1, 1, -1) < batch.sequence_lengths.unsqueeze(-1)).to(keys.dtype)
        return fields, keys, mask

    def _packed(self, batch: Batch) -> list[Tensor]:
        """The features' embeddings [B, F_cat·d] and each history pooled [B, d], the histories
        read without their padding (``Batch.history_ids``, or packed here from a padded batch),
        in one gather (whose gradient is one scatter into the table) of the features' rows and
        for each history either

        - its present items: averaged or summed as bags (``_LookupBags``: one ``embedding_bag``
          for all such histories), or read item by item for DIN's unit
          (``AttentionPooling.packed``), or
        - where the vocabulary is small against the items present, the vocabulary's rows: the
          history becomes counts per id [B, V] (``packed_counts``, all such histories at once),
          pooled as counts @ rows,
          and DIN's weights are computed once per (candidate, item) pair of the vocabularies.

        A row-wise table (``use_sparse_rows``) reads the batch's distinct rows instead of the
        table, and every history item by item or as bags.
        """
        lengths = batch.sequence_lengths
        assert lengths is not None
        batch_size, n_fields = batch.categorical.shape[0], self.n_categorical
        present = lengths.sum(0).tolist()
        if batch.history_ids is not None:
            local = list(batch.history_ids.split(present))
            widths: list[int | None] = [None] * len(present)
        else:
            assert batch.sequences is not None
            local = [pack_history(batch.sequences[:, i], lengths[:, i]).ids for i in range(len(present))]
            widths = [batch.sequences.shape[2]] * len(present)
        row_wise = self.sparse and torch.is_grad_enabled()
        counted = [self._by_counts(i, batch_size, present[i], not row_wise) for i in range(len(present))]
        feature_ids = (batch.categorical + self.offsets).view(-1)
        # the histories read item by item (DIN) or as bags, bags first, their ids shifted to their
        # vocabularies' rows in one tensor: one pass over the items, no concatenation
        bags = [i for i, seq in enumerate(self.sequences) if not counted[i] and seq.pooling != "attention"]
        items = [i for i, seq in enumerate(self.sequences) if not counted[i] and seq.pooling == "attention"]
        in_table = torch.empty(sum(present[i] for i in bags + items), dtype=torch.long, device=feature_ids.device)
        for i, piece in zip(bags + items, in_table.split([present[i] for i in bags + items]), strict=True):
            torch.add(local[i], self.vocabularies[i][0], out=piece)
        weight = self.table.weight
        if row_wise:  # the batch's distinct rows (a leaf that collects their gradient) and indices into them
            every = torch.cat([feature_ids, in_table])
            if self.union is not None:
                unique = self.union(torch.unique(every))
                inverse = torch.searchsorted(unique, every)
            else:
                unique, inverse = torch.unique(every, return_inverse=True)
            weight = self.table.weight.index_select(0, unique).requires_grad_()
            self.rows, self.row_ids = weight, unique
            feature_ids, in_table = inverse.split([feature_ids.shape[0], in_table.shape[0]])
        table_ids = dict(zip(bags + items, in_table.split([present[i] for i in bags + items]), strict=True))
        reads = [feature_ids]
        plans: list[Packed | Tensor | None] = []  # per history its packed items, its counts or None (a bag)
        by_counts = [i for i in range(len(present)) if counted[i]]
        sizes = [self.vocabularies[i][1] for i in by_counts]
        counted_rows = iter(
            packed_counts([local[i] for i in by_counts], lengths[:, by_counts], sizes) if by_counts else []
        )
        for i, seq in enumerate(self.sequences):
            start, size = self.vocabularies[i]
            if counted[i]:
                plans.append(next(counted_rows))
                reads.append(torch.arange(start, start + size, device=feature_ids.device))
                if seq.pooling == "attention":
                    target, target_size = self.targets[i]
                    reads.append(torch.arange(target, target + target_size, device=feature_ids.device))
            elif seq.pooling == "attention":
                plans.append(packed_layout(table_ids[i], lengths[:, i], widths[i]))
                reads.append(table_ids[i])
            else:
                plans.append(None)
        ids = torch.cat(reads)
        bagged: dict[int, Tensor] = {}
        if bags:
            counts = lengths[:, bags].t()  # [bags, B]
            bounds = torch.zeros(counts.numel() + 1, dtype=torch.long, device=ids.device)
            torch.cumsum(counts.reshape(-1), 0, out=bounds[1:])
            bag_ids = in_table[: sum(present[i] for i in bags)]
            looked, sums = _LookupBags.apply(weight, ids, bag_ids, bounds)
            sums = sums.view(len(bags), batch_size, self.dim)
            summed = [k for k, i in enumerate(bags) if self.sequences[i].pooling == "sum"]
            if len(summed) < len(bags):  # the means: one division for all
                divisor = counts.clamp_min(1)
                if summed:
                    divisor[summed] = 1
                sums = sums / divisor.unsqueeze(-1)
            bagged = dict(zip(bags, sums.unbind(0), strict=True))
        else:
            looked = _Lookup.apply(weight, ids)
        # one split (its gradient is one concatenation; slices would each build a zero gradient of the whole)
        fields, *rest = looked.split([r.shape[0] for r in reads])
        fields = fields.view(batch_size, n_fields, self.dim)
        parts, pieces = [fields.flatten(1)], iter(rest)
        for i, (seq, plan) in enumerate(zip(self.sequences, plans, strict=True)):
            unit = cast(AttentionPooling, self.attention[str(i)]) if seq.pooling == "attention" else None
            if plan is None:
                parts.append(bagged[i])
                continue
            if isinstance(plan, Packed):
                assert unit is not None and seq.target is not None
                parts.append(unit.packed(next(pieces), plan, fields[:, seq.target]))
                continue
            elif unit is not None:
                assert seq.target is not None
                rows = next(pieces)
                weights = unit.pair_weights(rows, next(pieces)).index_select(0, batch.categorical[:, seq.target])
                if unit.normalise:  # per occurrence of each id, over the row's items
                    weights = softmax_present(weights, plan)
                unit.report_later(
                    functools.partial(counted_report, weights.detach(), local[i], lengths[:, i], widths[i])
                )
                parts.append((plan * weights) @ rows)
                continue
            else:
                total = plan @ next(pieces)
            parts.append(total if seq.pooling == "sum" else total / lengths[:, i].clamp_min(1).unsqueeze(1))
        return parts

    def _by_counts(self, i: int, batch_size: int, present: int, whole_table: bool) -> bool:
        """Whether history ``i`` is cheaper as counts per id than item by item: its vocabulary
        (for DIN, also every pair with its target's) is small against the ``present`` items.
        Not while a row-wise table reads the batch's rows only (``whole_table`` False)."""
        _, size = self.vocabularies[i]
        if not whole_table or batch_size * size > COUNTS_PER_ITEM * present:
            return False
        return self.sequences[i].pooling != "attention" or self.targets[i][1] * size <= present

    def _pool(self, i: int, keys: Tensor, mask: Tensor, fields: Tensor) -> Tensor:
        """History ``i``'s embeddings [B, L, d] with their mask [B, L] -> one vector [B, d]."""
        seq = self.sequences[i]
        if seq.pooling == "attention":
            assert seq.target is not None
            return cast(AttentionPooling, self.attention[str(i)])(keys, mask, fields[:, seq.target])
        total = (keys * mask.unsqueeze(-1)).sum(1)
        return total if seq.pooling == "sum" else total / mask.sum(1, keepdim=True).clamp_min(1.0)

    @torch.no_grad()
    def update_rows(self, lr: float) -> None:
        """One lazy-Adam step on the rows of the last forward pass (nothing if they got no gradient)."""
        rows, ids = self.rows, self.row_ids
        self.rows = self.row_ids = None
        if rows is None or ids is None or rows.grad is None:
            return
        grad = rows.grad
        beta1, beta2 = self.betas
        self.row_steps += 1
        step = int(self.row_steps)
        moments = self.row_mv.index_select(0, ids)
        m, v = moments[:, 0], moments[:, 1]
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        self.row_mv.index_copy_(0, ids, moments)
        step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        # the rows as the forward pass read them are the table's rows now (nothing else writes a
        # row-wise table within a step): write the updated rows back, rather than gather them again
        self.table.weight.index_copy_(0, ids, rows.detach().addcdiv(m, v.sqrt().add_(self.eps), value=-step_size))

    def row_state(self) -> dict[str, Tensor]:
        """The row optimizer's state, for checkpoints (empty unless sparse)."""
        if not self.sparse:
            return {}
        return {"m": self.row_mv[:, 0].contiguous(), "v": self.row_mv[:, 1].contiguous(), "steps": self.row_steps}

    def load_row_state(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.row_mv[:, 0].copy_(state["m"])
            self.row_mv[:, 1].copy_(state["v"])
            self.row_steps.copy_(state["steps"])


def sparse_embeddings(model: nn.Module) -> list[tuple[str, FeatureEmbedding]]:
    """The embeddings of ``model`` that train row-wise, with their module names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, FeatureEmbedding) and m.sparse]


def use_sparse_rows(model: nn.Module, min_rows: int = 0) -> list[str]:
    """Make every embedding table of ``model`` with at least ``min_rows`` rows train row-wise;
    returns the names of the tables switched."""
    switched = []
    for name, module in model.named_modules():
        if isinstance(module, FeatureEmbedding) and module.table.weight.shape[0] >= min_rows:
            module.use_sparse_rows()
            switched.append(name)
    return switched


def trainable_tensors(model: nn.Module, named: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """``named`` parameters as the step sees them: a table that trains row-wise stands for the
    rows of the last forward pass (what its gradient reaches); frozen parameters are left out."""
    rows = {id(m.table.weight): m.rows for _, m in sparse_embeddings(model) if m.rows is not None}
    out: dict[str, Tensor] = {}
    for name, param in named.items():
        if id(param) in rows:
            out[name] = cast(Tensor, rows[id(param)])
        elif param.requires_grad:
            out[name] = param
    return out


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


def last_linear(net: nn.Module) -> nn.Linear:
    """The last Linear layer of ``net`` (an ``mlp``, a ModuleList of layers)."""
    layers = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError(f"{type(net).__name__} has no Linear layer")
    return layers[-1]


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

    def last_layer(self) -> Tensor:
        """The weights of the experts' output layer: [n, h_in, h] stacked, or the first Linear's."""
        return self.weights[-1] if len(self.weights) else self.first.weight

    def from_first_layer(self, pre: Tensor) -> Tensor:
        """The experts' outputs [B, n, h] from their first layer's pre-activations [B, n * units[0]]
        (lets a caller compute that layer inside a larger matmul)."""
        h = self.dropout(torch.relu(pre)).unflatten(1, (self.n, -1))
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


ExpertKind = Literal["mlp", "fm", "cross"]


def check_expert_kinds(kinds: list[ExpertKind] | None, count: int, count_key: str) -> list[ExpertKind] | None:
    """Validator helper: an ``expert_kinds``-style list names exactly one kind per expert."""
    if kinds is not None and len(kinds) != count:
        raise ValueError(f"names {len(kinds)} kinds for {count} experts ({count_key}); give one kind per expert")
    return kinds


class FMExpert(nn.Module):
    """Factorisation-machine expert: the pairwise inner products <v_i, v_j> (i < j) of the field
    embeddings, projected to the expert width by Linear -> ReLU.

    Categorical fields use their embeddings; numeric field j contributes x_j * v_j with a learned
    v_j, as in Rendle's FM. Input: FeatureEmbedding output [B, F_cat * dim + F_num]. Output [B, out].
    """

    pairs: Tensor

    def __init__(self, fields: FieldLayout, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fields = fields
        n_fields = fields.n_categorical + fields.n_numeric
        if n_fields < 2:
            raise ValueError("a factorisation-machine expert needs at least two input fields")
        self.numeric_vectors = (
            nn.Parameter(torch.randn(fields.n_numeric, fields.dim) * 0.05) if fields.n_numeric else None
        )
        rows, cols = torch.triu_indices(n_fields, n_fields, offset=1)
        self.register_buffer("pairs", rows * n_fields + cols, persistent=False)
        self.project = nn.Linear(len(rows), out_dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        f = self.fields
        split = f.n_categorical * f.dim
        vectors = x[:, :split].view(-1, f.n_categorical, f.dim)
        if self.numeric_vectors is not None:
            vectors = torch.cat([vectors, x[:, split:].unsqueeze(-1) * self.numeric_vectors], dim=1)  # [B, N, dim]
        inner = torch.bmm(vectors, vectors.transpose(1, 2)).flatten(1)[:, self.pairs]  # [B, N(N-1)/2]
        return self.dropout(torch.relu(self.project(inner)))


class CrossExpert(nn.Module):
    """Cross-network expert (DCN): x_{l+1} = x_0 * (w_l^T x_l) + b_l + x_l for ``layers`` layers,
    then Linear -> ReLU to the expert width. Input [B, in]; output [B, out].

    Wang, Fu, Fu, Wang, "Deep & Cross Network for Ad Click Predictions", ADKDD 2017.
    """

    def __init__(self, in_dim: int, layers: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.w = nn.Parameter(torch.empty(layers, in_dim).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(layers, in_dim))
        self.project = nn.Linear(in_dim, out_dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for w, b in zip(self.w, self.b, strict=True):
            x = x0 * (x @ w).unsqueeze(1) + b + x
        return self.dropout(torch.relu(self.project(x)))


def embedded_experts(
    inputs: InputSpec,
    embedding_dim: int,
    n_experts: int,
    expert_units: list[int],
    dropout: float,
    expert_kinds: Sequence[ExpertKind] | None,
    cross_layers: int,
) -> tuple[FeatureEmbedding, Experts]:
    """The feature embedding and a pool of experts over it (MLP experts unless ``expert_kinds``
    says otherwise), created in that order: the trunk of MMoE and OMoE."""
    embedding = FeatureEmbedding.for_inputs(inputs, embedding_dim)
    kinds = expert_kinds or ["mlp"] * n_experts
    return embedding, Experts(embedding.out_dim, kinds, expert_units, dropout, embedding.fields, cross_layers)


class Experts(nn.Module):
    """Experts of the given kinds over one input (heterogeneous experts, as in DEPHN, Kong et al., IJCNN 2023).

    ``mlp`` experts run together in one ExpertPool (batched matmuls); ``fm`` experts need the
    field layout of a FeatureEmbedding input; ``cross`` experts work on any input. Every expert
    ends in a ReLU layer of width ``units[-1]``. Input [B, in]; output [B, n, units[-1]] in the
    order of ``kinds``.
    """

    order: Tensor

    def __init__(
        self,
        in_dim: int,
        kinds: Sequence[ExpertKind],
        units: list[int],
        dropout: float = 0.0,
        fields: FieldLayout | None = None,
        cross_layers: int = 2,
    ) -> None:
        super().__init__()
        n_mlp = sum(kind == "mlp" for kind in kinds)
        self.n = len(kinds)
        self.out_dim = units[-1]
        self.pool = ExpertPool(in_dim, n_mlp, units, dropout) if n_mlp else None
        others: list[nn.Module] = []
        for kind in kinds:
            if kind == "fm":
                if fields is None:
                    raise ValueError("fm experts read field embeddings: they need the embedding layer's layout")
                others.append(FMExpert(fields, self.out_dim, dropout))
            elif kind == "cross":
                others.append(CrossExpert(in_dim, cross_layers, self.out_dim, dropout))
        self.others = nn.ModuleList(others)
        # The pool's outputs come first, then the others; ``order`` puts them back in kind order.
        computed = [i for i, k in enumerate(kinds) if k == "mlp"] + [i for i, k in enumerate(kinds) if k != "mlp"]
        self.register_buffer("order", torch.tensor(computed).argsort(), persistent=False)
        self.all_mlp = n_mlp == self.n

    def last_layer(self) -> list[Tensor]:
        """Every expert's output-layer weights: the MLP pool's, then each fm or cross expert's projection."""
        pool = [self.pool.last_layer()] if self.pool is not None else []
        return pool + [cast(FMExpert | CrossExpert, expert).project.weight for expert in self.others]

    def forward(self, x: Tensor) -> Tensor:
        if self.pool is not None and self.all_mlp:
            return self.pool(x)
        outs = [self.pool(x)] if self.pool is not None else []
        outs += [expert(x).unsqueeze(1) for expert in self.others]
        return torch.cat(outs, dim=1).index_select(1, self.order)
