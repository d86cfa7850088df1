"""Training throughput of every loss-weighting strategy relative to `equal`, on census MMoE.

Run by hand from the repository root (not part of the tests):

    python benchmarks/weighting_speed.py [--rounds 3] [--epochs 2] [NAME[:KEY=VALUE,...] ...]
    python benchmarks/weighting_speed.py --nproc 2 --epochs 3 [NAME ...]     # on 2 processes

``--set model.expert_units=[256,128]`` changes the reference model (MMoE, 8 experts of 16 units).
A name may carry strategy parameters, e.g. ``mgda:upper_bound=true`` (MGDA-UB); with no names it
runs every registered strategy with its defaults, and MGDA-UB.

Each round trains every strategy for a few epochs in turn (interleaved, so that a busy machine
slows them alike); the figure per strategy is its fastest epoch over all rounds, the least
disturbed one, and the ratio to `equal`'s. Prints a JSON object.

With ``--nproc N`` (N > 1) each strategy trains by ``mtl train --nproc N`` (the project's
launcher: N gloo processes, one thread each, the run's exchange as in any distributed run;
``benchmarks.distributed_speed.train``), and a run's figure is its median epoch after the first
(the first one pays the processes' start); the strategy's figure is its best run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` when run as a script

from benchmarks.distributed_speed import train
from benchmarks.train_speed import REFERENCE
from mtlcli.data.store import prepare
from mtlcli.models import build_model
from mtlcli.recipe import load_recipe
from mtlcli.train.checkpoint import input_spec
from mtlcli.train.loop import NullObserver, fit
from mtlcli.weighting import WEIGHTINGS, build_weighting


def epoch_speeds(recipe_file: str, spec: str, epochs: int, overrides: list[str] | None = None) -> list[float]:
    name, _, params = spec.partition(":")
    extra = [f"loss.{pair}" for pair in params.split(",") if pair]
    recipe = load_recipe(
        recipe_file,
        [*REFERENCE, *(overrides or []), f"train.epochs={epochs}", "train.threads=1", f"loss.weighting={name}", *extra],
    )
    prepared = prepare(recipe)
    torch.manual_seed(recipe.train.seed)
    torch.set_num_threads(1)
    schema = prepared.schema
    model = build_model(recipe.model.scheme, recipe.model.params, input_spec(schema))
    strategy = build_weighting(recipe.loss.weighting, recipe.loss.params, schema.task_names)
    types = [t.type for t in schema.tasks]
    result = fit(
        model,
        strategy,
        prepared.load("train"),
        prepared.load("valid"),
        recipe.train,
        schema.task_names,
        types,
        NullObserver(),
    )
    return [record["samples_per_second"] for record in result.history]


def run_speed(recipe_file: str, spec: str, epochs: int, nproc: int, work: Path, overrides: list[str]) -> list[float]:
    """Train samples/s of ``mtl train --nproc`` with strategy ``spec`` (one figure: the median
    epoch after the first)."""
    name, _, params = spec.partition(":")
    sets = [*REFERENCE, *overrides, f"train.epochs={epochs}", f"loss.weighting={name}"]
    sets += [f"loss.{pair}" for pair in params.split(",") if pair]
    return [train(recipe_file, work / "run", work / "cache", nproc, sets)["samples_per_second"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=None)
    parser.add_argument("--recipe", default="recipes/census-mmoe.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=1, help="processes (mtl train --nproc); 1: in this process")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override after the reference model's"
    )
    args = parser.parse_args()
    names = args.names or ["equal", *(n for n in WEIGHTINGS.names() if n != "equal"), "mgda:upper_bound=true"]
    speeds: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name in names:
                if args.nproc > 1:
                    speeds[name] += run_speed(args.recipe, name, args.epochs, args.nproc, Path(tmp), args.set)
                else:
                    speeds[name] += epoch_speeds(args.recipe, name, args.epochs, args.set)
    base = max(speeds["equal"]) if "equal" in speeds else float("nan")
    report = {
        name: {
            "best_samples_per_second": max(values),
            "median_samples_per_second": statistics.median(values),
            "relative_to_equal": max(values) / base,
        }
        for name, values in speeds.items()
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
