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

    from mtlcli.distributed import Ranks
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
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc",
            min=1,
            help="Train on N local processes (torch.distributed, gloo); train.batch_size stays the global batch.",
        ),
    ] = 1,
    experiment: Annotated[
        str | None,
        typer.Option("--experiment", help="The experiment train.loggers log into (default: the recipe's name)."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            "--port", min=1, max=65535, help="With --nproc: the localhost port the ranks meet on (default: a free one)."
        ),
    ] = None,
) -> None:
    """Train the recipe's model (preprocessing first if needed) into a run directory.

    The run directory gets recipe.yaml, schema.json, model.safetensors (best epoch), metrics.jsonl
    and summary.json. Progress goes to stderr; --json prints the summary on stdout. With --nproc N
    (or under torchrun) each process trains on its slice of every global batch and rank 0 writes.
    """
    from mtlcli import distributed

    if resume and force:
        raise typer.BadParameter("--resume continues a run and --force replaces it: give one of them")
    launching = nproc > 1 and not distributed.launched()
    if launching and recipe == "-":
        raise typer.BadParameter("--nproc starts processes that each read the recipe: give a file, not '-'")
    loaded = load_recipe(recipe, overrides or [])
    device = distributed.training_device(loaded.train.device)  # a missing GPU is said before any work
    if launching:  # the recipe, the batch split and the device are checked here once, not once per rank
        from mtlcli.train.launch import launch
        from mtlcli.train.run import check_batch_split

        check_batch_split(loaded.train.batch_size, nproc, loaded.train.shards)
        flags = [flag for flag, on in (("--force", force), ("--resume", resume), ("--json", as_json)) if on]
        flags += ["--quiet"] if quiet else []
        flags += ["--experiment", experiment] if experiment else []
        code = launch(nproc, ["train", recipe, "--out", str(out), *flags, *_set_args(overrides)], port)
        if code:
            raise typer.Exit(code)
        return
    ranks = distributed.SINGLE
    if distributed.launched():  # NCCL between GPUs, gloo between CPU processes
        if device.type == "cuda":
            import torch

            torch.cuda.set_device(device)
        ranks = distributed.join("nccl" if device.type == "cuda" else "gloo", device=str(device))
    try:
        quiet = quiet or not ranks.writes
        _train(loaded, recipe, out, force, resume, overrides, as_json and ranks.writes, quiet, ranks, experiment)
    finally:
        if ranks.active:
            # when one rank ends, the launcher stops the others with SIGTERM; this one is on its way
            # out already, and a signal during the interpreter's exit would print a traceback
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        distributed.leave()


def _train(
    loaded: Recipe,
    recipe: str,
    out: Path,
    force: bool,
    resume: bool,
    overrides: list[str] | None,
    as_json: bool,
    quiet: bool,
    ranks: Ranks,
    experiment: str | None = None,
) -> None:
    from torch.distributed import DistError

    from mtlcli.data.store import prepare  # heavy imports (torch) only when a command runs
    from mtlcli.distributed import SameOnEveryRank
    from mtlcli.errors import MtlError
    from mtlcli.train.loop import TrainingInterrupted
    from mtlcli.train.run import check_run_dir, train_run

    # rank 0 checks the run directory and preprocesses; the others then find the cache
    failure: MtlError | None = None
    prepared = None
    if ranks.writes:
        try:
            if not resume:
                check_run_dir(out, force)
            with err_console.status("preprocessing", spinner="dots") if not quiet else _null():
                prepared = prepare(loaded)
        except MtlError as exc:
            failure = exc
    if ranks.any(failure is not None):
        if failure is not None:
            raise failure
        raise typer.Exit(2)  # rank 0 said why
    if prepared is None:
        prepared = prepare(loaded)
    if not quiet:
        err_console.print(f"data: {prepared.directory} ({'cached' if prepared.reused else 'preprocessed'})")
    warn(prepared.schema.warnings)
    reporter = None if quiet else ConsoleReporter.for_recipe(loaded)
    stop = StopFlag()
    try:
        with stop.installed():
            name = experiment or loaded.train.experiment or ("stdin" if recipe == "-" else Path(recipe).stem)
            summary = train_run(
                loaded,
                out,
                force=force,
                observer=reporter,
                prepared=prepared,
                resume=resume,
                stop_requested=stop,
                experiment=name,
            )
    except TrainingInterrupted as exc:
        if reporter is not None:
            reporter.close()
        if ranks.writes:
            nproc = ["--nproc", str(ranks.world)] if ranks.active else []
            again = " ".join(
                shlex.quote(a)
                for a in ["mtl", "train", recipe, "--out", str(out), "--resume", *nproc, *_set_args(overrides)]
            )
            err_console.print(f"[yellow]{escape(exc.message)}[/]\n  resume with: {escape(again)}", soft_wrap=True)
        raise typer.Exit(130) from None
    except SameOnEveryRank:
        if ranks.writes:
            raise
        raise typer.Exit(2) from None  # rank 0 says it
    except (DistError, RuntimeError) as exc:
        if not ranks.active:
            raise
        # a collective failed (gloo raises a plain RuntimeError when a peer's connection closes)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MtlError(f"rank {ranks.rank}: lost another rank of the run ({first[:200]})") from None
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
        # only a second Ctrl-C stops at once: a SIGTERM after it (the launcher passing the user's
        # Ctrl-C on to every rank) must not cut the checkpoint short
        if self.requested and signum == signal.SIGINT:
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
