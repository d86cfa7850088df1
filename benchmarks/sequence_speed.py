"""Training speed with behaviour histories: MMoE with DIN-attention pooling vs DTRN, histories of
length 50 and 200, on the generated sequences (``synthetic: {kind: sequences}``).

Run by hand from the repository root (minutes; not part of the tests):

    python benchmarks/sequence_speed.py
    python benchmarks/sequence_speed.py --lengths 50 --rows 20000 --epochs 2

Prints train samples/s (median epoch after the first) and valid AUC per model and length; one
thread, batch 512, embedding 8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `mtlcli` when run as a script

from mtlcli.recipe import load_recipe
from mtlcli.train.run import train_run

MODELS = {
    "mmoe + attention": "model={scheme: mmoe, embedding_dim: 8, n_experts: 4, expert_units: [32], tower_units: [16]}",
    "dtrn": "model={scheme: dtrn, embedding_dim: 8, tower_units: [16]}",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    print("| model | history length | train samples/s | valid AUC click / buy |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for length in args.lengths:
            for name, model in MODELS.items():
                sets = [
                    model,
                    f"data.synthetic.rows={args.rows}",
                    f"data.synthetic.history={length}",
                    f"features.sequences.click_topics.max_len={length}",
                    f"features.sequences.clicks.max_len={length}",
                    f"features.sequences.buy_topics.max_len={max(1, length // 3)}",
                    f"features.sequences.buys.max_len={max(1, length // 3)}",
                    f"train.epochs={args.epochs}",
                    "train.early_stopping=null",
                    f"data.cache_dir={tmp}/cache",
                ]
                run = Path(tmp) / f"{name}-{length}".replace(" ", "")
                summary = train_run(load_recipe("recipes/sequences-mmoe.yaml", sets), run)
                lines = (run / "metrics.jsonl").read_text().splitlines()
                speeds = [json.loads(line)["samples_per_second"] for line in lines]
                speed = statistics.median(speeds[1:] or speeds)
                valid = summary["valid"]
                print(
                    f"| {name} | {length} | {speed:,.0f} | {valid['click']['auc']:.4f} / {valid['buy']['auc']:.4f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
