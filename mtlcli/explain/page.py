"""``mtl report``: one self-contained HTML page about one or more runs — training curves, loss
weights, metrics on valid and test, the gain over a baseline run, gate heatmaps, label and
gradient correlation, and the resolved recipe. Charts are inline SVG drawn here and heatmaps are
coloured table cells, so the page needs no network, no script and no plotting library."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, model_validator

from mtlcli import __version__
from mtlcli.explain.compare import compare_results, distinct_runs, headline, verdict
from mtlcli.explain.importance import loss_of
from mtlcli.explain.report import ExplainOptions, explain_run, read_metrics
from mtlcli.fileio import sha256_file
from mtlcli.recipe import recipe_to_yaml

PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ddd;padding:.2em .5em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.charts{display:flex;flex-wrap:wrap;gap:1em}.note{color:#666;font-size:.9em}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}
svg text{font-size:11px;fill:#333}
"""


Matrix = dict[str, dict[str, float | None]]


def _rectangular(values: Matrix) -> Matrix:
    columns = [list(row) for row in values.values()]
    if any(c != columns[0] for c in columns):
        raise ValueError("its rows name different columns")
    return values


class SavedGates(BaseModel):
    """A gate group as the page draws it: one weight per expert in each gate's row."""

    model_config = ConfigDict(strict=True)
    experts: list[str]
    weights: dict[str, list[float | None]]

    @model_validator(mode="after")
    def _check(self) -> SavedGates:
        for row, values in self.weights.items():
            if len(values) != len(self.experts):
                raise ValueError(f"the {row} gate has {len(values)} weights for {len(self.experts)} experts")
        return self


class SavedImportance(BaseModel):
    model_config = ConfigDict(strict=True)
    metric: dict[str, str]
    importance: dict[str, dict[str, dict[Literal["drop", "std"], float | None]]]


class SavedExplain(BaseModel):
    """What the page reads of a saved ``mtl explain --json`` (other keys are not read); the
    ``model_sha256`` ties it to the model it describes."""

    model_config = ConfigDict(strict=True)
    run_dir: str
    model_sha256: str
    gates: dict[str, SavedGates]
    alpha: dict[str, Annotated[Matrix, AfterValidator(_rectangular)]] | None
    label_correlation: Annotated[Matrix, AfterValidator(_rectangular)] | None
    gradient_cosine: Annotated[Matrix, AfterValidator(_rectangular)] | None
    importance: SavedImportance | None
    readings: dict[str, str | list[str] | None]


