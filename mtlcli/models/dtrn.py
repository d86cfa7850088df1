"""Deep Task-specific Bottom Representation Network (DTRN).

Liu, Zhou, Jiang, Ge, Lian, "Deep Task-specific Bottom Representation Network for Multi-Task
Recommendation", CIKM 2023 (arXiv:2308.05996). Each task gets its own bottom representation:

- **TIM** (task-specific interest module): one transformer layer is shared by every (task t,
  behaviour type b) pair, and its layer norms are *conditional*: two hypernetworks (two-layer
  ReLU MLPs) map the concatenated task and behaviour-type embeddings to γ_{t,b} and β_{t,b} for
  every layer norm, CLN(X) = γ_{t,b} · γ · (X − μ)/σ + β_{t,b} + β. The transformer reads the
  history of type b (a sequence feature: one behaviour type per feature) for task t, and the
  candidate's embedding attends over its outputs (target attention: DIN's activation unit, no
  softmax, shared by every pair) to give one interest vector per (t, b); task t's interest is
  their concatenation.
- **TRM** (task-specific representation refinement): raw_t = [feature embeddings, interest_t,
  numbers]; refine_t = MLP_t(raw_t), SENet-like (two layers, ReLU then sigmoid, one weight per
  element of raw_t); r_t = raw_t ⊙ refine_t feeds task t's tower.

Shared by all tasks: the embedding table, the transformer, the hypernetworks and the task and
type embeddings. Task t's own: its refinement MLP and its tower. There is no single shared
representation (each task's bottom differs), so MGDA-UB, which needs one, is refused.

Choices where the paper leaves room (see docs/methods.md): one transformer layer with single-head
self-attention over the real items; the candidate of a history is the feature it attends to
(``target``) or whose vocabulary it shares; interest by DIN's target attention over the layer's
outputs (``interest: softmax`` uses a scaled dot product with a softmax instead, which keeps which
items match the candidate but not how many — on the generated histories, where the count is the
signal, it stays at chance); the hypernetworks' hidden width ``hyper_units``; the refinement
MLP's hidden width |raw_t| / ``se_reduction``. Without histories DTRN is its TRM alone. The
ablations of the paper are parameters: ``conditional_norm: false`` (plain layer norms, no
hypernetworks) and ``refine: false`` (r_t = raw_t).

How it is computed (the same function, checked against a pair-by-pair loop in the tests): all
(task, type) pairs at once. Each type's histories are cut to the longest of that type in the
batch and laid end to end; the self-attention, which no task changes, runs once per type
(``scaled_dot_product_attention``); the hypernetworks give every pair's γ, β in one pass; from
the first norm on, each position carries all tasks ([B, P, T, d]). DIN's first layer is linear in
[k, c, k − c, k ⊙ c], so for a history with candidate c it is one [d, 36] matrix and offset, and
PReLU(x) = (1 − a)·ReLU(x) + a·x puts only the ReLU through the 36 hidden units.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Literal, NamedTuple, cast

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from mtlcli.data.batch import Batch
from mtlcli.errors import MtlError
from mtlcli.models.base import Capabilities, Dropout, InputSpec, ModelParams, group_by_prefix, register_scheme
from mtlcli.models.blocks import AttentionPooling, FeatureEmbedding, last_linear, mlp
from mtlcli.models.views import Introspection, TaskRepresentation

NORMS = 2  # layer norms in the transformer layer: after attention, after the feed-forward network


class DTRNParams(ModelParams):
    hyper_units: PositiveInt = 32
    se_reduction: PositiveInt = 4
    tower_units: list[PositiveInt] = Field(default=[32], min_length=1)
    dropout: Dropout = 0.0
    conditional_norm: bool = True
    refine: bool = True
    interest: Literal["din", "softmax"] = "din"


class Layout(NamedTuple):
    """Where each history's items sit once the histories of a batch are laid end to end, each
    type cut to its longest history in the batch (``lengths``, P = their sum positions)."""

    lengths: list[int]  # per type
    types: Tensor  # [P]: each position's behaviour type
    segments: Tensor  # [S, P] float: one where a position belongs to a type
    present: Tensor  # [B, P] float: one for a real item
    keys: Tensor  # [B, P] bool: the keys a query may attend to (an empty history: its first position)
    any_item: Tensor  # [B, S]: histories with an item


class TaskInterest(nn.Module):
    """TIM: histories [B, S, L, d] (mask [B, S, L]) and each history's candidate [B, S, d] ->
    interests [B, T, S, d], one per (task, behaviour type).

    Computed for every (task, type) pair at once: the histories of each type are cut to the
    longest of its type in the batch and laid end to end ([B, P, d], P = the sum of those
    lengths); the self-attention, which no task changes, runs once per type; from the first
    conditional norm on, every position carries the γ_{t,b}, β_{t,b} of its type for all tasks
    ([B, T, P, d]), and DIN's unit and the pooling of each type are one product each."""

    def __init__(
        self, tasks: int, types: int, dim: int, hyper_units: int, conditional: bool, pooling: str = "din"
    ) -> None:
        super().__init__()
        self.tasks, self.types, self.dim, self.conditional = tasks, types, dim, conditional
        if conditional:  # the hypernetworks exist only where they are used (no dead parameters)
            self.task_embedding = nn.Embedding(tasks, dim)
            self.type_embedding = nn.Embedding(types, dim)
            self.hyper_gamma = mlp(2 * dim, [hyper_units], out_dim=NORMS * dim)
            self.hyper_beta = mlp(2 * dim, [hyper_units], out_dim=NORMS * dim)
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.ffn = mlp(dim, [2 * dim], out_dim=dim)
        self.gamma = nn.Parameter(torch.ones(NORMS, dim))
        self.beta = nn.Parameter(torch.zeros(NORMS, dim))
        self.target = AttentionPooling(dim) if pooling == "din" else None
        self.last_interest: Tensor | None = None  # [B, T, S, d] of the last forward pass, for reports

    def condition(self) -> tuple[Tensor, Tensor]:
        """γ_{t,b} and β_{t,b}: [T, S, NORMS, d] for all pairs in one pass of each hypernetwork;
        ones and zeros without conditional norms."""
        if not self.conditional:
            ones = self.gamma.new_ones((self.tasks, self.types, NORMS, self.dim))
            return ones, torch.zeros_like(ones)
        pairs = torch.cat(
            [
                self.task_embedding.weight.unsqueeze(1).expand(-1, self.types, -1),
                self.type_embedding.weight.unsqueeze(0).expand(self.tasks, -1, -1),
            ],
            dim=-1,
        )
        shape = (self.tasks, self.types, NORMS, self.dim)
        # γ_{t,b} = 1 + the hypernetwork's output: near 1 at the start, so that the layer starts
        # as a plain layer norm instead of scaling its input down to almost nothing
        return 1.0 + self.hyper_gamma(pairs).view(shape), self.hyper_beta(pairs).view(shape)

    def layout(self, mask: Tensor) -> Layout:
        """The positions of the batch's items (see ``Layout``) from the mask [B, S, L]. While
        tracing (ONNX export) every type keeps the full length L, so the graph fits any batch."""
        count = mask.sum(-1)  # [B, S]
        longest = mask.shape[-1]
        if torch.jit.is_tracing():
            lengths = [longest] * self.types
        else:
            lengths = [max(1, n) for n in count.amax(0).long().tolist()]
        device = mask.device
        types = torch.repeat_interleave(torch.arange(self.types, device=device), torch.tensor(lengths, device=device))
        segments = F.one_hot(types, self.types).t().to(mask.dtype)  # [S, P]
        present = torch.cat([mask[:, s, :n] for s, n in enumerate(lengths)], dim=1)
        any_item = count > 0
        first = torch.zeros(len(types), dtype=torch.bool, device=device)
        first[torch.tensor([0, *itertools.accumulate(lengths[:-1])], device=device)] = True
        keys = (present > 0) | (first & ~any_item.index_select(1, types))
        return Layout(lengths, types, segments, present, keys, any_item)

    def encode(self, histories: Tensor, layout: Layout) -> Tensor:
        """The shared transformer layer with each (task, type)'s conditional norms
        CLN(X) = γ_{t,b} · γ · (X − μ)/σ + β_{t,b} + β: [B, S, L, d] -> [B, P, T, d]."""
        lengths, dim = layout.lengths, self.dim
        x = torch.cat([histories[:, s, :n] for s, n in enumerate(lengths)], dim=1)  # [B, P, d]
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        qkv = F.linear(x, weight, bias).unsqueeze(1)  # [B, 1, P, 3d]: one head
        attended, start = [], 0
        for n in lengths:  # self-attention within each type, over its real items
            q, k, v = qkv[:, :, start : start + n].split(dim, dim=-1)
            keys = layout.keys[:, start : start + n]
            full = not torch.jit.is_tracing() and bool(keys.all())
            allowed = None if full else keys.view(-1, 1, 1, n)
            attended.append(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed))
            start += n
        normalized = F.layer_norm(x + torch.cat(attended, dim=2).squeeze(1), (dim,))  # the same for every task
        gamma, beta = self.condition()
        scale = (gamma * self.gamma).index_select(1, layout.types).transpose(0, 1)  # [P, T, NORMS, d]
        shift = (beta + self.beta).index_select(1, layout.types).transpose(0, 1)
        h = torch.addcmul(shift[:, :, 0], scale[:, :, 0], normalized.unsqueeze(2))  # [B, P, T, d]
        return torch.addcmul(shift[:, :, 1], scale[:, :, 1], F.layer_norm(h + self.ffn(h), (dim,)))

    def pool(self, h: Tensor, layout: Layout, candidates: Tensor) -> Tensor:
        """Target attention of each history's candidate [B, S, d] over the layer's outputs
        h [B, P, T, d] -> interests [B, T, S, d]."""
        batch, tasks, dim = h.shape[0], self.tasks, self.dim
        if self.target is not None:
            # DIN's unit, weight_l = v · PReLU(W [k, c, k − c, k ⊙ c] + b) + b₂ for key k, candidate c:
            # its first layer is M_c k + m_c with M_c = W_k + W_d + W_p diag(c) and m_c = (W_q − W_d) c + b,
            # one [d, 36] matrix per history (its candidate is fixed), and PReLU(x) = (1 − a) ReLU(x) + a x,
            # whose linear part through v is (v M_c) k + v m_c: only ReLU needs the 36 hidden units
            score = self.target.score
            first, act, last = cast(nn.Linear, score[0]), cast(nn.PReLU, score[1]), cast(nn.Linear, score[2])
            w_k, w_q, w_d, w_p = first.weight.split(dim, dim=1)
            v, slope = last.weight.view(-1), act.weight.view(())
            matrices = (w_k + w_d).t() + candidates.unsqueeze(-1) * w_p.t()  # [B, S, d, 36]
            offsets = F.linear(candidates, w_q - w_d, first.bias)  # [B, S, 36]
            matrices_v, offsets_v = matrices @ v.unsqueeze(-1), offsets @ v  # [B, S, d, 1], [B, S]
        interests, start = [], 0
        for s, n in enumerate(layout.lengths):
            keys = h[:, start : start + n]  # [B, n, T, d]
            if self.target is not None:
                flat = keys.reshape(batch, n * tasks, dim)
                hidden = torch.baddbmm(offsets[:, s : s + 1], flat, matrices[:, s]).relu_()  # [B, n·T, 36]
                direct = (flat @ matrices_v[:, s]).squeeze(-1) + offsets_v[:, s : s + 1]  # [B, n·T]
                weights = (1 - slope) * (hidden @ v) + slope * direct + last.bias
                weights = weights.view(batch, n, tasks) * layout.present[:, start : start + n].unsqueeze(-1)
            else:
                scores = (keys * candidates[:, s].view(batch, 1, 1, dim)).sum(-1) / math.sqrt(dim)  # [B, n, T]
                allowed = layout.keys[:, start : start + n].unsqueeze(-1)
                weights = scores.masked_fill(~allowed, float("-inf")).softmax(1)
            interests.append((weights.unsqueeze(-1) * keys).sum(1))  # [B, T, d]
            start += n
        interest = torch.stack(interests, dim=2)  # [B, T, S, d]
        return interest * layout.any_item.unsqueeze(1).unsqueeze(-1)  # an empty history has no interest

    def forward(self, histories: Tensor, mask: Tensor, candidates: Tensor) -> Tensor:
        layout = self.layout(mask)
        interest = self.pool(self.encode(histories, layout), layout, candidates)
        self.last_interest = interest.detach()
        return interest


