"""`mtl sweep`: train a recipe over a grid of settings and tabulate the results.

A grid is a list of ``KEY=V1,V2,...`` axes (the values are YAML, as in ``--set``); every
combination becomes one run directory under the sweep's output directory, named after its
settings. Finished runs are reused, interrupted ones resumed, so rerunning the same command after
a crash or Ctrl-C continues where it stopped. ``train.seed`` (or any ``--replicate`` key) is the
replicate axis: the summary averages over it, giving mean ± std per task for every other setting.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mtlcli.errors import MtlError, RecipeError
from mtlcli.fileio import write_json
from mtlcli.recipe import recipe_to_yaml
from mtlcli.recipe.load import load_recipe_noted, load_yaml
from mtlcli.recipe.schema import Recipe

SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class Axis:
    key: str
    values: list[str]


@dataclass(frozen=True)
class Point:
    """One combination of the grid: its settings (key -> value text), run name and recipe."""

    settings: dict[str, str]
    name: str
    recipe: Recipe
    notes: tuple[str, ...] = ()  # what the settings changed beyond their values (load_recipe_noted)


def split_values(text: str) -> list[str]:
    """``a,[1,2],{x: 1}`` -> ``['a', '[1,2]', '{x: 1}']``: commas inside brackets or quotes stay."""
    values: list[str] = []
    current: list[str] = []
    depth, quote = 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    values.append("".join(current).strip())
    return values


def _yaml_value(text: str, key: str) -> object:
    """A --grid value as the recipe will read it (YAML with the recipe's booleans: ``yes`` is
    text), or the text itself when it is not YAML."""
    try:
        return load_yaml(text, "--grid", key)
    except yaml.YAMLError:
        return text


def parse_grid(items: Sequence[str]) -> list[Axis]:
    """The ``--grid`` options as axes; a clear error for a malformed one or a repeated key."""
    axes: list[Axis] = []
    for item in items:
        key, sep, rest = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise MtlError(f"--grid {item!r}: expected KEY=V1,V2,...", "e.g. --grid loss.weighting=equal,pcgrad,mgda")
        values = split_values(rest)
        if any(not v for v in values):
            raise MtlError(f"--grid {item!r}: an empty value", "separate the values with single commas")
        if len(set(values)) != len(values):
            raise MtlError(f"--grid {item!r}: a value is listed twice")
        parsed = [_yaml_value(v, key) for v in values]
        for i, value in enumerate(parsed):
            for j in range(i):
                if value == parsed[j] and type(value) is type(parsed[j]):
                    raise MtlError(
                        f"--grid {item!r}: {values[j]!r} and {values[i]!r} are the same value",
                        "list each value once (a sweep would train it twice and count it as two replicates)",
                    )
        if any(a.key == key for a in axes):
            raise MtlError(f"--grid: {key!r} is given twice", "list all its values in one --grid KEY=V1,V2")
        if key == "recipe":
            raise MtlError("--grid: 'recipe' is not a recipe key", "give several recipe files to sweep over recipes")
        axes.append(Axis(key, values))
    return axes


def run_name(settings: dict[str, str]) -> str:
    """A directory name from the settings: ``weighting=pcgrad_seed=1`` (the last part of each key,
    or the whole key where last parts would collide); characters unsafe in file names become '-'."""
    short = [key.rsplit(".", 1)[-1] for key in settings]
    keys = [s if short.count(s) == 1 else k for s, k in zip(short, settings, strict=True)]
    values = [re.sub(r"[,:\s]+", "-", re.sub(r"[\[\]{}'\"]", "", v)).strip("-") for v in settings.values()]
    parts = [f"{k}={v}" for k, v in zip(keys, values, strict=True)]
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "-", "_".join(parts)).strip("-")
    return name[:200] or "run"


def recipe_labels(files: Sequence[str]) -> list[str]:
    """Short labels for several recipe files: their stems (``census-ple``), or paths where stems repeat."""
    stems = [Path(f).name.removesuffix(".yaml").removesuffix(".yml") for f in files]
    if len(set(stems)) == len(stems):
        return stems
    return [str(f) for f in files]


def expand(recipe_files: str | Sequence[str], axes: list[Axis], overrides: Sequence[str]) -> list[Point]:
    """Every combination, its recipe validated up front (an invalid one names its settings).

    With several recipe files, the recipe is the first axis (setting ``recipe``: the file's stem).
    """
    files = [recipe_files] if isinstance(recipe_files, str) else list(recipe_files)
    if len(set(files)) != len(files):
        raise MtlError("a recipe file is given twice")
    labels = recipe_labels(files)
    points = []
    for (file, label), combination in itertools.product(
        zip(files, labels, strict=True), itertools.product(*(axis.values for axis in axes))
    ):
        settings = {axis.key: value for axis, value in zip(axes, combination, strict=True)}
        if len(files) > 1:
            settings = {"recipe": label, **settings}
        sets = [*overrides, *(f"{k}={v}" for k, v in settings.items() if k != "recipe")]
        try:
            recipe, notes = load_recipe_noted(file, sets)
        except RecipeError as exc:
            where = " ".join(f"{k}={v}" for k, v in settings.items())
            raise MtlError(f"grid point {where}: {exc.message}", exc.hint) from None
        points.append(Point(settings, run_name(settings), recipe, tuple(notes)))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise MtlError("two grid points map to the same run directory name", "use values that differ in letters")
    return points


def run_state(run_dir: Path, recipe: Recipe) -> str:
    """``new``, ``done`` (a finished run of this recipe), ``partial`` (interrupted: resumable) or
    ``other`` (the directory holds something else)."""
    from mtlcli.train.run import CHECKPOINT

    if not run_dir.exists():
        return "new"
    saved = run_dir / "recipe.yaml"
    if not saved.is_file() or saved.read_text(encoding="utf-8") != recipe_to_yaml(recipe):
        return "other"
    if (run_dir / "summary.json").is_file():
        return "done"
    return "partial" if (run_dir / CHECKPOINT).is_file() else "other"


def summarise(runs: list[dict[str, Any]], replicate: Sequence[str]) -> list[dict[str, Any]]:
    """Group the runs by their settings without the replicate keys; per task and metric the mean,
    the sample std (0 for one run) and the count."""
    groups: dict[tuple[tuple[str, str], ...], list[dict[str, Any]]] = {}
    for run in runs:
        key = tuple((k, v) for k, v in run["settings"].items() if k not in replicate)
        groups.setdefault(key, []).append(run)
    out = []
    for key, members in groups.items():
        tasks: dict[str, dict[str, Any]] = {}
        for task in members[0]["tasks"]:
            metrics: dict[str, Any] = {}
            for metric in ("auc", "gauc", "logloss", "rmse", "mae"):
                values = [m["tasks"][task].get(metric) for m in members]
                values = [v for v in values if v is not None and not math.isnan(v)]
                if values:
                    std = statistics.stdev(values) if len(values) > 1 else 0.0
                    metrics[metric] = {"mean": statistics.fmean(values), "std": std, "runs": len(values)}
            tasks[task] = metrics
        speeds = [m["train_samples_per_second"] for m in members]
        out.append(
            {
                "settings": dict(key),
                "runs": [m["name"] for m in members],
                "tasks": tasks,
                "train_samples_per_second": statistics.median(speeds),
            }
        )
    return out


def run_sweep(
    points: list[Point],
    out: Path,
    split: str,
    replicate: Sequence[str],
    force: bool = False,
    on_start: Callable[[int, Point, str], Any] = lambda i, p, s: None,
    on_done: Callable[[int, Point, dict[str, Any]], None] = lambda i, p, r: None,
    stop_requested: Callable[[], bool] = lambda: False,
    experiment: str | None = None,
) -> dict[str, Any]:
    """Train (or reuse, or resume) every point into ``out/<name>``, evaluate each on ``split`` and
    write ``out/sweep.json``. ``on_start`` may return an observer for the training loop. With
    ``train.loggers`` every point is one tracker run in one experiment (``experiment``, else the
    recipe's ``train.experiment``, else the sweep directory's name), its settings as parameters."""
    from mtlcli.train.run import evaluate_run, train_run

    if out.exists() and not out.is_dir():
        raise MtlError(f"{out}: exists and is not a directory", "give a directory for the sweep's runs")
    states = {p.name: run_state(out / p.name, p.recipe) for p in points}
    clash = [name for name, state in states.items() if state == "other"]
    if clash and not force:
        raise MtlError(
            f"{out / clash[0]}: holds a run of another recipe (or not a run)",
            "use another --out, or --force to retrain the grid points whose runs differ",
        )
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for index, point in enumerate(points, start=1):
        run_dir = out / point.name
        state = states[point.name]
        observer = on_start(index, point, state)
        if state != "done":
            train_run(
                point.recipe,
                run_dir,
                force=state == "other",
                observer=observer,
                resume=state == "partial",
                stop_requested=stop_requested,
                experiment=experiment or point.recipe.train.experiment or out.resolve().name,
                tracker_params={f"sweep.{key}": value for key, value in point.settings.items()},
            )
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        evaluated = evaluate_run(run_dir, split)
        record = {
            "name": point.name,
            "run_dir": str(run_dir),
            "settings": point.settings,
            "reused": state == "done",
            "tasks": evaluated["tasks"],
            "best_epoch": summary.get("best_epoch"),
            "train_samples_per_second": summary.get("train_samples_per_second", 0.0),
        }
        runs.append(record)
        on_done(index, point, record)
    result = {
        "split": split,
        "grid": {k: list(dict.fromkeys(p.settings[k] for p in points)) for k in points[0].settings},
        "replicate": [k for k in replicate if k in points[0].settings],
        "runs": runs,
        "summary": summarise(runs, replicate),
    }
    write_json(out / SWEEP_FILE, result)
    return result
