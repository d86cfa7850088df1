"""Models with behaviour histories on the generated sequences (``recipes/sequences-mmoe.yaml``),
over seeds: MMoE without histories, MMoE with attention-pooled histories (the recipe), DTRN and
its ablations (no conditional layer norms, no refinement, softmax interest pooling).

Run by hand from the repository root (about half an hour on two cores; not part of the tests):

    python benchmarks/sequence_models.py --work /tmp/seqmodels
    python benchmarks/sequence_models.py --work /tmp/seqmodels --models dtrn dtrn-no-cln --seeds 0

Each seed draws new data (``data.synthetic.seed``), a new split and a new initialisation. Every
model trains ``--epochs`` epochs (15) and keeps its best epoch by mean valid AUC (DTRN's valid
AUC can stay flat for several epochs before it rises, so early stopping would stop it too soon),
then is scored on test. For DTRN it also prints what ``mtl explain`` reports of its task-specific
bottoms on valid: the cosine between the two tasks' interests in each history, and each task's
mean refinement weight on the two topic histories (click is driven by the click history, buy by
the purchase history). ``dtrn, buy from clicks`` is the control for that measure: the same data
but purchases driven by the clicks too, so both tasks read one history.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `mtlcli` when run as a script

from mtlcli.explain.report import ExplainOptions, explain_run
from mtlcli.recipe import load_recipe
from mtlcli.train.run import evaluate_run, train_run

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "sequences-mmoe.yaml"
DTRN = "{scheme: dtrn, embedding_dim: 8, tower_units: [16]"
MODELS = {
    "mmoe, no histories": ["features.sequences={}"],
    "mmoe + attention": [],
    "dtrn": [f"model={DTRN}}}"],
    "dtrn-no-cln": [f"model={DTRN}, conditional_norm: false}}"],
    "dtrn-no-trm": [f"model={DTRN}, refine: false}}"],
    "dtrn-softmax": [f"model={DTRN}, interest: softmax}}"],
    # the control: purchases follow the clicks too, so the tasks' interests have nothing to separate
    "dtrn, buy from clicks": [f"model={DTRN}}}", "data.synthetic.buy_from=clicks"],
}
TASKS = ("click", "buy")


def one(work: Path, model: str, seed: int, epochs: int, patience: int) -> dict[str, Any]:
    sets = [
        *MODELS[model],
        f"data.synthetic.seed={seed}",
        f"data.split.seed={seed}",
        f"train.seed={seed}",
        f"train.epochs={epochs}",
        f"train.early_stopping={{patience: {patience}}}",
        f"data.cache_dir={work}/cache",
    ]
    run = work / "runs" / f"{model.replace(' ', '').replace(',', '-')}-{seed}"
    summary = train_run(load_recipe(str(RECIPE), sets), run, force=True)
    tested = evaluate_run(run, "test")
    out: dict[str, Any] = {
        "model": model,
        "seed": seed,
        "auc": {t: tested["tasks"][t]["auc"] for t in TASKS},
        "samples_per_second": summary["train_samples_per_second"],
        "best_epoch": summary["best_epoch"],
    }
    if model.startswith("dtrn"):
        bottoms = explain_run(run, "valid", ExplainOptions(grad_batches=1))["representations"]
        out["interest_cosine"] = {h: m["click"]["buy"] for h, m in bottoms["interest_cosine"].items()}
        if bottoms["refine"]:  # none without refinement
            out["refine"] = {t: {h: bottoms["refine"][t][h] for h in ("click_topics", "buy_topics")} for t in TASKS}
    return out


def cell(values: list[float], digits: int = 3) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--patience", type=int, default=15, help="early stopping (the best epoch is kept)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for model in args.models:
        for seed in args.seeds:
            result = one(args.work, model, seed, args.epochs, args.patience)
            print(json.dumps(result), file=sys.stderr, flush=True)
            results.append(result)
    print("| model | test AUC click | test AUC buy | train samples/s | best epoch |")
    print("|---|---|---|---|---|")
    for model in args.models:
        rows = [r for r in results if r["model"] == model]
        aucs = [cell([r["auc"][t] for r in rows]) for t in TASKS]
        speed = statistics.median(r["samples_per_second"] for r in rows)
        epochs = "/".join(str(r["best_epoch"]) for r in rows)
        print(f"| {model} | {' | '.join(aucs)} | {speed:,.0f} | {epochs} |")
    dtrn = [r for r in results if "interest_cosine" in r]
    if dtrn:
        print("\n| model | cos click~buy: click_topics / buy_topics / clicks / buys | "
              "refine click: click_topics / buy_topics | refine buy: click_topics / buy_topics |")  # fmt: skip
        print("|---|---|---|---|")
        for model in dict.fromkeys(r["model"] for r in dtrn):
            rows = [r for r in dtrn if r["model"] == model]
            cos = " / ".join(cell([r["interest_cosine"][h] for r in rows], 2) for h in rows[0]["interest_cosine"])
            refine = [
                " / ".join(cell([r["refine"][t][h] for r in rows], 2) for h in ("click_topics", "buy_topics"))
                if "refine" in rows[0]
                else "—"
                for t in TASKS
            ]
            print(f"| {model} | {cos} | {refine[0]} | {refine[1]} |")


if __name__ == "__main__":
    main()
