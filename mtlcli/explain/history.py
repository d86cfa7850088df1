"""Training history from a run's metrics.jsonl: the loss weights and losses per epoch, and, when the
recipe sets ``train.track_gradients``, the gradient cosines and loss weights sampled every N steps."""

from __future__ import annotations

from typing import Any


def history_report(records: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any] | None:
    """{"epochs", "loss_weights", "train_loss", "valid_auc", "gradients"} or None without records.

    ``gradients`` (None unless tracked): {"steps": [global step], "cosine": {"a~b": [...]},
    "loss_weights": {task: [...]}}.
    """
    epochs = [r for r in records if "epoch" in r and "train_loss" in r]
    tracked = [r for r in records if r.get("kind") == "gradients"]
    if not epochs and not tracked:
        return None
    pairs = [f"{a}~{b}" for i, a in enumerate(tasks) for b in tasks[i + 1 :]]
    report: dict[str, Any] = {
        "epochs": [r["epoch"] for r in epochs],
        "loss_weights": {t: [r.get("weights", {}).get(t) for r in epochs] for t in tasks},
        "train_loss": {t: [r.get("train_loss", {}).get(t) for r in epochs] for t in tasks},
        "valid_auc": {t: [r.get("valid", {}).get(t, {}).get("auc") for r in epochs] for t in tasks},
        "gradients": None,
    }
    if tracked:
        report["gradients"] = {
            "steps": [r["step"] for r in tracked],
            "cosine": {
                pair: [r["gradient_cosine"].get(pair.split("~")[0], {}).get(pair.split("~")[1]) for r in tracked]
                for pair in pairs
            },
            "loss_weights": {t: [r.get("weights", {}).get(t) for r in tracked] for t in tasks},
        }
    report["reading"] = read_history(report, pairs)
    return report


def read_history(report: dict[str, Any], pairs: list[str]) -> str:
    parts = []
    weights = report["loss_weights"]
    changing = {
        t: (w[0], w[-1]) for t, w in weights.items() if w and None not in (w[0], w[-1]) and abs(w[-1] - w[0]) > 1e-6
    }
    if changing:
        parts.append("loss weights moved: " + ", ".join(f"{t} {a:.3g} -> {b:.3g}" for t, (a, b) in changing.items()))
    elif report["epochs"]:
        parts.append(f"loss weights constant over {len(report['epochs'])} epochs")
    gradients = report["gradients"]
    if gradients:
        for pair in pairs:
            values = [v for v in gradients["cosine"][pair] if v is not None]
            if values:
                third = max(1, len(values) // 3)
                early, late = sum(values[:third]) / third, sum(values[-third:]) / third
                parts.append(f"{pair} gradient cosine {early:+.2f} early -> {late:+.2f} late")
    return "history: " + ("; ".join(parts) if parts else "nothing recorded")


def tallies_report(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What a scheme's own step counted, per epoch (the records' ``tallies``; CSRec's
    ``share_changed``: the shared-weight entries whose update the share rule scaled, summed over
    the epoch's steps): {"epochs", "counts": {name: [count per epoch]}}; None without any."""
    counted = [r for r in records if isinstance(r.get("tallies"), dict) and r["tallies"] and "epoch" in r]
    if not counted:
        return None
    names = list(dict.fromkeys(name for r in counted for name in r["tallies"]))
    return {
        "epochs": [r["epoch"] for r in counted],
        "counts": {n: [r["tallies"].get(n) for r in counted] for n in names},
    }


def read_tallies(report: dict[str, Any]) -> str:
    """One line: each count per epoch."""
    parts = [
        f"{name.replace('_', ' ')} " + ", ".join("-" if v is None else f"{v:,.0f}" for v in values)
        for name, values in report["counts"].items()
    ]
    return f"the scheme's step counted per epoch ({', '.join(map(str, report['epochs']))}): " + "; ".join(parts)
