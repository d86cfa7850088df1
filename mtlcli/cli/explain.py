"""`mtl explain`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from mtlcli.cli.common import JsonOption, err_console, handle_errors, print_json


def heat(value: float | None, low: float, high: float, diverging: bool = False, digits: int = 3) -> Text:
    """A cell coloured by value: white -> red on [low, high], or blue <- white -> red around 0."""
    if value is None:
        return Text("-", style="dim")
    if diverging:
        t = max(-1.0, min(1.0, value / max(abs(low), abs(high), 1e-12)))
        r, g, b = (
            (255, int(255 * (1 - t)), int(255 * (1 - t))) if t >= 0 else (int(255 * (1 + t)), int(255 * (1 + t)), 255)
        )
    else:
        t = max(0.0, min(1.0, (value - low) / (high - low) if high > low else 0.0))
        r, g, b = 255, int(255 * (1 - 0.75 * t)), int(255 * (1 - t))
    return Text(f"{value:.{digits}f}", style=f"black on rgb({r},{g},{b})")


def matrix_table(title: str, matrix: dict[str, dict[str, float | None]], diverging: bool = True) -> Table:
    table = Table(title=title, title_justify="left")
    columns = list(next(iter(matrix.values())).keys()) if matrix else []
    table.add_column("", no_wrap=True)
    for column in columns:
        table.add_column(column, justify="right")
    for row, values in matrix.items():
        table.add_row(row, *(heat(values[c], -1.0, 1.0, diverging) for c in columns))
    return table


def gate_table(name: str, report: dict[str, Any]) -> Table:
    table = Table(title=f"{name}: mean weight per gate and expert (± spread across rows)", title_justify="left")
    table.add_column("gate", no_wrap=True)
    for expert in report["experts"]:
        table.add_column(expert, justify="right")
    table.add_column("entropy", justify="right")
    high = max((w for ws in report["weights"].values() for w in ws if w is not None), default=1.0)
    for row, weights in report["weights"].items():
        table.add_row(
            row,
            *(heat(w, 0.0, high, digits=2) for w in weights),
            Text(f"{report['entropy'][row] or 0.0:.2f}", style="dim"),
        )
    return table


def scale_table(name: str, report: dict[str, Any], top: int = 15) -> Table:
    """A gate group's mean scale per unit (rows: units, the ``top`` furthest from 1 over the gates;
    columns: the gates)."""
    rows = report["rows"]
    units = report["units"]
    ranked = sorted(range(len(units)), key=lambda i: -max(abs(v["mean"][i] - 1.0) for v in rows.values()))[:top]
    shown = f"the {len(ranked)} of {len(units)} units furthest from 1" if len(ranked) < len(units) else "every unit"
    table = Table(title=f"{name}: mean gate scale per unit ({shown}; --json has all)", title_justify="left")
    table.add_column("unit", no_wrap=True)
    for row in rows:
        table.add_column(row, justify="right")
    for i in ranked:
        table.add_row(units[i], *(heat(v["mean"][i], 0.0, report["bound"], digits=2) for v in rows.values()))
    return table


def by_table(group: str, feature: str, experts: list[str], values: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{group} by {feature}: mean weight per value", title_justify="left")
    table.add_column(feature, no_wrap=True)
    table.add_column("rows", justify="right", no_wrap=True)
    table.add_column("gate", no_wrap=True)
    for expert in experts:
        table.add_column(expert, justify="right")
    for entry in values:
        for i, (row, weights) in enumerate(entry["weights"].items()):
            table.add_row(
                entry["value"] if i == 0 else "",
                f"{entry['rows']:,}" if i == 0 else "",
                row,
                *(heat(w, 0.0, 1.0, digits=2) for w in weights),
            )
    return table


def say_readings(*lines: str) -> None:
    """Each reading on its own indented line, as written (no markup, soft-wrapped)."""
    for line in lines:
        err_console.print(f"  {line}", soft_wrap=True, markup=False)


def render(report: dict[str, Any]) -> None:
    readings = report["readings"]
    say = err_console.print
    say(
        f"[bold]{report['run_dir']}[/] ({report['scheme']}, {report['weighting']}) on {report['split']}: {report['rows']:,} rows"
    )
    for name, group in report["gates"].items():
        say(gate_table(name, group))
    say_readings(*readings["gates"])
    if report["gates_by"]:
        for name, values in report["gates_by"]["gates"].items():
            say(by_table(name, report["gates_by"]["feature"], report["gates"][name]["experts"], values))
        say_readings(*readings["gates_by"])
    for layer, matrix in report["alpha"].items():
        say(matrix_table(f"cross-stitch alpha, {layer} (row k mixes into task k's column)", matrix))
    say_readings(*readings["alpha"])
    if report.get("masks"):
        say(
            matrix_table(
                "sparse-sharing mask overlap (IoU of the kept weights)", report["masks"]["overlap"], diverging=False
            )
        )
        say_readings(*readings["masks"])
    if report.get("gate_control"):
        for table in gate_control_tables(report["gate_control"]):
            say(table)
        say_readings(*readings["gate_control"])
    if report.get("tallies"):
        say(tallies_table(report["tallies"]))
        say_readings(readings["tallies"])
    if report.get("objective"):
        for table in objective_tables(report["objective"]):
            say(table)
        say_readings(*readings["objective"])
    if report.get("gate_scales"):
        for name, group in report["gate_scales"].items():
            say(scale_table(name, group))
        say_readings(*readings["gate_scales"])
    if report.get("representations"):
        for history, matrix in report["representations"]["interest_cosine"].items():
            say(matrix_table(f"cosine between the tasks' interests in {history}", matrix))
        say_readings(*readings["representations"])
    say(matrix_table("label correlation (Pearson; phi for binary pairs)", report["label_correlation"]))
    if report["conditional_positive_rate"]:
        say(matrix_table("P(column = 1 | row = 1)", report["conditional_positive_rate"], diverging=False))
    say_readings(readings["label_correlation"])
    say(matrix_table("prediction correlation", report["prediction_correlation"]))
    say_readings(readings["prediction_correlation"])
    if report["gradient_cosine"]:
        say(
            matrix_table(
                f"gradient cosine on shared parameters ({report['gradient_batches']} batches)",
                report["gradient_cosine"],
            )
        )
        say(
            matrix_table(
                "share of batches with negative cosine (conflict)", report["gradient_conflict"], diverging=False
            )
        )
        if len(report["gradient_cosine_by_layer"]) > 1:
            say(layer_table(report))
    say_readings(readings["gradient_cosine"])
    if readings.get("history"):
        say_readings(readings["history"])
    if report.get("importance"):
        for table in importance_tables(report["importance"]):
            say(table)
        say_readings(*readings["importance"])
    for warning in report["warnings"]:
        say(f"[yellow]warning:[/] {warning}", soft_wrap=True)


def gate_control_tables(report: dict[str, Any], top: int = 15) -> list[Table]:
    """Gate control: the ``top`` input fields by their largest |s| over the tasks, with each task's
    field scale s (tasks as columns), and λ per epoch and task."""
    scales = report["field_scales"]
    tasks = list(scales)
    fields = list(scales[tasks[0]]) if tasks else []
    ranked = sorted(fields, key=lambda f: -max(abs(scales[t][f]) for t in tasks))[:top]
    high = max((abs(v) for row in scales.values() for v in row.values()), default=1.0)
    shown = (
        f"the {len(ranked)} of {len(fields)} inputs with the largest |s|"
        if len(ranked) < len(fields)
        else "every input"
    )
    table = Table(title=f"gate control: field scale s per task's gate ({shown}; --json has all)", title_justify="left")
    table.add_column("input", no_wrap=True)
    for task in tasks:
        table.add_column(task, justify="right")
    for field in ranked:
        table.add_row(field, *(heat(scales[t][field], -high, high, diverging=True, digits=2) for t in tasks))
    tables = [table]
    coefficients = report.get("lambda")
    if coefficients:
        lam = Table(
            title="gate control: λ per epoch (mean over its steps; 1 = plain gate learning)", title_justify="left"
        )
        lam.add_column("epoch", justify="right")
        for task in coefficients["lambda"]:
            lam.add_column(f"λ {task}", justify="right")
        for task in coefficients["difference"]:
            lam.add_column(f"d {task}", justify="right")
        targets = coefficients.get("target") or {}
        for task in targets:
            lam.add_column(f"d* {task}", justify="right")
        for i, epoch in enumerate(coefficients["epochs"]):
            values = [
                v[i] for key in ("lambda", "difference", "target") for v in (coefficients.get(key) or {}).values()
            ]
            lam.add_row(str(epoch), *("-" if v is None else f"{v:.3f}" for v in values))
        tables.append(lam)
    return tables


def tallies_table(report: dict[str, Any]) -> Table:
    """What the scheme's own step counted in each epoch (CSRec: the updates its share rule changed)."""
    table = Table(title="counted by the scheme's training step, per epoch", title_justify="left")
    table.add_column("epoch", justify="right")
    for name in report["counts"]:
        table.add_column(name.replace("_", " "), justify="right")
    for i, epoch in enumerate(report["epochs"]):
        table.add_row(str(epoch), *("-" if v[i] is None else f"{v[i]:,.0f}" for v in report["counts"].values()))
    return table


