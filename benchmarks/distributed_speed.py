"""Training on 1 and 2 processes (`mtl train --nproc`), one thread each, in one session: train
samples/s of the median epoch, the wall time of an epoch, and their ratio; then what each
weighting strategy adds per step (the time of a 2-process step with it over one with `equal`,
and the floats it exchanges).

Run by hand from the repository root (minutes; not part of the tests):

    python benchmarks/distributed_speed.py
    python benchmarks/distributed_speed.py --click-log /tmp/cl2m/recipe.yaml   # benchmarks/click_log.py

The census recipe is recipes/census-mmoe.yaml (3 epochs); the click log is read from the recipe
that benchmarks/click_log.py writes (1 epoch); with --stream also streamed in windows of 262,144
rows, where each of 2 processes reads its own shard (train.shards: auto). Every run uses the same
cache, prepared first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRADIENT = ["pcgrad", "mgda", "cagrad", "metabalance", "gradnorm"]


def train(recipe: str, run: Path, cache: Path, nproc: int, sets: list[str]) -> dict[str, float]:
    args = [sys.executable, "-m", "mtlcli", "train", recipe, "--out", str(run), "--force", "--quiet", "--json"]
    args += ["--nproc", str(nproc)] if nproc > 1 else []
    for item in ["train.threads=1", "train.early_stopping=null", f"data.cache_dir={cache}", *sets]:
        args += ["--set", item]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = lines[1:] or lines
    return {
        "samples_per_second": statistics.median(e["samples_per_second"] for e in epochs),
        "epoch_seconds": statistics.median(e["seconds"] for e in epochs),
    }


def shared_floats(recipe: str, sets: list[str]) -> tuple[int, int]:
    """(all trainable floats, floats of the shared parameters) of the recipe's model."""
    sys.path.insert(0, str(ROOT))
    from mtlcli.data.store import prepare
    from mtlcli.models import build_model
    from mtlcli.models.base import scheme
    from mtlcli.recipe import load_recipe
    from mtlcli.train.checkpoint import input_spec

    loaded = load_recipe(recipe, sets)
    prepared = prepare(loaded)
    model = build_model(loaded.model.scheme, loaded.model.params, input_spec(prepared.schema))
    shared = scheme(model).parameter_groups()["shared"]
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in shared.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--click-log", help="the recipe written by benchmarks/click_log.py")
    parser.add_argument("--skip-strategies", action="store_true")
    parser.add_argument(
        "--stream", action="store_true", help="also the click log streamed (each process reads its own shard)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        data = [("census", "recipes/census-mmoe.yaml", ["train.epochs=3"])]
        if args.click_log:
            data.append(("click log", args.click_log, ["train.epochs=1"]))
            if args.stream:
                streamed = ["train.epochs=1", "train.loading=stream", "train.shuffle_buffer=262144"]
                data.append(("click log, streamed", args.click_log, streamed))
        print("| data | processes | train samples/s | epoch seconds | ratio to 1 process |")
        print("|---|---|---|---|---|")
        for name, recipe, sets in data:
            one = train(recipe, Path(tmp) / "one", cache, 1, sets)
            two = train(recipe, Path(tmp) / "two", cache, 2, sets)
            for n, got in ((1, one), (2, two)):
                ratio = got["samples_per_second"] / one["samples_per_second"]
                print(f"| {name} | {n} | {got['samples_per_second']:,.0f} | {got['epoch_seconds']:.2f} | {ratio:.2f} |")
        if args.skip_strategies:
            return
        recipe, sets = "recipes/census-mmoe.yaml", ["train.epochs=3"]
        total, shared = shared_floats(recipe, [*sets, f"data.cache_dir={cache}"])
        print(f"\ncensus MMoE: {total:,} trainable floats, {shared:,} shared; 2 processes, one thread each")
        print("\n| weighting | step time vs equal | floats exchanged per step besides the gradient sum |")
        print("|---|---|---|")
        base = train(recipe, Path(tmp) / "equal", cache, 2, sets)["epoch_seconds"]
        extra = {"pcgrad": "T × shared", "mgda": "T × shared", "cagrad": "T × shared", "metabalance": "T × shared",
                 "gradnorm": "T × last shared layer", "uncertainty": "none", "dwa": "none", "rlw": "none"}  # fmt: skip
        for weighting in ["uncertainty", "dwa", "rlw", *GRADIENT]:
            took = train(recipe, Path(tmp) / weighting, cache, 2, [*sets, f"loss.weighting={weighting}"])
            print(f"| {weighting} | {took['epoch_seconds'] / base:.2f} | {extra[weighting]} |")


if __name__ == "__main__":
    main()
