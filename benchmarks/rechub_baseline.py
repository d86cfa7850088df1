"""torch-rechub 0.9.0's MMOE, trained by its MTLTrainer, on the census data exactly as mtl encodes it.

Used by ``benchmarks/train_speed.py --baseline rechub``; needs the ``bench`` extra
(``pip install -e '.[bench]'``).

It is driven the way torch-rechub documents it, with nothing tuned: one ``SparseFeature``
per categorical column and one ``DenseFeature`` per numeric column, inputs as a dict of
per-feature numpy arrays fed through ``DataGenerator.generate_dataloader`` (a per-row
``Dataset`` and a plain ``DataLoader``), and ``MTLTrainer.fit`` with Adam. The model matches
the reference of ``train_speed.py``: 8 experts of one 16-unit layer, towers of 8 units,
embedding size 4, batch size 1024, the recipe's learning rate, weight decay and seed.
torch-rechub's own layers differ from mtl's in ways a user cannot switch off: every MLP layer
(experts, towers and the softmax gates too) carries a BatchNorm1d and a Dropout(p=0), each
categorical feature has its own embedding table, and the heads are sigmoid + BCELoss.

What is timed: ``MTLTrainer.train_one_epoch`` alone (the epoch's shuffled DataLoader pass,
forward, backward and optimizer steps, and its per-step loss bookkeeping). ``fit``'s
validation pass after each epoch, its best-weights copy and the final checkpoint save are not.
That is the same span mtl's own ``samples_per_second`` covers.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch_rechub.basic.features import DenseFeature, SparseFeature
from torch_rechub.models.multi_task import MMOE
from torch_rechub.trainers import MTLTrainer
from torch_rechub.utils.data import DataGenerator

from mtlcli.data.batch import SplitTensors
from mtlcli.data.schema import DataSchema
from mtlcli.data.store import prepare
from mtlcli.recipe import load_recipe

EMBEDDING_DIM = 4
N_EXPERTS = 8
EXPERT_UNITS = [16]
TOWER_UNITS = [8]
BATCH_SIZE = 1024


class _TimedMTLTrainer(MTLTrainer):
    """MTLTrainer that records the wall time of each ``train_one_epoch`` call; nothing else changes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch_seconds: list[float] = []

    def train_one_epoch(self, data_loader: Any) -> Any:
        started = time.perf_counter()
        losses = super().train_one_epoch(data_loader)
        self.epoch_seconds.append(time.perf_counter() - started)
        return losses


def _features(schema: DataSchema) -> list[SparseFeature | DenseFeature]:
    sparse = [SparseFeature(f.name, vocab_size=f.cardinality, embed_dim=EMBEDDING_DIM) for f in schema.categorical]
    dense = [DenseFeature(f.name) for f in schema.numeric]
    return [*sparse, *dense]


def _inputs(split: SplitTensors, schema: DataSchema) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """mtl's encoded split as torch-rechub's input: {feature name: [N] array}, labels [N, T]."""
    if not bool(split.label_mask.all()):
        raise ValueError("torch-rechub's MTLTrainer has no label mask: this benchmark needs every label present")
    categorical = split.categorical.numpy()
    numeric = split.numeric.numpy()
    x = {f.name: np.ascontiguousarray(categorical[:, i]) for i, f in enumerate(schema.categorical)}
    x |= {f.name: np.ascontiguousarray(numeric[:, i]) for i, f in enumerate(schema.numeric)}
    return x, split.labels.numpy()


def run_rechub(recipe_file: str, epochs: int, threads: int) -> dict[str, float | None]:
    """Train torch-rechub's MMOE for ``epochs`` epochs; train samples/second overall and per-epoch median."""
    torch.set_num_threads(threads)
    recipe = load_recipe(recipe_file)
    prepared = prepare(recipe)
    schema = prepared.schema
    if any(t.type != "binary" for t in schema.tasks):
        raise ValueError("this benchmark compares binary tasks only")
    x_train, y_train = _inputs(prepared.load("train"), schema)
    x_valid, y_valid = _inputs(prepared.load("valid"), schema)

    torch.manual_seed(recipe.train.seed)
    task_types = ["classification"] * len(schema.tasks)
    model = MMOE(
        features=_features(schema),
        task_types=task_types,
        n_expert=N_EXPERTS,
        expert_params={"dims": EXPERT_UNITS},
        tower_params_list=[{"dims": TOWER_UNITS} for _ in task_types],
    )
    # The test loader is required by the API; the valid split stands in for it and is never used.
    train_loader, valid_loader, _ = DataGenerator(x_train, y_train).generate_dataloader(
        x_val=x_valid, y_val=y_valid, x_test=x_valid, y_test=y_valid, batch_size=BATCH_SIZE
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _TimedMTLTrainer(
            model,
            task_types=task_types,
            optimizer_fn=torch.optim.Adam,
            optimizer_params={"lr": recipe.train.lr, "weight_decay": recipe.train.weight_decay},
            n_epoch=epochs,
            earlystop_patience=epochs + 1,  # never stops early, like train.early_stopping=null
            device="cpu",
            model_path=tmp,
        )
        # torch-rechub prints losses and scores to stdout: keep train_speed.py's JSON there clean.
        with contextlib.redirect_stdout(sys.stderr):
            log = trainer.fit(train_loader, valid_loader)

    rows = len(y_train)
    seconds = trainer.epoch_seconds
    per_epoch = [rows / s for s in seconds]
    n_tasks = len(task_types)
    income = schema.task_names.index("income") if "income" in schema.task_names else None
    # fit's log has, per epoch, the n_tasks train losses then the n_tasks validation AUCs.
    valid_auc = float(log[-1][n_tasks + income]) if income is not None and log else None
    return {
        "samples_per_second": rows * len(seconds) / sum(seconds),
        "median_epoch_samples_per_second": statistics.median(per_epoch[1:] or per_epoch),
        "valid_auc_income": valid_auc,
    }
