"""The sharing-scheme contract, the scheme registry and the parameters every scheme shares."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Protocol, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationInfo, field_validator
from torch import Tensor, nn

from mtlcli.data.batch import Batch
from mtlcli.data.source import BatchSource
from mtlcli.errors import MtlError
from mtlcli.models.blocks import ExpertKind, SequenceInput, check_expert_kinds
from mtlcli.models.views import Introspection, SharedRepresentation, TaskRepresentation, TaskTowers
from mtlcli.registry import Component, Registry

if TYPE_CHECKING:
    from mtlcli.models.gate_control import GateControl
    from mtlcli.train.step import Step, StepParts

SCHEMES: Registry[Component] = Registry("sharing scheme")


@dataclass(frozen=True)
class InputSpec:
    """What a scheme needs to know about its inputs and outputs, taken from schema.json."""

    cardinalities: list[int]
    n_numeric: int
    tasks: list[str]
    task_types: list[str]
    sequences: list[SequenceInput] = field(default_factory=list)  # behaviour histories, pooled


class ModelParams(BaseModel):
    """Parameters every scheme accepts; each scheme's params class adds its own."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    embedding_dim: PositiveInt = 8


@dataclass(frozen=True)
class Capabilities:
    """What a scheme can do beyond the contract, declared by the scheme itself (its
    ``capabilities``). Generic code (training, explain, export, compare) asks here and never
    probes a model for methods or compares scheme names.

    - ``masks()``: each task's binary masks over the shared network's weights (sparse sharing);
    - ``search(train, batch_size, lr, seed)``: finds the scheme's structure before training;
    - ``baseline``: nothing is shared; the single-task baseline that MTL gain is measured against;
    - ``task_representations(batch)``: what each task's own bottom made of a batch
      (``TaskRepresentation``, DTRN's), for explain;
    - ``shared_representation``: the representation z every task reads (``SharedRepresentation``),
      which MGDA-UB needs; None when each task has its own bottom (DTRN);
    - ``step(parts)``: the scheme's own training step (``mtlcli.train.step``), made from the
      run's built parts (model, weighting, optimizer, exchange), for schemes that update their
      parameter groups or tasks in turn; without it the default step trains them together;
    - ``sum_over_ranks(total)``: the scheme takes statistics of the global batch in its training
      forward pass (gate control's gates and labels); the training's exchange hands it ``total``,
      which sums a tensor over the ranks (None on one process);
    - ``epoch_record()``: what the scheme adds to each epoch's record in metrics.jsonl (gate
      control's λ), called once at each epoch's end;
    - ``field_scales()``: s [T, F], how much each input field steers each task's gate (gate
      control's field mapping; fields in the embedding's order: categorical features, histories,
      numbers), for explain;
    - ``mask_contest(batch)``: per masked layer, what each task loses on ``batch`` without the
      weights it shares (``reliance``: {task: Δ}) and the share of the layer's conflicting weights
      it wins (``wins``: {task: share}) (CSRec), for explain;
    - ``task_towers``: what each task's tower reads (h_k) and the towers (``TaskTowers``), for
      training objectives that need them (CrossDistil); None where a task has no separate tower;
    - ``repeat_pass()``: the scheme updates statistics of the step in its training forward pass
      (gate control's λ and label correlation); inside this context a further training forward
      pass over the step's batch (CrossDistil's teacher pass) reuses them and updates nothing.
      Ask for it through ``repeated_pass(model)``.
    """

    masks: Callable[[], dict[str, list[Tensor]]] | None = None
    search: Callable[[BatchSource, int, float, int], None] | None = None
    baseline: bool = False
    task_representations: Callable[[Batch], list[TaskRepresentation]] | None = None
    shared_representation: SharedRepresentation | None = None
    step: Callable[[StepParts], Step] | None = None
    sum_over_ranks: Callable[[Callable[[Tensor], Tensor] | None], None] | None = None
    epoch_record: Callable[[], dict[str, Any]] | None = None
    field_scales: Callable[[], Tensor] | None = None
    mask_contest: Callable[[Batch], list[dict[str, dict[str, float]]]] | None = None
    task_towers: TaskTowers | None = None
    repeat_pass: Callable[[], AbstractContextManager[None]] | None = None


def gated_capabilities(
    z: SharedRepresentation, control: GateControl | None, towers: TaskTowers | None = None
) -> Capabilities:
    """An expert scheme's capabilities: its shared representation ``z`` and, when the recipe turns
    DEPHN's gate control on (``control``), what the exchange, the epoch record and explain ask of it; ``towers``
    for training objectives (CrossDistil)."""
    if control is None:
        return Capabilities(shared_representation=z, task_towers=towers)
    return Capabilities(
        shared_representation=z,
        task_towers=towers,
        sum_over_ranks=control.sum_over_ranks,
        epoch_record=control.epoch_record,
        field_scales=control.field_scales,
        repeat_pass=control.repeat_pass,
    )