def saved_explain(path: Path, model_sha256: str) -> tuple[dict[str, Any] | None, str | None]:
    """A run's saved explain report, or None and why it cannot be shown: not readable JSON, not
    the shape ``mtl explain --json`` writes, or the report of another model (a file copied from
    another run, or a run retrained since)."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc.msg} at line {exc.lineno})"
    try:
        saved = SavedExplain.model_validate(report)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return None, f"not the report `mtl explain --json` writes ({where + ': ' if where else ''}{first['msg']})"
    if saved.model_sha256 != model_sha256:
        return None, f"describes another model (explained from {saved.run_dir}), not this run's model.safetensors"
    return report, None


def gather(run_dir: Path, options: ExplainOptions) -> dict[str, Any]:
    """What the page shows of one run: its recipe, history, valid and test metrics, the explain
    report (the run's saved ``explain.json`` when it has one that fits the run, else computed on
    valid), and warnings about what the run directory holds that could not be used."""
    from mtlcli.train.run import EXPLAINED, evaluate_splits, loaded_run

    run = loaded_run(run_dir)  # the model and its data, loaded once for the explain report and the metrics
    loaded = run[0]
    saved = run_dir / EXPLAINED
    history, warnings = read_metrics(run_dir / "metrics.jsonl")
    explained, problem = None, None
    if saved.is_file():
        explained, problem = saved_explain(saved, sha256_file(run_dir / "model.safetensors"))
        source = f"from the run's saved {EXPLAINED}"
    if problem is not None:
        warnings.append(f"{saved}: {problem}; the explain report is computed again for this page")
    if explained is None:
        explained = explain_run(run_dir, "valid", options, run)
        rows = f"{explained['rows']:,} rows of the valid split"
        why = f"its saved {EXPLAINED} {problem}" if problem else f"no saved {EXPLAINED} in the run"
        source = f"computed for this page on {rows} ({why})"
    recipe = loaded.recipe
    identity = {"scheme": recipe.model.scheme, "weighting": recipe.loss.weighting}
    evaluated = evaluate_splits(run_dir, ["valid", "test"], run=run)
    return {
        "run_dir": str(run_dir),
        "name": run_dir.name,
        "scheme": recipe.model.scheme,
        "weighting": recipe.loss.weighting,
        "tasks": loaded.schema.task_names,
        "types": [t.type for t in loaded.schema.tasks],
        "history": history,
        "valid": evaluated["valid"] | identity,
        "test": evaluated["test"] | identity,
        "explain": explained,
        "explain_source": source,
        "recipe": recipe_to_yaml(recipe),  # the model's own: the run's recipe.yaml may be gone
        "warnings": warnings,
    }


# --- pieces -------------------------------------------------------------------------------------


def number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int) or (isinstance(value, float) and digits == 0):
        return f"{value:,.0f}"
    return f"{value:.{digits}f}" if isinstance(value, float) else escape(str(value))


def table(header: list[str], rows: list[list[str]]) -> str:
    """Cells are HTML already (escape text before)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def colour(value: float | None, low: float, high: float, diverging: bool) -> str:
    if value is None:
        return "#ffffff"
    if diverging:
        t = max(-1.0, min(1.0, value / max(abs(low), abs(high), 1e-12)))
        r, g, b = (255, int(255 * (1 - t)), int(255 * (1 - t))) if t >= 0 else (int(255 * (1 + t)),) * 2 + (255,)
    else:
        t = max(0.0, min(1.0, (value - low) / (high - low) if high > low else 0.0))
        r, g, b = 255, int(255 * (1 - 0.75 * t)), int(255 * (1 - t))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(rows: list[str], columns: list[str], values: list[list[float | None]], diverging: bool) -> str:
    flat = [v for row in values for v in row if v is not None]
    low, high = (-1.0, 1.0) if diverging else (0.0, max(flat, default=1.0))
    body = [
        [escape(r)]
        + [
            f'<span style="display:block;background:{colour(v, low, high, diverging)}">{number(v, 3)}</span>'
            for v in row
        ]
        for r, row in zip(rows, values, strict=True)
    ]
    return table([""] + [escape(c) for c in columns], body)


def matrix(values: dict[str, dict[str, float | None]], diverging: bool = True) -> str:
    rows = list(values)
    columns = list(next(iter(values.values()))) if values else []
    return heatmap(rows, columns, [[values[r][c] for c in columns] for r in rows], diverging)


def line_chart(title: str, series: dict[str, list[tuple[float, float | None]]], xlabel: str) -> str:
    """An inline SVG chart: one polyline per series (gaps where a value is missing), a legend."""
    width, height, left, right, top, bottom = 440, 250, 62, 110, 28, 36
    points = [(x, y) for values in series.values() for x, y in values if y is not None and math.isfinite(y)]
    if not points:
        return ""
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}"'
        ' font-size="11" font-family="sans-serif">',
        f'<text x="{left}" y="16" font-weight="bold">{escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#bbb"/>',
    ]
    for i in range(3):
        tick = y0 + (y1 - y0) * i / 2
        parts.append(f'<text x="{left - 4}" y="{sy(tick) + 4:.1f}" text-anchor="end">{tick:.4g}</text>')
    parts.append(f'<text x="{left}" y="{height - 8}">{x0:g}</text>')
    parts.append(f'<text x="{left + plot_w}" y="{height - 8}" text-anchor="end">{x1:g}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">{escape(xlabel)}</text>')
    for k, (label, values) in enumerate(series.items()):
        stroke = PALETTE[k % len(PALETTE)]
        run: list[str] = []
        for x, value in [*values, (math.nan, None)]:
            if value is None or not math.isfinite(value) or not math.isfinite(x):
                if len(run) > 1:
                    parts.append(
                        f'<polyline fill="none" stroke="{stroke}" stroke-width="1.8" points="{" ".join(run)}"/>'
                    )
                elif run:
                    cx, cy = run[0].split(",")
                    parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{stroke}"/>')
                run = []
            else:
                run.append(f"{sx(x):.1f},{sy(value):.1f}")
        ly = top + 12 + 16 * k
        parts.append(f'<rect x="{width - right + 8}" y="{ly - 8}" width="10" height="10" fill="{stroke}"/>')
        parts.append(f'<text x="{width - right + 22}" y="{ly + 1}">{escape(label[:16])}</text>')
    parts.append("</svg>")
    return "".join(parts)


