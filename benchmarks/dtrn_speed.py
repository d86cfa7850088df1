"""DTRN's training speed against MMoE + attention on the same histories, side by side.

The generated sequences of ``benchmarks/sequence_speed.py`` (same recipe and overrides, one
thread, batch 512, embedding 8), but the two models alternate: each round trains each model for
``--epochs`` epochs on the same prepared data, and the figure is the median over rounds of each
run's median epoch after the first. The ratio DTRN / MMoE + attention is what to read (the
machine's load moves the absolute figures).

Run by hand from the repository root (minutes; not part of the tests):

    python benchmarks/dtrn_speed.py
    python benchmarks/dtrn_speed.py --lengths 50 --rows 10000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `mtlcli` when run as a script

from mtlcli.data.store import prepare
from mtlcli.recipe import load_recipe
from mtlcli.train.run import train_run

MODELS = {
    "mmoe + attention": "model={scheme: mmoe, embedding_dim: 8, n_experts: 4, expert_units: [32], tower_units: [16]}",
    "dtrn": "model={scheme: dtrn, embedding_dim: 8, tower_units: [16]}",
}


def overrides(length: int, rows: int, epochs: int, cache: str) -> list[str]:
    return [
        f"data.synthetic.rows={rows}",
        f"data.synthetic.history={length}",
        f"features.sequences.click_topics.max_len={length}",
        f"features.sequences.clicks.max_len={length}",
        f"features.sequences.buy_topics.max_len={max(1, length // 3)}",
        f"features.sequences.buys.max_len={max(1, length // 3)}",
        f"train.epochs={epochs}",
        "train.early_stopping=null",
        "train.threads=1",
        f"data.cache_dir={cache}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | history length | train samples/s (median of rounds) | per round | DTRN / MMoE + attention |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for length in args.lengths:
            base = overrides(length, args.rows, args.epochs, f"{tmp}/cache")
            recipes = {name: load_recipe("recipes/sequences-mmoe.yaml", [MODELS[name], *base]) for name in args.models}
            prepared = prepare(next(iter(recipes.values())))
            speeds: dict[str, list[float]] = {name: [] for name in args.models}
            for round_ in range(args.rounds):
                for name in args.models:
                    run = Path(tmp) / f"{name}-{length}-{round_}".replace(" ", "")
                    train_run(recipes[name], run, prepared=prepared)
                    lines = (run / "metrics.jsonl").read_text().splitlines()
                    epochs = [json.loads(line)["samples_per_second"] for line in lines]
                    speeds[name].append(statistics.median(epochs[1:] or epochs))
            medians = {name: statistics.median(s) for name, s in speeds.items()}
            for name in args.models:
                ratio = medians[name] / medians["mmoe + attention"] if "mmoe + attention" in medians else float("nan")
                rounds = " / ".join(f"{s:,.0f}" for s in speeds[name])
                print(f"| {name} | {length} | {medians[name]:,.0f} | {rounds} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
