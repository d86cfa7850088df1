"""The newer schemes (AITM, PEPNet, AdaTT, STEM, HoME) against MMoE, PLE and ESMM, on the generated
click log (CTR -> CVR, the purchase observed only after a click: AITM's and ESMM's setting) and on
the generated sequences (``recipes/sequences-mmoe.yaml``'s sizes).

Run by hand from the repository root (not part of the tests), one thread per run:

    python benchmarks/click_log.py --rows 400000 --out /tmp/clicklog
    python benchmarks/new_schemes.py click --data /tmp/clicklog --work /tmp/new-schemes
    python benchmarks/new_schemes.py sequences --work /tmp/new-schemes

Click log: the recipe ``click_log.py`` writes (embedding 16, batch 2048) with at most ``--epochs``
epochs (3), keeping the best epoch by mean valid AUC and stopping after one without gain (most ids
are rare, so a second pass over them mostly overfits). Models that train the purchase over every impression (``esmm``, whose
conversion output is pCTR x pCVR, and ``aitm-entire``, AITM with its calibrator on that label)
get ``purchase`` without its click space; the others train it in the click space. Every model is
scored on the same test rows three ways: click AUC over the impressions; CVR AUC over the clicked
impressions (pCVR: the purchase output of a click-space model, pCTCVR / pCTR of an entire-space
one); CTCVR AUC over the impressions (pCTR x pCVR, or pCTCVR). Sequences: the recipe as shipped
(10 epochs, early stopping on the mean valid AUC), test AUC per task. Both print a markdown table
with the training samples/s of each run (the summary's, one seed: compare within a table only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `mtlcli` when run as a script

from mtlcli.recipe import load_recipe
from mtlcli.train.metrics import auc
from mtlcli.train.run import evaluate_run, load_run, run_data, train_run

ROOT = Path(__file__).resolve().parents[1]
SEQUENCES = ROOT / "recipes" / "sequences-mmoe.yaml"

# click log: model sections (embedding 16, as the generated recipe), and whether purchase is over every impression
CLICK: dict[str, tuple[str, bool]] = {
    "mmoe": ("{scheme: mmoe, embedding_dim: 16, n_experts: 8, expert_units: [64], tower_units: [32]}", False),
    "ple": (
        "{scheme: ple, embedding_dim: 16, n_shared_experts: 4, n_task_experts: 2, expert_units: [64], tower_units: [32]}",
        False,
    ),
    "esmm": ("{scheme: esmm, embedding_dim: 16, tower_units: [64, 32]}", True),
    "aitm": ("{scheme: aitm, embedding_dim: 16, tower_units: [64, 32]}", False),
    "aitm-entire": ("{scheme: aitm, embedding_dim: 16, tower_units: [64, 32]}", True),
    "pepnet": (
        "{scheme: pepnet, embedding_dim: 16, prior: [user, item], domain: [page], gate_units: 32, tower_units: [64, 32]}",
        False,
    ),
    "adatt": (
        "{scheme: adatt, embedding_dim: 16, levels: 2, n_task_experts: 2, n_shared_experts: 2, expert_units: [64], tower_units: [32]}",
        False,
    ),
    "stem": (
        "{scheme: stem, embedding_dim: 16, n_shared_experts: 2, n_task_experts: 2, expert_units: [64], tower_units: [32]}",
        False,
    ),
    "home": (
        "{scheme: home, embedding_dim: 16, n_shared_experts: 2, n_category_experts: 1, n_task_experts: 1, expert_units: [64], tower_units: [32]}",
        False,
    ),
}
# sequences: the recipe's sizes (embedding 8, towers of 16, experts of 32)
SEQ: dict[str, str] = {
    "mmoe": "{scheme: mmoe, embedding_dim: 8, n_experts: 4, expert_units: [32], tower_units: [16]}",
    "ple": "{scheme: ple, embedding_dim: 8, n_shared_experts: 2, n_task_experts: 1, expert_units: [32], tower_units: [16]}",
    "esmm": "{scheme: esmm, embedding_dim: 8, tower_units: [32, 16]}",
    "aitm": "{scheme: aitm, embedding_dim: 8, tower_units: [32, 16]}",
    "pepnet": "{scheme: pepnet, embedding_dim: 8, prior: [user, item], domain: [topic], gate_units: 16, tower_units: [32, 16]}",
    "adatt": "{scheme: adatt, embedding_dim: 8, levels: 2, n_task_experts: 1, n_shared_experts: 2, expert_units: [32], tower_units: [16]}",
    "stem": "{scheme: stem, embedding_dim: 8, n_shared_experts: 2, n_task_experts: 1, expert_units: [32], tower_units: [16]}",
    "home": "{scheme: home, embedding_dim: 8, n_shared_experts: 2, n_category_experts: 1, n_task_experts: 1, expert_units: [32], tower_units: [16]}",
}


@torch.no_grad()
def click_scores(run: Path, entire: bool) -> dict[str, float]:
    """Click, CVR (clicked rows) and CTCVR test AUC of a click-log run."""
    loaded = load_run(run)
    data = run_data(run, loaded).load("test")
    model = loaded.model.eval()
    probs = torch.cat([torch.sigmoid(model(batch)) for batch in data.batches(65536)])
    click = data.labels[:, 0]
    purchase = torch.where(data.label_mask[:, 1], data.labels[:, 1], torch.zeros_like(click))  # 0 without a click
    p_click, p_out = probs[:, 0], probs[:, 1]
    pcvr = p_out / p_click.clamp_min(1e-12) if entire else p_out
    pctcvr = p_out if entire else p_out * p_click
    clicked = click > 0.5
    return {
        "click": auc(p_click, click),
        "cvr": auc(pcvr[clicked], purchase[clicked]),
        "ctcvr": auc(pctcvr, purchase),
    }


def train(recipe: Path, sets: list[str], run: Path) -> dict[str, Any]:
    summary = train_run(load_recipe(str(recipe), sets), run, force=True)
    return {
        "samples_per_second": summary["train_samples_per_second"],
        "parameters": summary["parameters"],
        "epochs": f"{summary['best_epoch']}/{summary['epochs_run']}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=["click", "sequences"])
    parser.add_argument("--data", type=Path, help="the click log's directory (click_log.py --out)")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3, help="click log epochs")
    parser.add_argument("--models", nargs="+")
    parser.add_argument(
        "--set", nargs="+", default=[], help="more overrides for every run, e.g. train.early_stopping={patience: 10}"
    )
    parser.add_argument("--suffix", default="", help="appended to each model's name (runs with --set)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, dict[str, Any]] = {}
    out = args.work / f"{args.suite}.json"
    if out.is_file():
        results = json.loads(out.read_text())
    common = ["train.threads=1", f"data.cache_dir={args.work}/cache-{args.suite}", *args.set]
    if args.suite == "click":
        if args.data is None:
            parser.error("click needs --data")
        for name in args.models or list(CLICK):
            model, entire = CLICK[name]
            sets = [*common, f"model={model}", f"train.epochs={args.epochs}", "train.early_stopping={patience: 1}"]
            if entire:
                sets.append("tasks.purchase={label: purchase}")
            run = args.work / "runs" / f"click-{name}"
            result = train(args.data / "recipe.yaml", sets, run)
            results[name] = {**result, **click_scores(run, entire), "entire": entire}
            print(name, results[name], file=sys.stderr, flush=True)
            out.write_text(json.dumps(results, indent=1))
        print(
            "| model | purchase trained over | click AUC | CVR AUC (clicked) | CTCVR AUC | train samples/s | parameters |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, r in results.items():
            space = "every impression" if r["entire"] else "clicks"
            print(
                f"| `{name}` | {space} | {r['click']:.4f} | {r['cvr']:.4f} | {r['ctcvr']:.4f} | "
                f"{r['samples_per_second']:,.0f} | {r['parameters']:,} |"
            )
    else:
        for name in args.models or list(SEQ):
            run = args.work / "runs" / f"seq-{name}{args.suffix}"
            result = train(SEQUENCES, [*common, f"model={SEQ[name]}"], run)
            tested = evaluate_run(run, "test")["tasks"]
            key = name + args.suffix
            results[key] = {**result, "click": tested["click"]["auc"], "buy": tested["buy"]["auc"]}
            print(key, results[key], file=sys.stderr, flush=True)
            out.write_text(json.dumps(results, indent=1))
        print("| model | click AUC | buy AUC | train samples/s | parameters | epochs (best/run) |")
        print("|---|---|---|---|---|---|")
        for name, r in results.items():
            print(
                f"| `{name}` | {r['click']:.4f} | {r['buy']:.4f} | {r['samples_per_second']:,.0f} | {r['parameters']:,} "
                f"| {r.get('epochs', '?')} |"
            )


if __name__ == "__main__":
    main()
