"""What watches the training loop: one protocol, and a plain list of observers that the loop
tells everything (the console, the run directory's writer, each experiment tracker)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from torch import nn

    from mtlcli.train.loop import LoopState
    from mtlcli.weighting.base import WeightingStrategy


class Observer(Protocol):
    def on_start(self, epochs: int, steps_per_epoch: int) -> None: ...

    def on_step(self, epoch: int, step: int) -> None: ...

    def on_epoch(self, record: dict[str, Any], model: nn.Module, improved: bool) -> None: ...

    def on_checkpoint(self, state: LoopState, model: nn.Module, optimizer: Any, strategy: WeightingStrategy) -> None:
        """``optimizer`` is the run's ``TrainingOptimizer``."""
        ...

    def on_gradients(self, record: dict[str, Any]) -> None: ...


class NullObserver:
    """Observes nothing; a base for observers that want one or two of the calls."""

    def on_start(self, epochs: int, steps_per_epoch: int) -> None:
        return None

    def on_step(self, epoch: int, step: int) -> None:
        return None

    def on_epoch(self, record: dict[str, Any], model: nn.Module, improved: bool) -> None:
        return None

    def on_checkpoint(self, state: LoopState, model: nn.Module, optimizer: Any, strategy: WeightingStrategy) -> None:
        return None

    def on_gradients(self, record: dict[str, Any]) -> None:
        return None


class Observers(list[Observer]):
    """A plain list of observers that is itself an observer: each call goes to every member, in order."""

    def on_start(self, epochs: int, steps_per_epoch: int) -> None:
        for observer in self:
            observer.on_start(epochs, steps_per_epoch)

    def on_step(self, epoch: int, step: int) -> None:
        for observer in self:
            observer.on_step(epoch, step)

    def on_epoch(self, record: dict[str, Any], model: nn.Module, improved: bool) -> None:
        for observer in self:
            observer.on_epoch(record, model, improved)

    def on_checkpoint(self, state: LoopState, model: nn.Module, optimizer: Any, strategy: WeightingStrategy) -> None:
        for observer in self:
            observer.on_checkpoint(state, model, optimizer, strategy)

    def on_gradients(self, record: dict[str, Any]) -> None:
        for observer in self:
            observer.on_gradients(record)
