"""The plan of a training: every setting worked out once, before any rank starts.

``resolve_plan`` checks and decides: the device, the process count, the run directory (and on
``--resume`` the checkpoint's identity), the prepared data, the shards of a streamed train split,
the run's identity, the trackers' experiment. Every rank then trains from the same ``Plan``
(``mtl train --nproc`` writes it to a file the ranks read, ``MTL_PLAN``); nothing in it is
worked out again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtlcli.data.schema import DataSchema
from mtlcli.data.source import check_shards, streams
from mtlcli.data.store import Prepared, prepare
from mtlcli.distributed import resolve_device
from mtlcli.errors import ArtifactError, MtlError
from mtlcli.fileio import sha256_json, to_json, write_text
from mtlcli.objectives.training import refuse_objective
from mtlcli.recipe import Recipe
from mtlcli.train.checkpoint import read_checkpoint_identity
from mtlcli.train.rundir import RunPlace, resolve_run_dir
from mtlcli.train.tracking import check_trackers
from mtlcli.weighting import build_weighting

PLAN_VARIABLE = "MTL_PLAN"  # the plan file of the ranks `mtl train --nproc` starts


@dataclass(frozen=True)
class Plan:
    """What every rank of a training shares. ``device`` is ``cpu`` or ``cuda`` (each rank takes
    its local GPU); ``shards`` the streamed train split's shard count; ``identity`` what a
    checkpoint must match to be resumed."""

    recipe: Recipe
    place: RunPlace
    prepared: Prepared
    device: str
    world: int
    shards: int
    identity: dict[str, str]
    experiment: str
    resumed_at: tuple[int, int] | None = None  # on --resume: the checkpoint's epoch and step

    def to_json(self) -> str:
        return to_json(
            {
                "recipe": self.recipe.to_dict(),
                "place": {"path": str(self.place.path), "work": str(self.place.work),
                          "resume": self.place.resume, "made": self.place.made},
                "data": {"directory": str(self.prepared.directory), "reused": self.prepared.reused},
                "device": self.device,
                "world": self.world,
                "shards": self.shards,
                "identity": self.identity,
                "experiment": self.experiment,
                "resumed_at": self.resumed_at,
            }
        )  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> Plan:
        from mtlcli.recipe import recipe_from_dict

        spec: dict[str, Any] = json.loads(text)
        place, data = spec["place"], spec["data"]
        directory = Path(data["directory"])
        return cls(
            recipe_from_dict(spec["recipe"], "the training plan"),
            RunPlace(Path(place["path"]), Path(place["work"]), place["resume"], place["made"]),
            Prepared(directory, DataSchema.load(directory / "schema.json"), data["reused"]),
            spec["device"],
            spec["world"],
            spec["shards"],
            spec["identity"],
            spec["experiment"],
            tuple(spec["resumed_at"]) if spec["resumed_at"] is not None else None,  # type: ignore[arg-type]
        )

    def write(self, path: Path) -> None:
        write_text(path, self.to_json())


def handed_plan() -> Plan | None:
    """The plan the launcher's parent resolved for this rank (``MTL_PLAN``), if any."""
    path = os.environ.get(PLAN_VARIABLE)
    return Plan.from_json(Path(path).read_text(encoding="utf-8")) if path else None


def resolve_plan(
    recipe: Recipe,
    out: Path,
    force: bool = False,
    resume: bool = False,
    world: int = 1,
    experiment: str | None = None,
    prepared: Prepared | None = None,
    recipe_name: str = "mtl",
) -> Plan:
    """Check and decide everything a training needs before it starts (any error here comes
    before work: a missing GPU, a batch that does not split, a run directory to refuse, a
    checkpoint that does not fit)."""
    settings = recipe.train
    name = experiment or settings.experiment or recipe_name  # the trackers' experiment
    check_trackers(settings.loggers, name)
    device = resolve_device(settings.device)
    check_batch_split(settings.batch_size, world, settings.shards)
    if recipe.objective is not None:
        strategy = build_weighting(recipe.loss.weighting, recipe.loss.params, recipe.task_names)
        refuse_objective(recipe.loss.weighting, strategy, recipe.task_names)
    place = resolve_run_dir(out, force, resume)
    prepared = prepared or prepare(recipe)
    saved = read_checkpoint_identity(place.checkpoint) if resume else {}
    shards = stream_shards(settings.shards, world, saved)
    if settings.shards == "auto" and streams(prepared.file("train"), settings.loading, recipe.data.memory_budget):
        check_shards(shards, world)  # a resumed stream keeps its count (a number given is checked above)
    identity = run_identity(recipe, prepared.schema, shards)
    resumed_at = None
    if resume:
        check_resumable(place.checkpoint.parent, saved, identity)
        loop = json.loads(saved.get("loop", "{}"))
        resumed_at = (int(loop.get("epoch", 1)), int(loop.get("step", 0)))
    return Plan(recipe, place, prepared, device, world, shards, identity, name, resumed_at)


def check_batch_split(batch_size: int, processes: int, shards: int | str = "auto") -> None:
    """The global batch and ``train.shards`` (a number, before any work) against the process count."""
    if batch_size % processes:
        raise MtlError(
            f"train.batch_size ({batch_size}) does not divide evenly among the {processes} processes",
            f"train.batch_size is the global batch: make it a multiple of {processes}",
        )
    if shards != "auto":
        check_shards(int(shards), processes)


def stream_shards(setting: int | str, world: int, saved: dict[str, str]) -> int:
    """``train.shards``: a number as given; auto, one per process, or on resume the run's own
    count (the order of an epoch depends on it; a run that began before shards existed had 1)."""
    if setting != "auto":
        return int(setting)
    return int(saved.get("shards", "1")) if saved else world


def run_identity(recipe: Recipe, schema: DataSchema, shards: int = 1) -> dict[str, str]:
    """What a checkpoint must match to be resumed: the recipe (train.epochs, the loggers, the
    experiment and the device may change: a run may go on elsewhere), the data, and the shards a
    streamed train split is dealt to (``train.shards`` may say auto or the number)."""
    spec = recipe.to_dict()
    free = ("epochs", "loggers", "experiment", "device", "shards")
    spec["train"] = {k: v for k, v in spec["train"].items() if k not in free}
    return {"recipe_sha256": sha256_json(spec), "data_key": schema.data_key, "shards": str(shards)}


def check_resumable(run_dir: Path, saved: dict[str, str], identity: dict[str, str]) -> None:
    """The checkpoint's identity (``saved``) against this run's: same data, recipe and shards."""
    if saved.get("data_key") != identity["data_key"]:
        raise ArtifactError(
            f"{run_dir}: cannot resume: the data changed since the run started",
            "train into a new --out, or restore the original data",
        )
    if saved.get("recipe_sha256") != identity["recipe_sha256"]:
        raise ArtifactError(
            f"{run_dir}: cannot resume: the recipe differs from the run's recipe.yaml (only train.epochs may change)",
            f"compare with `mtl recipe show {run_dir / 'recipe.yaml'}`, or train into a new --out",
        )
    if saved.get("shards", "1") != identity["shards"]:
        raise ArtifactError(
            f"{run_dir}: cannot resume: the run streamed its train split as {saved.get('shards', '1')} "
            f"shards (train.shards), and {identity['shards']} are asked for now",
            "set train.shards: auto to go on in the run's order",
        )