class MultiTaskModel(Protocol):
    """What a sharing scheme builds: an nn.Module mapping a Batch to per-task logits [B, T].

    ``parameter_groups`` says which parameters are shared by all tasks and which belong to one
    task; together they must cover every parameter exactly once. A parameter belongs to task k
    only if no other task's loss can reach it. Weighting strategies that work on gradients use the
    shared group; reports use both.

    ``introspect`` returns what the reports show about how the tasks share, as typed records
    (``Introspection``): softmax gates [B, n] with the names of the experts they weigh, and
    cross-stitch matrices [T, T]. Schemes with nothing to show return an empty ``Introspection``.

    ``last_shared_layer`` names GradNorm's W (Chen et al., ICML 2018): the weights of the last
    shared layer whose output every task's head depends on, one tensor or a few (a stack of
    experts, one column per task). Each is in the shared group and every task's loss reaches it.
    Empty only when nothing is shared.

    ``capabilities`` declares the optional abilities (see ``Capabilities``).
    """

    tasks: list[str]

    @property
    def capabilities(self) -> Capabilities: ...

    def __call__(self, batch: Batch) -> Tensor: ...

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]: ...

    def introspect(self, batch: Batch) -> Introspection: ...

    def last_shared_layer(self) -> list[Tensor]: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]: ...


def scheme(model: nn.Module) -> MultiTaskModel:
    """``model`` as the scheme protocol: every module ``build_model`` returns follows it."""
    return cast(MultiTaskModel, model)


def repeated_pass(model: nn.Module) -> AbstractContextManager[None]:
    """The context for a further training forward pass over the step's batch, after the step's
    first one: the scheme's step statistics are read, not updated (``Capabilities.repeat_pass``);
    nothing for a scheme without any."""
    repeat = scheme(model).capabilities.repeat_pass
    return repeat() if repeat is not None else nullcontext()


def enable_representation(model: nn.Module) -> None:
    """Make ``model`` keep its shared representation (for MGDA-UB); a clear error if it has none."""
    representation = scheme(model).capabilities.shared_representation
    if representation is None:
        raise MtlError(
            f"loss.weighting: this weighting works on one representation shared by every task, and the scheme "
            f"{type(model).__name__} has none (each task has its own bottom)",
            "choose another weighting: mgda works on the shared parameters instead",
        )
    representation.enabled = True


Dropout = Annotated[float, Field(ge=0.0, lt=1.0)]


class BottomParams(ModelParams):
    """A bottom MLP and per-task towers: shared-bottom (shared bottom) and single-task (one per task)."""

    bottom_units: list[PositiveInt] = Field(default=[128, 64], min_length=1)
    tower_units: list[PositiveInt] = [32]
    dropout: Dropout = 0.0


class ExpertPoolParams(ModelParams):
    """A pool of experts over the embedded input, towers on top: MMoE (a gate per task) and OMoE
    (one gate). ``expert_kinds`` makes the experts heterogeneous (one kind per expert)."""

    n_experts: PositiveInt = 8
    expert_units: list[PositiveInt] = Field(default=[16], min_length=1)
    tower_units: list[PositiveInt] = [8]
    dropout: Dropout = 0.0
    expert_kinds: list[ExpertKind] | None = None
    cross_layers: PositiveInt = 2

    @field_validator("expert_kinds")
    @classmethod
    def _one_kind_per_expert(cls, kinds: list[ExpertKind] | None, info: ValidationInfo) -> list[ExpertKind] | None:
        return check_expert_kinds(kinds, info.data.get("n_experts", 0), "n_experts")


P = TypeVar("P", bound=BaseModel)


Builder = Callable[[P, InputSpec], MultiTaskModel]


def register_scheme(
    name: str, params: type[P], summary: str, check: Callable[[Any, Any], list[tuple[str, str]]] | None = None
) -> Callable[[Builder[P]], Builder[P]]:
    """Decorator for a scheme's ``build(params, inputs)`` function, which returns an nn.Module that
    follows ``MultiTaskModel`` (the type checker holds every scheme to the protocol, capabilities
    included); ``check(params, recipe)`` (optional) validates the parameters against the rest of
    the recipe."""

    def decorate(build: Builder[P]) -> Builder[P]:
        SCHEMES.add(name, Component(name, params, build, summary, check))
        return build

    return decorate


def build_model(scheme: str, params: Any, inputs: InputSpec) -> nn.Module:
    return SCHEMES.get(scheme).build(params, inputs)  # type: ignore[no-any-return]


def group_by_prefix(module: nn.Module, task_prefixes: dict[str, list[str]]) -> dict[str, dict[str, nn.Parameter]]:
    """Parameter groups from name prefixes: ``{task: [prefix, ...]}``; the rest is shared."""
    groups: dict[str, dict[str, nn.Parameter]] = {"shared": {}, **{task: {} for task in task_prefixes}}
    for name, param in module.named_parameters():
        owner = next(
            (task for task, prefixes in task_prefixes.items() if any(name.startswith(p) for p in prefixes)),
            "shared",
        )
        groups[owner][name] = param
    return groups
