"""A production-shaped click log, written as Parquet shards: impressions of items to users with
context, a click label and a purchase label inside the click space, both depending on the ids
(each user and item has a hidden taste vector), so that embeddings matter.

Run by hand from the repository root (not part of the tests):

    python benchmarks/click_log.py --rows 2000000 --out /tmp/clicklog        # 2M rows, 8 shards
    python benchmarks/click_log.py --rows 20000000 --users 1000000 --items 200000 --out /tmp/clicklog20m

Columns: ``user`` (Zipf-distributed activity over ``--users``), ``item`` (Zipf popularity over
``--items``), ``category`` (of the item), ``brand`` (of the item), ``hour``, ``weekday``,
``device``, ``region``, ``page``, ``position`` (slot on the page), ``price`` and ``user_age``
(numeric), ``split`` (``train``/``valid``/``test`` by day: the last two days are valid and test),
and the labels ``click`` and ``purchase`` (purchase is 0 without a click). Shards are generated
one at a time, so memory stays bounded by ``--shard-rows``. Also writes ``recipe.yaml`` beside
the shards: an MMoE recipe over every column, click and purchase (purchase in the click space).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `mtlcli` when run as a script

from mtlcli.fileio import write_text

TASTE = 8  # dimensions of the hidden user and item taste vectors


def zipf_ids(rng: np.random.Generator, n: int, size: int, a: float = 1.2) -> np.ndarray:
    """Ids 0..n-1 with Zipf-like frequencies (id 0 most frequent), ``size`` draws."""
    return np.minimum(rng.zipf(a, size) - 1, n - 1)


def shard(
    rng: np.random.Generator, rows: int, users: int, items: int, taste: dict[str, np.ndarray], day: np.ndarray
) -> pl.DataFrame:
    user = zipf_ids(rng, users, rows)
    item = zipf_ids(rng, items, rows, a=1.1)
    item = (item * 7919) % items  # popularity not in id order
    position = rng.integers(1, 21, rows)
    affinity = (taste["user"][user] * taste["item"][item]).sum(1) / np.sqrt(TASTE)
    logit = -2.2 + 1.2 * affinity - 0.06 * position + 0.3 * taste["item_bias"][item]
    click = rng.random(rows) < 1 / (1 + np.exp(-logit))
    buy_logit = -2.0 + 1.5 * affinity + 0.5 * taste["user_bias"][user]
    purchase = click & (rng.random(rows) < 1 / (1 + np.exp(-buy_logit)))
    split = np.where(day == 29, "test", np.where(day == 28, "valid", "train"))
    return pl.DataFrame(
        {
            "user": ("u" + pl.Series(user).cast(pl.String)),
            "item": ("i" + pl.Series(item).cast(pl.String)),
            "category": ("c" + pl.Series(item % 300).cast(pl.String)),
            "brand": ("b" + pl.Series((item * 31) % 5000).cast(pl.String)),
            "hour": rng.integers(0, 24, rows),
            "weekday": day % 7,
            "device": rng.choice(["ios", "android", "web"], rows, p=[0.45, 0.45, 0.1]),
            "region": ("r" + pl.Series(user % 50).cast(pl.String)),
            "page": rng.choice(["home", "search", "cart", "detail"], rows),
            "position": position,
            "price": np.round(np.exp(rng.normal(3.0, 1.0, rows) + 0.1 * taste["item_bias"][item]), 2),
            "user_age": np.clip(rng.normal(35, 10, rows) + (user % 17), 16, 90).round(),
            "split": split,
            "click": click.astype(np.int8),
            "purchase": purchase.astype(np.int8),
        }
    )


RECIPE = """# A generated click log (benchmarks/click_log.py): MMoE over every column.
data:
  source: {source}
  split: {{by: column, column: split}}
features:
  numeric: [price, user_age]
  categorical: auto
  exclude: [split]
tasks:
  click: {{label: click}}
  purchase: {{label: purchase, space: click}}
model: {{scheme: mmoe, embedding_dim: 16, n_experts: 8, expert_units: [64], tower_units: [32]}}
train: {{batch_size: 2048, epochs: 1, early_stopping: null}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--users", type=int, default=650_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--shard-rows", type=int, default=250_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    taste = {
        "user": rng.normal(size=(args.users, TASTE)).astype(np.float32),
        "item": rng.normal(size=(args.items, TASTE)).astype(np.float32),
        "user_bias": rng.normal(size=args.users).astype(np.float32),
        "item_bias": rng.normal(size=args.items).astype(np.float32),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    written, index = 0, 0
    while written < args.rows:
        rows = min(args.shard_rows, args.rows - written)
        day = np.sort(rng.integers(0, 30, rows))  # a shard spans the month; the split is by day
        frame = shard(rng, rows, args.users, args.items, taste, day)
        frame.write_parquet(args.out / f"part-{index:05d}.parquet")
        written += rows
        index += 1
        print(f"\r{written:,} rows in {index} shards", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    write_text(args.out / "recipe.yaml", RECIPE.format(source=f'"{args.out / "part-*.parquet"}"'))
    print(f"{args.out}: {written:,} rows in {index} shards; recipe {args.out / 'recipe.yaml'}")


if __name__ == "__main__":
    main()
