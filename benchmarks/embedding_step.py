"""The cost of one training step of an embedding table as the vocabulary grows: dense (the table
trained by Adam, today's census path) vs row-wise (``train.sparse_embeddings``: lazy Adam on the
batch's rows).

Run by hand from the repository root (not part of the tests):

    python benchmarks/embedding_step.py                       # vocabularies 1k, 1M, 10M
    python benchmarks/embedding_step.py --rows 1000 100000 --steps 20

Each step: FeatureEmbedding (8 categorical fields over one table of ``rows`` rows, dim 16) → a
linear head → squared error, backward, optimizer step; batch 2048, one thread. Prints the median
step time in ms over ``--steps`` steps (after 3 warm-up steps) for both paths, and each path's
cost relative to its own at the smallest vocabulary.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `mtlcli` when run as a script

from mtlcli.data.batch import Batch
from mtlcli.models.blocks import FeatureEmbedding

FIELDS, DIM, BATCH = 8, 16, 2048


def step_times(rows: int, sparse: bool, steps: int, distinct: int | None = None) -> list[float]:
    """Step times in seconds. ``distinct``: each batch's ids come from that many rows per field,
    drawn afresh each step anywhere in the table (the same work per step at every vocabulary
    size, where uniform ids give a 1k table at most 1,000 distinct rows and a 10M one ~16,000)."""
    torch.manual_seed(0)
    per_field = max(1, rows // FIELDS)
    embedding = FeatureEmbedding([per_field] * FIELDS, 0, DIM)
    head = nn.Linear(FIELDS * DIM, 1)
    if sparse:
        embedding.use_sparse_rows()
    params = [p for p in [*embedding.parameters(), *head.parameters()] if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    times = []
    for index in range(steps + 3):
        ids = torch.randint(0, per_field, (BATCH, FIELDS), generator=generator)
        if distinct is not None:
            pool = torch.randint(0, per_field, (distinct, FIELDS), generator=generator)
            ids = pool.gather(0, torch.randint(0, distinct, (BATCH, FIELDS), generator=generator))
        batch = Batch(ids, torch.zeros(BATCH, 0), torch.zeros(BATCH, 1), torch.ones(BATCH, 1, dtype=torch.bool))
        target = torch.randn(BATCH, 1, generator=generator)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = ((head(embedding(batch)) - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        if sparse:
            embedding.update_rows(1e-3)
        if index >= 3:
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000, 1_000_000, 10_000_000])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--distinct", type=int, default=100, help="distinct rows per field in the second table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("Uniform ids (a batch touches min(vocabulary, ~16,000) distinct rows):")
    print("| vocabulary rows | dense step (ms) | row-wise step (ms) | dense vs smallest | row-wise vs smallest |")
    print("|---|---|---|---|---|")
    base: dict[bool, float] = {}
    for rows in args.rows:
        medians = {sparse: statistics.median(step_times(rows, sparse, args.steps)) * 1e3 for sparse in (False, True)}
        for sparse, value in medians.items():
            base.setdefault(sparse, value)
        print(
            f"| {rows:,} | {medians[False]:.1f} | {medians[True]:.1f} | "
            f"{medians[False] / base[False]:.1f}× | {medians[True] / base[True]:.2f}× |",
            flush=True,
        )
    print(f"\nThe same work at every size: each batch's ids from {args.distinct} random rows per field, row-wise:")
    print("| vocabulary rows | row-wise step (ms) | vs smallest |")
    print("|---|---|---|")
    first = None
    for rows in args.rows:
        median = statistics.median(step_times(rows, True, args.steps, args.distinct)) * 1e3
        first = first or median
        print(f"| {rows:,} | {median:.1f} | {median / first:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
