"""Gate reports: which experts each task's gate uses, how sharply, and which experts nobody uses;
with gate control (DEPHN), which input fields steer each gate and the coefficient λ per epoch.

A scheme's ``introspect`` gives its gates as ``GateRecord``s: softmax weights [B, n] and the names of
the n experts they weigh. Gates of one *gate group* (``gate`` for MMoE, ``level1.gate`` for a PLE
level) form one table: its rows are the tasks (and ``shared``) and its columns the union of the
experts any of its gates can choose, so task gates over different expert sets (CGC, PLE) line up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mtlcli.models.views import AlphaRecord, GateRecord, ScaleRecord


@dataclass(frozen=True)
class GateRow:
    """One gate: the union index of each of its columns, and its weights [N, n] on its rows."""

    columns: list[int]
    weights: Tensor
    rows: Tensor  # bool [N]: the rows this gate is judged on (its task's sample space)


def gate_groups(gates: list[GateRecord]) -> dict[str, list[GateRecord]]:
    """The gates of each gate group, groups and gates in the scheme's order."""
    groups: dict[str, list[GateRecord]] = {}
    for gate in gates:
        groups.setdefault(gate.group, []).append(gate)
    return groups


def union_of_experts(labels: list[list[str]], tasks: list[str]) -> list[str]:
    """Every expert any gate of a group can choose: task experts in task order, then the rest."""
    seen = list(dict.fromkeys(label for row in labels for label in row))

    def key(label: str) -> tuple[int, int]:
        owner, _, index = label.rpartition(".")
        rank = tasks.index(owner) if owner in tasks else len(tasks)
        return rank, int(index) if index.isdigit() else 0

    return sorted(seen, key=key) if any("." in label for label in seen) else seen


def normalised_entropy(weights: Tensor) -> Tensor:
    """Entropy of each row of ``weights`` [N, n] divided by log n: 0 = one expert, 1 = uniform. [N]."""
    n = weights.shape[-1]
    if n < 2:
        return torch.zeros(weights.shape[:-1])
    w = weights.double().clamp_min(1e-12)
    return (-(w * w.log()).sum(-1) / math.log(n)).float()


def gate_group_report(
    rows: dict[str, GateRow], experts: list[str], dead_below: float, collapsed_above: float
) -> dict[str, Any]:
    """Statistics of one gate group; weights of experts a gate cannot choose are None."""
    report: dict[str, Any] = {
        "experts": experts,
        "weights": {},
        "spread": {},
        "entropy": {},
        "usage_entropy": {},
        "collapsed": {},
        "rows": {},
    }
    best = torch.zeros(len(experts))
    max_error = 0.0
    for name, row in rows.items():
        w = row.weights[row.rows].double()
        count = int(w.shape[0])
        mean = w.mean(0) if count else torch.full((w.shape[1],), math.nan, dtype=torch.float64)
        std = w.std(0, correction=0) if count else torch.full_like(mean, math.nan)
        full_mean: list[float | None] = [None] * len(experts)
        full_std: list[float | None] = [None] * len(experts)
        for column, index in enumerate(row.columns):
            full_mean[index] = float(mean[column])
            full_std[index] = float(std[column])
            best[index] = max(float(best[index]), float(mean[column]) if count else 0.0)
        report["weights"][name] = full_mean
        report["spread"][name] = full_std
        report["entropy"][name] = float(normalised_entropy(w).mean()) if count else None
        report["usage_entropy"][name] = float(normalised_entropy(mean.unsqueeze(0))[0]) if count else None
        top = int(mean.argmax()) if count else 0
        collapsed = count > 0 and len(row.columns) > 1 and float(mean[top]) >= collapsed_above
        report["collapsed"][name] = experts[row.columns[top]] if collapsed else None
        report["rows"][name] = count
        if count:
            max_error = max(max_error, float((w.sum(1) - 1.0).abs().max()))
    report["dead_experts"] = [e for e, b in zip(experts, best.tolist(), strict=True) if b < dead_below]
    report["max_sum_error"] = max_error
    return report


