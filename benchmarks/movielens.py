"""MovieLens-100k with behaviour histories: single-task, MMoE, MMoE with attention-pooled
histories and DTRN (with its ablations), test AUC per task over seeds.

The data (943 users, 1,682 items, 100,000 timestamped ratings) comes inside the ``recbole==1.2.1``
wheel on PyPI; its licence forbids redistribution, so this script downloads the wheel with pip
into ``--work``, checks the file's sha256 and never writes it into the repository. Run by hand
from the repository root (network to PyPI needed once; minutes):

    python benchmarks/movielens.py --work /tmp/movielens
    python benchmarks/movielens.py --work /tmp/movielens --seeds 0 --models mmoe mmoe+attention
    python benchmarks/movielens.py --work /tmp/movielens --preprocess-only --repeats 3

Each rating is an impression (user, item, time) with two tasks: ``like`` = rating >= 4 and
``love`` = rating = 5. Three behaviour types from the same log: ``low`` (rating <= 2), ``mid`` (3),
``high`` (>= 4); each impression's histories are the user's ratings of each type strictly before
its time (``features.sequences.*.events``: no leakage of the rating itself or of ratings at the
same second). Split by time per user: the last 10% of the user's ratings (at least one) are test,
the 10% before valid (equal timestamps ordered by item id). Test AUC and GAUC (per user) per task.

``--preprocess-only`` times preprocessing instead, without and with the three histories, each
run a fresh process (interleaved, ``--repeats`` times): the median wall time of the whole
command, of ``preprocess`` alone, and the median peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import polars as pl
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `mtlcli` when run as a script

from mtlcli.recipe import recipe_from_text
from mtlcli.train.run import evaluate_run, train_run

INTER = "recbole/dataset_example/ml-100k/ml-100k.inter"
SHA256 = "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"
TYPES = {"low": [1, 2], "mid": [3], "high": [4, 5]}


def fetch(work: Path) -> bytes:
    """The ratings file from the recbole wheel (downloaded once into ``work``), sha256-checked."""
    wheels = sorted(work.glob("recbole-1.2.1-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "recbole==1.2.1", "--no-deps", "-d", str(work), "-q"], check=True
        )
        wheels = sorted(work.glob("recbole-1.2.1-*.whl"))
    data = zipfile.ZipFile(wheels[0]).read(INTER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{INTER}: sha256 {digest}, expected {SHA256}")
    return data


def build(work: Path) -> None:
    """ratings.parquet (impressions with labels and split) and events.parquet (typed events)."""
    raw = pl.read_csv(fetch(work), separator="\t")
    raw = raw.rename({c: c.split(":")[0] for c in raw.columns}).with_columns(
        pl.col("user_id").cast(pl.String).alias("user"),
        pl.col("item_id").cast(pl.String).alias("item"),
        pl.col("timestamp").cast(pl.Int64).alias("time"),
        pl.col("rating").cast(pl.Int64),
    )
    ordered = raw.sort(["user", "time", "item_id"]).with_columns(
        pl.int_range(pl.len()).over("user").alias("position"), pl.len().over("user").alias("count")
    )
    tail = (pl.col("count") * 0.1).round().clip(lower_bound=1).cast(pl.Int64)
    split = (
        pl.when(pl.col("position") >= pl.col("count") - tail)
        .then(pl.lit("test"))
        .when(pl.col("position") >= pl.col("count") - 2 * tail)
        .then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
    )
    rows = ordered.select(
        "user",
        "item",
        "time",
        (pl.col("rating") >= 4).cast(pl.Int8).alias("like"),
        (pl.col("rating") == 5).cast(pl.Int8).alias("love"),
        split.alias("split"),
    )
    rows.write_parquet(work / "ratings.parquet")
    kind = pl.when(pl.col("rating") <= 2).then(pl.lit("low")).when(pl.col("rating") == 3).then(pl.lit("mid"))
    raw.select("user", "item", "time", kind.otherwise(pl.lit("high")).alias("type")).write_parquet(
        work / "events.parquet"
    )


def recipe(work: Path, model: str, seed: int, max_len: int, epochs: int) -> dict[str, Any]:
    histories = {
        name: {
            "events": {"source": [str(work / "events.parquet")], "type": "type", "types": [name]},
            "vocabulary": "item",
            "max_len": max_len,
            "pooling": "attention",
        }
        for name in TYPES
    }
    scheme: dict[str, Any] = {"scheme": "mmoe", "embedding_dim": 16, "n_experts": 4, "expert_units": [64],
                              "tower_units": [32]}  # fmt: skip
    sequences: dict[str, Any] = {}
    if model == "single_task":
        scheme = {"scheme": "single_task", "embedding_dim": 16, "bottom_units": [64], "tower_units": [32]}
    elif model == "mmoe+attention":
        sequences = histories
    elif model == "mmoe+attention-softmax":
        sequences = {name: {**history, "weights": "softmax"} for name, history in histories.items()}
    elif model == "mmoe+mean":
        sequences = {name: {**history, "pooling": "mean"} for name, history in histories.items()}
    elif model.startswith("dtrn"):
        sequences = histories
        scheme = {"scheme": "dtrn", "embedding_dim": 16, "tower_units": [32]}
        if model == "dtrn-no-cln":
            scheme["conditional_norm"] = False
        if model == "dtrn-no-trm":
            scheme["refine"] = False
    return {
        "data": {"source": str(work / "ratings.parquet"), "split": {"by": "column", "column": "split"},
                 "cache_dir": str(work / "cache"), "group": "user"},
        "features": {"categorical": ["user", "item"], "exclude": ["time", "split"], "sequences": sequences},
        "tasks": {"like": {"label": "like"}, "love": {"label": "love"}},
        "model": scheme,
        "train": {"epochs": epochs, "batch_size": 512, "lr": 0.002, "seed": seed, "threads": 1,
                  "early_stopping": {"patience": 2}},
    }  # fmt: skip


MODELS = [
    "single_task",
    "mmoe",
    "mmoe+mean",
    "mmoe+attention",
    "mmoe+attention-softmax",
    "dtrn",
    "dtrn-no-cln",
    "dtrn-no-trm",
]

TIMED = """
import json, resource, sys, time
from pathlib import Path
from mtlcli.recipe import load_recipe
from mtlcli.data.store import prepare
recipe = load_recipe(Path(sys.argv[1]))
start = time.perf_counter()
prepare(recipe, force=True)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10}))
"""


def preprocess_figures(work: Path, max_len: int, repeats: int) -> None:
    """Preprocessing without and with the histories, interleaved, each a fresh process (one thread)."""
    found: dict[str, dict[str, list[float]]] = {}
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for _ in range(repeats):
        for model in ("mmoe", "mmoe+attention"):
            path = work / f"preprocess-{model}.yaml"
            path.write_text(yaml.safe_dump(recipe(work, model, 0, max_len, 1)))
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-c", TIMED, str(path)], capture_output=True, text=True, check=True, env=environment
            )
            report = json.loads(done.stdout.strip().splitlines()[-1])
            figures = found.setdefault(model, {"command": [], "preprocess": [], "rss": []})
            figures["command"].append(time.perf_counter() - start)
            figures["preprocess"].append(report["seconds"])
            figures["rss"].append(report["rss"])
    median = {model: {k: statistics.median(v) for k, v in figures.items()} for model, figures in found.items()}
    plain, histories = median["mmoe"], median["mmoe+attention"]
    print("| histories | command s | preprocess s | peak RSS MB |")
    print("|---|---|---|---|")
    for label, m in (("none", plain), (f"3 from events, max_len {max_len}", histories)):
        print(f"| {label} | {m['command']:.2f} | {m['preprocess']:.2f} | {m['rss']:.0f} |")
    ratios = {k: histories[k] / plain[k] for k in plain}
    print(f"| ratio | {ratios['command']:.2f}x | {ratios['preprocess']:.2f}x | {ratios['rss']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--preprocess-only", action="store_true", help="time preprocessing (see above)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "ratings.parquet").is_file():
        build(args.work)
    if args.preprocess_only:
        preprocess_figures(args.work, args.max_len, args.repeats)
        return
    print("| model | test AUC like | test AUC love | test GAUC like | test GAUC love | train samples/s |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        aucs: dict[str, list[float]] = {"like": [], "love": []}
        gaucs: dict[str, list[float]] = {"like": [], "love": []}
        speeds = []
        for seed in args.seeds:
            spec = recipe(args.work, model, seed, args.max_len, args.epochs)
            run = args.work / "runs" / f"{model}-{seed}"
            summary = train_run(recipe_from_text(yaml.safe_dump(spec), "movielens"), run, force=True)
            tested = evaluate_run(run, "test")
            for task in aucs:
                aucs[task].append(tested["tasks"][task]["auc"])
                gaucs[task].append(tested["tasks"][task]["gauc"])
            speeds.append(summary["train_samples_per_second"])

        def cell(values: list[float]) -> str:
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.4f} ± {spread:.4f}"

        cells = [cell(aucs["like"]), cell(aucs["love"]), cell(gaucs["like"]), cell(gaucs["love"])]
        print(f"| {model} | {' | '.join(cells)} | {statistics.median(speeds):,.0f} |", flush=True)


if __name__ == "__main__":
    main()