class DTRN(nn.Module):
    """embedding -> per task: [features, TIM interest_t, numbers] -> TRM refinement -> tower_t.
    Output [B, T]."""

    def __init__(self, inputs: InputSpec, params: DTRNParams) -> None:
        super().__init__()
        self.tasks = list(inputs.tasks)
        dim = params.embedding_dim
        # the histories are read raw (TIM pools them): no pooling modules of the embedding's own
        raw = [dataclasses.replace(s, pooling="mean", target=None) for s in inputs.sequences]
        self.embedding = FeatureEmbedding(inputs.cardinalities, inputs.n_numeric, dim, raw)
        self.candidates = self._candidates(inputs)
        self.interest = (
            TaskInterest(len(self.tasks), len(raw), dim, params.hyper_units, params.conditional_norm, params.interest)
            if raw
            else None
        )
        width = self.embedding.out_dim  # raw_t: features, one interest per history, numbers
        self.refine = params.refine
        hidden = max(1, width // params.se_reduction)
        self.refiners = nn.ModuleDict(
            {t: nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width)) for t in self.tasks}
            if params.refine
            else {}
        )
        self.towers = nn.ModuleDict({t: mlp(width, params.tower_units, params.dropout, out_dim=1) for t in self.tasks})
        self.last_refine: dict[str, Tensor] = {}

    @staticmethod
    def _candidates(inputs: InputSpec) -> list[int]:
        """For each history, the categorical feature whose embedding queries it: its attention
        target, else the feature whose vocabulary it shares, else (a history of ids of its own)
        the first history's candidate."""
        own = [seq.target if seq.target is not None else seq.shares for seq in inputs.sequences]
        first = next((c for c in own if c is not None), None)
        if inputs.sequences and first is None:
            raise MtlError(
                "model.scheme: dtrn attends to the behaviour histories with the candidate item, and no history "
                "shares a feature's vocabulary or names an attention target",
                "give a history `vocabulary: <the candidate's feature>` (e.g. clicked items share `item`)",
            )
        return [c if c is not None else first for c in own]  # type: ignore[misc]

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(task_representations=self.refinements)

    def representations(self, batch: Batch) -> list[Tensor]:
        """raw_t for every task: [B, width] each."""
        fields, keys, mask = self.embedding.lookup(batch)
        base = fields.flatten(1)
        if self.interest is None or keys is None or mask is None:
            return [torch.cat([base, batch.numeric], dim=1) for _ in self.tasks]
        interest = self.interest(keys, mask, fields[:, self.candidates])  # [B, T, S, d]
        return [torch.cat([base, interest[:, k].flatten(1), batch.numeric], dim=1) for k in range(len(self.tasks))]

    def forward(self, batch: Batch) -> Tensor:
        outputs = []
        for task, raw in zip(self.tasks, self.representations(batch), strict=True):
            if self.refine:
                weights = torch.sigmoid(self.refiners[task](raw))
                self.last_refine[task] = weights.detach()
                raw = raw * weights
            outputs.append(self.towers[task](raw))
        return torch.cat(outputs, dim=1)

    def introspect(self, batch: Batch) -> Introspection:
        """No gates and no mixing matrices. (``refinements`` and ``interests`` give what DTRN
        learned per task; `mtl explain` does not show them yet.)"""
        return Introspection()

    @torch.no_grad()
    def refinements(self, batch: Batch) -> list[TaskRepresentation]:
        """Each task's TRM weights [B, width] (one per element of raw_t), and with histories its
        interests [B, S, d]."""
        self(batch)
        interests = self.interest.last_interest if self.interest is not None else None
        return [
            TaskRepresentation(
                task,
                self.last_refine[task] if self.refine else None,
                interests[:, k] if interests is not None else None,
            )
            for k, task in enumerate(self.tasks)
        ]

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        return group_by_prefix(self, {t: [f"refiners.{t}.", f"towers.{t}."] for t in self.tasks})

    def last_shared_layer(self) -> list[Tensor]:
        """The embedding table (and the transformer's feed-forward output when there are
        histories): what every task's representation is made of."""
        layers = [self.embedding.table.weight]
        if self.interest is not None:
            layers.append(last_linear(self.interest.ffn).weight)
        return layers


@register_scheme(
    "dtrn", DTRNParams, "task-specific bottoms: conditional-norm interests and SENet refinement (CIKM 2023)"
)
def build(params: DTRNParams, inputs: InputSpec) -> DTRN:
    return DTRN(inputs, params)
