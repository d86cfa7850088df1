"""``explain_run``: every report on one split of a run's data, as one JSON-ready dict (docs/explain.md)."""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from mtlcli.data.batch import SplitTensors
from mtlcli.data.schema import FIRST_ID, MISSING_ID, OOV_ID, DataSchema
from mtlcli.errors import MtlError
from mtlcli.explain.correlation import correlation_report
from mtlcli.explain.distillation import objective_report, read_objective
from mtlcli.explain.gates import (
    GateRow,
    alpha_report,
    field_scale_report,
    gate_group_report,
    gate_groups,
    gates_by_value,
    lambda_report,
    read_alpha,
    read_by_value,
    read_field_scales,
    read_gate_group,
    read_lambda,
    read_scales,
    scale_report,
    union_of_experts,
)
from mtlcli.explain.gradients import gradient_report, read_gradients
from mtlcli.explain.history import history_report, read_tallies, tallies_report
from mtlcli.explain.importance import importance_report, read_importance
from mtlcli.explain.masks import mask_report, read_masks
from mtlcli.explain.representations import read_representations, representation_report
from mtlcli.fileio import sha256_file
from mtlcli.models.base import scheme
from mtlcli.models.views import AlphaRecord, GateRecord, Introspection, ScaleRecord

if TYPE_CHECKING:
    from mtlcli.data.store import Prepared
    from mtlcli.train.checkpoint import LoadedModel


@dataclass(frozen=True)
class ExplainOptions:
    """``max_rows``: sample at most this many rows of the split (seeded); ``dead_below``: an expert
    whose mean weight is below this for every gate that can choose it is dead; ``collapsed_above``: a
    gate whose mean weight on one expert reaches this has collapsed; ``by``: a categorical feature to
    split the gate weights by, keeping its ``top_values`` most frequent values; ``grad_batches`` of
    ``grad_batch_size`` rows go into the gradient cosines."""

    max_rows: int | None = None
    dead_below: float = 0.02
    collapsed_above: float = 0.9
    by: str | None = None
    top_values: int = 8
    grad_batches: int = 32
    grad_batch_size: int = 1024
    batch_size: int = 8192
    seed: int = 0
    importance: bool = False  # per-task permutation importance (explain/importance.py)
    importance_repeats: int = 3
    groups: tuple[str, ...] = ()  # NAME=PATTERN,... inputs shuffled together


class UnknownFeature(MtlError):
    """``--by`` names no categorical feature of the run."""


def sample_rows(data: SplitTensors, max_rows: int | None, seed: int) -> SplitTensors:
    if max_rows is None or len(data) <= max_rows:
        return data
    keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:max_rows].sort().values
    return data.select(keep)


