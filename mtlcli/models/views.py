"""What a scheme lets others see of its inside: its gates and cross-stitch matrices as typed records
(``introspect``, for the reports), what each task's own bottom made of a batch (DTRN) and its shared
representation (for MGDA-UB)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from mtlcli.data.batch import Batch


class SharedRepresentation(nn.Module):
    """A scheme's *shared representation* z, for MGDA-UB; a scheme that has one holds one of these
    (no parameters) and declares it as ``Capabilities.shared_representation``.

    z is a list of tensors that cuts the model's graph in two: every shared parameter lies
    upstream of z, every task-specific parameter downstream, and the logits depend on the shared
    parameters only through z. Then each task's gradient on the shared parameters is
    J_zᵀ ∂L_k/∂z, and the cheap gradients ∂L_k/∂z stand in for it (Sener & Koltun, section 3.3).
    A tensor that several consumers read but only some of them belong to the cut is passed
    through ``alias`` so that ∂L/∂alias counts only the consumers downstream of the cut.

    Once ``enabled`` (``enable_representation``: the training loop does it for strategies that need
    z) the scheme's forward pass in training mode stores z in ``tensors`` through ``keep``;
    otherwise nothing is stored. Being a submodule, it follows the scheme's train/eval mode.
    """

    def __init__(self) -> None:
        super().__init__()
        self.enabled = False
        self.tensors: list[Tensor] = []

    def keeping(self) -> bool:
        """Whether this forward pass keeps z (enabled, in training mode)."""
        return self.enabled and self.training

    def keep(self, *tensors: Tensor) -> None:
        """Store z (any shapes, each [B, ...]) when keeping it."""
        if self.keeping():
            self.tensors = list(tensors)

    def alias(self, x: Tensor) -> Tensor:
        """A new graph node equal to ``x`` when z is kept; ``x`` otherwise."""
        return x.view_as(x) if self.keeping() else x


@dataclass(frozen=True)
class GateRecord:
    """One softmax gate as ``introspect`` shows it: gate ``row`` (a task, or ``shared`` for a gate
    every task reads) of the gate group ``group`` (``gate`` for MMoE's gates, ``level<j>.gate`` for
    PLE's level j; explain makes one table per group), its ``weights`` [B, n] (each row sums to 1)
    and the names of the n experts its columns weigh (``"0"`` .. for one pool of experts;
    ``<task>.<i>`` and ``shared.<i>`` for CGC's and PLE's)."""

    group: str
    row: str
    weights: Tensor
    experts: list[str]


@dataclass(frozen=True)
class ScaleRecord:
    """A multiplicative gate as a scheme shows it (``Capabilities.gate_scales``): gate ``row`` (a
    task, or ``shared``) of the group ``group`` scales ``n`` units by ``scales`` [B, n], each in
    [0, ``bound``] (1 leaves a unit as it is); ``units`` names them (hidden units numbered from
    0), or is None when they are the input fields in the embedding's order (categorical features,
    histories, numbers), which explain names from the run's schema."""

    group: str
    row: str
    scales: Tensor
    units: list[str] | None
    bound: float


@dataclass(frozen=True)
class AlphaRecord:
    """A cross-stitch mixing matrix [T, T] after hidden layer ``layer`` (``layer<l>``, from 1): row
    k says how task k's column mixes the columns of every task."""

    layer: str
    matrix: Tensor


@dataclass(frozen=True)
class TaskRepresentation:
    """What task ``task``'s own bottom made of a batch (DTRN): its refinement weights [B, width],
    one per element of its representation (None without refinement), and its interest in each
    behaviour history [B, S, d] (None without histories)."""

    task: str
    refine: Tensor | None
    interest: Tensor | None


@dataclass(frozen=True)
class Introspection:
    """What ``introspect`` shows of how the tasks share: gates and cross-stitch matrices, each in
    the scheme's order; both empty for a scheme with nothing to show."""

    gates: list[GateRecord] = field(default_factory=list)
    alphas: list[AlphaRecord] = field(default_factory=list)


@dataclass(frozen=True)
class TaskTowers:
    """What each task's tower reads and the towers themselves, for objectives that add towers of
    their own beside them (CrossDistil's teachers) or run a task's tower alone (its look-ahead).

    ``inputs(batch)``: h_k, what task k's tower reads, T tensors [B, H_k] in task order (through
    the scheme's shared layers, with their graph); ``towers[k](h_k)``: task k's logits [B, 1],
    the scheme's output column k. Together they compute what the scheme's forward pass does.
    """

    inputs: Callable[[Batch], list[Tensor]]
    towers: nn.ModuleDict
