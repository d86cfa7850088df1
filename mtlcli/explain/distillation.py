"""What a training objective learned (CrossDistil's teachers): the per-epoch terms its records
carry, and, from the run's checkpoint (bundles carry the students only), the teachers against
the students on a split and the teachers' order of the augmented levels.

Generic over objectives: the terms are whatever {task: number} entries an objective's epoch record
holds, and the split's figures are the objective's own ``explain``; this module only adds the
pure computation CrossDistil's ``explain`` calls (``teacher_student_report``)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mtlcli.train.metrics import auc

if TYPE_CHECKING:
    from mtlcli.data.batch import SplitTensors
    from mtlcli.train.checkpoint import LoadedModel

CHANCE = 0.5  # the share of correctly ordered pairs of a score that knows nothing


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


def teacher_student_report(
    tasks: list[str],
    students: Tensor,
    teachers: Tensor,
    labels: Tensor,
    mask: Tensor,
    levels: list[Tensor],
    pair_names: list[str],
    calibrated: Tensor | None = None,
) -> dict[str, Any]:
    """Per task k: the AUC of the student's logits and of the teacher's scores against y_k on k's
    rows (calibration is monotone, so the teacher's AUC is its probabilities' too), and per pair
    of non-empty levels of k's augmented order the teachers' share of correctly ordered pairs
    (0.5 is chance) and how many pairs it counts.

    students, teachers: [N, T]; labels: [N, T]; mask: bool [N, T]; levels: T x bool [4, N]
    (``level_masks`` of each task's order); pair_names: one per ``level_pairs()``; calibrated:
    the teachers' calibrated logits [N, T], which add "pcoc": {task: {"student", "teacher"}}, the
    mean predicted probability over the positive rate on k's rows (1 is calibrated).
    Returns {"auc": {task: {"student", "teacher"}}, "pairwise_accuracy": {task: {pair: share}},
    "pair_counts": {task: {pair: count}}}; an AUC is None where k's rows hold one class only.
    """
    from mtlcli.objectives.crossdistil import level_pairs, pairwise_accuracy  # it imports explain's modules

    report: dict[str, Any] = {"auc": {}, "pairwise_accuracy": {}, "pair_counts": {}}
    for k, task in enumerate(tasks):
        rows = mask[:, k]
        y = labels[rows, k]
        report["auc"][task] = {
            "student": _number(auc(students[rows, k], y)),
            "teacher": _number(auc(teachers[rows, k], y)),
        }
        if calibrated is not None:
            rate = float(y.double().mean()) if y.numel() else 0.0
            report.setdefault("pcoc", {})[task] = {
                name: float(torch.sigmoid(logits[rows, k].double()).mean()) / rate if rate > 0 else None
                for name, logits in (("student", students), ("teacher", calibrated))
            }
        shares = pairwise_accuracy(teachers[:, k], levels[k])
        sizes = levels[k].sum(1).tolist()
        named = [(name, pair) for name, pair in zip(pair_names, level_pairs(), strict=True) if pair in shares]
        report["pairwise_accuracy"][task] = {name: shares[pair] for name, pair in named}
        report["pair_counts"][task] = {name: int(sizes[pair[0]] * sizes[pair[1]]) for name, pair in named}
    return report


def _numbers(value: Any) -> bool:
    """A {name: number} mapping (booleans are not numbers here)."""
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value.values())
    )


def objective_history(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The objective's epoch records as series: {"kind", "epochs", "terms": {name: {task: [value
    per epoch]}}, "breakdowns": {name: {task: {part: [value per epoch]}}}}: every {task: number}
    entry is a term (CrossDistil: distill_loss, quadruplet_loss, calibration_loss), every {task:
    {part: number}} entry a breakdown (its pairwise_accuracy per level pair). None without records."""
    kept = [(r["epoch"], r["objective"]) for r in records if isinstance(r.get("objective"), dict) and "epoch" in r]
    if not kept:
        return None
    terms: dict[str, dict[str, list[float | None]]] = {}
    breakdowns: dict[str, dict[str, dict[str, list[float | None]]]] = {}
    for _, entry in kept:
        for name, value in entry.items():
            if _numbers(value):
                terms.setdefault(name, {t: [] for t in value})
            elif isinstance(value, dict) and value and all(_numbers(v) for v in value.values()):
                breakdowns.setdefault(name, {})
                for task, parts in value.items():
                    breakdowns[name].setdefault(task, {p: [] for p in parts})
    for _, entry in kept:
        for name, by_task in terms.items():
            for task, series in by_task.items():
                series.append((entry.get(name) or {}).get(task))
        for name, tasks in breakdowns.items():
            for task, parts in tasks.items():
                for part, series in parts.items():
                    series.append(((entry.get(name) or {}).get(task) or {}).get(part))
    return {
        "kind": kept[-1][1].get("kind"),
        "epochs": [epoch for epoch, _ in kept],
        "terms": terms,
        "breakdowns": breakdowns,
    }


def objective_report(
    run_dir: Path, loaded: LoadedModel, data: SplitTensors, records: list[dict[str, Any]], batch_size: int
) -> tuple[dict[str, Any] | None, list[str]]:
    """The run's objective: {"history": ``objective_history``, "learned": the objective's
    ``explain`` on ``data`` with the checkpoint's model and objective state (the last epoch trained,
    ``epoch``), or None}, and warnings; (None, []) for a run without an objective. The teachers
    live only in the checkpoint: without one (or one that does not fit) "learned" is None and a
    warning says why."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mtlcli.objectives.training import restore_crossdistil
    from mtlcli.train.rundir import CHECKPOINT

    section = loaded.recipe.objective
    if section is None:
        return None, []
    history = objective_history(records)
    report: dict[str, Any] = {"history": history, "learned": None, "epoch": None}
    path = run_dir / CHECKPOINT
    last = next((r for r in reversed(records) if isinstance(r.get("objective"), dict)), None)
    if last is None:
        return report, [f"{run_dir}: no epoch record of the objective in metrics.jsonl; its teachers are not shown"]
    if not path.is_file():
        return report, [f"{path}: not found; the objective's teachers live only there, so they are not shown"]
    try:
        tensors = load_file(str(path))
        model = copy.deepcopy(loaded.model)
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        objective = restore_crossdistil(
            section, model, loaded.schema.task_names, last["objective"], torch.device("cpu")
        )
        objective.load_state_dict({k[10:]: v for k, v in tensors.items() if k.startswith("objective.")})
    except (SafetensorError, OSError, RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        return report, [f"{path}: the objective's teachers could not be read ({first}); they are not shown"]
    model.eval()
    report["learned"] = objective.explain(data, batch_size)
    report["epoch"] = last.get("epoch")
    return report, []


def read_objective(report: dict[str, Any]) -> list[str]:
    """Lines: each term's first and last epoch per task; teacher against student AUC; the
    teachers' weakest level pair per task against chance."""
    lines = []
    history = report.get("history")
    if history:
        kind = history.get("kind") or "objective"
        for name, by_task in history["terms"].items():
            moves = []
            for task, values in by_task.items():
                known = [v for v in values if v is not None]
                if known:
                    moves.append(f"{task} {known[0]:.3g} -> {known[-1]:.3g}")
            if moves:
                lines.append(f"{kind} {name.replace('_', ' ')} per epoch: " + ", ".join(moves))
    learned = report.get("learned")
    if learned:
        parts = []
        for task, value in learned["auc"].items():
            teacher, student = value["teacher"], value["student"]
            if teacher is not None and student is not None:
                pcoc = learned.get("pcoc", {}).get(task, {})
                calibration = (
                    f" (pcoc {pcoc['teacher']:.2f} vs {pcoc['student']:.2f})"
                    if pcoc.get("teacher") is not None and pcoc.get("student") is not None
                    else ""
                )
                parts.append(f"{task} teacher {teacher:.4f} vs student {student:.4f}{calibration}")
        if parts:
            lines.append(f"AUC with epoch {report['epoch']}'s teachers and students: " + ", ".join(parts))
        orders = []
        for task, shares in learned["pairwise_accuracy"].items():
            if shares:
                pair, share = min(shares.items(), key=lambda item: item[1])
                above = sum(1 for v in shares.values() if v > CHANCE)
                orders.append(
                    f"{task} (with {learned['partners'][task]}) {above} of {len(shares)} level pairs above chance,"
                    f" weakest {pair} {share:.3f}"
                )
        if orders:
            lines.append("teachers' share of correctly ordered pairs: " + "; ".join(orders))
    return lines
