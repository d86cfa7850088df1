"""Training throughput on the census MMoE recipe: train samples/second and peak memory.

Run by hand from the repository root (not part of the tests; 2-core timings are noisy, so
compare ratios from one run and look at medians):

    python benchmarks/train_speed.py                      # mtl only
    python benchmarks/train_speed.py --baseline rechub    # also torch-rechub's MMOE trainer, if installed

The model is the issue's reference: 8 experts of 16 units, towers of 8, embedding size 4,
batch size 1024, on the census protocol's 59,856 training rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` when run as a script

from mtlcli.data.store import prepare
from mtlcli.recipe import load_recipe
from mtlcli.train.run import train_run

REFERENCE = [
    "model.scheme=mmoe",
    "model.embedding_dim=4",
    "model.n_experts=8",
    "model.expert_units=[16]",
    "model.tower_units=[8]",
    "train.batch_size=1024",
    "train.early_stopping=null",
]


def measure_mtl(recipe_file: str, epochs: int, threads: int, extra: list[str]) -> dict[str, float]:
    recipe = load_recipe(recipe_file, [*REFERENCE, f"train.epochs={epochs}", f"train.threads={threads}", *extra])
    prepared = prepare(recipe)
    with tempfile.TemporaryDirectory() as tmp:
        summary = train_run(recipe, Path(tmp) / "run", prepared=prepared)
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
    per_epoch = [json.loads(line)["samples_per_second"] for line in lines]
    return {
        "samples_per_second": summary["train_samples_per_second"],
        "median_epoch_samples_per_second": statistics.median(per_epoch[1:] or per_epoch),
        "valid_auc_income": summary["valid"]["income"]["auc"],
    }


def measure_rechub(recipe_file: str, epochs: int, threads: int) -> dict[str, float]:
    """torch-rechub 0.9.0's MMOE and MTLTrainer on the same encoded census data."""
    from benchmarks.rechub_baseline import run_rechub  # imported lazily: optional dependency

    return run_rechub(recipe_file, epochs, threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/census-mmoe.yaml")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline", choices=["none", "rechub"], default="none")
    parser.add_argument("--set", action="append", default=[], help="extra recipe overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    ours = measure_mtl(args.recipe, args.epochs, args.threads, args.set)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"mtl      train samples/s {ours['samples_per_second']:>10,.0f}  (median epoch {ours['median_epoch_samples_per_second']:,.0f})",
        file=sys.stderr,
    )
    print(f"mtl      peak memory {peak_mib:,.0f} MiB; wall {time.perf_counter() - started:.1f} s", file=sys.stderr)
    result = {"mtl": ours, "peak_memory_mib": peak_mib, "threads": args.threads, "epochs": args.epochs}
    if args.baseline == "rechub":
        theirs = measure_rechub(args.recipe, args.epochs, args.threads)
        ratio = ours["median_epoch_samples_per_second"] / theirs["median_epoch_samples_per_second"]
        print(
            f"rechub   train samples/s {theirs['samples_per_second']:>10,.0f}  (median epoch {theirs['median_epoch_samples_per_second']:,.0f})",
            file=sys.stderr,
        )
        print(f"speed-up mtl / torch-rechub: {ratio:.1f}x", file=sys.stderr)
        result |= {"rechub": theirs, "speedup": ratio}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
