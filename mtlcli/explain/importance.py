"""Per-task permutation importance: how much each task's metric drops when one input (or a group
of inputs) is shuffled across the rows of a split, breaking its link with everything else in the
row while keeping its distribution.

For a binary task the metric is AUC and the importance is AUC(original) − AUC(shuffled); for a
regression task it is RMSE and the importance is RMSE(shuffled) − RMSE(original): in both, how
much worse the task does without that input, 0 for an input it ignores (a little below 0 by
chance). Each input is shuffled ``repeats`` times with permutations drawn from one seeded
generator; the report gives the mean and the spread. A group (``name=pattern,pattern``, names or
globs over the run's input names, as in the recipe's ``features``) is shuffled with one
permutation for all of its inputs, so what they say together is removed at once. A behaviour
history is one input: its ids and its length move together.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import statistics
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mtlcli.data.batch import SplitTensors
from mtlcli.data.schema import DataSchema
from mtlcli.errors import MtlError
from mtlcli.explain.compare import HEADLINE
from mtlcli.train.loop import predict_logits
from mtlcli.train.metrics import task_metrics


@dataclass(frozen=True)
class Input:
    name: str
    kind: str  # categorical | numeric | sequence
    index: int  # its column (or history) in the encoded split


def run_inputs(schema: DataSchema) -> list[Input]:
    return (
        [Input(f.name, "categorical", i) for i, f in enumerate(schema.categorical)]
        + [Input(f.name, "numeric", i) for i, f in enumerate(schema.numeric)]
        + [Input(f.name, "sequence", i) for i, f in enumerate(schema.sequences)]
    )


def input_groups(inputs: list[Input], specs: list[str]) -> dict[str, list[Input]]:
    """Each ``name=pattern,...`` spec as one group; every input no group takes is its own."""
    names = [i.name for i in inputs]
    groups: dict[str, list[Input]] = {}
    for spec in specs:
        label, sep, patterns = spec.partition("=")
        if not sep or not label.strip() or not patterns.strip():
            raise MtlError(f"--group {spec!r}: expected NAME=PATTERN[,PATTERN...]", "e.g. --group geo='state*,region*'")
        members = [
            i for i in inputs if any(fnmatch.fnmatchcase(i.name, p.strip()) for p in patterns.split(",") if p.strip())
        ]
        if not members:
            raise MtlError(
                f"--group {spec!r}: no input of this run matches",
                f"the run's inputs: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}",
            )
        name = label.strip()
        if name in groups:
            raise MtlError(
                f"--group: {name!r} is given twice",
                "give each group its own name, or one --group with all its patterns",
            )
        groups[name] = members
    grouped = {i.name for members in groups.values() for i in members}
    for name in groups:
        if name in names and name not in grouped:
            raise MtlError(
                f"--group {name!r}: {name!r} is the name of an input that is not in the group",
                "name the group differently: each row of the report is one name",
            )
    return groups | {i.name: [i] for i in inputs if i.name not in grouped}


def shuffled(data: SplitTensors, members: list[Input], order: Tensor) -> SplitTensors:
    """``data`` with the columns of ``members`` taken from the rows ``order`` (the rest unchanged;
    histories padded)."""
    data = data.padded()
    categorical, numeric = data.categorical, data.numeric
    sequences, lengths = data.sequences, data.sequence_lengths
    for member in members:
        if member.kind == "categorical":
            categorical = categorical.clone() if categorical is data.categorical else categorical
            categorical[:, member.index] = data.categorical[order, member.index]
        elif member.kind == "numeric":
            numeric = numeric.clone() if numeric is data.numeric else numeric
            numeric[:, member.index] = data.numeric[order, member.index]
        else:
            assert data.sequences is not None and data.sequence_lengths is not None and sequences is not None
            assert lengths is not None
            sequences = sequences.clone() if sequences is data.sequences else sequences
            lengths = lengths.clone() if lengths is data.sequence_lengths else lengths
            sequences[:, member.index] = data.sequences[order, member.index]
            lengths[:, member.index] = data.sequence_lengths[order, member.index]
    return dataclasses.replace(
        data, categorical=categorical, numeric=numeric, sequences=sequences, sequence_lengths=lengths
    )


def _scores(
    model: nn.Module, data: SplitTensors, tasks: list[str], types: list[str], batch_size: int
) -> dict[str, float | None]:
    metrics = task_metrics(predict_logits(model, data, batch_size), data.labels, data.label_mask, tasks, types)
    out: dict[str, float | None] = {}
    for task, kind in zip(tasks, types, strict=True):
        value = metrics[task][HEADLINE[kind][0]]
        out[task] = None if value is None else float(value)
    return out


@torch.no_grad()
def importance_report(
    model: nn.Module,
    data: SplitTensors,
    schema: DataSchema,
    groups: list[str] | None = None,
    repeats: int = 3,
    seed: int = 0,
    batch_size: int = 8192,
) -> dict[str, Any]:
    """{"metric", "baseline", "repeats", "seed", "groups", "importance": {task: {input: {"drop",
    "std"}}} sorted by drop, most important first}."""
    tasks = schema.task_names
    types = [t.type for t in schema.tasks]
    headline = {t: HEADLINE[kind] for t, kind in zip(tasks, types, strict=True)}  # (metric, +1 when higher is better)
    members = input_groups(run_inputs(schema), groups or [])
    baseline = _scores(model, data, tasks, types, batch_size)
    generator = torch.Generator().manual_seed(seed)
    drops: dict[str, dict[str, list[float]]] = {t: {} for t in tasks}
    for name, group in members.items():
        for _ in range(repeats):
            order = torch.randperm(len(data), generator=generator)
            scores = _scores(model, shuffled(data, group, order), tasks, types, batch_size)
            for task in tasks:
                base, now = baseline[task], scores[task]
                if base is not None and now is not None:
                    drops[task].setdefault(name, []).append(headline[task][1] * (base - now))
    importance = {
        task: dict(
            sorted(
                (
                    (name, {"drop": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0})
                    for name, v in values.items()
                ),
                key=lambda item: -item[1]["drop"],
            )
        )
        for task, values in drops.items()
    }
    return {
        "metric": {t: metric for t, (metric, _) in headline.items()},
        "baseline": baseline,
        "repeats": repeats,
        "seed": seed,
        "rows": len(data),
        "groups": {
            name: [i.name for i in group] for name, group in members.items() if len(group) > 1 or name != group[0].name
        },
        "importance": importance,
    }


def loss_of(metric: str) -> str:
    """What shuffling costs, in the metric's words: "auc lost" or "rmse gained"."""
    return f"{metric} {'gained' if metric == 'rmse' else 'lost'}"


def read_importance(report: dict[str, Any], top: int = 3) -> list[str]:
    """One line per task: the inputs it relies on most."""
    lines = []
    for task, entries in report["importance"].items():
        metric = report["metric"][task]
        best = list(entries.items())[:top]
        if not best:
            lines.append(f"{task}: no importance ({metric} undefined on this split)")
            continue
        said = ", ".join(f"{name} ({value['drop']:+.4f})" for name, value in best)
        lines.append(f"{task} relies most on {said} ({loss_of(metric)} when shuffled)")
    return lines
