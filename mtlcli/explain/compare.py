"""``compare_runs``: per-task metrics of several runs side by side, and each run's multi-task gain
over a baseline run (normally a ``single_task`` run), with seesaw marked.

The gain of a task is measured on its headline metric: AUC for binary tasks (higher is better) and
RMSE for regression (lower is better, so the gain is baseline - run). A run *seesaws* when at least
one task gains more than ``tolerance`` and another loses more than ``tolerance``.

Runs whose recipes differ only in ``train.seed`` form a *seed group*: its mean and spread (sample
std) per task say how far a difference must go before it is more than the seeds' noise, and the
readings say when one is within it. With one seed per run the readings say that one seed cannot
tell.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from mtlcli.errors import MtlError
from mtlcli.fileio import sha256_json

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
        "groups": seed_groups(runs, results, tasks),
    }


def seed_groups(runs: list[dict[str, Any]], results: list[dict[str, Any]], tasks: list[str]) -> list[dict[str, Any]]:
    """The runs grouped by ``recipe_key`` (their recipe without ``train.seed``; a result without
    one is its own group), with per task the mean and sample std of the headline metric (and of
    the gain, when the runs have gains) over the group's seeds."""
    keys: dict[str, list[int]] = {}
    for i, result in enumerate(results):
        keys.setdefault(str(result.get("recipe_key") or f"run {i}"), []).append(i)
    groups = []
    for members in keys.values():
        group: dict[str, Any] = {
            "runs": [runs[i]["run_dir"] for i in members],
            "seeds": [results[i].get("seed") for i in members],
            "scheme": runs[members[0]]["scheme"],
            "tasks": {},
            "gain": {},
        }
        for task in tasks:
            metrics = [runs[i]["tasks"].get(task) or {} for i in members]
            found = headline(metrics[0])
            values = [m[found[0]] for m in metrics if found and m.get(found[0]) is not None]
            if found and len(values) == len(members):
                group["tasks"][task] = {"metric": found[0], **_spread([float(v) for v in values])}
            gains_ = [g["gain"] for i in members if (g := (runs[i].get("gain") or {}).get(task)) is not None]
            if "gain" in runs[members[0]] and len(gains_) == len(members):
                group["gain"][task] = _spread(gains_)
        groups.append(group)
    return groups


def _spread(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}  # fmt: skip


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


def readings(comparison: dict[str, Any], names: dict[str, str] | None = None) -> list[str]:
    """With a baseline, one line per run: which tasks it helps and hurts; then what the seeds say:
    per seed group the gain (or, without a baseline, each task's difference from the best group)
    against the seeds' spread, or that one seed per run cannot tell. ``names``: shown run names."""
    name = (names or {}).get
    lines = [
        f"{name(run['run_dir'], run['run_dir'])} ({run['scheme']}): {verdict(run)}"
        for run in comparison["runs"]
        if "gain" in run
    ]
    groups = comparison["groups"]
    seeded = [g for g in groups if len(g["runs"]) > 1]
    for group in seeded:
        label = f"{name(group['runs'][0], group['runs'][0])} and {len(group['runs']) - 1} more ({group['scheme']}, seeds {', '.join(map(str, group['seeds']))})"
        if group["gain"]:
            parts = [
                f"{task} {g['mean']:+.4f} ± {g['std']:.4f}"
                + (" (within the seeds' spread)" if abs(g["mean"]) <= max(g["std"], comparison["tolerance"]) else "")
                for task, g in group["gain"].items()
            ]
            lines.append(f"{label}: gain over the baseline, mean ± std over the seeds: {', '.join(parts)}")
    if len(seeded) > 1:
        for task in comparison["tasks"]:
            scored = [g for g in seeded if task in g["tasks"]]
            if len(scored) < 2:
                continue
            sign = dict(HEADLINE.values())[scored[0]["tasks"][task]["metric"]]
            best = max(scored, key=lambda g: sign * g["tasks"][task]["mean"])
            for other in scored:
                if other is best:
                    continue
                a, b = best["tasks"][task], other["tasks"][task]
                spread = max(a["std"], b["std"])
                diff = abs(a["mean"] - b["mean"])
                where = "within the seeds' spread" if diff <= spread else "beyond the seeds' spread"
                lines.append(
                    f"{task}: {name(best['runs'][0], best['runs'][0])}'s group leads {name(other['runs'][0], other['runs'][0])}'s"
                    f" by {diff:.4f} {a['metric']}, {where} (std {spread:.4f})"
                )
    if groups and not seeded and (comparison["baseline"] is not None or len(groups) > 1):
        lines.append(
            "one seed per run: a single seed cannot tell a difference of this size from seed noise;"
            " train several seeds (mtl sweep --grid train.seed=0,1,2) and compare them as groups"
        )
    return lines


