"""Training speed with behaviour histories: MMoE with DIN-attention pooling vs DTRN, histories of
length 50 and 200, on the generated sequences (``synthetic: {kind: sequences}``).

Run by hand from the repository root (minutes; not part of the tests):

    python benchmarks/sequence_speed.py
    python benchmarks/sequence_speed.py --lengths 50 --rows 20000 --epochs 2

Prints train samples/s (median epoch after the first) and valid AUC per model and length; one
thread, batch 512, embedding 8.

``--pooling`` measures instead what histories cost MMoE, side by side: the same model without
histories, with them averaged and with them pooled by DIN attention, each its own model, step
and data, trained in interleaved rounds of steps on one thread (batching, forward, backward and
optimizer step), each variant's speed the median of its rounds by CPU time (the process's, so
that other load on the machine counts less) and by wall time, and its ratio to no histories:

    python benchmarks/sequence_speed.py --pooling
    python benchmarks/sequence_speed.py --pooling --movielens /tmp/movielens  # also MovieLens-100k

``--breakdown`` says instead where a sample's time goes, for no histories and averaged ones (µs
of CPU per sample, medians of interleaved rounds): batching alone (an epoch of shuffled
batches), the embedding's forward and backward alone (the pooled histories' cost) and the whole
training step:

    python benchmarks/sequence_speed.py --breakdown --lengths 50 200 --movielens /tmp/movielens

On the generated data the histories are the recipe's (topics by attention, items averaged in
``attention``; all four averaged in ``mean``); on MovieLens-100k (as benchmarks/movielens.py
builds it) the three rating histories, embedding 16.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `mtlcli` when run as a script

from mtlcli.data.store import prepare
from mtlcli.models import build_model
from mtlcli.models.blocks import FeatureEmbedding, use_sparse_rows
from mtlcli.recipe import Recipe, load_recipe, recipe_from_text
from mtlcli.train.checkpoint import input_spec
from mtlcli.train.loop import build_parts, make_step
from mtlcli.train.run import SPARSE_MIN_ROWS, train_run
from mtlcli.train.step import StepAt
from mtlcli.weighting import build_weighting

MODELS = {
    "mmoe + attention": "model={scheme: mmoe, embedding_dim: 8, n_experts: 4, expert_units: [32], tower_units: [16]}",
    "dtrn": "model={scheme: dtrn, embedding_dim: 8, tower_units: [16]}",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--pooling", action="store_true", help="history pooling against no histories, side by side")
    parser.add_argument("--movielens", type=Path, help="with --pooling: also MovieLens-100k, built in this folder")
    parser.add_argument("--rounds", type=int, default=9, help="with --pooling: rounds of steps per variant")
    parser.add_argument("--breakdown", action="store_true", help="where a sample's time goes, without and with mean")
    args = parser.parse_args()
    if args.pooling or args.breakdown:
        pooling(args)
        return
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


class Variant:
    """One recipe's model, step and train split, stepped a few batches at a time."""

    def __init__(self, recipe: Recipe) -> None:
        prepared = prepare(recipe)
        schema, settings = prepared.schema, recipe.train
        torch.manual_seed(settings.seed)
        self.model = build_model(recipe.model.scheme, recipe.model.params, input_spec(schema))
        if settings.sparse_embeddings is not False:
            use_sparse_rows(self.model, SPARSE_MIN_ROWS if settings.sparse_embeddings == "auto" else 0)
        strategy = build_weighting(recipe.loss.weighting, recipe.loss.params, schema.task_names)
        self.train = prepared.load("train")
        self.batch_size = settings.batch_size
        steps = self.train.steps(self.batch_size)
        types = [t.type for t in schema.tasks]
        self.step = make_step(build_parts(self.model, strategy, settings, schema.task_names, types, steps))
        self.shuffle = torch.Generator().manual_seed(settings.seed)
        self.batches: Any = iter(())
        self.done = 0
        self.lengths = self.train.sequence_lengths
        self.width = max((f.max_len for f in schema.sequences), default=0)  # the padded layout's L

    def run(self, steps: int) -> tuple[float, float, int]:
        """``steps`` training steps (a new shuffled epoch when one ends): CPU and wall seconds, rows."""
        self.model.train()
        cpu, wall, rows = time.process_time(), time.perf_counter(), 0
        for _ in range(steps):
            batch = next(self.batches, None)
            if batch is None:
                self.batches = iter(self.train.batches(self.batch_size, True, self.shuffle))
                batch = next(self.batches)
            self.done += 1
            self.step(batch, StepAt(1, self.done, self.done))
            rows += len(batch)
        return time.process_time() - cpu, time.perf_counter() - wall, rows


