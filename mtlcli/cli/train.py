"""`mtl train`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from mtlcli.cli.common import JsonOption, QuietOption, SetOption, handle_errors, warn

NprocOption = typer.Option(
    "--nproc",
    min=1,
    help="Train on N local processes (torch.distributed, gloo); train.batch_size stays the global batch.",
)
PortOption = typer.Option(
    "--port", min=1, max=65535, help="With --nproc: the localhost port the ranks meet on (default: a free one)."
)
MAX_NPROC_PER_CORE = 4  # --nproc above this many processes per core is refused: each holds a model and its data


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
    nproc: Annotated[int, NprocOption] = 1,
    experiment: Annotated[
        str | None,
        typer.Option("--experiment", help="The experiment train.loggers log into (default: the recipe's name)."),
    ] = None,
    port: Annotated[int | None, PortOption] = None,
) -> None:
    """Train the recipe's model (preprocessing first if needed) into a run directory.

    The run directory gets recipe.yaml, schema.json, model.safetensors (best epoch), metrics.jsonl
    and summary.json. Progress goes to stderr; --json prints the summary on stdout. With --nproc N
    (or under torchrun) each process trains on its slice of every global batch and rank 0 writes.
    A run that replaces another (--force) takes its place only when complete.
    """
    from mtlcli import distributed
    from mtlcli.cli.train_ranks import rank_plan, train_ranks
    from mtlcli.train.plan import PLAN_VARIABLE, handed_plan

    if resume and force:
        raise typer.BadParameter("--resume continues a run and --force replaces it: give one of them")
    if port is not None and nproc == 1:
        raise typer.BadParameter("--port is where the --nproc processes meet: give --nproc N (N > 1) with it")
    cores = os.cpu_count() or 1
    if nproc > MAX_NPROC_PER_CORE * cores:
        raise typer.BadParameter(
            f"--nproc {nproc} on {cores} cores: each process holds a model and its data; use at most {cores}"
        )
    if nproc > cores:
        warn([f"--nproc {nproc} is more processes than this machine's {cores} cores: they will share them"])
    launching = nproc > 1 and not distributed.launched()
    if launching and recipe == "-":
        raise typer.BadParameter("--nproc starts processes that each read the recipe: give a file, not '-'")
    settings = Settings(recipe, overrides or [], out, force, resume, experiment, as_json, quiet)
    plan = handed_plan()  # a rank of --nproc: its parent resolved the plan
    if launching:  # everything is checked and decided here once, then handed to the ranks
        from tempfile import TemporaryDirectory

        from mtlcli.train.launch import launch

        plan = rank_plan(settings, nproc, distributed.SINGLE)
        with TemporaryDirectory(prefix=".mtl-plan-") as folder:
            plan.write(Path(folder) / "plan.json")
            os.environ[PLAN_VARIABLE] = str(Path(folder) / "plan.json")  # the ranks inherit it
            flags = ["--quiet"] * quiet + ["--json"] * as_json + ["--resume"] * resume  # --set: for its hint
            sets = [part for item in overrides or [] for part in ("--set", item)]
            try:
                code = launch(nproc, ["train", recipe, "--out", str(out), *flags, *sets], plan.place, port)
            finally:
                del os.environ[PLAN_VARIABLE]
        if code:
            raise typer.Exit(code)
        return
    train_ranks(settings, plan)


class Settings:
    """The command line of one `mtl train`, as the ranks need it."""

    def __init__(
        self,
        recipe: str,
        overrides: list[str],
        out: Path,
        force: bool,
        resume: bool,
        experiment: str | None,
        as_json: bool,
        quiet: bool,
    ) -> None:
        self.recipe, self.overrides, self.out, self.force, self.resume = recipe, overrides, out, force, resume
        self.experiment, self.as_json, self.quiet = experiment, as_json, quiet
        self.name = "stdin" if recipe == "-" else Path(recipe).stem

    def again(self, world: int) -> list[str]:
        """The command that resumes this run."""
        sets = [part for item in self.overrides for part in ("--set", item)]
        nproc = ["--nproc", str(world)] if world > 1 else []
        return ["mtl", "train", self.recipe, "--out", str(self.out), "--resume", *nproc, *sets]
