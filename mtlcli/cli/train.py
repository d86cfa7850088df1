"""`mtl train`."""

from __future__ import annotations

import shlex
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mtlcli.cli.common import JsonOption, QuietOption, SetOption, err_console, fmt, handle_errors, print_json, warn
from mtlcli.recipe import load_recipe

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
    table = Table(title=f"best epoch {summary['best_epoch']} of {summary['epochs_run']} (valid)", title_justify="left")
    table.add_column("task")
    metrics = sorted({m for v in summary["valid"].values() for m in v if m not in ("n",)})
    for metric in metrics:
        table.add_column(metric, justify="right")
    for task, values in summary["valid"].items():
        table.add_row(task, *(fmt(values.get(m)) for m in metrics))
    return table


@handle_errors
def command(
    recipe: Annotated[str, typer.Argument(help="Recipe file ('-' for stdin).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to create.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run directory.")] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the interrupted run in --out from its last checkpoint.")
    ] = False,
    overrides: SetOption = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train the recipe's model (preprocessing first if needed) into a run directory.

    The run directory gets recipe.yaml, schema.json, model.safetensors (best epoch), metrics.jsonl
    and summary.json. Progress goes to stderr; --json prints the summary on stdout.
    """
    from mtlcli.data.store import prepare  # heavy imports (torch) only when a command runs
    from mtlcli.train.loop import TrainingInterrupted
    from mtlcli.train.run import check_run_dir, train_run

    if resume and force:
        raise typer.BadParameter("--resume continues a run and --force replaces it: give one of them")
    loaded = load_recipe(recipe, overrides or [])
    if not resume:
        check_run_dir(out, force)
    with err_console.status("preprocessing", spinner="dots") if not quiet else _null():
        prepared = prepare(loaded)
    if not quiet:
        err_console.print(f"data: {prepared.directory} ({'cached' if prepared.reused else 'preprocessed'})")
    warn(prepared.schema.warnings)
    reporter = None if quiet else ConsoleReporter.for_recipe(loaded)
    stop = StopFlag()
    try:
        with stop.installed():
            summary = train_run(
                loaded, out, force=force, observer=reporter, prepared=prepared, resume=resume, stop_requested=stop
            )
    except TrainingInterrupted as exc:
        if reporter is not None:
            reporter.close()
        again = " ".join(
            shlex.quote(a) for a in ["mtl", "train", recipe, "--out", str(out), "--resume", *_set_args(overrides)]
        )
        err_console.print(f"[yellow]{escape(exc.message)}[/]\n  resume with: {escape(again)}", soft_wrap=True)
        raise typer.Exit(130) from None
    finally:
        if reporter is not None:
            reporter.close()
    if not quiet:
        err_console.print(summary_table(summary))
        err_console.print(
            f"{summary['train_samples_per_second']:,.0f} train samples/s; model in [bold]{out}[/]", highlight=False
        )
    if as_json:
        print_json(summary)


class StopFlag:
    """Set by SIGINT / SIGTERM while training: the loop finishes its step, checkpoints and stops.
    A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _set_args(overrides: list[str] | None) -> list[str]:
    return [part for item in overrides or [] for part in ("--set", item)]


def _null() -> Any:
    from contextlib import nullcontext

    return nullcontext()