def objective_tables(report: dict[str, Any]) -> list[Table]:
    """The training objective: its terms per epoch and task; with its checkpoint, the teachers
    against the students and the teachers' share of correctly ordered pairs per level pair."""
    tables = []
    history = report.get("history")
    kind = (history or {}).get("kind") or "objective"
    if history and history["terms"]:
        terms = Table(title=f"{kind}: mean terms per epoch (training batches)", title_justify="left")
        terms.add_column("epoch", justify="right")
        columns = [(name, task) for name, by_task in history["terms"].items() for task in by_task]
        for name, task in columns:
            terms.add_column(f"{name.removesuffix('_loss')} {task}", justify="right")
        for i, epoch in enumerate(history["epochs"]):
            values = [history["terms"][name][task][i] for name, task in columns]
            terms.add_row(str(epoch), *("-" if v is None else f"{v:.4f}" for v in values))
        tables.append(terms)
    learned = report.get("learned")
    if learned:
        versus = Table(title=f"{kind}: epoch {report['epoch']}'s teachers and students", title_justify="left")
        for column in ("task", "partner", "AUC student", "AUC teacher", "pcoc student", "pcoc teacher"):
            versus.add_column(column, justify="left" if column in ("task", "partner") else "right")
        for task, value in learned["auc"].items():
            pcoc = learned.get("pcoc", {}).get(task, {})
            cells = [value["student"], value["teacher"], pcoc.get("student"), pcoc.get("teacher")]
            versus.add_row(task, learned["partners"][task], *("-" if v is None else f"{v:.4f}" for v in cells))
        tables.append(versus)
        shares = learned["pairwise_accuracy"]
        pairs = list(dict.fromkeys(pair for values in shares.values() for pair in values))
        order = Table(
            title="teachers' share of correctly ordered pairs per level pair (levels (y task, y partner); 0.5 chance)",
            title_justify="left",
        )
        order.add_column("task", no_wrap=True)
        for pair in pairs:
            order.add_column(pair, justify="right")
        for task, values in shares.items():
            order.add_row(task, *(heat(values.get(pair), 0.5, 1.0) for pair in pairs))
        tables.append(order)
    return tables