# --- sections -----------------------------------------------------------------------------------


def runs_section(runs: list[dict[str, Any]]) -> str:
    rows = []
    for run in runs:
        history = run["history"]
        best = history[-1].get("best_epoch") if history else None
        speed = sorted(h.get("samples_per_second", 0.0) for h in history)[len(history) // 2] if history else None
        rows.append(
            [escape(run["run_dir"]), escape(run["scheme"]), escape(run["weighting"]), number(len(history)),
             number(best), number(speed, 0)]
        )  # fmt: skip
    return "<h2>Runs</h2>" + table(
        ["run", "scheme", "weighting", "epochs", "best epoch", "train samples/s (median epoch)"], rows
    )


def metrics_section(runs: list[dict[str, Any]], baseline: dict[str, Any] | None) -> str:
    out = ["<h2>Metrics</h2>"]
    shown = runs + ([baseline] if baseline else [])
    names = [escape(r["name"]) + (" (baseline)" if r is baseline else "") for r in shown]
    for split in ("valid", "test"):
        tasks = list(dict.fromkeys(t for r in shown for t in r[split]["tasks"]))
        rows = []
        for task in tasks:
            metric_names = list(dict.fromkeys(m for r in shown for m in r[split]["tasks"].get(task, {})))
            for metric in metric_names:
                rows.append(
                    [escape(task), escape(metric)]
                    + [number(r[split]["tasks"].get(task, {}).get(metric)) for r in shown]
                )
        out.append(f"<h3>{split}</h3>" + table(["task", "metric", *names], rows))
    if baseline is not None:
        comparison = compare_results([r["test"] for r in runs], baseline["test"])
        rows = []
        for run, entry in zip(runs, comparison["runs"], strict=True):
            for task, gain in entry["gain"].items():
                if gain is not None:
                    rows.append([escape(run["name"]), escape(task), escape(gain["metric"]), number(gain["baseline"]),
                                 number(gain["value"]), f"{gain['gain']:+.4f}"])  # fmt: skip
            rows.append([escape(run["name"]), "<b>all</b>", "", "", "", escape(verdict(entry))])
        out.append(
            f"<h3>MTL gain on test over {escape(baseline['name'])}</h3>"
            '<p class="note">The gain of a task is on its headline metric: AUC up, or RMSE down, '
            f"against the baseline run (more than {comparison['tolerance']:g} counts as a move).</p>"
            + table(["run", "task", "metric", "baseline", "run", "gain"], rows)
        )
    return "".join(out)


def curves_section(runs: list[dict[str, Any]]) -> str:
    out = ["<h2>Training</h2>", '<div class="charts">']
    tasks = list(dict.fromkeys(t for r in runs for t in r["tasks"]))
    for task in tasks:
        loss = {r["name"]: [(h["epoch"], h["train_loss"].get(task)) for h in r["history"]] for r in runs}
        out.append(line_chart(f"{task}: train loss", loss, "epoch"))
        valid: dict[str, list[tuple[float, float | None]]] = {}
        metric = "auc"
        for r in runs:
            series = []
            for h in r["history"]:
                found = headline(h["valid"].get(task, {}))
                if found is not None:
                    metric = found[0]
                series.append((h["epoch"], h["valid"].get(task, {}).get(metric)))
            valid[r["name"]] = series
        out.append(line_chart(f"{task}: valid {metric}", valid, "epoch"))
    out.append('</div><h3>Loss weights</h3><div class="charts">')
    for r in runs:
        weights = {t: [(h["epoch"], h["weights"].get(t)) for h in r["history"]] for t in r["tasks"]}
        out.append(line_chart(f"{r['name']} ({r['weighting']})", weights, "epoch"))
    out.append("</div>")
    return "".join(out)


def explain_section(run: dict[str, Any]) -> str:
    report = run["explain"]
    out = [
        f"<h2>{escape(run['name'])}: what the model does</h2>",
        f'<p class="note">Reports {escape(run["explain_source"])}.</p>',
    ]
    for name, group in report.get("gates", {}).items():
        rows = list(group["weights"])
        out.append(f"<h3>{escape(name)}: mean weight per gate and expert</h3>")
        out.append(heatmap(rows, group["experts"], [group["weights"][r] for r in rows], diverging=False))
    for layer, values in (report.get("alpha") or {}).items():
        out.append(f"<h3>cross-stitch α, {escape(layer)}</h3>" + matrix(values))
    out += seed_method_sections(report)
    if report.get("label_correlation"):
        out.append("<h3>label correlation</h3>" + matrix(report["label_correlation"]))
    if report.get("gradient_cosine"):
        out.append("<h3>gradient cosine on the shared parameters</h3>" + matrix(report["gradient_cosine"]))
    importance = report.get("importance")
    if importance:
        for task, entries in importance["importance"].items():
            rows = [[escape(n), number(v["drop"]), number(v["std"])] for n, v in list(entries.items())[:10]]
            metric = importance["metric"][task]
            out.append(f"<h3>{escape(task)}: {loss_of(metric)} when an input is shuffled</h3>")
            out.append(table(["input", loss_of(metric), "±"], rows))
    readings = [
        line
        for value in report.get("readings", {}).values()
        for line in (value if isinstance(value, list) else [value])
        if line
    ]
    if readings:
        out.append("<ul>" + "".join(f"<li>{escape(str(line))}</li>" for line in readings) + "</ul>")
    out.append(f"<h3>recipe (resolved)</h3><pre>{escape(run['recipe'])}</pre>")
    return "".join(out)


def _series(epochs: list[int], values: list[float | None]) -> list[tuple[float, float | None]]:
    return [(float(e), v) for e, v in zip(epochs, values, strict=True)]


def seed_method_sections(report: dict[str, Any]) -> list[str]:
    """What the masks, the scheme's step counts, gate control and the training objective learned,
    for the runs that have them (each part only when the report has it)."""
    out = []
    masks = report.get("masks")
    if masks:
        tasks = list(masks["density"])
        rows = [[escape(t), number(masks["density"][t], 3)] for t in tasks]
        out.append("<h3>masks: share of the shared weights each task keeps</h3>" + table(["task", "density"], rows))
        out.append("<h3>masks: overlap (IoU of the kept weights)</h3>" + matrix(masks["overlap"], diverging=False))
        layers = masks.get("per_layer") or []
        if any("reliance" in figures for figures in layers):  # a scheme that settles the weights it shares
            header = ["layer", "conflicting", *(f"Δ {escape(t)}" for t in tasks), *(f"wins {escape(t)}" for t in tasks)]
            rows = [
                [number(i), number(f["conflicting"], 3)]
                + [number(f.get("reliance", {}).get(t)) for t in tasks]
                + [number(f.get("wins", {}).get(t), 3) for t in tasks]
                for i, f in enumerate(layers)
            ]
            out.append(
                "<h3>masks: the weights the tasks share, per layer</h3>"
                '<p class="note">conflicting: the share of the layer\'s weights two tasks or more keep; Δ: what the '
                "task loses without the weights it shares; wins: the share of the conflicting weights where the "
                "task's share is 1.</p>" + table(header, rows)
            )
    tallies = report.get("tallies")
    if tallies:
        header = ["epoch", *(escape(n.replace("_", " ")) for n in tallies["counts"])]
        rows = [
            [number(e), *(number(v[i], 0) for v in tallies["counts"].values())] for i, e in enumerate(tallies["epochs"])
        ]
        out.append("<h3>counted by the scheme's training step, per epoch</h3>" + table(header, rows))
        chart = {n.replace("_", " "): _series(tallies["epochs"], v) for n, v in tallies["counts"].items()}
        out.append(f'<div class="charts">{line_chart("counts per epoch", chart, "epoch")}</div>')
    control = (report.get("gate_control") or {}).get("lambda")
    if control:
        epochs = control["epochs"]
        lam = {t: _series(epochs, v) for t, v in control["lambda"].items()}
        gaps = {f"d {t}": _series(epochs, v) for t, v in control["difference"].items()}
        gaps.update({f"d* {t}": _series(epochs, v) for t, v in (control.get("target") or {}).items()})
        out.append(
            "<h3>gate control</h3>"
            "<p class=\"note\">λ_k scales gate k's gradient (mean over the epoch's steps; 1 = plain learning); "
            "d_k is how far its routing is from the other gates' (the epoch's last step), d*_k = δ(1 − c_k) the "
            "difference its task's label correlation c_k warrants: d above d* slows the gate (λ &lt; 1).</p>"
            f'<div class="charts">{line_chart("λ per epoch", lam, "epoch")}'
            f"{line_chart('gate difference d and target d*', gaps, 'epoch')}</div>"
        )
        keys = [k for k in ("lambda", "difference", "target", "correlation") if control.get(k)]
        labels = {"lambda": "λ", "difference": "d", "target": "d*", "correlation": "c"}
        header = ["epoch", *(f"{labels[k]} {escape(t)}" for k in keys for t in control[k])]
        rows = [
            [number(e), *(number(control[k][t][i], 3) for k in keys for t in control[k])] for i, e in enumerate(epochs)
        ]
        out.append(table(header, rows))
    objective = report.get("objective")
    if objective:
        out += objective_sections(objective)
    return out


def objective_sections(objective: dict[str, Any]) -> list[str]:
    """The training objective's terms per epoch and, with its checkpoint, its teachers."""
    out = []
    history = objective.get("history")
    kind = escape((history or {}).get("kind") or "objective")
    if history and history["terms"]:
        charts = [
            line_chart(f"{name.replace('_', ' ')}", {t: _series(history["epochs"], v) for t, v in by_task.items()},
                       "epoch")
            for name, by_task in history["terms"].items()
        ]  # fmt: skip
        out.append(f"<h3>{kind}: mean terms per epoch</h3>" + '<div class="charts">' + "".join(charts) + "</div>")
    learned = objective.get("learned")
    if learned:
        rows = []
        for task, value in learned["auc"].items():
            pcoc = learned.get("pcoc", {}).get(task, {})
            rows.append([escape(task), escape(learned["partners"][task]), number(value["student"]),
                         number(value["teacher"]), number(pcoc.get("student"), 3), number(pcoc.get("teacher"), 3)])  # fmt: skip
        out.append(
            f"<h3>{kind}: epoch {number(objective.get('epoch'))}'s teachers and students</h3>"
            + table(["task", "partner", "AUC student", "AUC teacher", "pcoc student", "pcoc teacher"], rows)
        )
        shares = learned["pairwise_accuracy"]
        pairs = list(dict.fromkeys(p for values in shares.values() for p in values))
        out.append(
            "<h3>teachers' share of correctly ordered pairs per level pair</h3>"
            '<p class="note">Levels are named by (y task, y partner) in the augmented order; 0.5 is chance.</p>'
            + heatmap(list(shares), pairs, [[shares[t].get(p) for p in pairs] for t in shares], diverging=False)
        )
    return out


def render_page(runs: list[dict[str, Any]], baseline: dict[str, Any] | None = None) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = "mtl report: " + ", ".join(r["name"] for r in runs)
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="note">mtlcli {escape(__version__)}, {when}. Valid and test metrics are computed from each run\'s '
        "model and data when the page is made.</p>",
        runs_section(runs),
        metrics_section(runs, baseline),
        curves_section(runs),
        *(explain_section(r) for r in runs),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )


def report_page(
    run_dirs: list[Path], baseline: Path | None = None, max_rows: int | None = 20000
) -> tuple[str, list[str]]:
    """The page, and the warnings about what the runs hold that it could not use."""
    distinct_runs(run_dirs, baseline)
    options = ExplainOptions(max_rows=max_rows, grad_batches=8)
    runs = [gather(r, options) for r in run_dirs]
    base = gather(baseline, options) if baseline is not None else None
    names = [r["name"] for r in runs]
    for i, run in enumerate(runs):  # two runs with the same directory name: keep them apart
        if names.count(run["name"]) > 1:
            run["name"] = f"{run['name']} ({i + 1})"
    warnings = [w for r in [*runs, *([base] if base else [])] for w in r["warnings"]]
    return render_page(runs, base), warnings
