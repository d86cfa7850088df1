"""What `mtl train` shows while it trains: a progress bar and a line per epoch, the inputs the
model reads, the end-of-training table (readable in a narrow terminal), and the stop flag that
SIGINT / SIGTERM set."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mtlcli.cli.common import err_console, fmt

if TYPE_CHECKING:
    from torch import nn

    from mtlcli.recipe import Recipe


class ConsoleReporter:
    """Progress bar per epoch and one line per epoch on stderr."""

    def __init__(self, tasks: list[str], types: list[str], binary_metric: str = "auc") -> None:
        self.tasks, self.types = tasks, types
        self.binary_metric = binary_metric  # shown per binary task: auc, or gauc when early stopping uses it
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        )
        self.bar: Any = None
        self.steps = 0

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> ConsoleReporter:
        """The recipe's tasks, showing GAUC for binary tasks when early stopping watches it."""
        stopping = recipe.train.early_stopping
        shown = "gauc" if stopping is not None and stopping.metric == "gauc" else "auc"
        return cls(list(recipe.tasks), [spec.type for spec in recipe.tasks.values()], shown)

    def on_start(self, epochs: int, steps_per_epoch: int) -> None:
        self.steps = steps_per_epoch
        self.progress.start()
        self.bar = self.progress.add_task("train", total=steps_per_epoch, epoch=1)

    def on_step(self, epoch: int, step: int) -> None:
        self.progress.update(self.bar, completed=step, epoch=epoch)

    def on_epoch(self, record: dict[str, Any], model: nn.Module, improved: bool) -> None:
        parts = [f"epoch {record['epoch']:>3}"]
        parts.append("loss " + " ".join(f"{t} {record['train_loss'][t]:.4f}" for t in self.tasks))
        parts.append("weights " + " ".join(f"{t} {record['weights'][t]:.3g}" for t in self.tasks))
        valid = record["valid"]
        metric = {
            t: (self.binary_metric, valid[t].get(self.binary_metric)) if k == "binary" else ("rmse", valid[t]["rmse"])
            for t, k in zip(self.tasks, self.types, strict=True)
        }
        parts.append("valid " + " ".join(f"{t} {m} {fmt(v)}" for t, (m, v) in metric.items()))
        parts.append(f"{record['samples_per_second']:,.0f} samples/s")
        self.progress.console.print(
            "  ".join(parts) + ("  [green]*[/]" if improved else ""), highlight=False, soft_wrap=True
        )
        self.progress.reset(self.bar, total=self.steps, epoch=record["epoch"] + 1)

    def on_checkpoint(self, state: Any, model: nn.Module, optimizer: Any, strategy: Any) -> None:
        return None

    def on_gradients(self, record: dict[str, Any]) -> None:
        return None

    def close(self) -> None:
        self.progress.stop()


def summary_table(summary: dict[str, Any]) -> Table:
    """The best epoch's valid metrics: a row per metric, a column per task (tasks are few, metrics
    many: so the table fits a narrow terminal), names folded rather than cut when it does not."""
    table = Table(title=f"best epoch {summary['best_epoch']} of {summary['epochs_run']} (valid)", title_justify="left")
    table.add_column("metric", overflow="fold")
    for task in summary["valid"]:
        table.add_column(task, justify="right", overflow="fold")
    metrics = sorted({m for v in summary["valid"].values() for m in v if m not in ("n",)})
    for metric in metrics:
        table.add_row(metric, *(fmt(values.get(metric)) for values in summary["valid"].values()))
    return table


def inputs_line(inputs: dict[str, list[str]]) -> str:
    """The model's inputs by kind, every name."""
    parts = [f"{len(names)} {kind} ({', '.join(names)})" if names else f"0 {kind}" for kind, names in inputs.items()]
    return "inputs: " + "; ".join(parts)


class StopFlag:
    """Set by SIGINT / SIGTERM while training: the loop finishes its step, checkpoints and stops.
    A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame: object) -> None:
        # only a second Ctrl-C stops at once: a SIGTERM after it (the launcher passing the user's
        # Ctrl-C on to every rank) must not cut the checkpoint short
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    @contextmanager
    def installed(self, then_ignored: bool = False) -> Iterator[None]:
        """The flag set by the signals while training; after it, the handlers before, or with
        ``then_ignored`` none (a rank of several, stopped by the launcher once one rank has
        ended: it is on its way out, and a KeyboardInterrupt would print over the launcher's word)."""
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_IGN if then_ignored else handler)