def importance_tables(report: dict[str, Any], top: int = 10) -> list[Table]:
    """Per task, its ``top`` inputs by permutation importance (mean ± spread over the shuffles)."""
    from mtlcli.explain.importance import loss_of

    tables = []
    for task, entries in report["importance"].items():
        metric = report["metric"][task]
        baseline = report["baseline"][task]
        shown = f"{baseline:.4f}" if baseline is not None else "-"
        table = Table(
            title=f"{task}: {loss_of(metric)} when an input is shuffled ({metric} {shown}, {report['repeats']} shuffles)",
            title_justify="left",
        )
        table.add_column("input")
        table.add_column(loss_of(metric), justify="right")
        table.add_column("±", justify="right")
        high = max((abs(v["drop"]) for v in entries.values()), default=1.0) or 1.0
        for name, value in list(entries.items())[:top]:
            table.add_row(name, heat(value["drop"], -high, high, diverging=True, digits=4), f"{value['std']:.4f}")
        tables.append(table)
    return tables


def layer_table(report: dict[str, Any]) -> Table:
    tasks = report["tasks"]
    pairs = [(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1 :]]
    table = Table(title="gradient cosine per shared layer (negative share)", title_justify="left")
    table.add_column("layer")
    for a, b in pairs:
        table.add_column(f"{a}~{b}", justify="right")
    for layer, matrix in report["gradient_cosine_by_layer"].items():
        conflict = report["gradient_conflict_by_layer"][layer]
        cells = []
        for a, b in pairs:
            cell = heat(matrix[a][b], -1.0, 1.0, diverging=True)
            if conflict[a][b] is not None:
                cell.append(f" ({conflict[a][b]:.0%})")
            cells.append(cell)
        table.add_row(layer, *cells)
    return table


