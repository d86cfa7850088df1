"""The bad-input corpus: every case ends in exit code 2 and one message naming what is wrong and
where, never a traceback, and leaves no partial output behind. docs/errors.md lists the cases
(regenerate it with `python tests/test_bad_inputs.py > docs/errors.md`)."""

from __future__ import annotations

import copy
import gzip
import io
import os
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from mtlcli.cli.app import app


def good_data() -> str:
    rng = random.Random(1)
    lines = ["user,item,age,click,buy"]
    for _ in range(80):
        item = rng.randrange(5)
        click = int(rng.random() < 0.2 + 0.12 * item)
        lines.append(f"u{rng.randrange(8)},i{item},{rng.gauss(35, 8):.1f},{click},{int(click and rng.random() < 0.5)}")
    return "\n".join(lines) + "\n"


GOOD: dict[str, Any] = {
    "data": {
        "source": "data.csv",
        "split": {"by": "modulo", "modulus": 4, "test": [0], "valid": [1]},
        "cache_dir": "cache",
    },
    "features": {"numeric": ["age"], "categorical": "auto"},
    "tasks": {"click": {"label": "click"}, "buy": {"label": "buy", "space": "click"}},
    "model": {"scheme": "mmoe", "embedding_dim": 2, "n_experts": 2, "expert_units": [4], "tower_units": [2]},
    "train": {"epochs": 1, "batch_size": 32, "threads": 1, "early_stopping": None},
}


