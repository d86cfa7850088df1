"""``compare_runs``: per-task metrics of several runs side by side, and each run's multi-task gain
over a baseline run (normally a ``single_task`` run), with seesaw marked.

The gain of a task is measured on its headline metric: AUC for binary tasks (higher is better) and
RMSE for regression (lower is better, so the gain is baseline - run). A run *seesaws* when at least
one task gains more than ``tolerance`` and another loses more than ``tolerance``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtlcli.errors import MtlError

HEADLINE = {"binary": ("auc", 1.0), "regression": ("rmse", -1.0)}


def headline(metrics: dict[str, Any]) -> tuple[str, float] | None:
    """(metric, sign) of a task's headline metric, from which metrics it has."""
    for metric, sign in HEADLINE.values():
        if metrics.get(metric) is not None:
            return metric, sign
    return None


def gains(run: dict[str, Any], baseline: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """Per-task gain of ``run`` over ``baseline`` (both ``evaluate_run`` results) and the seesaw verdict."""
    out: dict[str, Any] = {}
    for task, metrics in run["tasks"].items():
        base = baseline["tasks"].get(task)
        found = headline(metrics)
        if base is None or found is None or base.get(found[0]) is None:
            out[task] = None
            continue
        metric, sign = found
        delta = sign * (metrics[metric] - base[metric])
        out[task] = {
            "metric": metric,
            "baseline": base[metric],
            "value": metrics[metric],
            "gain": delta,
            "relative_gain": delta / abs(base[metric]) if base[metric] else None,
        }
    deltas = [g["gain"] for g in out.values() if g is not None]
    up = [t for t, g in out.items() if g is not None and g["gain"] > tolerance]
    down = [t for t, g in out.items() if g is not None and g["gain"] < -tolerance]
    return {
        "gain": out,
        "mean_gain": sum(deltas) / len(deltas) if deltas else None,
        "improved": up,
        "worsened": down,
        "seesaw": bool(up and down),
    }


def compare_results(
    results: list[dict[str, Any]], baseline: dict[str, Any] | None, tolerance: float = 0.001
) -> dict[str, Any]:
    """Side-by-side table from ``evaluate_run``-like results ({"run_dir", "scheme", "tasks": {task: metrics}})."""
    tasks = list(dict.fromkeys(t for r in results for t in r["tasks"]))
    runs: list[dict[str, Any]] = []
    for result in results:
        entry: dict[str, Any] = {key: result.get(key) for key in ("run_dir", "scheme", "weighting")}
        entry["tasks"] = result["tasks"]
        if baseline is not None:
            entry.update(gains(result, baseline, tolerance))
        runs.append(entry)
    best: dict[str, str | None] = {}
    for task in tasks:
        scored = []
        for entry in runs:
            metrics = entry["tasks"].get(task)
            found = headline(metrics) if metrics else None
            if metrics is not None and found is not None:
                scored.append((found[1] * metrics[found[0]], entry["run_dir"]))
        best[task] = max(scored)[1] if scored else None
    return {
        "tasks": tasks,
        "baseline": _identity(baseline),
        "tolerance": tolerance,
        "runs": runs,
        "best": best,
    }


def _identity(result: dict[str, Any] | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {key: result.get(key) for key in ("run_dir", "scheme", "weighting")} | {"tasks": result["tasks"]}


def verdict(run: dict[str, Any]) -> str:
    """Which tasks a run (a ``compare_results`` entry with gains) helps and hurts, in words."""
    if run["seesaw"]:
        return f"seesaw: {', '.join(run['improved'])} up, {', '.join(run['worsened'])} down"
    if run["worsened"]:
        return f"negative transfer on {', '.join(run['worsened'])}"
    if run["improved"]:
        return f"gains on {', '.join(run['improved'])}, no task worse"
    return "no task moves beyond the tolerance"


def readings(comparison: dict[str, Any]) -> list[str]:
    """One line per run with a baseline: which tasks it helps and hurts."""
    return [f"{run['run_dir']} ({run['scheme']}): {verdict(run)}" for run in comparison["runs"] if "gain" in run]


def compare_runs(
    run_dirs: list[Path], baseline: Path | None = None, split: str = "test", tolerance: float = 0.001
) -> dict[str, Any]:
    """Evaluate every run (and the baseline) on ``split`` and compare them."""
    from mtlcli.train.run import evaluate_run, load_run

    if not run_dirs:
        raise MtlError("give at least one run directory to compare")

    def evaluated(run_dir: Path) -> dict[str, Any]:
        recipe = load_run(run_dir).recipe
        result = evaluate_run(run_dir, split)
        return {**result, "scheme": recipe.model.scheme, "weighting": recipe.loss.weighting}

    base = evaluated(baseline) if baseline is not None else None
    out = compare_results([evaluated(r) for r in run_dirs], base, tolerance)
    out["split"] = split
    out["readings"] = readings(out)
    return out