def main_experts(weights: list[float | None], experts: list[str], share: float = 0.5, limit: int = 3) -> list[str]:
    """The fewest experts (at most ``limit``) that together take ``share`` of a gate's mean weight."""
    ranked = sorted(((w, e) for w, e in zip(weights, experts, strict=True) if w is not None), reverse=True)
    chosen, total = [], 0.0
    for w, e in ranked[:limit]:
        chosen.append(e)
        total += w
        if total >= share:
            break
    return chosen


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def read_gate_group(name: str, report: dict[str, Any]) -> str:
    """One line: each gate's main experts, the experts two tasks share, dead experts, collapsed gates."""
    experts = report["experts"]
    mains = {row: main_experts(w, experts) for row, w in report["weights"].items() if report["rows"][row]}
    parts = []
    for row, chosen in mains.items():
        weights = report["weights"][row]
        total = sum(weights[experts.index(e)] for e in chosen)
        parts.append(f"{row} leans on expert{'s' if len(chosen) > 1 else ''} {_join(chosen)} ({total:.0%})")
    line = f"{name}: " + "; ".join(parts)
    task_rows = [r for r in mains if r != "shared"]
    for i, a in enumerate(task_rows):
        for b in task_rows[i + 1 :]:
            common = [e for e in mains[a] if e in mains[b]]
            if common:
                line += f"; {a} and {b} share expert{'s' if len(common) > 1 else ''} {_join(common)}"
            elif len(task_rows) == 2:
                line += f"; {a} and {b} use different experts"
    dead = report["dead_experts"]
    if dead:
        line += f"; expert{'s' if len(dead) > 1 else ''} {_join(dead)} {'are' if len(dead) > 1 else 'is'} dead"
    for row, expert in report["collapsed"].items():
        if expert is not None:
            line += f"; {row}'s gate has collapsed onto expert {expert}"
    return line


def gates_by_value(
    rows: dict[str, GateRow], experts: list[str], values: Tensor, names: list[str], top: int
) -> list[dict[str, Any]]:
    """Mean gate weights per value of a categorical feature (ids [N]), for the ``top`` most frequent values."""
    ids, counts = values.unique(return_counts=True)
    order = counts.argsort(descending=True, stable=True)[:top]
    result = []
    for i in order.tolist():
        value = int(ids[i])
        selected = values == value
        means: dict[str, list[float | None]] = {}
        for name, row in rows.items():
            w = row.weights[selected & row.rows].double()
            full: list[float | None] = [None] * len(experts)
            if w.shape[0]:
                for column, index in enumerate(row.columns):
                    full[index] = float(w[:, column].mean())
            means[name] = full
        result.append(
            {"value": names[value] if value < len(names) else str(value), "rows": int(counts[i]), "weights": means}
        )
    return result


def read_by_value(group: str, feature: str, overall: dict[str, Any], by_value: list[dict[str, Any]]) -> str:
    """One line: for each gate, the feature value whose routing differs most from the overall mean."""
    experts = overall["experts"]
    parts = []
    for row, mean in overall["weights"].items():
        best: tuple[float, str, int, float, float] | None = None
        for entry in by_value:
            w = entry["weights"][row]
            pairs = [(i, a, b) for i, (a, b) in enumerate(zip(w, mean, strict=True)) if a is not None and b is not None]
            if not pairs:
                continue
            distance = 0.5 * sum(abs(a - b) for _, a, b in pairs)
            i, a, b = max(pairs, key=lambda p: abs(p[1] - p[2]))
            if best is None or distance > best[0]:
                best = (distance, entry["value"], i, a, b)
        if best is not None:
            distance, value, i, a, b = best
            parts.append(
                f"{row}'s gate moves most for {value!r} (by {distance:.0%}: expert {experts[i]} {a:.2f} vs {b:.2f})"
            )
    return f"{group} by {feature}: " + "; ".join(parts)


