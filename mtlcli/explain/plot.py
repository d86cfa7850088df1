"""PNG heatmaps of an explain report (matplotlib, an optional extra: ``pip install mtlcli[plot]``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mtlcli.errors import MtlError
from mtlcli.fileio import atomic_path


class PlotUnavailable(MtlError):
    """--plot was asked for but matplotlib is not installed."""


def require_matplotlib() -> Any:
    """The pyplot module on the non-interactive Agg backend, or PlotUnavailable."""
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib, which is not installed", "pip install 'mtlcli[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _saved(plt: Any, fig: Any, path: Path) -> Path:
    """Lay the figure out, write it to ``path`` atomically as PNG and free it."""
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def heatmap(
    path: Path,
    title: str,
    rows: list[str],
    columns: list[str],
    values: list[list[float | None]],
    diverging: bool,
) -> Path:
    plt = require_matplotlib()
    import numpy as np

    grid = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    width = max(3.5, 0.7 * len(columns) + 2.0)
    height = max(2.2, 0.5 * len(rows) + 1.4)
    fig, ax = plt.subplots(figsize=(width, height), dpi=80)
    if diverging:
        image = ax.imshow(grid, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    else:
        image = ax.imshow(grid, cmap="Reds", vmin=0.0, vmax=max(float(np.nanmax(grid)) if grid.size else 1.0, 1e-6))
    ax.set_xticks(
        range(len(columns)),
        columns,
        rotation=45 if len(columns) > 4 else 0,
        ha="right" if len(columns) > 4 else "center",
    )
    ax.set_yticks(range(len(rows)), rows)
    low, high = image.get_clim()
    for i in range(len(rows)):
        for j in range(len(columns)):
            if not np.isnan(grid[i, j]):
                strong = abs(grid[i, j]) > 0.6 * high if diverging else grid[i, j] > low + 0.6 * (high - low)
                colour = "white" if strong else "black"
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _saved(plt, fig, path)


def matrix_plot(path: Path, title: str, matrix: dict[str, dict[str, float | None]]) -> Path:
    rows = list(matrix)
    columns = list(next(iter(matrix.values()))) if matrix else []
    return heatmap(path, title, rows, columns, [[matrix[r][c] for c in columns] for r in rows], diverging=True)


def history_plot(path: Path, history: dict[str, Any]) -> Path:
    plt = require_matplotlib()
    gradients = history.get("gradients")
    panels = 2 if gradients else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3), dpi=80, squeeze=False)
    ax = axes[0][0]
    if gradients:
        for task, values in gradients["loss_weights"].items():
            ax.plot(gradients["steps"], values, label=task)
        ax.set_xlabel("step")
    else:
        for task, values in history["loss_weights"].items():
            ax.plot(history["epochs"], values, marker="o", label=task)
        ax.set_xlabel("epoch")
    ax.set_title("loss weights", fontsize=9)
    ax.legend(fontsize=7)
    if gradients:
        ax = axes[0][1]
        for pair, values in gradients["cosine"].items():
            ax.plot(gradients["steps"], [float("nan") if v is None else v for v in values], label=pair)
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set_xlabel("step")
        ax.set_title("gradient cosine on shared parameters", fontsize=9)
        ax.legend(fontsize=7)
    return _saved(plt, fig, path)


def importance_plot(path: Path, task: str, metric: str, entries: dict[str, Any], top: int = 15) -> Path:
    """Horizontal bars: the task's ``top`` inputs by permutation importance, with their spread."""
    from mtlcli.explain.importance import loss_of

    plt = require_matplotlib()
    shown = list(entries.items())[:top][::-1]
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(shown) + 1), dpi=80)
    ax.barh([n for n, _ in shown], [v["drop"] for _, v in shown], xerr=[v["std"] for _, v in shown], color="#c44e52")
    ax.axvline(0.0, color="grey", linewidth=0.5)
    ax.set_title(f"{task}: {loss_of(metric)} when an input is shuffled", fontsize=9)
    ax.tick_params(labelsize=7)
    return _saved(plt, fig, path)