def compare_runs(
    run_dirs: list[Path], baseline: Path | None = None, split: str = "test", tolerance: float = 0.001
) -> dict[str, Any]:
    """Evaluate every run (and the baseline) on ``split`` and compare them."""
    from mtlcli.train.run import evaluate_run, load_run

    if not run_dirs:
        raise MtlError("give at least one run directory to compare")
    distinct_runs(run_dirs, baseline)

    def evaluated(run_dir: Path) -> dict[str, Any]:
        recipe = load_run(run_dir).recipe
        result = evaluate_run(run_dir, split)
        spec = recipe.to_dict()
        spec["data"] = {k: v for k, v in spec["data"].items() if k not in ("cache_dir", "memory_budget")}
        spec["train"] = {k: v for k, v in spec["train"].items() if k not in SEED_FREE}
        return {
            **result,
            "scheme": recipe.model.scheme,
            "weighting": recipe.loss.weighting,
            "seed": recipe.train.seed,
            "recipe_key": sha256_json(spec),
        }

    base = evaluated(baseline) if baseline is not None else None
    out = compare_results([evaluated(r) for r in run_dirs], base, tolerance)
    out["split"] = split
    out["names"] = short_names([str(r) for r in [*run_dirs, *([baseline] if baseline is not None else [])]])
    out["readings"] = readings(out, out["names"])
    return out


def distinct_runs(run_dirs: list[Path], baseline: Path | None) -> None:
    """Refuse a run given twice (it would count as two seeds of one setting, or two rows that look
    alike) and a baseline that is one of the runs (every gain 0 by construction)."""
    seen: dict[Path, Path] = {}
    for run_dir in run_dirs:
        first = seen.setdefault(run_dir.resolve(), run_dir)
        if first is not run_dir:
            also = f" (also as {first})" if str(first) != str(run_dir) else ""
            raise MtlError(f"the run {run_dir} is given twice{also}", "list each run once")
    if baseline is not None and baseline.resolve() in seen:
        raise MtlError(
            f"--baseline {baseline}: the baseline is also one of the runs compared (its gain is 0 by construction)",
            "give the baseline only as --baseline",
        )


# what does not change a run's results: runs that differ only here (and in the seed) are seeds of one setting
SEED_FREE = ("seed", "threads", "loggers", "experiment", "device", "eval_batch_size")


def short_names(paths: list[str]) -> dict[str, str]:
    """Each path as its last N parts, N the fewest that tell every distinct path apart
    (``runs/a/seed0/mmoe`` and ``runs/b/seed0/mmoe`` become ``a/seed0/mmoe`` and ``b/seed0/mmoe``);
    a path that is a tail of another is shown whole."""
    parts = {path: Path(path).parts for path in dict.fromkeys(paths)}
    for length in range(1, max((len(p) for p in parts.values()), default=0) + 1):
        tails = [p[-length:] for p in parts.values()]
        if len(set(tails)) == len(tails):
            return {path: path if len(p) <= length else str(Path(*p[-length:])) for path, p in parts.items()}
    return {path: path for path in parts}