def alpha_report(alphas: list[AlphaRecord], tasks: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Cross-stitch matrices as {layer: {task: {task: alpha}}}; row k mixes into task k's column."""
    return {
        alpha.layer: {a: {b: float(alpha.matrix[i, j]) for j, b in enumerate(tasks)} for i, a in enumerate(tasks)}
        for alpha in alphas
    }


def read_alpha(layer: str, matrix: dict[str, dict[str, float]]) -> str:
    """How much of each column's input comes from the other tasks' columns (by absolute alpha)."""
    parts = []
    for task, row in matrix.items():
        total = sum(abs(v) for v in row.values())
        other = sum(abs(v) for b, v in row.items() if b != task)
        parts.append(f"{task} takes {other / total if total else 0.0:.0%} from the others")
    return f"{layer}: " + "; ".join(parts)


def field_scale_report(scales: Tensor, tasks: list[str], fields: list[str]) -> dict[str, dict[str, float]]:
    """Gate control's field mapping as {task: {field: s}}: how much each input field steers the
    task's gate (s [T, F]; 1 where training left it, 0 where the gate ignores the field)."""
    return {task: dict(zip(fields, scales[k].tolist(), strict=True)) for k, task in enumerate(tasks)}


def read_field_scales(report: dict[str, dict[str, float]], top: int = 3) -> str:
    """One line: the fields that steer each task's gate most, and least (by |s|)."""
    parts = []
    for task, scales in report.items():
        ranked = sorted(scales.items(), key=lambda item: -abs(item[1]))
        most = ", ".join(f"{field} {value:.2f}" for field, value in ranked[:top])
        least = ranked[-1]
        parts.append(f"{task}'s gate reads most {most}; least {least[0]} {least[1]:.2f}")
    return "gate inputs: " + "; ".join(parts)


def lambda_report(records: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any] | None:
    """Gate control's coefficients per epoch from a run's epoch records: {"epochs", "lambda",
    "difference", "correlation", "target"}, each but the first {task: [value per epoch]} (target:
    d* = δ(1 − c); None in records written before it was logged); None when no record carries
    them (gate control off)."""
    controlled = [r for r in records if isinstance(r.get("gate_control"), dict)]
    if not controlled:
        return None
    report: dict[str, Any] = {"epochs": [r.get("epoch") for r in controlled]}
    for key in ("lambda", "difference", "correlation", "target"):
        report[key] = {t: [r["gate_control"].get(key, {}).get(t) for r in controlled] for t in tasks}
    return report


def read_lambda(report: dict[str, Any]) -> str:
    """One line: each task's λ in the first and the last epoch, and whether the tasks' λ differ."""
    parts = []
    for task, values in report["lambda"].items():
        known = [v for v in values if v is not None]
        if known:
            parts.append(f"{task} {known[0]:.3g} -> {known[-1]:.3g}")
    last = [v[-1] for v in report["lambda"].values() if v and v[-1] is not None]
    same = len(last) > 1 and max(last) - min(last) <= 1e-9 * max(abs(v) for v in last)
    note = " (the same for every task: with two tasks d and c are shared by both)" if same else ""
    versus = []
    for task in report["lambda"]:
        d, target = report["difference"][task][-1], report.get("target", {}).get(task, [None])[-1]
        if d is not None and target is not None:
            pace = "slower" if d > target else "faster"
            versus.append(f"{task} d {d:.3f} vs d* {target:.3f} ({pace})")
    against = f"; last epoch's gate difference against its target: {', '.join(versus)}" if versus else ""
    return "gate control λ per epoch: " + ", ".join(parts) + note + against


def scale_report(records: list[ScaleRecord], fields: list[str]) -> dict[str, dict[str, Any]]:
    """Multiplicative gates (``ScaleRecord``, concatenated over the rows) as {group: {"bound",
    "units", "rows": {row: {"mean": [per unit], "spread": [per unit]}}}}: each unit's mean scale
    over the rows and its standard deviation across rows (how much the gate personalises it);
    units are named by the record, or by ``fields`` when they are the input fields."""
    report: dict[str, dict[str, Any]] = {}
    for record in records:
        units = record.units if record.units is not None else fields
        group = report.setdefault(record.group, {"bound": record.bound, "units": units, "rows": {}})
        scales = record.scales.double()
        spread = scales.std(0, unbiased=False) if len(scales) else torch.zeros(scales.shape[1:])
        group["rows"][record.row] = {
            "mean": [float(v) for v in (scales.mean(0) if len(scales) else torch.ones(scales.shape[1:]))],
            "spread": [float(v) for v in spread],
        }
    return report


def read_scales(group: str, report: dict[str, Any], top: int = 3) -> str:
    """One line per group: per row, the mean scale over its units, the units it raises and lowers
    most, and how much it varies across rows (the mean spread)."""
    parts = []
    units = report["units"]
    for row, values in report["rows"].items():
        mean = values["mean"]
        ranked = sorted(range(len(mean)), key=lambda i: -mean[i])
        high = ", ".join(f"{units[i]} {mean[i]:.2f}" for i in ranked[:top])
        low = ", ".join(f"{units[i]} {mean[i]:.2f}" for i in ranked[::-1][:top])
        average = sum(mean) / len(mean) if mean else 1.0
        spread = sum(values["spread"]) / len(mean) if mean else 0.0
        parts.append(f"{row} scales by {average:.2f} on average (± {spread:.2f} across rows); most {high}; least {low}")
    return f"{group} gate scales (of 0..{report['bound']:g}): " + "; ".join(parts)
