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


def step_times(rows: int, sparse: bool, steps: int) -> list[float]:
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
    args = parser.parse_args()
    torch.set_num_threads(1)
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


if __name__ == "__main__":
    main()