@handle_errors
def command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `mtl train`.")],
    split: Annotated[str, typer.Option("--split", help="Which split: valid, test or train.")] = "valid",
    max_rows: Annotated[
        int | None, typer.Option("--max-rows", min=1, help="Sample at most N rows of the split (seeded).")
    ] = None,
    by: Annotated[
        str | None, typer.Option("--by", help="A categorical feature: mean gate weights per value (top values).")
    ] = None,
    dead_below: Annotated[
        float,
        typer.Option("--dead-below", min=0.0, max=1.0, help="An expert below this mean weight in every gate is dead."),
    ] = 0.02,
    collapsed_above: Annotated[
        float,
        typer.Option(
            "--collapsed-above", min=0.0, max=1.0, help="A gate with this mean weight on one expert has collapsed."
        ),
    ] = 0.9,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write PNG heatmaps into this directory (needs mtlcli[plot]).")
    ] = None,
    importance: Annotated[
        bool,
        typer.Option("--importance", help="Per-task permutation importance of every input (or --group) on the split."),
    ] = False,
    repeats: Annotated[
        int, typer.Option("--repeats", min=1, help="--importance: shuffles per input (mean and spread).")
    ] = 3,
    groups: Annotated[
        list[str] | None,
        typer.Option(
            "--group", help="--importance: NAME=PATTERN[,PATTERN...] inputs shuffled together (globs). Repeatable."
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the row sample and the shuffles.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Why the model behaves as it does: gate weights per task and expert (dead experts, collapsed
    gates), cross-stitch alphas, masks, gate control's λ, a training objective's teachers against
    the students, label and prediction correlation between the tasks, the cosine of their
    gradients on the shared parameters, and the training history. See docs/explain.md."""
    from mtlcli.explain import ExplainOptions, explain_run

    if split not in ("train", "valid", "test"):
        raise typer.BadParameter(f"{split!r} is not one of train, valid, test", param_hint="--split")
    if plot is not None:
        from mtlcli.explain.plot import require_matplotlib

        if plot.exists() and not plot.is_dir():
            raise typer.BadParameter(f"{plot} is a file; give a directory for the plots", param_hint="--plot")
        require_matplotlib()
    if (groups or repeats != 3) and not importance:
        raise typer.BadParameter("--group and --repeats shape --importance: add --importance")
    options = ExplainOptions(
        max_rows=max_rows,
        by=by,
        dead_below=dead_below,
        collapsed_above=collapsed_above,
        seed=seed,
        importance=importance,
        importance_repeats=repeats,
        groups=tuple(groups or []),
    )
    with err_console.status("explaining", spinner="dots"):
        report = explain_run(run_dir, split, options)
    if plot is not None:
        from mtlcli.explain.plot import write_plots

        written = write_plots(report, plot)
        err_console.print(f"wrote {len(written)} plot{'s' if len(written) != 1 else ''} to {plot}")
    if as_json:
        print_json(report)
        return
    render(report)