def patched(change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    recipe = copy.deepcopy(GOOD)
    change(recipe)
    return recipe


def setting(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(recipe: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = recipe
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return change


def dropping(path: str) -> Callable[[dict[str, Any]], None]:
    def change(recipe: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = recipe
        for part in parents:
            node = node[part]
        del node[last]

    return change


@dataclass
class Case:
    name: str
    expect: str
    kind: str = "recipe"  # recipe | data | artifact
    recipe: dict[str, Any] | str | bytes | None = None  # None: the good recipe
    data: str | bytes | None = None  # None: the good data
    command: str = "train"  # check | train | sweep | eval | export | resume | predict-free
    args: list[str] = field(default_factory=list)
    damage: Callable[[Path], object] | None = None  # applied to a copy of a good run (artifact cases)


def _laughs(levels: int = 10) -> str:
    """A 'billion laughs' YAML prefix: anchors each repeating the one before ten times."""
    lines = ["a0: &a0 [lol]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def rows(text: str) -> str:
    return "user,item,age,click,buy\n" + text


def with_histories(last: str) -> str:
    """The good data with a history of item ids, their behaviour types and timestamps per row
    (oldest first, ``|`` between), then one row whose ``hist,kinds,times`` are ``last``."""
    lines = good_data().splitlines()
    out = [lines[0] + ",hist,kinds,times"] + [f"{line},i1|i2,c|b,1|2" for line in lines[1:]]
    return "\n".join([*out, f"u1,i1,30,1,0,{last}"]) + "\n"


def parquet_bytes(csv_text: str, times: list[float | None] | None = None) -> bytes:
    """The rows of CSV text as a Parquet file (histories as lists; with ``times``, the last row's
    timestamps replaced by that list of numbers)."""
    frame = pl.read_csv(io.StringIO(csv_text), infer_schema=False)
    if times is not None:
        lists = [c for c in ("hist", "kinds") if c in frame.columns]
        frame = frame.with_columns(pl.col(c).str.split("|") for c in lists).with_columns(
            pl.col("times").str.split("|").list.eval(pl.element().cast(pl.Float64))
        )
        frame = frame.with_columns(
            pl.when(pl.int_range(pl.len()) == pl.len() - 1)
            .then(pl.lit(times, pl.List(pl.Float64)))
            .otherwise(pl.col("times"))
            .alias("times")
        )
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


HISTORY = patched(
    lambda r: (
        setting("features.sequences", {"hist": {"vocabulary": "item", "type_column": "kinds", "time_column": "times"}})(
            r
        ),
        setting("features.exclude", ["kinds", "times"])(r),
    )
)


CASES = [
    # --- recipes ---
    Case("YAML syntax error", "YAML syntax error", recipe="data: {source: [data.csv\ntasks: {}\n"),
    Case("tab indentation", "YAML syntax error", recipe="data:\n\tsource: data.csv\n"),
    Case("empty recipe", "the recipe is empty", recipe=""),
    Case("recipe is a list", "a recipe is a mapping of sections", recipe="- data\n- tasks\n"),
    Case(
        "memory budget is not a size",
        "'lots' is not a size",
        recipe=patched(setting("data.memory_budget", "lots")),
    ),
    Case(
        "history of length 0",
        "features.sequences.hist.max_len: Input should be greater than 0",
        recipe=patched(setting("features.sequences", {"hist": {"column": "item", "max_len": 0}})),
    ),
    Case(
        "capped and hashed vocabulary",
        "give max_size (a capped vocabulary) or hash_buckets (no vocabulary), not both",
        recipe=patched(setting("features.defaults.categorical", {"max_size": 5, "hash_buckets": 10})),
    ),
    Case("recipe is not UTF-8", "not UTF-8 text", recipe=b"data: {source: \xff\xfe}\n"),
    Case("recipe file missing", "file not found", recipe="MISSING"),
    Case(
        "misspelt section",
        "modle: unknown key (did you mean 'model'?)",
        recipe=patched(lambda r: r.update(modle=r.pop("model"))),
    ),
    Case(
        "misspelt train key",
        "train.epoch: unknown key (did you mean 'epochs'?)",
        recipe=patched(lambda r: r["train"].update(epoch=r["train"].pop("epochs"))),
    ),
    Case(
        "misspelt scheme",
        "unknown sharing scheme 'mmoee' (did you mean 'mmoe'?)",
        recipe=patched(setting("model.scheme", "mmoee")),
    ),
    Case(
        "misspelt weighting",
        "unknown weighting strategy 'equl' (did you mean 'equal'?)",
        recipe=patched(setting("loss", {"weighting": "equl"})),
    ),
    # --- CSRec: its own update of the shared weights (issue 26) ---
    Case(
        "CSRec with a gradient-combining weighting",
        "model.scheme: csrec defines its own update",
        recipe=patched(
            lambda r: r.update(
                model={"scheme": "csrec", "embedding_dim": 2, "bottom_units": [4], "tower_units": [2]},
                loss={"weighting": "pcgrad"},
            )
        ),
    ),
    Case(
        "GAUC early stopping without a group",
        "train.early_stopping.metric: gauc needs data.group",
        recipe=patched(setting("train.early_stopping", {"metric": "gauc"})),
    ),
    Case(
        "sweep axis without values",
        "--grid 'train.seed': expected KEY=V1,V2,...",
        command="sweep",
        args=["--grid", "train.seed"],
    ),
    Case(
        "sweep grid point with a misspelt value",
        "grid point loss.weighting=pcgrd: invalid recipe",
        command="sweep",
        args=["--grid", "loss.weighting=equal,pcgrd"],
    ),
    # --- recipe surfaces: hostile YAML, booleans for numbers, input names, scheme switches (issue 24) ---
    Case(
        "YAML alias bomb (billion laughs)",
        "the YAML is more than 100,000 values once its aliases (*name) are expanded",
        recipe=_laughs() + yaml.safe_dump(GOOD, sort_keys=False),
    ),
    Case(
        "5,000 nested lists",
        "the YAML is nested deeper than 100 levels of mappings and lists",
        recipe="x: " + "[" * 5000 + "]" * 5000 + "\n" + yaml.safe_dump(GOOD, sort_keys=False),
    ),
    Case(
        "alias bomb in a --set value",
        "model.expert_units: the YAML is more than 100,000 values",
        command="check",
        args=["--set", "model.expert_units=[" + ", ".join(_laughs().replace(": ", ": ").splitlines()) + "]"],
    ),
    Case(
        "--set train.lr=true",
        "train.lr: expected a number, got a boolean (true/false); write the number itself (set with --set)",
        command="check",
        args=["--set", "train.lr=true"],
    ),
    Case(
        "a boolean for a scheme's count",
        "model.n_experts: expected a number, got a boolean",
        recipe=patched(setting("model.n_experts", True)),
    ),
    Case(
        "a boolean for a loss weight",
        "loss.weights.click: expected a number, got a boolean",
        recipe=patched(setting("loss", {"weighting": "static", "weights": {"click": True, "buy": 1.0}})),
    ),
    Case(
        "history named like a listed feature",
        "features.sequences.age: the history's name 'age' is also a numeric feature",
        recipe=patched(setting("features.sequences", {"age": {"column": "item"}})),
    ),
    Case(
        "history named like a column auto takes",
        "features.sequences.user: the history's name 'user' is also a categorical input column",
        recipe=patched(setting("features.sequences", {"user": {"column": "item"}})),
    ),
    Case(
        "a key of the old scheme set after switching schemes",
        "model.n_experts: unknown key",
        command="check",
        args=["--set", "model.scheme=shared_bottom", "--set", "model.n_experts=3"],
    ),
    Case(
        "sweep value nested too deep",
        "invalid recipe --grid (1 problem): --grid: train.lr: the YAML is nested deeper than 100 levels",
        command="sweep",
        args=["--grid", "train.lr=" + "[" * 3000 + "]" * 3000 + ",0.01"],
    ),
    Case(
        "sweep value a boolean for a number",
        "grid point train.lr=true: invalid recipe",
        command="sweep",
        args=["--grid", "train.lr=true,0.01"],
    ),
    Case(
        "scheme parameter of another scheme",
        "model.bottom_units: unknown key",
        recipe=patched(setting("model.bottom_units", [8])),
    ),
    # gate control (DEPHN): model.gate_control of the expert schemes
    Case(
        "gate control with one task",
        "model.gate_control: gate control compares each task's gate with the other tasks' gates",
        recipe=patched(lambda r: (r["tasks"].pop("buy"), r["model"].update(gate_control=True))),
    ),
    Case(
        "gate control on omoe",
        "omoe has one gate for every task, and gate control adjusts each task's own gate",
        recipe=patched(setting("model", {"scheme": "omoe", "gate_control": True})),
    ),
    Case(
        "misspelt gate control key",
        "model.gate_control.kapa: unknown key",
        recipe=patched(setting("model.gate_control", {"kapa": 2})),
    ),
    Case(
        "gate control clip out of order",
        "lambda_min (5.0) is above lambda_max (2.0)",
        recipe=patched(setting("model.gate_control", {"lambda_min": 5, "lambda_max": 2})),
    ),
    # the newer schemes' own parameters: checked against the data's features when they are auto
    Case(
        "pepnet prior field missing",
        "model.prior: 'usr' is not a categorical feature of this run's data (did you mean 'user'?)",
        recipe=patched(setting("model", {"scheme": "pepnet", "prior": ["usr"]})),
    ),
    Case(
        "pepnet prior not among listed features",
        "model.prior: 'page' is not a categorical feature",
        recipe=patched(
            lambda r: (
                setting("features.categorical", ["user", "item"])(r),
                r.update(model={"scheme": "pepnet", "prior": ["page"]}),
            )
        ),
        command="check",
    ),
    Case(
        "home category with an unknown task",
        "model.categories.views: unknown task 'bye' (did you mean 'buy'?)",
        recipe=patched(setting("model", {"scheme": "home", "categories": {"views": ["click", "bye"]}})),
        command="check",
    ),
    Case("wrong type", "train.lr: Input should be a valid number", recipe=patched(setting("train.lr", "fast"))),
    Case(
        "out-of-range value",
        "train.batch_size: Input should be greater than 0",
        recipe=patched(setting("train.batch_size", 0)),
    ),
    Case("dropout of 1", "model.dropout: Input should be less than 1", recipe=patched(setting("model.dropout", 1.0))),
    Case(
        "unknown split method",
        "unknown 'by' 'modulus' (did you mean 'modulo'?)",
        recipe=patched(setting("data.split", {"by": "modulus"})),
    ),
    Case(
        "residue not below modulus", "residue 7 is not below modulus 4", recipe=patched(setting("data.split.test", [7]))
    ),
    Case(
        "random split leaves no train rows",
        "valid + test must leave rows for train",
        recipe=patched(setting("data.split", {"by": "random", "valid": 0.6, "test": 0.5})),
    ),
    Case(
        "positive and threshold",
        "give 'positive' or 'threshold', not both",
        recipe=patched(setting("tasks.click.label", {"column": "click", "positive": ["1"], "threshold": 0.5})),
    ),
    Case(
        "standardize and minmax",
        "choose one of standardize and minmax",
        recipe=patched(setting("features.numeric", {"age": {"transform": ["standardize", "minmax"]}})),
    ),
    Case(
        "early stopping on an unknown task",
        "unknown task 'clik' (did you mean 'click'?)",
        recipe=patched(setting("train.early_stopping", {"task": "clik"})),
    ),
    Case(
        "AUC on a regression task",
        "auc needs binary tasks",
        recipe=patched(
            lambda r: (
                r["tasks"].update(age={"type": "regression", "label": "age"}),
                r["features"].update(numeric=[]),
                r["train"].update(early_stopping={"metric": "auc", "task": "age"}),
            )
        ),
    ),
    # --- the training objective (CrossDistil) ---
    Case(
        "crossdistil with a regression task",
        "tasks.age.type: is a regression task, and objective crossdistil orders rows by binary labels",
        command="check",
        recipe=patched(
            lambda r: (
                r["tasks"].update(age={"type": "regression", "label": "age"}),
                r["features"].update(numeric=[]),
                r.update(objective={"kind": "crossdistil"}),
            )
        ),
    ),
    Case(
        "crossdistil partner that is not a task",
        "objective.partners.click: 'biy' is not a task (did you mean 'buy'?)",
        command="check",
        recipe=patched(setting("objective", {"kind": "crossdistil", "partners": {"click": "biy"}})),
    ),
    Case(
        "crossdistil misspelt key",
        "objective.distil_weight: unknown key",
        command="check",
        recipe=patched(setting("objective", {"kind": "crossdistil", "distil_weight": 0.5})),
    ),
    Case(
        "crossdistil over a scheme without task towers",
        "does not declare",
        recipe=patched(
            lambda r: (r.update(model={"scheme": "cross_stitch"}), r.update(objective={"kind": "crossdistil"}))
        ),
    ),
    Case(
        "crossdistil with a gradient-combining weighting",
        "use a loss-based weighting",
        recipe=patched(lambda r: (r.update(loss={"weighting": "pcgrad"}), r.update(objective={"kind": "crossdistil"}))),
    ),
    Case(
        "label column as a feature",
        "is a task's label column; labels are never model inputs",
        recipe=patched(setting("features.numeric", ["age", "click"])),
    ),
    Case(
        "static weight for an unknown task",
        "loss.weights.clik: unknown task 'clik'",
        recipe=patched(setting("loss", {"weighting": "static", "weights": {"clik": 2.0}})),
    ),
    Case(
        "duplicate key",
        "key given twice in one mapping",
        recipe="data: {source: data.csv}\ntasks: {click: {label: click}}\ntrain: {lr: 1, lr: 2}\n",
    ),
    Case(
        "space is the task itself",
        "a task cannot live in its own sample space",
        recipe=patched(setting("tasks.buy.space", "buy")),
    ),
    Case(
        "CSV without header or columns",
        "list its column names in 'columns'",
        recipe=patched(setting("data.header", False)),
    ),
    Case("no tasks", "tasks: Dictionary should have at least 1 item", recipe=patched(setting("tasks", {}))),
    Case("extends a missing recipe", "extends: recipe not found: nowhere.yaml", recipe="extends: nowhere.yaml\n"),
    Case("extends itself", "recipes extend each other in a loop", recipe="extends: recipe.yaml\n"),
    Case("--set without =", "expected KEY.PATH=VALUE", args=["--set", "train.lr"]),
    Case(
        "--set unknown key",
        "train.epoch: unknown key (did you mean 'epochs'?) (set with --set)",
        args=["--set", "train.epoch=3"],
    ),
    Case(
        "--set into a plain value",
        "cannot set inside 'features.categorical'",
        args=["--set", "features.categorical.user.min_count=2"],
    ),
    Case(
        "recipe check reports every error",
        "(3 problems)",
        command="check",
        recipe=patched(
            lambda r: (setting("train.lr", "x")(r), setting("train.epochs", -1)(r), setting("model.n_expert", 2)(r))
        ),
    ),
    Case(
        "infinite learning rate",
        "train.lr: Input should be a finite number",
        recipe=patched(setting("train.lr", float("inf"))),
    ),
    Case(
        "NaN loss weight",
        "loss.weights.click: Input should be a finite number",
        recipe=patched(setting("loss", {"weighting": "static", "weights": {"click": float("nan")}})),
    ),
    Case(
        "task name with a dot and a space",
        "the task name 'buy.rate now' cannot be used",
        recipe=patched(lambda r: r["tasks"].update({"buy.rate now": r["tasks"].pop("buy")})),
    ),
    Case(
        "empty task name",
        "the task name '' cannot be used",
        recipe=patched(lambda r: r["tasks"].update({"": r["tasks"].pop("buy")})),
    ),
    Case(
        "non-ASCII task name",
        "the task name 'köp' cannot be used",
        recipe=patched(lambda r: r["tasks"].update({"köp": r["tasks"].pop("buy")})),
    ),
    Case(
        "task name starting with a digit",
        "the task name '2nd_click' cannot be used",
        recipe=patched(lambda r: r["tasks"].update({"2nd_click": r["tasks"].pop("buy")})),
    ),
    Case(
        "NaN label threshold",
        "tasks.click.label.threshold: Input should be a finite number",
        recipe=patched(setting("tasks.click.label", {"column": "click", "threshold": float("nan")})),
    ),
    Case("--set a list for a section", "data: expected a mapping of keys (got [1, 2])", args=["--set", "data=[1,2]"]),
    Case("extends a directory", "extends: sub is a directory", recipe="extends: sub\n"),
    Case(
        "sweep value spelt twice",
        "'1' and '01' are the same value",
        command="sweep",
        args=["--grid", "train.seed=1,01"],
    ),
    Case(
        "--nproc with a batch that does not split evenly",
        "train.batch_size (32) does not divide evenly among the 3 processes",
        args=["--nproc", "3"],
    ),
    Case(
        "sweep value listed twice",
        "a value is listed twice",
        command="sweep",
        args=["--grid", "train.seed=1,1"],
    ),
    # --- data ---
    Case(
        "history shares a vocabulary that is not a categorical feature",
        "features.sequences.hist.vocabulary: 'age' is not a categorical feature",
        kind="data",
        recipe=patched(setting("features.sequences", {"hist": {"column": "item", "vocabulary": "age"}})),
    ),
    Case(
        "history's type list of another length than its ids",
        "features.sequences.hist.type_column: column 'kinds' has 1 type for 2 ids (data row 81; 1 row like it)",
        kind="data",
        recipe=HISTORY,
        data=with_histories("i1|i2,c,1|2"),
    ),
    Case(
        "history's timestamps not oldest first",
        "features.sequences.hist.time_column: the timestamps in column 'times' are not oldest first: '5|2'",
        kind="data",
        recipe=HISTORY,
        data=with_histories("i1|i2,c|b,5|2"),
    ),
    Case(
        "history's timestamp not a number",
        "features.sequences.hist.time_column: column 'times' has a timestamp that is missing, not a number or infinite: '1|noon'",
        kind="data",
        recipe=HISTORY,
        data=with_histories("i1|i2,c|b,1|noon"),
    ),
    # --- serving and data input (issue 24): histories' values, text encodings, JSON lines, CSV rows ---
    Case(
        "history's timestamp infinite",
        "column 'times' has a timestamp that is missing, not a number or infinite: '1|inf' (data row 81)",
        kind="data",
        recipe=HISTORY,
        data=with_histories("i1|i2,c|b,1|inf"),
    ),
    Case(
        "history's timestamp missing inside its list",
        "column 'times' has a timestamp that is missing, not a number or infinite: '1|' (data row 81)",
        kind="data",
        recipe=HISTORY,
        data=with_histories("i1|i2,c|b,1|"),
    ),
    Case(
        "history keeps only a type that never occurs",
        "features.sequences.hist.types: none of the types 'clik' occurs in column 'kinds', so every history would "
        "be empty (types seen: 'b', 'c')",
        kind="data",
        recipe={
            **HISTORY,
            "features": {
                **HISTORY["features"],
                "sequences": {"hist": {**HISTORY["features"]["sequences"]["hist"], "types": ["clik"]}},
            },
        },
        data=with_histories("i1|i2,c|b,1|2"),
    ),
    Case(
        "Parquet data read as CSV",
        "cannot read it as CSV: it is a Parquet file (it starts with PAR1) hint: set data.format: parquet",
        kind="data",
        recipe=patched(setting("data.format", "csv")),
        data=parquet_bytes(good_data()),
    ),
    Case(
        "data file in UTF-16",
        "data.csv: cannot read it as CSV: it is UTF-16 text (it starts with a UTF-16 byte-order mark)",
        kind="data",
        data=good_data().encode("utf-16"),
    ),
    Case(
        "Parquet history with a null timestamp",
        "column 'times' has a timestamp that is missing, not a number or infinite: '[1.0, null]' (data row 81)",
        kind="data",
        recipe=HISTORY,
        data=parquet_bytes(with_histories("i1|i2,c|b,1|2"), times=[1.0, None]),
    ),
    Case(
        "predict a truncated gzip",
        "rows.csv.gz: the gzip data is truncated or damaged",
        kind="artifact",
        command="predict",
        args=["--input", "rows.csv.gz"],
        damage=lambda run: (run.parent / "rows.csv.gz").write_bytes(gzip.compress(good_data().encode())[:200]),
    ),
    Case(
        "predict JSON lines whose first row lacks a column",
        "rows.jsonl: the first row (line 1) has no key 'age'",
        kind="artifact",
        command="predict",
        args=["--input", "rows.jsonl"],
        damage=lambda run: (run.parent / "rows.jsonl").write_text(
            '{"user": "u1", "item": "i1"}\n{"user": "u1", "item": "i1", "age": 30}\n'
        ),
    ),
    Case(
        "predict a JSON line that is not an object",
        "rows.jsonl: line 2 holds a JSON list, not an object",
        kind="artifact",
        command="predict",
        args=["--input", "rows.jsonl"],
        damage=lambda run: (run.parent / "rows.jsonl").write_text('{"user": "u1", "item": "i1", "age": 30}\n[1, 2]\n'),
    ),
    Case(
        "predict a JSON line that is not JSON",
        "rows.jsonl: line 2 is not JSON",
        kind="artifact",
        command="predict",
        args=["--input", "rows.jsonl"],
        damage=lambda run: (run.parent / "rows.jsonl").write_text('{"user": "u1", "item": "i1", "age": 30}\n{age\n'),
    ),
    Case(
        "predict a JSON object where a value belongs",
        "rows.jsonl: line 1, key 'age': holds an object where a single value belongs",
        kind="artifact",
        command="predict",
        args=["--input", "rows.jsonl"],
        damage=lambda run: (run.parent / "rows.jsonl").write_text('{"user": "u1", "item": "i1", "age": {"y": 30}}\n'),
    ),
    Case(
        "predict a JSON Infinity",
        "input column 'age': column 'age' has an infinite value: 'inf' (data row 1)",
        kind="artifact",
        command="predict",
        args=["--input", "rows.jsonl"],
        damage=lambda run: (run.parent / "rows.jsonl").write_text('{"user": "u1", "item": "i1", "age": Infinity}\n'),
    ),
    Case(
        "predict JSON lines that are not UTF-8",
        "rows.jsonl: line 1: it is not UTF-8 text",
        kind="artifact",
        command="predict",
        args=["--input", "rows.jsonl"],
        damage=lambda run: (run.parent / "rows.jsonl").write_bytes(b'{"user": "\xe9", "item": "i1", "age": 30}\n'),
    ),
    Case(
        "predict CSV in UTF-16",
        "rows.csv: cannot read it as text: it is UTF-16 text",
        kind="artifact",
        command="predict",
        args=["--input", "rows.csv"],
        damage=lambda run: (run.parent / "rows.csv").write_bytes(rows("u1,i1,30,1,0\n").encode("utf-16")),
    ),
    Case(
        "predict CSV in Latin-1",
        "rows.csv: cannot read it as CSV: it is not UTF-8 text",
        kind="artifact",
        command="predict",
        args=["--input", "rows.csv"],
        damage=lambda run: (run.parent / "rows.csv").write_bytes(rows("u1,\xe9t\xe9,30,1,0\n").encode("latin-1")),
    ),
    Case(
        "predict a short CSV row",
        "rows.csv: line 3 has 3 fields, not 5 as the first row",
        kind="artifact",
        command="predict",
        args=["--input", "rows.csv", "--chunk-rows", "2"],
        damage=lambda run: (run.parent / "rows.csv").write_text(rows("u1,i1,30,1,0\nu2,i2,31\nu3,i3,32,0,0\n")),
    ),
    Case(
        "predict a blank line between rows",
        "rows.csv: line 3 is blank",
        kind="artifact",
        command="predict",
        args=["--input", "rows.csv"],
        damage=lambda run: (run.parent / "rows.csv").write_text(rows("u1,i1,30,1,0\n\nu3,i3,32,0,0\n")),
    ),
    Case(
        "predict a header split by another separator",
        "column 'user' is not in the input hint: the header is one column 'user;item;age;click;buy': its fields "
        "are split by ';', not ','",
        kind="artifact",
        command="predict",
        args=["--input", "rows.csv"],
        damage=lambda run: (run.parent / "rows.csv").write_text("user;item;age;click;buy\nu1;i1;30;1;0\n"),
    ),
    Case(
        "memory budget too small for one batch",
        "data.memory_budget (4,096 bytes holds windows of",
        kind="data",
        recipe=patched(lambda r: (setting("data.memory_budget", "4KiB")(r), setting("train.loading", "stream")(r))),
    ),
    Case(
        "shuffle buffer smaller than a batch",
        "train.shuffle_buffer (8 rows) is too small for one batch of train.batch_size (32 rows)",
        kind="data",
        recipe=patched(lambda r: (setting("train.shuffle_buffer", 8)(r), setting("train.loading", "stream")(r))),
    ),
    Case(
        "streamed shards that do not divide the batch",
        "train.batch_size (32) does not divide evenly among 3 shards (train.shards)",
        kind="data",
        recipe=patched(lambda r: (setting("train.shards", 3)(r), setting("train.loading", "stream")(r))),
    ),
    Case(
        "data file missing",
        "data file not found: nowhere.csv",
        kind="data",
        recipe=patched(setting("data.source", "nowhere.csv")),
    ),
    Case("empty data file", "the file is empty", kind="data", data=""),
    Case("header only", "the file has no data rows", kind="data", data="user,item,age,click,buy\n"),
    Case(
        "label column absent",
        "tasks.click.label.column: column 'clik' is not in the data (did you mean 'click'?)",
        kind="data",
        recipe=patched(setting("tasks.click.label", "clik")),
    ),
    Case(
        "feature column absent",
        "features.numeric: column 'agee' is not in the data (did you mean 'age'?)",
        kind="data",
        recipe=patched(setting("features.numeric", ["agee"])),
    ),
    Case(
        "excluded column absent",
        "features.exclude: column 'zip' is not in the data",
        kind="data",
        recipe=patched(setting("features.exclude", ["zip"])),
    ),
    Case(
        "pattern matches nothing",
        "pattern 'num_*' matches no column",
        kind="data",
        recipe=patched(setting("features.numeric", ["num_*"])),
    ),
    Case(
        "text in a numeric column",
        "column 'age' has a value that is not a number: 'old'",
        kind="data",
        data=good_data() + "u1,i1,old,1,0\n",
    ),
    Case(
        "binary label not 0/1",
        "binary label column 'click' holds '2'",
        kind="data",
        data=good_data() + "u1,i1,30,2,0\n",
    ),
    Case("NaN label", "column 'click' is NaN or infinite", kind="data", data=good_data() + "u1,i1,30,nan,0\n"),
    Case("empty label", "column 'click' is empty in 1 rows", kind="data", data=good_data() + "u1,i1,30,,0\n"),
    Case(
        "empty label inside the space",
        "empty in 1 rows inside its sample space",
        kind="data",
        data=good_data() + "u1,i1,30,1,\n",
    ),
    Case(
        "positive value that never occurs",
        "'yes' never occurs in column 'click'",
        kind="data",
        recipe=patched(setting("tasks.click.label", {"column": "click", "positive": ["yes"]})),
    ),
    Case(
        "wrong number of columns",
        "the file has 5 columns but data.columns names 3",
        kind="data",
        recipe=patched(lambda r: r["data"].update(header=False, columns=["a", "b", "c"])),
    ),
    Case(
        "not UTF-8 data",
        "it is not UTF-8 text",
        kind="data",
        data=good_data().encode() + "u1,\xe9t\xe9,30,1,0\n".encode("latin-1"),
    ),
    Case("row with too many fields", "more fields than the header", kind="data", data=good_data() + "u1,i1,30,1,0,9\n"),
    Case(
        "row with too few fields", "has 4 fields, not 5 (ragged rows)", kind="data", data=good_data() + "u1,i1,30,1\n"
    ),
    Case(
        "split column absent",
        "data.split.column: column 'fold' is not in the data",
        kind="data",
        recipe=patched(setting("data.split", {"by": "column", "column": "fold"})),
    ),
    Case(
        "GAUC group column absent",
        "data.group: column 'users' is not in the data (did you mean 'user'?)",
        kind="data",
        recipe=patched(setting("data.group", "users")),
    ),
    Case(
        "empty valid split",
        "the valid split is empty",
        kind="data",
        recipe=patched(
            setting("data.split", {"by": "column", "column": "user", "train": ["u1", "u2"], "valid": ["nobody"]})
        ),
    ),
    Case(
        "infinite number in a train row",
        "features.numeric.age: column 'age' has an infinite value: 'inf' (data row 83)",
        kind="data",
        data=good_data() + "u1,i1,30,1,0\nu1,i1,30,1,0\nu1,i1,inf,1,0\n",
    ),
    Case(
        "-Infinity in a valid row",
        "column 'age' has an infinite value: '-Infinity' (data row 82)",
        kind="data",
        data=good_data() + "u1,i1,30,1,0\nu1,i1,-Infinity,1,0\n",
    ),
    Case(
        "overflowing number in a test row",
        "column 'age' has an infinite value: '1e400' (data row 81)",
        kind="data",
        data=good_data() + "u1,i1,1e400,1,0\n",
    ),
    Case("infinite label", "column 'click' has an infinite value", kind="data", data=good_data() + "u1,i1,30,inf,0\n"),
    Case(
        "yes/no label without positive",
        "for other values name the positive ones, e.g. label: {column: click, positive: [yes]}",
        kind="data",
        data=good_data() + "u1,i1,30,yes,0\n",
    ),
    Case(
        "duplicate header name",
        "the header names column 'item' twice (columns 2 and 3)",
        kind="data",
        data=good_data().replace("user,item,age", "user,item,item", 1),
    ),
    Case(
        "duplicate name in data.columns",
        "data: 'columns' has duplicate names",
        recipe=patched(lambda r: r["data"].update(header=False, columns=["a", "a", "c", "d", "e"])),
    ),
    Case(
        "duplicate label column in the header",
        "the header names column 'click' twice (columns 4 and 5)",
        kind="data",
        data=good_data().replace("click,buy", "click,click", 1),
    ),
    # --- artifacts ---
    Case(
        "eval on a directory that is not a run",
        "not an mtl run directory",
        kind="artifact",
        command="eval",
        damage=lambda run: (run / "model.safetensors").unlink(),
    ),
    Case(
        "eval on a missing directory",
        "not a directory",
        kind="artifact",
        command="eval",
        damage=lambda run: shutil.rmtree(run),
    ),
    # --- explain, report and compare: options and run lists (issue 24) ---
    Case(
        "explain --group name given twice",
        "--group: 'a' is given twice",
        kind="artifact",
        command="explain",
        args=["--importance", "--group", "a=age", "--group", "a=item"],
    ),
    Case(
        "explain --group named like another input",
        "--group 'user': 'user' is the name of an input that is not in the group",
        kind="artifact",
        command="explain",
        args=["--importance", "--group", "user=age"],
    ),
    Case(
        "explain --by a numeric feature",
        "--by 'age': not a categorical feature of this run",
        kind="artifact",
        command="explain",
        args=["--by", "age"],
    ),
    Case(
        "explain --plot onto a file",
        "plots.png is a file; give a directory for the plots",
        kind="artifact",
        command="explain",
        args=["--plot", "plots.png"],
        damage=lambda run: (run.parent / "plots.png").write_bytes(b"png"),
    ),
    Case(
        "explain --dead-below above 1",
        "Invalid value for '--dead-below'",
        kind="artifact",
        command="explain",
        args=["--dead-below", "2"],
    ),
    Case(
        "report on a directory that is not a run",
        "not an mtl run directory (no model.safetensors in it)",
        kind="artifact",
        command="report",
        damage=lambda run: (run / "model.safetensors").unlink(),
    ),
    Case(
        "report of a run given twice",
        "the run run is given twice",
        kind="artifact",
        command="report",
        args=["run"],
    ),
    Case(
        "report with a run as its own baseline",
        "--baseline run: the baseline is also one of the runs compared",
        kind="artifact",
        command="report",
        args=["--baseline", "run"],
    ),
    Case(
        "compare a run given twice",
        "the run run is given twice",
        kind="artifact",
        command="compare",
        args=["run"],
    ),
    Case(
        "compare with a negative tolerance",
        "Invalid value for '--tolerance'",
        kind="artifact",
        command="compare",
        args=["--tolerance", "-0.01"],
    ),
    Case(
        "compare against a missing baseline",
        "nosuch: not a directory",
        kind="artifact",
        command="compare",
        args=["--baseline", "nosuch"],
    ),
    Case(
        "truncated model file",
        "not a readable safetensors file",
        kind="artifact",
        command="eval",
        damage=lambda run: (run / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes()[:200]),
    ),
    Case(
        "garbage model file",
        "not a readable safetensors file",
        kind="artifact",
        command="eval",
        damage=lambda run: (run / "model.safetensors").write_bytes(b"\x00" * 64),
    ),
    Case(
        "model file from another tool",
        "not an mtl model",
        kind="artifact",
        command="eval",
        damage=lambda run: _foreign_safetensors(run / "model.safetensors"),
    ),
    Case(
        "source data changed since training",
        "the source data changed since this model was trained",
        kind="artifact",
        command="eval",
        damage=lambda run: _append(run.parent / "data.csv", "u1,i1,30,1,0\n"),
    ),
    Case(
        "export onto a directory that is not a bundle",
        "--force only replaces an mtl bundle",
        kind="artifact",
        command="export",
        args=["--force"],
        damage=lambda run: _occupy(run.parent / "elsewhere"),
    ),
    Case(
        "train --force onto a directory that is not a run",
        "--force only replaces an mtl run directory",
        kind="artifact",
        command="train-into",
        args=["--force"],
        damage=lambda run: _occupy(run.parent / "other"),
    ),
    # --- the training wing: its command line, trackers and run directory (issue 24) ---
    Case("--port without --nproc", "--port is where the --nproc processes meet", args=["--port", "29999"]),
    Case("far more processes than cores", "each process holds a model and its data", args=["--nproc", "100000"]),
    Case(
        "a misspelt tracker",
        "unknown tracker 'tensorbord' (did you mean 'tensorboard'?)",
        recipe=patched(setting("train.loggers", ["tensorbord"])),
    ),
    Case(
        "resume with a tensorboard folder it cannot write",
        "tensorboard cannot write its event files",
        kind="artifact",
        command="resume",
        args=["--set", "train.loggers=[tensorboard]", "--set", "train.epochs=3"],
        damage=lambda run: (run / "tensorboard").write_text("not a folder"),
    ),
    Case(
        "resume without a checkpoint",
        "no checkpoint to resume from",
        kind="artifact",
        command="resume",
        damage=lambda run: (run / "checkpoint.safetensors").unlink(),
    ),
    Case(
        "resume with another recipe",
        "the recipe differs from the run's recipe.yaml",
        kind="artifact",
        command="resume",
        args=["--set", "train.lr=0.5"],
    ),
    Case(
        "resume a run of another data file",
        "the data changed since the run started",
        kind="artifact",
        command="resume",
        damage=lambda run: _append(run.parent / "data.csv", "u2,i2,31,0,0\n"),
    ),
    Case(
        "corrupt checkpoint",
        "not a readable checkpoint",
        kind="artifact",
        command="resume",
        damage=lambda run: (run / "checkpoint.safetensors").write_bytes(b"{}"),
    ),
    Case(
        "tampered bundle",
        "sha256 does not match the manifest",
        kind="artifact",
        command="load-bundle",
        damage=lambda run: None,
    ),
    Case(
        "bundle manifest of a newer version",
        "bundle version 99 is not 1 (written by a newer mtl)",
        kind="artifact",
        command="predict",
        damage=lambda run: _edit_manifest(run.parent / "bundle", version=99),
    ),
    Case(
        "bundle manifest of another format",
        "format 'other-tool' is not 'mtlcli-bundle'",
        kind="artifact",
        command="predict",
        damage=lambda run: _edit_manifest(run.parent / "bundle", format="other-tool"),
    ),
    Case(
        "predict an infinite value",
        "input column 'age': column 'age' has an infinite value: '-inf' (data row 3)",
        kind="artifact",
        command="predict",
        args=["--input", "rows.csv"],
        damage=lambda run: (run.parent / "rows.csv").write_text(rows("u1,i1,30,1,0\nu2,i2,31,0,0\nu3,i3,-inf,0,0\n")),
    ),
    Case(
        "predict into a directory",
        "--output outdir: is a directory",
        kind="artifact",
        command="predict",
        args=["--input", "data.csv", "--output", "outdir"],
        damage=lambda run: (run.parent / "outdir").mkdir(),
    ),
    Case(
        "predict --keep a column that is not there",
        "column 'nosuch' is not in the input",
        kind="artifact",
        command="predict",
        args=["--input", "data.csv", "--keep", "nosuch"],
    ),
    Case(
        "predict input with a duplicate header name",
        "the header names column 'age' twice",
        kind="artifact",
        command="predict",
        args=["--input", "rows.csv"],
        damage=lambda run: (run.parent / "rows.csv").write_text("user,item,age,age,buy\nu1,i1,30,1,0\n"),
    ),
    Case(
        "predict --score with a name that is not a task",
        "--score: 'clik' is not a task of this model (did you mean 'click'?)",
        kind="artifact",
        command="predict",
        args=["--input", "data.csv", "--score", "clik^2"],
    ),
]


def _edit_manifest(bundle: Path, **changes: object) -> None:
    import json

    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(changes)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def _occupy(directory: Path) -> None:
    directory.mkdir()
    (directory / "notes.txt").write_text("mine")


def _foreign_safetensors(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(path))


runner = CliRunner()


def write_inputs(work: Path, case: Case) -> Path:
    data = good_data() if case.data is None else case.data
    (work / "data.csv").write_bytes(data if isinstance(data, bytes) else data.encode())
    recipe = work / "recipe.yaml"
    if case.recipe == "MISSING":
        return work / "missing.yaml"
    body = GOOD if case.recipe is None else case.recipe
    if isinstance(body, dict):
        body = yaml.safe_dump(body, sort_keys=False)
    recipe.write_bytes(body if isinstance(body, bytes) else body.encode())
    return recipe


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("good")
    make_good_run(work)
    return work


def make_good_run(work: Path) -> None:
    recipe = write_inputs(work, Case("good", ""))
    previous = Path.cwd()
    os.chdir(work)
    try:
        result = runner.invoke(app, ["train", str(recipe), "--out", "run", "--quiet"])
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["export", "run", "--out", "bundle"])
        assert result.exit_code == 0, result.output
    finally:
        os.chdir(previous)


def run_case(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, good: Path | None) -> tuple[int, str, Path]:
    if case.kind == "artifact":
        assert good is not None
        work = tmp_path / "work"
        shutil.copytree(good, work)
        shutil.rmtree(work / "cache")  # re-encoded from data.csv where needed
        monkeypatch.chdir(work)
        if case.damage is not None:
            case.damage(work / "run")
        recipe = work / "recipe.yaml"
        if case.command == "eval":
            argv = ["eval", "run"]
        elif case.command == "export":
            argv = ["export", "run", "--out", "elsewhere"]
        elif case.command == "predict":
            argv = ["predict", "bundle"]
        elif case.command in ("explain", "compare"):
            argv = [case.command, "run"]
        elif case.command == "report":
            argv = ["report", "run", "--out", "page.html"]
        elif case.command == "train-into":
            argv = ["train", str(recipe), "--out", "other", "--quiet"]
        elif case.command == "load-bundle":
            model = work / "bundle" / "model.safetensors"
            raw = bytearray(model.read_bytes())
            raw[-1] ^= 0xFF
            model.write_bytes(bytes(raw))
            from mtlcli.errors import MtlError
            from mtlcli.export.bundle import load_bundle

            with pytest.raises(MtlError) as caught:
                load_bundle(work / "bundle")
            return 2, str(caught.value), work
        else:
            argv = ["train", str(recipe), "--out", "run", "--resume", "--quiet"]
        result = runner.invoke(app, argv + case.args)
        return result.exit_code, result.output, work
    monkeypatch.chdir(tmp_path)
    recipe = write_inputs(tmp_path, case)
    (tmp_path / "sub").mkdir(exist_ok=True)  # for `extends: sub`
    if case.command == "check":
        argv = ["recipe", "check", str(recipe)]
    elif case.command == "sweep":
        argv = ["sweep", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]
    else:
        argv = ["train", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]
    result = runner.invoke(app, argv + case.args)
    return result.exit_code, result.output, tmp_path


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.kind for c in CASES} == {"recipe", "data", "artifact"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_clear_message_and_exit_2(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    good = request.getfixturevalue("good_run") if case.kind == "artifact" else None
    code, output, work = run_case(case, tmp_path, monkeypatch, good)
    assert code == 2, output
    assert "Traceback" not in output
    assert case.expect in " ".join(output.split()), output
    if case.kind != "artifact":
        assert not (work / "run").exists(), "a failed run left a run directory behind"
        leftovers = [p for p in (work / "cache").rglob("*")] if (work / "cache").exists() else []
        assert not [p for p in leftovers if p.name.endswith(".tmp")], "partial cache entry left behind"


def render_markdown() -> str:  # pragma: no cover - documentation helper
    import tempfile

    out = [
        "# Errors: the bad-input corpus",
        "",
        "Every case below is a test in `tests/test_bad_inputs.py`: the command exits with code 2 and",
        "prints one message naming what is wrong and where (file, line, YAML path, column or row), with",
        "a hint, never a traceback, and leaves no partial output behind. Messages as printed:",
        "",
    ]
    section = ""
    titles = {"recipe": "Recipes", "data": "Data", "artifact": "Artifacts (runs, checkpoints, bundles)"}
    good: Path | None = None
    for case in CASES:
        if case.kind != section:
            section = case.kind
            out += ["", f"## {titles[section]}", "", "| case | message |", "|---|---|"]
        with tempfile.TemporaryDirectory() as tmp:
            if case.kind == "artifact" and good is None:
                good = Path(tempfile.mkdtemp())
                make_good_run(good)
            patcher = pytest.MonkeyPatch()
            try:
                _, output, _ = run_case(case, Path(tmp), patcher, good)
            finally:
                patcher.undo()
        message = " ".join(output.replace(tmp, "…").split()).replace("|", "\\|")
        out.append(f"| {case.name} | `{message}` |")
    return "\n".join(out) + "\n" + ENVIRONMENT


ENVIRONMENT = """
## The environment: signals, full disks, closed pipes

Tested in `tests/test_environment.py` (these are not input mistakes, so their exit codes differ):

| case | exit | what happens |
|---|---|---|
| SIGTERM or Ctrl-C during any command (`recipe check`, `preprocess`, `train`, `eval`, `predict`, `export`, `sweep`) | 130 | `interrupted` on stderr; temporary files removed. `mtl train` and `mtl sweep` first save a checkpoint and print the command that resumes. |
| SIGTERM while `mtl predict` writes to stdout | 130 | the rows already scored are flushed to the reader first |
| SIGTERM while `mtl predict -o FILE` writes | 130 | `FILE was not written: an interrupted file is never left half-written`; no FILE, no temporary file |
| stdout is a full disk (`mtl eval --json > /dev/full`, `mtl recipe show > /dev/full`, `mtl predict -o /dev/full`, ...) | 3 | `error: cannot write standard output: No space left on device; free some space (or write elsewhere) and run it again` |
| the disk fills while `mtl train` or `mtl export` writes | 3 | `error: cannot write …/run/model.safetensors: No space left on device; ...`; a run that has no checkpoint yet is removed, nothing half-written is left |
| permission denied on a path | 3 | `error: cannot write or read PATH: Permission denied; check its permissions, or choose another path` |
| the reader of stdout goes away (`mtl predict ... \\| head`) | 0 | nothing on stderr |
"""


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(render_markdown())
