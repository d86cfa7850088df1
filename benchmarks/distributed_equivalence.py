"""Census MMoE on 1 and on 2 processes, every weighting.

Default: whole runs through `mtl train --nproc 2` — the largest relative difference of the
per-epoch train losses and the test AUC of each. `--steps 50`: the per-step task losses of the
first 50 steps of one epoch, 2 ranks (spawned in this script, gloo) against one process, with the
same global batches — the largest relative difference per weighting.

Run by hand from the repository root (about 10 minutes on two cores; not part of the tests):

    python benchmarks/distributed_equivalence.py
    python benchmarks/distributed_equivalence.py --epochs 5 --weightings equal pcgrad
    python benchmarks/distributed_equivalence.py --steps 50
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `mtlcli` when run as a script

from mtlcli.weighting import WEIGHTINGS  # noqa: E402


def run(
    work: Path, name: str, weighting: str, epochs: int, nproc: int
) -> tuple[list[dict[str, float]], dict[str, float]]:
    out = work / name
    sets = [f"loss.weighting={weighting}", f"train.epochs={epochs}", "train.early_stopping=null", "train.threads=1",
            f"data.cache_dir={work / 'cache'}"]  # fmt: skip
    args = [sys.executable, "-m", "mtlcli", "train", "recipes/census-mmoe.yaml", "--out", str(out), "--force", "-q"]
    args += [part for s in sets for part in ("--set", s)] + (["--nproc", str(nproc)] if nproc > 1 else [])
    subprocess.run(args, cwd=ROOT, check=True)
    tested = subprocess.run(
        [sys.executable, "-m", "mtlcli", "eval", str(out), "--split", "test", "--json"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    losses = [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return losses, {t: m["auc"] for t, m in json.loads(tested.stdout)["tasks"].items()}


def step_losses(weighting: str, steps: int) -> Any:
    """The first ``steps`` per-step losses [steps, T] of census MMoE with ``weighting``."""
    import torch

    from mtlcli.data.store import prepare
    from mtlcli.models import build_model
    from mtlcli.recipe import load_recipe
    from mtlcli.train.checkpoint import input_spec
    from mtlcli.train.loop import NullObserver, fit
    from mtlcli.weighting import build_weighting
    from tests.test_distributed import Recording

    recipe = load_recipe(str(ROOT / "recipes" / "census-mmoe.yaml"), [f"loss.weighting={weighting}"])
    prepared = prepare(recipe)
    schema = prepared.schema
    train, valid = prepared.load("train"), prepared.load("valid")
    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe.model.scheme, recipe.model.params, input_spec(schema))
    strategy = Recording(build_weighting(weighting, recipe.loss.params, schema.task_names))
    settings = recipe.train.model_copy(update={"epochs": 1, "early_stopping": None})
    types = [t.type for t in schema.tasks]
    fit(model, strategy, train, valid, settings, schema.task_names, types, NullObserver())
    return torch.stack(strategy.steps[:steps])


def rank_main(rank: int, world: int, store: str, out: str, weightings: list[str], steps: int) -> None:
    import torch
    from safetensors.torch import save_file

    from mtlcli import distributed

    torch.set_num_threads(1)
    distributed.join("gloo", f"file://{store}", rank, world)
    try:
        for weighting in weightings:
            losses = step_losses(weighting, steps)
            if rank == 0:
                save_file({"losses": losses.contiguous()}, f"{out}/{weighting}.safetensors")
    finally:
        distributed.leave()


def compare_steps(weightings: list[str], steps: int) -> None:
    import torch
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    print(f"| weighting | max rel. diff of the first {steps} per-step losses, 2 ranks vs 1 process |")
    print("|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(rank_main, args=(2, f"{tmp}/store", tmp, weightings, steps), nprocs=2, join=True)
        for weighting in weightings:
            alone = step_losses(weighting, steps)
            shared = load_file(f"{tmp}/{weighting}.safetensors")["losses"]
            worst = ((shared - alone).abs() / alone.abs().clamp_min(1e-12)).max().item()
            print(f"| {weighting} | {worst:.1e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--weightings", nargs="+", default=WEIGHTINGS.names())
    parser.add_argument("--steps", type=int, help="compare the first N per-step losses instead of whole runs")
    args = parser.parse_args()
    if args.steps:
        compare_steps(args.weightings, args.steps)
        return
    print("| weighting | max rel. diff of epoch train losses | test AUC income 1 / 2 processes | marital 1 / 2 |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for weighting in args.weightings:
            one_losses, one = run(work, "one", weighting, args.epochs, 1)
            two_losses, two = run(work, "two", weighting, args.epochs, 2)
            worst = max(
                abs(b[t] - a[t]) / max(abs(a[t]), 1e-12) for a, b in zip(one_losses, two_losses, strict=True) for t in a
            )
            cells = [f"{one[t]:.6f} / {two[t]:.6f}" for t in ("income", "marital")]
            print(f"| {weighting} | {worst:.1e} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
