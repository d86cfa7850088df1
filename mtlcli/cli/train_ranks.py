"""`mtl train` on this process: the plan resolved (or handed over), the rank trained, its end said."""

from __future__ import annotations

import os
import shlex
import signal
import sys
from contextlib import nullcontext
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from mtlcli.cli.common import err_console, print_json, warn
from mtlcli.cli.train_console import ConsoleReporter, StopFlag, inputs_line, summary_table

if TYPE_CHECKING:
    from mtlcli.cli.train import Settings
    from mtlcli.distributed import Ranks
    from mtlcli.train.plan import Plan


def rank_plan(settings: Settings, world: int, ranks: Ranks) -> Plan:
    """The plan, resolved by rank 0 (or the parent of --nproc ranks), shared with the other ranks
    of a bare torchrun; an error is raised by rank 0 and said once."""
    from mtlcli.errors import MtlError
    from mtlcli.recipe import load_recipe
    from mtlcli.train.plan import Plan, resolve_plan

    failure: MtlError | None = None
    plan = None
    if ranks.writes:
        try:
            loaded = load_recipe(settings.recipe, settings.overrides)
            with err_console.status("preprocessing", spinner="dots") if not settings.quiet else nullcontext():
                plan = resolve_plan(
                    loaded, settings.out, settings.force, settings.resume, world, settings.experiment,
                    recipe_name=settings.name,
                )  # fmt: skip
        except MtlError as exc:
            failure = exc
    if ranks.active:
        text = ranks.share(plan.to_json() if plan is not None else "")
        plan = Plan.from_json(text) if text else None
    if failure is not None:
        raise failure
    if plan is None:
        raise typer.Exit(2)  # rank 0 said why
    return plan


def train_ranks(settings: Settings, plan: Plan | None) -> None:
    """Join the other ranks when there are some (NCCL between GPUs, gloo between CPU processes),
    then train this one."""
    from mtlcli import distributed

    ranks = distributed.SINGLE
    if distributed.launched():
        from mtlcli.recipe import load_recipe

        # a bare torchrun hands no plan: the device is read here to pick the backend, the rest from rank 0
        kind = plan.device if plan is not None else distributed.resolve_device(
            load_recipe(settings.recipe, settings.overrides).train.device
        )  # fmt: skip
        device = distributed.rank_device(kind)
        if device.type == "cuda":
            import torch

            torch.cuda.set_device(device)
        ranks = distributed.join("nccl" if device.type == "cuda" else "gloo", device=str(device))
    try:
        _train(plan or rank_plan(settings, ranks.world, ranks), settings, ranks)
    finally:
        if ranks.active:
            # when one rank ends, the launcher stops the others with SIGTERM; this one is on its way
            # out already, and a signal during the interpreter's exit would print a traceback
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        distributed.leave()


def _train(plan: Plan, settings: Settings, ranks: Ranks) -> None:
    from torch.distributed import DistError

    from mtlcli.distributed import SameOnEveryRank
    from mtlcli.train.loop import TrainingInterrupted
    from mtlcli.train.run import model_inputs, run_plan

    quiet = settings.quiet or not ranks.writes
    schema = plan.prepared.schema
    if not quiet:
        err_console.print(f"data: {plan.prepared.directory} ({'cached' if plan.prepared.reused else 'preprocessed'})")
        err_console.print(escape(inputs_line(model_inputs(schema))), highlight=False, soft_wrap=True)
    if ranks.writes:
        warn(schema.warnings)
    reporter = None if quiet else ConsoleReporter.for_recipe(plan.recipe)
    stop = StopFlag()
    try:
        with stop.installed(then_ignored=ranks.active):
            summary = run_plan(plan, ranks, [reporter] if reporter is not None else [], stop)
    except TrainingInterrupted as exc:
        if reporter is not None:
            reporter.close()
        if ranks.writes:
            again = " ".join(shlex.quote(a) for a in settings.again(ranks.world))
            kept = f"\n  {escape(exc.hint)}" if exc.hint else ""
            err_console.print(f"[yellow]{escape(exc.message)}[/]{kept}\n  resume with: {escape(again)}", soft_wrap=True)
        raise typer.Exit(130) from None
    except SameOnEveryRank:
        if ranks.writes:
            raise
        raise typer.Exit(2) from None  # rank 0 says it
    except (DistError, RuntimeError) as exc:
        if not ranks.active:
            raise
        # a collective failed (gloo raises a plain RuntimeError when a peer's connection closes)
        from mtlcli.train.launch import LOST_PEER, lost_peer, under_launcher
        from mtlcli.train.rundir import kept as run_kept

        if under_launcher():  # the launcher names the rank that went first
            if reporter is not None:
                reporter.close()
            # the process group is broken: tearing it down can abort in C++ ("terminate called ...")
            # and print over the launcher's line; the run was settled as the error left run_plan
            sys.stderr.flush()
            os._exit(LOST_PEER)
        raise lost_peer(ranks.rank, exc, run_kept(plan.place)) from None
    finally:
        if reporter is not None:
            reporter.close()
    if ranks.writes:
        warn([w for w in summary["warnings"] if w not in schema.warnings])
    if not quiet:
        err_console.print(summary_table(summary))
        err_console.print(
            f"{summary['train_samples_per_second']:,.0f} train samples/s; model in [bold]{plan.place.path}[/]",
            highlight=False,
        )
    if settings.as_json and ranks.writes:
        print_json(summary)
