"""Census MMoE on 1 and on 2 processes, every weighting; or CSRec, CrossDistil and gate control.

Default: whole runs through `mtl train --nproc 2` — the largest relative difference of the
per-epoch train losses and the test AUC of each. `--steps 50`: the per-step task losses of the
first 50 steps of one epoch, 2 ranks (spawned in this script, gloo) against one process, with the
same global batches — the largest relative difference per weighting. `--methods --steps 50`: the
same for the methods with steps or parts of their own (`METHODS`: CSRec alternating and joint,
CrossDistil with and without error correction, gate control), each from its census recipe, as
`mtl train` builds them (the mask search, the objective), plus the test AUC after the epoch.

Run by hand from the repository root (about 10 minutes on two cores; not part of the tests):

    python benchmarks/distributed_equivalence.py
    python benchmarks/distributed_equivalence.py --epochs 5 --weightings equal pcgrad
    python benchmarks/distributed_equivalence.py --steps 50
    python benchmarks/distributed_equivalence.py --methods --steps 50
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


# name: (recipe, --set overrides)
METHODS: dict[str, tuple[str, list[str]]] = {
    "csrec": ("census-csrec.yaml", []),
    "csrec-joint": ("census-csrec.yaml", ["model.update=joint"]),
    "crossdistil": ("census-crossdistil.yaml", []),
    "crossdistil-no-correction": ("census-crossdistil.yaml", ["objective.error_correction=false"]),
    "gate-control": ("census-gate-control.yaml", []),
}


def method_recipe(method: str) -> Any:
    from mtlcli.recipe import load_recipe

    name, sets = METHODS[method]
    return load_recipe(str(ROOT / "recipes" / name), [*sets, "train.epochs=1", "train.early_stopping=null"])


def method_losses(method: str, steps: int) -> tuple[Any, Any]:
    """One epoch of ``method`` as `mtl train` builds it: its first ``steps`` per-step losses
    [steps, T] and the test AUC [T] after the epoch."""
    import torch

    from mtlcli.data.store import prepare
    from mtlcli.models import build_model
    from mtlcli.models.base import scheme
    from mtlcli.models.blocks import use_sparse_rows
    from mtlcli.objectives.training import build_crossdistil
    from mtlcli.train.checkpoint import input_spec
    from mtlcli.train.loop import LoopState, NullObserver, build_parts, evaluate, make_step, train_loop
    from mtlcli.train.run import SPARSE_MIN_ROWS, pos_weight_tensor
    from mtlcli.weighting import build_weighting
    from tests.test_distributed import Recording

    recipe = method_recipe(method)
    prepared, settings = prepare(recipe), recipe.train
    schema, tasks, types = prepared.schema, prepared.schema.task_names, [t.type for t in prepared.schema.tasks]
    train, valid, test = prepared.load("train"), prepared.load("valid"), prepared.load("test")
    torch.manual_seed(settings.seed)
    model = build_model(recipe.model.scheme, recipe.model.params, input_spec(schema))
    if settings.sparse_embeddings is not False:
        use_sparse_rows(model, SPARSE_MIN_ROWS if settings.sparse_embeddings == "auto" else 0)
    strategy = Recording(build_weighting(recipe.loss.weighting, recipe.loss.params, tasks))
    search = scheme(model).capabilities.search
    if search is not None:
        search(train, settings.batch_size, settings.lr, settings.seed)
    objective = None
    if recipe.objective is not None:
        objective = build_crossdistil(
            recipe.objective, model, recipe.model.scheme, tasks, types, train, settings.batch_size, settings.seed,
            torch.device("cpu"),
        )  # fmt: skip
    pos_weight = pos_weight_tensor(recipe)
    parts = build_parts(
        model, strategy, settings, tasks, types, train.steps(settings.batch_size), pos_weight,
        recipe.loss.params.own_lr(), objective=objective,
    )  # fmt: skip
    train_loop(parts, make_step(parts), train, valid, types, NullObserver(), LoopState())
    metrics = evaluate(model, test, tasks, types, settings.eval_batch_size, pos_weight)
    return torch.stack(strategy.steps[:steps]), torch.tensor([metrics[t]["auc"] for t in tasks])


def methods_rank_main(rank: int, world: int, store: str, out: str, methods: list[str], steps: int) -> None:
    import torch
    from safetensors.torch import save_file

    from mtlcli import distributed

    torch.set_num_threads(1)
    distributed.join("gloo", f"file://{store}", rank, world)
    try:
        for method in methods:
            losses, aucs = method_losses(method, steps)
            if rank == 0:
                save_file({"losses": losses.contiguous(), "auc": aucs}, f"{out}/{method}.safetensors")
    finally:
        distributed.leave()


def compare_methods(methods: list[str], steps: int) -> None:
    import torch
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from mtlcli.data.store import prepare

    torch.set_num_threads(1)
    for method in methods:  # the cache, once, before the ranks read it
        prepare(method_recipe(method))
    print(f"| method | max rel. diff of the first {steps} per-step losses, 2 ranks vs 1 process "
          "| test AUC income 1 / 2 | marital 1 / 2 |")  # fmt: skip
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(methods_rank_main, args=(2, f"{tmp}/store", tmp, methods, steps), nprocs=2, join=True)
        for method in methods:
            alone, auc = method_losses(method, steps)
            saved = load_file(f"{tmp}/{method}.safetensors")
            shared, shared_auc = saved["losses"], saved["auc"]
            assert alone.shape == shared.shape == (steps, 2), (alone.shape, shared.shape)
            worst = ((shared - alone).abs() / alone.abs().clamp_min(1e-12)).max().item()
            cells = [f"{float(a):.6f} / {float(b):.6f}" for a, b in zip(auc, shared_auc, strict=True)]
            print(f"| {method} | {worst:.1e} | {cells[0]} | {cells[1]} |", flush=True)


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
    parser.add_argument("--methods", nargs="*", choices=list(METHODS), help="CSRec, CrossDistil, gate control")
    args = parser.parse_args()
    if args.methods is not None:
        compare_methods(args.methods or list(METHODS), args.steps or 50)
        return
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