def _lines(ax: Any, epochs: list[int], series: dict[str, list[float | None]], title: str, **style: Any) -> None:
    for label, values in series.items():
        ax.plot(epochs, [float("nan") if v is None else v for v in values], marker="o", label=label, **style)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def gate_control_plot(path: Path, report: dict[str, Any]) -> Path:
    """Gate control per epoch: λ per task (log scale), and each task's gate difference d beside
    its target d* (dashed)."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3), dpi=80)
    epochs = report["epochs"]
    _lines(axes[0], epochs, {f"λ {t}": v for t, v in report["lambda"].items()}, "gate control: λ per epoch")
    axes[0].set_yscale("log")
    axes[0].axhline(1.0, color="grey", linewidth=0.5)
    _lines(axes[1], epochs, {f"d {t}": v for t, v in report["difference"].items()}, "gate difference d, target d*")
    axes[1].set_prop_cycle(None)
    targets = report.get("target") or {}
    _lines(axes[1], epochs, {f"d* {t}": v for t, v in targets.items()}, "gate difference d, target d*", linestyle="--")
    return _saved(plt, fig, path)


def tallies_plot(path: Path, report: dict[str, Any]) -> Path:
    """What the scheme's training step counted per epoch."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
    named = {n.replace("_", " "): v for n, v in report["counts"].items()}
    _lines(ax, report["epochs"], named, "counted by the scheme's training step")
    return _saved(plt, fig, path)


def objective_plot(path: Path, report: dict[str, Any]) -> Path:
    """The objective's terms per epoch (one panel each) and, with its teachers, their share of
    correctly ordered pairs per level pair (bars per task; 0.5 is chance)."""
    plt = require_matplotlib()
    history = report.get("history") or {"terms": {}, "epochs": []}
    learned = report.get("learned")
    panels = len(history["terms"]) + (1 if learned else 0)
    fig, axes = plt.subplots(1, max(1, panels), figsize=(4 * max(1, panels), 3), dpi=80, squeeze=False)
    for ax, (name, by_task) in zip(axes[0], history["terms"].items(), strict=False):
        _lines(ax, history["epochs"], by_task, name.replace("_", " "))
    if learned:
        ax = axes[0][-1]
        shares = learned["pairwise_accuracy"]
        pairs = list(dict.fromkeys(p for values in shares.values() for p in values))
        width = 0.8 / max(1, len(shares))
        for k, (task, values) in enumerate(shares.items()):
            heights = [values.get(p, float("nan")) for p in pairs]
            ax.bar([i + k * width for i in range(len(pairs))], heights, width, label=task)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(pairs))], pairs, fontsize=7)
        ax.axhline(0.5, color="grey", linewidth=0.5)
        ax.set_ylim(0.0, 1.0)
        ax.set_title(f"teachers' ordered pairs (epoch {report.get('epoch')})", fontsize=9)
        ax.legend(fontsize=7)
    return _saved(plt, fig, path)


def write_plots(report: dict[str, Any], directory: Path) -> list[Path]:
    """One PNG per gate group, alpha layer and task matrix, the training history, and where the run
    has them gate control's λ (gate_control.png), the scheme step's counts (tallies.png) and the
    training objective's terms and teachers (<kind>.png, e.g. crossdistil.png); returns the paths."""
    require_matplotlib()
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, group in report["gates"].items():
        rows = list(group["weights"])
        written.append(
            heatmap(
                directory / f"gates_{_safe(name)}.png",
                f"{name}: mean weight per expert",
                rows,
                group["experts"],
                [group["weights"][r] for r in rows],
                diverging=False,
            )
        )
    for layer, matrix in report["alpha"].items():
        written.append(matrix_plot(directory / f"alpha_{_safe(layer)}.png", f"cross-stitch alpha, {layer}", matrix))
    written.append(matrix_plot(directory / "label_correlation.png", "label correlation", report["label_correlation"]))
    written.append(
        matrix_plot(
            directory / "prediction_correlation.png", "prediction correlation", report["prediction_correlation"]
        )
    )
    if report["gradient_cosine"]:
        written.append(
            matrix_plot(directory / "gradient_cosine.png", "gradient cosine (shared params)", report["gradient_cosine"])
        )
    if report.get("history"):
        written.append(history_plot(directory / "history.png", report["history"]))
    control = (report.get("gate_control") or {}).get("lambda")
    if control:
        written.append(gate_control_plot(directory / "gate_control.png", control))
    if report.get("tallies"):
        written.append(tallies_plot(directory / "tallies.png", report["tallies"]))
    objective = report.get("objective")
    if objective and (objective.get("learned") or (objective.get("history") or {}).get("terms")):
        kind = (objective.get("history") or {}).get("kind") or "objective"
        written.append(objective_plot(directory / f"{_safe(kind)}.png", objective))
    if report.get("importance"):
        importance = report["importance"]
        for task, entries in importance["importance"].items():
            path = directory / f"importance_{_safe(task)}.png"
            written.append(importance_plot(path, task, importance["metric"][task], entries))
    return written
