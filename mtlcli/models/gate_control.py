"""DEPHN's gate-strength control: the formulas as plain modules and functions, and ``GateControl``,
which an expert scheme (MMoE, CGC, PLE) holds when its recipe sets ``model.gate_control``.

Kong, Su, Zhao, Hou, "DEPHN: Different Expression Parallel Heterogeneous Network using Virtual
Gradient Optimization for Multi-task Learning", IJCNN 2023 (arXiv:2307.12519).

What the paper states [paper]: each task's gate reads a *feature explicit mapping* of the input, a
*virtual gradient coefficient* acts during training, and the *learning intensity of each gate* is
adjusted from the *difference between the gates' values* and the *correlation between the tasks*.

The exact forms are not available to the project; these are the project's own [spec] choices
(docs/methods.md, "Gate control (DEPHN)"):

- ``FieldMapping``: task k's gate reads φ_k(x) = concat_f (s_{k,f} · e_f), one learned scalar per
  task and input field (task k's parameters), initialised to 1 (the gate then starts as it would on the flat input);
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
which are sums that ``GateControl`` adds up over the ranks (``sum_over_ranks``) before dividing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, cast

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from torch import Tensor, nn

from mtlcli.models.blocks import FieldLayout

DELTA = 0.5  # δ: the gate difference wanted between two uncorrelated tasks [spec]
KAPPA = 5.0  # κ: how sharply λ responds to a gap between wanted and actual difference [spec]
LAMBDA_MIN, LAMBDA_MAX = 0.1, 10.0  # λ's clip [spec]
CORR_DECAY = 0.99  # the label correlation's moving-average decay per step [spec]


class FieldMapping(nn.Module):
    """One task's explicit re-weighting of the input fields: φ_k(x) = concat_f (s_{k,f} · e_f).

    The fields are those of ``FeatureEmbedding``'s layout: ``n_categorical`` embeddings of width
    ``dim`` (pooled histories included), then ``n_numeric`` numbers, each number one field of
    width 1. ``scales`` [F] (F = n_categorical + n_numeric) starts at 1, so that the gate starts
    as it would on the flat input. One module per task: task k's scales are task k's parameters.

    Input: the flat embedding x [B, D] with D = n_categorical · dim + n_numeric. Output [B, D].
    """

    widths: Tensor

    def __init__(self, fields: FieldLayout) -> None:
        super().__init__()
        self.scales = nn.Parameter(torch.ones(fields.n_categorical + fields.n_numeric))
        widths = [fields.dim] * fields.n_categorical + [1] * fields.n_numeric
        self.register_buffer("widths", torch.tensor(widths, dtype=torch.long), persistent=False)
        self.out_dim = fields.n_categorical * fields.dim + fields.n_numeric

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scales.repeat_interleave(self.widths)


class _VirtualGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by a coefficient (or divides
    it by the coefficient, ``inverse``). The coefficient is read when the backward pass runs."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, coefficient: Tensor, inverse: bool) -> Tensor:
        ctx.coefficient, ctx.inverse = coefficient, inverse  # not saved: it may be set after this call
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        factor = ctx.coefficient.to(grad.dtype)
        return (grad / factor if ctx.inverse else grad * factor), None, None


def virtual_gradient(x: Tensor, coefficient: Tensor | float, inverse: bool = False) -> Tensor:
    """``x`` unchanged in the forward pass; in the backward pass the gradient reaching ``x`` is
    multiplied by ``coefficient`` (λ_k; divided by it with ``inverse``), so everything upstream
    (the gate, its field mapping, and their own inputs) learns from gate k at λ_k times the rate.

    x: any shape; coefficient: a number or a 0-d tensor (no gradient flows to it). A tensor is
    read when the backward pass runs, so it may be set in place after this call: gate control
    sets λ from the batch's gates, which are computed after the gates' input passes through here.
    """
    factor = coefficient.detach() if isinstance(coefficient, Tensor) else torch.tensor(coefficient)
    if factor.dim() != 0:
        raise ValueError(f"the virtual gradient's coefficient is one number per gate, got shape {list(factor.shape)}")
    out: Tensor = _VirtualGradient.apply(x, factor, inverse)
    return out


def controlled_gate_logits(gate: nn.Module, mapping: FieldMapping, x: Tensor, coefficient: Tensor) -> Tensor:
    """Gate k's logits gate(φ_k(x)), with λ_k acting on the gate and its field mapping only.

    The logits pass through ``virtual_gradient`` with λ_k, and x passes through it inverted (1/λ_k)
    before the mapping. The gate's and s_k's gradients are then λ_k times their plain values, and
    the gradient reaching x (the embedding that the experts share) through this gate is its plain
    value, to rounding. ``coefficient`` is read in the backward pass (see ``virtual_gradient``).

    gate: [B, D] -> [B, E]; x: the flat embedding [B, D]; coefficient: λ_k, a 0-d tensor (> 0).
    Output [B, E].
    """
    shielded = virtual_gradient(x, coefficient, inverse=True)
    return virtual_gradient(gate(mapping(shielded)), coefficient)


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


class GateControlSettings(BaseModel):
    """``model.gate_control`` of an expert scheme: ``true`` for these defaults, a mapping to change
    some, ``false`` (the default) for none (the ablation: no field mapping, λ ≡ 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    delta: float = Field(DELTA, ge=0.0, le=1.0)
    kappa: float = Field(KAPPA, ge=0.0)
    corr_decay: float = Field(CORR_DECAY, ge=0.0, lt=1.0)
    lambda_min: float = Field(LAMBDA_MIN, gt=0.0)
    lambda_max: float = Field(LAMBDA_MAX, gt=0.0)

    @model_validator(mode="after")
    def _clip_in_order(self) -> GateControlSettings:
        if self.lambda_min > self.lambda_max:
            raise ValueError(
                f"lambda_min ({self.lambda_min}) is above lambda_max ({self.lambda_max}): λ's clip needs min <= max"
            )
        return self


def _switch(value: Any) -> Any:
    """``true`` means the default settings and ``false`` none; a mapping is validated as settings."""
    if value is True:
        return {}
    if value is False:
        return None
    return value


GateControlOption = Annotated[GateControlSettings | None, BeforeValidator(_switch)]


def check_gate_control(settings: GateControlSettings | None, tasks: list[str]) -> list[tuple[str, str]]:
    """A scheme's recipe check: gate control compares each task's gate with the others'."""
    if settings is None or len(tasks) >= 2:
        return []
    return [
        (
            "gate_control",
            f"gate control compares each task's gate with the other tasks' gates, and the recipe has one task "
            f"({', '.join(tasks)}): add a task or set gate_control: false",
        )
    ]


class GateControl(nn.Module):
    """DEPHN's gate control for the T task gates of one expert layer that read the embedded input.

    ``gate_logits`` runs each task's gate on its field mapping; in a training forward pass (train
    mode, gradients on) it also computes this step's λ from the global batch (``update``) and makes
    each gate's logits carry it (``controlled_gate_logits``); elsewhere (evaluation, serving,
    export) the gates run on their field mappings without λ, which only touches gradients. (Under
    Adam a gradient scaled by a constant gives the same step: λ then acts only through its changes
    between steps; see docs/methods.md.)

    ``compared``: gate difference compares the last ``compared`` columns of every gate, renormalised
    (CGC's and PLE's task gates weigh their own experts first, then the shared ones, which are the
    only experts two task gates have in common); None compares every column (MMoE).

    Buffers, saved with the model (a resumed run goes on exactly): the label correlation's moving
    average, ``coefficients`` (λ of the last step, float64 [T]; 1 before any), ``difference`` (d of
    the last step [T]), and ``lambda_sum``/``steps``, λ summed over the steps since the last epoch
    record (``epoch_record``).
    """

    coefficients: Tensor
    difference: Tensor
    lambda_sum: Tensor
    steps: Tensor

    def __init__(
        self, tasks: list[str], fields: FieldLayout, settings: GateControlSettings, compared: int | None = None
    ) -> None:
        super().__init__()
        if len(tasks) < 2:
            raise ValueError("gate control compares each task's gate with the others': it needs two tasks or more")
        self.tasks = list(tasks)
        self.settings = settings
        self.compared = compared
        self.mapping = nn.ModuleDict({t: FieldMapping(fields) for t in self.tasks})
        self.correlation = LabelCorrelation(len(self.tasks), settings.corr_decay)
        n = len(self.tasks)
        self.register_buffer("coefficients", torch.ones(n, dtype=torch.float64))
        self.register_buffer("difference", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("lambda_sum", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.total: Callable[[Tensor], Tensor] | None = None  # see sum_over_ranks
        self.repeating = False  # see repeat_pass

    def sum_over_ranks(self, total: Callable[[Tensor], Tensor] | None) -> None:
        """On several processes (set by the training's exchange): ``total`` sums a tensor over the
        ranks, so that λ comes from the global batch's gates and labels on every rank."""
        self.total = total

    @contextmanager
    def repeat_pass(self) -> Iterator[None]:
        """Within it, a training forward pass repeats the step's first one (CrossDistil's teacher
        pass over the same batch): the gates carry the step's λ (``coefficients``), and neither λ,
        the correlation's average nor the epoch's sums are updated. Without it the second pass
        would take a second step's statistics from the same batch."""
        self.repeating = True
        try:
            yield
        finally:
            self.repeating = False

    def gate_logits(
        self, gates: Sequence[nn.Module], inputs: Sequence[Tensor], labels: tuple[Tensor, Tensor] | None
    ) -> list[Tensor]:
        """Task k's gate logits gate_k(φ_k(x_k)), T x [B, E]; in a training forward pass they carry
        λ_k, computed here from this batch's gates and ``labels``: (labels [B, T], mask bool [B, T])
        (inside ``repeat_pass``: the step's λ, computed by its first pass).

        gates: T modules [B, D] -> [B, E]; inputs: T tensors x_k [B, D] (the embedded input as
        task k's gate reads it)."""
        if not (self.training and torch.is_grad_enabled()):
            return [gate(self.mapping[t](x)) for t, gate, x in zip(self.tasks, gates, inputs, strict=True)]
        if self.repeating:
            step = self.coefficients.to(inputs[0].dtype, copy=True)  # the next step's update leaves it
            return [
                controlled_gate_logits(gate, cast(FieldMapping, self.mapping[t]), x, step[k])
                for k, (t, gate, x) in enumerate(zip(self.tasks, gates, inputs, strict=True))
            ]
        if labels is None:
            raise ValueError("gate control's training forward pass reads the batch's labels: pass them")
        pending = inputs[0].new_ones(len(self.tasks))  # λ, set below, before any backward pass reads it
        logits = [
            controlled_gate_logits(gate, cast(FieldMapping, self.mapping[t]), x, pending[k])
            for k, (t, gate, x) in enumerate(zip(self.tasks, gates, inputs, strict=True))
        ]
        with torch.no_grad():
            pending.copy_(self.update(logits, *labels))
        return logits

    @torch.no_grad()
    def update(self, logits: Sequence[Tensor], labels: Tensor, mask: Tensor) -> Tensor:
        """One training step's λ [T] (float64) from its gates' logits (T x [B, E]) and labels, every
        sum taken over the ranks first; folds the labels into the correlation's moving average."""
        sums = torch.stack([torch.softmax(x.detach(), dim=-1).sum(0) for x in logits]).double()  # [T, E]
        if self.compared is not None:
            sums = sums[:, sums.shape[1] - self.compared :]
        moments = label_moments(labels, mask)  # [6, T, T]
        flat = torch.cat([sums.flatten(), moments.flatten().to(sums.device)])
        if self.total is not None:  # one exchange for both
            flat = self.total(flat)
        sums, moments = flat[: sums.numel()].view_as(sums), flat[sums.numel() :].view_as(moments)
        mean_gates = sums / sums.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        difference = gate_difference(mean_gates)
        correlation = self.correlation.update(moments)
        s = self.settings
        coefficients = gate_coefficients(difference, correlation, s.delta, s.kappa, s.lambda_min, s.lambda_max)
        self.coefficients.copy_(coefficients)
        self.difference.copy_(difference)
        self.lambda_sum += coefficients
        self.steps += 1
        return coefficients

    def epoch_record(self) -> dict[str, Any]:
        """``{"gate_control": {"lambda", "difference", "correlation"}}``, each {task: value}: λ's mean
        over the steps since the last call (the last λ when there were none), the last step's d and
        the correlation c; starts the next count."""
        steps = int(self.steps)
        mean = self.lambda_sum / steps if steps else self.coefficients
        correlation = self.correlation.task_correlation()
        self.lambda_sum.zero_()
        self.steps.zero_()

        def by_task(values: Tensor) -> dict[str, float]:
            return dict(zip(self.tasks, values.tolist(), strict=True))

        return {
            "gate_control": {
                "lambda": by_task(mean),
                "difference": by_task(self.difference),
                "correlation": by_task(correlation),
            }
        }

    def field_scales(self) -> Tensor:
        """s [T, F]: task k's scale of each input field (row k)."""
        return torch.stack([cast(FieldMapping, self.mapping[t]).scales.detach() for t in self.tasks])
