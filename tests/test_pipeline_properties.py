"""A property test of the whole pipeline: inputs drawn from valid and from broken generators
(non-finite numbers, random bytes, random task names) go through `recipe check` → `preprocess` →
`train` (1 epoch) → `predict` on tiny data. Valid inputs exit 0 with finite probabilities; broken
ones stop with exit 2 and a message; nothing ever ends in a traceback."""

from __future__ import annotations

import io
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

from mtlcli.cli.app import app

runner = CliRunner()
ROWS = 24
TASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
NON_FINITE = ["inf", "-inf", "Infinity", "-Infinity", "1e400", "-1e999"]


@dataclass
class Example:
    task: str
    header: list[str]
    rows: list[list[str]]
    broken: str | None  # what is wrong, or None for valid input

    def csv(self) -> bytes:
        lines = [",".join(self.header)] + [",".join(row) for row in self.rows]
        return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


numbers = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False).map(lambda x: f"{x:.6g}")
words = st.text(alphabet="abcdefghij", min_size=1, max_size=4)


@st.composite
def valid_tables(draw: st.DrawFn) -> Example:
    task = draw(st.from_regex(TASK_NAME, fullmatch=True).filter(lambda t: len(t) <= 12 and t not in ("user", "age")))
    rows = []
    for i in range(ROWS):
        label = str(i % 2) if i < 8 else draw(st.sampled_from(["0", "1"]))  # both classes in every split
        rows.append([draw(words), draw(numbers), label])
    return Example(task, ["user", "age", "label"], rows, None)


@st.composite
def broken_tables(draw: st.DrawFn) -> Example:
    example = draw(valid_tables())
    kind = draw(st.sampled_from(["non-finite feature", "non-finite label", "bytes in a number", "task name"]))
    row = draw(st.integers(0, ROWS - 1))
    if kind == "non-finite feature":
        example.rows[row][1] = draw(st.sampled_from(NON_FINITE))
    elif kind == "non-finite label":
        example.rows[row][2] = draw(st.sampled_from([*NON_FINITE, "nan"]))
    elif kind == "bytes in a number":
        junk = draw(st.binary(min_size=1, max_size=6)).decode("latin-1")
        junk = re.sub(r"[,\n\r\"]", "", junk)
        example.rows[row][1] = "x" + junk  # a letter first: never a number
    else:
        example.task = draw(st.text(max_size=8).filter(lambda t: not TASK_NAME.fullmatch(t)))
    example.broken = kind
    return example


def recipe(example: Example, work: Path) -> str:
    spec = {
        "data": {
            "source": str(work / "data.csv"),
            "split": {"by": "modulo", "modulus": 4, "test": [0], "valid": [1]},
            "cache_dir": str(work / "cache"),
        },
        "features": {"numeric": ["age"], "categorical": ["user"]},
        "tasks": {example.task: {"label": "label"}},
        "model": {"scheme": "mmoe", "embedding_dim": 2, "n_experts": 2, "expert_units": [4], "tower_units": [2]},
        "train": {"epochs": 1, "batch_size": 8, "threads": 1, "early_stopping": None},
    }
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)


def no_traceback(result: Result) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def pipeline(example: Example) -> list[tuple[str, Result]]:
    """Run the four commands until one fails; every result so far."""
    results: list[tuple[str, Result]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "data.csv").write_bytes(example.csv())
        (work / "recipe.yaml").write_text(recipe(example, work), encoding="utf-8")
        steps = [
            ("check", ["recipe", "check", str(work / "recipe.yaml")]),
            ("preprocess", ["preprocess", str(work / "recipe.yaml"), "--quiet"]),
            ("train", ["train", str(work / "recipe.yaml"), "--out", str(work / "run"), "--quiet"]),
            ("export", ["export", str(work / "run"), "--out", str(work / "bundle")]),
            ("predict", ["predict", str(work / "bundle"), "--input", str(work / "data.csv")]),
        ]
        for name, argv in steps:
            result = runner.invoke(app, argv)
            results.append((name, result))
            no_traceback(result)
            if result.exit_code != 0:
                break
    return results


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.one_of(valid_tables(), broken_tables()))
def test_valid_inputs_score_and_broken_ones_stop_with_a_message(example: Example) -> None:
    results = pipeline(example)
    name, last = results[-1]
    if example.broken is None:
        assert last.exit_code == 0 and name == "predict", (name, last.output)
        scores = pl.read_csv(io.BytesIO(last.stdout_bytes))
        assert scores.columns == [example.task] and scores.height == ROWS
        assert all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in scores.get_column(example.task).to_list())
    else:
        assert last.exit_code == 2, (example.broken, name, last.output)
        assert "error:" in last.output, last.output
        expected_step = "check" if example.broken == "task name" else "preprocess"
        assert name == expected_step, (example.broken, name, last.output)