def side_by_side(variants: dict[str, Variant], rounds: int, steps: int = 8) -> dict[str, tuple[float, float]]:
    """Samples/s (CPU time, wall time) of each variant: medians over interleaved rounds."""
    for variant in variants.values():
        variant.run(3)  # warm up
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, variant in variants.items():
            seconds, elapsed, rows = variant.run(steps)
            cpu[name].append(rows / seconds)
            wall[name].append(rows / elapsed)
    return {name: (statistics.median(cpu[name]), statistics.median(wall[name])) for name in variants}


def breakdown(variants: dict[str, Variant], rounds: int, steps: int = 8) -> dict[str, dict[str, float]]:
    """µs of CPU per sample of each variant (medians over interleaved rounds): an epoch of
    batches, the embedding's forward and backward on ``steps`` batches, ``steps`` training steps."""
    parts = ("batching", "embedding", "step")
    times: dict[str, dict[str, list[float]]] = {name: {part: [] for part in parts} for name in variants}
    for variant in variants.values():
        variant.run(3)
    for _ in range(rounds):
        for name, variant in variants.items():
            cpu = time.process_time()
            rows = sum(len(batch) for batch in variant.train.batches(variant.batch_size, True, variant.shuffle))
            times[name]["batching"].append((time.process_time() - cpu) / rows)
            embedding = next(m for m in variant.model.modules() if isinstance(m, FeatureEmbedding))
            batches = list(itertools.islice(variant.train.batches(variant.batch_size, True, variant.shuffle), steps))
            cpu = time.process_time()
            for batch in batches:
                embedding(batch).sum().backward()
            times[name]["embedding"].append((time.process_time() - cpu) / sum(len(b) for b in batches))
            variant.model.zero_grad(set_to_none=True)
            seconds, _, rows = variant.run(steps)
            times[name]["step"].append(seconds / rows)
    return {name: {part: 1e6 * statistics.median(t) for part, t in times[name].items()} for name in variants}


def generated(length: int, pooling: str, rows: int, cache: Path) -> Recipe:
    """The sequences recipe at history ``length`` (purchases a third of it), histories as shipped
    (``attention``), all averaged (``mean``) or none."""
    short = max(1, length // 3)
    lengths = {"click_topics": length, "clicks": length, "buy_topics": short, "buys": short}
    sets = [
        f"data.synthetic.rows={rows}",
        f"data.synthetic.history={length}",
        f"data.cache_dir={cache}",
        *(f"features.sequences.{name}.max_len={n}" for name, n in lengths.items()),
    ]
    if pooling == "none":
        sets.append("features.sequences={}")
    elif pooling == "mean":
        sets += [f"features.sequences.{name}.pooling=mean" for name in lengths]
    return load_recipe("recipes/sequences-mmoe.yaml", sets)


def movielens(work: Path, length: int, pooling: str) -> Recipe:
    """MovieLens-100k's MMoE (benchmarks/movielens.py) with its three histories at ``length``."""
    import movielens as ml

    if not (work / "ratings.parquet").is_file():
        work.mkdir(parents=True, exist_ok=True)
        ml.build(work)
    spec = ml.recipe(work, "mmoe" if pooling == "none" else "mmoe+attention", 0, length, 1)
    for history in spec["features"]["sequences"].values():
        history["pooling"] = pooling
    return recipe_from_text(yaml.safe_dump(spec), "movielens")


def pooling(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/movielens.py
    if args.breakdown:
        print("| data | history length | pooling | batching µs | embedding µs | step µs (CPU, per sample) |")
        print("|---|---|---|---|---|---|")
    else:
        print(
            "| data | history length | pooling | items present / padded | samples/s (CPU) | ratio "
            "| samples/s (wall) | ratio |"
        )
        print("|---|---|---|---|---|---|---|---|")
    poolings = ["none", "mean"] if args.breakdown else POOLINGS
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("generated", length) for length in args.lengths]
        if args.movielens is not None:
            cases += [("MovieLens-100k", length) for length in args.lengths]
        for data, length in cases:
            if data == "generated":
                variants = {p: Variant(generated(length, p, args.rows, Path(tmp) / "cache")) for p in poolings}
            else:
                variants = {p: Variant(movielens(args.movielens, length, p)) for p in poolings}
            if args.breakdown:
                for name, part in breakdown(variants, args.rounds).items():
                    print(
                        f"| {data} | {length} | {name} | {part['batching']:.2f} | {part['embedding']:.2f} "
                        f"| {part['step']:.2f} |",
                        flush=True,
                    )
                continue
            speeds = side_by_side(variants, args.rounds)
            base_cpu, base_wall = speeds["none"]
            for name, (cpu, wall) in speeds.items():
                lengths, variant = variants[name].lengths, variants[name]
                fill = "" if lengths is None else f"{float(lengths.float().mean()) / variant.width:.0%}"
                print(
                    f"| {data} | {length} | {name} | {fill} | {cpu:,.0f} | {cpu / base_cpu:.2f} "
                    f"| {wall:,.0f} | {wall / base_wall:.2f} |",
                    flush=True,
                )


POOLINGS = ["none", "mean", "attention"]


if __name__ == "__main__":
    main()