def value_names(schema: DataSchema, feature: str) -> tuple[int, list[str]]:
    """(column index, name of every id) of a categorical feature."""
    names = [f.name for f in schema.categorical]
    if feature not in names:
        close = difflib.get_close_matches(feature, names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"one of: {', '.join(names) or '(no categorical features)'}"
        raise UnknownFeature(f"--by {feature!r}: not a categorical feature of this run", hint)
    spec = schema.categorical[names.index(feature)]
    labels = [""] * spec.cardinality
    labels[OOV_ID], labels[MISSING_ID] = "<out of vocabulary>", "<missing>"
    for i in range(FIRST_ID, spec.cardinality):
        labels[i] = f"bucket {i - FIRST_ID}" if spec.hash_buckets else spec.vocab[i - FIRST_ID]
    return names.index(feature), labels


@torch.no_grad()
def collect(model: nn.Module, data: SplitTensors, batch_size: int) -> tuple[Tensor, Introspection]:
    """Logits [N, T] and what the scheme introspects: gate weights concatenated over the batches
    ([N, n]), cross-stitch alphas as the first batch gave them."""
    was_training = model.training
    model.eval()
    logits: list[Tensor] = []
    gates: dict[tuple[str, str], list[GateRecord]] = {}
    alphas: list[AlphaRecord] | None = None
    for batch in data.batches(batch_size):
        logits.append(model(batch))
        shown = scheme(model).introspect(batch)
        alphas = shown.alphas if alphas is None else alphas
        for gate in shown.gates:
            gates.setdefault((gate.group, gate.row), []).append(gate)
    model.train(was_training)
    joined = [replace(parts[0], weights=torch.cat([p.weights for p in parts])) for parts in gates.values()]
    out = torch.cat(logits) if logits else torch.zeros((0, data.labels.shape[1]))
    return out, Introspection(joined, alphas or [])


@torch.no_grad()
def collect_scales(model: nn.Module, data: SplitTensors, batch_size: int) -> list[ScaleRecord]:
    """The scheme's multiplicative gates (``Capabilities.gate_scales``) concatenated over the
    batches ([N, n] each); none when the scheme declares none."""
    scales = scheme(model).capabilities.gate_scales
    if scales is None:
        return []
    was_training = model.training
    model.eval()
    parts: dict[tuple[str, str], list[ScaleRecord]] = {}
    for batch in data.batches(batch_size):
        for record in scales(batch):
            parts.setdefault((record.group, record.row), []).append(record)
    model.train(was_training)
    return [replace(p[0], scales=torch.cat([r.scales for r in p])) for p in parts.values()]


def explain_model(
    model: nn.Module,
    data: SplitTensors,
    tasks: list[str],
    types: list[str],
    options: ExplainOptions = ExplainOptions(),
    by: tuple[str, int, list[str]] | None = None,
    pos_weight: Tensor | None = None,
    inputs: tuple[list[str], list[str], list[str]] | None = None,
) -> dict[str, Any]:
    """Every report for ``model`` on ``data``; ``by`` = (feature, column, value names) splits the gates;
    ``pos_weight`` (the tasks' training loss) shapes the gradients compared."""
    logits, introspected = collect(model, data, options.batch_size)
    mask = data.label_mask
    readings: dict[str, Any] = {"gates": [], "gates_by": [], "alpha": []}
    gates: dict[str, Any] = {}
    by_report: dict[str, Any] | None = None
    if by is not None:
        by_report = {"feature": by[0], "gates": {}}
    for group, rows in gate_groups(introspected.gates).items():
        experts = union_of_experts([row.experts for row in rows], tasks)
        gate_rows = {
            row.row: GateRow(
                [experts.index(label) for label in row.experts],
                row.weights,
                mask[:, tasks.index(row.row)] if row.row in tasks else torch.ones(len(row.weights), dtype=torch.bool),
            )
            for row in rows
        }
        gates[group] = gate_group_report(gate_rows, experts, options.dead_below, options.collapsed_above)
        readings["gates"].append(read_gate_group(group, gates[group]))
        if by is not None and by_report is not None:
            values = gates_by_value(gate_rows, experts, data.categorical[:, by[1]], by[2], options.top_values)
            by_report["gates"][group] = values
            readings["gates_by"].append(read_by_value(group, by[0], gates[group], values))
    alpha = alpha_report(introspected.alphas, tasks)
    readings["alpha"] = [read_alpha(layer, matrix) for layer, matrix in alpha.items()]
    masks = mask_report(model, next(iter(data.batches(options.batch_size)), None))
    readings["masks"] = read_masks(masks) if masks else []
    if inputs is None:  # no schema at hand: name the inputs by position
        histories = data.sequence_lengths.shape[1] if data.sequence_lengths is not None else 0
        inputs = (
            [f"categorical {i}" for i in range(data.categorical.shape[1])],
            [f"history {i}" for i in range(histories)],
            [f"numeric {i}" for i in range(data.numeric.shape[1])],
        )
    scales = scheme(model).capabilities.field_scales  # gate control's field mapping
    gate_control = None
    if scales is not None:
        gate_control = {"field_scales": field_scale_report(scales(), tasks, [*inputs[0], *inputs[1], *inputs[2]])}
    readings["gate_control"] = [read_field_scales(gate_control["field_scales"])] if gate_control else []
    gate_scales = scale_report(collect_scales(model, data, options.batch_size), [*inputs[0], *inputs[1], *inputs[2]])
    readings["gate_scales"] = [read_scales(group, report) for group, report in gate_scales.items()]
    bottoms = representation_report(model, data, options.batch_size, *inputs)
    readings["representations"] = [read_representations(bottoms)] if bottoms else []
    correlations = correlation_report(data.labels, mask, logits, tasks, types)
    readings.update(correlations.pop("readings"))
    gradients = gradient_report(
        model, data, tasks, types, options.grad_batch_size, options.grad_batches, options.seed, pos_weight
    )
    readings["gradient_cosine"] = read_gradients(gradients, tasks)
    warnings = [
        f"{group}: expert {expert} is dead (mean weight below {options.dead_below} for every gate)"
        for group, report in gates.items()
        for expert in report["dead_experts"]
    ] + [
        f"{group}: the {row} gate has collapsed onto expert {expert} (mean weight >= {options.collapsed_above})"
        for group, report in gates.items()
        for row, expert in report["collapsed"].items()
        if expert is not None
    ]
    return {
        "rows": len(data),
        "tasks": tasks,
        "task_types": types,
        "gates": gates,
        "gates_by": by_report,
        "alpha": alpha,
        "masks": masks,
        "gate_control": gate_control,
        "gate_scales": gate_scales or None,
        "representations": bottoms,
        **correlations,
        **gradients,
        "warnings": warnings,
        "readings": readings,
        "options": asdict(options),
    }


def explain_run(
    run_dir: Path,
    split: str = "valid",
    options: ExplainOptions = ExplainOptions(),
    run: tuple[LoadedModel, Prepared] | None = None,
) -> dict[str, Any]:
    """Every report on one split of a run's data (re-encoded if the run's cache is gone), plus the
    training history from its metrics.jsonl. ``run``: the run's model and data, already loaded."""
    from mtlcli.train.run import GRADIENTS, load_run, pos_weight_tensor, run_data

    loaded = run[0] if run is not None else load_run(run_dir)
    by = None
    if options.by is not None:
        column, names = value_names(loaded.schema, options.by)
        by = (options.by, column, names)
    prepared = run[1] if run is not None else run_data(run_dir, loaded)
    data = sample_rows(prepared.load(split), options.max_rows, options.seed)
    tasks = loaded.schema.task_names
    types = [t.type for t in loaded.schema.tasks]
    schema = loaded.schema
    inputs = (
        [f.name for f in schema.categorical],
        [f.name for f in schema.sequences],
        [f.name for f in schema.numeric],
    )
    report = explain_model(loaded.model, data, tasks, types, options, by, pos_weight_tensor(loaded.recipe), inputs)
    report["importance"] = None
    if options.importance:
        report["importance"] = importance_report(
            loaded.model, data, schema, list(options.groups), options.importance_repeats, options.seed,
            options.batch_size,
        )  # fmt: skip
        report["readings"]["importance"] = read_importance(report["importance"])
    epochs, damaged = read_metrics(run_dir / "metrics.jsonl", EpochRecord)
    samples, damaged_samples = read_metrics(run_dir / GRADIENTS, GradientRecord)
    report["warnings"] += damaged + damaged_samples
    history = history_report(epochs + samples, tasks)
    report["readings"]["history"] = history.pop("reading") if history else None
    report["tallies"] = tallies_report(epochs)
    report["readings"]["tallies"] = read_tallies(report["tallies"]) if report["tallies"] else None
    report["objective"], warnings = objective_report(run_dir, loaded, data, epochs, options.batch_size)
    report["warnings"] += warnings
    report["readings"]["objective"] = read_objective(report["objective"]) if report["objective"] else []
    coefficients = lambda_report(epochs, tasks)
    if report["gate_control"] is not None and coefficients is not None:
        report["gate_control"]["lambda"] = coefficients
        report["readings"]["gate_control"].append(read_lambda(coefficients))
    return {
        "run_dir": str(run_dir),
        "model_sha256": sha256_file(run_dir / "model.safetensors"),
        "split": split,
        "scheme": loaded.recipe.model.scheme,
        "weighting": loaded.recipe.loss.weighting,
        **report,
        "history": history,
    }


class EpochRecord(BaseModel):
    """What the history and the page read of a metrics.jsonl line (one epoch)."""

    model_config = ConfigDict(strict=True)
    epoch: int
    train_loss: dict[str, float | None]
    weights: dict[str, float | None] = {}
    valid: dict[str, dict[str, float | None]] = {}
    samples_per_second: float = 0.0
    best_epoch: int | None = None


class GradientRecord(BaseModel):
    """What the history reads of a gradients.jsonl line (one sample of train.track_gradients)."""

    model_config = ConfigDict(strict=True)
    kind: Literal["gradients"]
    step: int
    gradient_cosine: dict[str, dict[str, float | None]]
    weights: dict[str, float | None] = {}


def read_metrics(path: Path, shape: type[BaseModel] = EpochRecord) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of a run's metrics.jsonl (or gradients.jsonl) that have the ``shape`` their
    readers need, and a warning for each line that has not, naming the file and line: a damaged
    line is left out of the curves, never silently. No records if the file is missing."""
    if not path.is_file():
        return [], []
    records: list[dict[str, Any]] = []
    damaged: list[str] = []
    text = path.read_bytes().decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            shape.model_validate(record)
        except json.JSONDecodeError as exc:
            damaged.append(f"{path}:{number}: not JSON ({exc.msg}); the line is left out of the history")
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "the line"
            damaged.append(
                f"{path}:{number}: not a {shape.__name__.removesuffix('Record').lower()} record ({where}:"
                f" {first['msg']}); the line is left out of the history"
            )
        else:
            records.append(record)
    return records, damaged
