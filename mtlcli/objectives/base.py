"""The training-objective contract: terms and parameters of its own on top of a scheme's task
losses, trained by a step of its own. The loop, the optimizer and checkpoints ask the objective
(never its name); bundles never carry its parameters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor, nn

if TYPE_CHECKING:
    from mtlcli.data.batch import SplitTensors
    from mtlcli.train.step import Step, StepParts


class TrainingObjective(Protocol):
    """``parameters``: the objective's own (their optimizer group ``objective``, at ``lr``; None:
    ``train.lr``); ``make_step(parts)``: the step that trains the model and them; ``state_dict`` /
    ``load_state_dict``: everything a checkpoint needs to resume exactly (parameters, generators,
    the epoch's running sums); ``end_epoch()``: the epoch's record (for metrics.jsonl), after
    which the running sums start again; ``explain(data, batch_size)``: what its own parameters
    learned, measured on a split (for ``mtl explain`` and ``mtl report``)."""

    @property
    def lr(self) -> float | None: ...

    def parameters(self) -> list[nn.Parameter]: ...

    def make_step(self, parts: StepParts) -> Step: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...

    def end_epoch(self) -> dict[str, Any]: ...

    def explain(self, data: SplitTensors, batch_size: int) -> dict[str, Any]: ...
