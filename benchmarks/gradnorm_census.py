"""GradNorm on every census scheme over several seeds: test AUC per task and the layer W it balances.

Run by hand from the repository root (not part of the tests):

    python benchmarks/gradnorm_census.py                     # every multi-task census recipe, seeds 0 1 2
    python benchmarks/gradnorm_census.py --schemes mmoe ple --work /tmp/gradnorm

Each ``recipes/census-<scheme>.yaml`` is trained as shipped with ``loss.weighting=gradnorm``
(default alpha), ``train.seed=S`` and one thread, then evaluated on test. ``single-task`` is left
out: it has no shared layer, so GradNorm's weights never move. Results are cached in
``WORK/results.json`` (keyed by the resolved recipe), so a rerun only trains what changed; the
table is printed as markdown on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `mtlcli` when run as a script

from benchmarks.scheme_results import CENSUS, CENSUS_TASKS, RECIPES, ResultCache, fmt, run_one
from mtlcli.data.store import prepare
from mtlcli.models import build_model
from mtlcli.recipe import load_recipe
from mtlcli.train.checkpoint import input_spec
from mtlcli.weighting.gradnorm import balanced_parameters

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = [name for name in CENSUS if name != "single-task"]


def balanced_layer(recipe_file: Path, work: Path) -> str:
    """The parameters GradNorm measures its gradient norms on (W), for this recipe's model."""
    recipe = load_recipe(recipe_file, [f"data.cache_dir={work / 'cache'}"])
    model = build_model(recipe.model.scheme, recipe.model.params, input_spec(prepare(recipe).schema))
    names = {id(p): n for n, p in model.named_parameters()}
    return ", ".join(f"{names[id(p)]} {list(p.shape)}" for p in balanced_parameters(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "gradnorm-census")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--schemes", nargs="+", default=SCHEMES, help=f"of: {', '.join(SCHEMES)}")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = ResultCache(args.work / "results.json")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    rows = ["| scheme | W (GradNorm's layer) | income AUC | marital AUC | epochs (best/run) |", "|---|---|---|---|---|"]
    for name in args.schemes:
        recipe_file = RECIPES / CENSUS[name]
        runs = [
            run_one(
                cache,
                args.work,
                f"{name}-gradnorm-seed{seed}",
                recipe_file,
                ["loss.weighting=gradnorm", f"train.seed={seed}"],
                log,
            )
            for seed in args.seeds
        ]
        aucs = [fmt([r["test"][t]["auc"] for r in runs]) for t in CENSUS_TASKS]
        epochs = ", ".join(f"{r['best_epoch']}/{r['epochs_run']}" for r in runs)
        rows.append(f"| `{name}` | {balanced_layer(recipe_file, args.work)} | {' | '.join(aucs)} | {epochs} |")
        log(rows[-1])
    print("\n".join(rows))


if __name__ == "__main__":
    main()
