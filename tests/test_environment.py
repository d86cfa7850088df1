"""Failures that come from the machine, not the input: signals, full disks, closed pipes. Each
gives one line and a documented exit code (130 interrupted, 3 environment, 0 for `| head`), no
traceback, and no partial or temporary file; JSON output stays strict JSON."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mtlcli.cli.app import app
from mtlcli.fileio import to_json
from tests.helpers import mtl
from tests.test_bad_inputs import GOOD, good_data

runner = CliRunner()
FULL = Path("/dev/full")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny recipe, its data, a trained run and its bundle."""
    work = tmp_path_factory.mktemp("environment")
    (work / "data.csv").write_text(good_data())
    (work / "recipe.yaml").write_text(yaml.safe_dump(GOOD, sort_keys=False))
    previous = Path.cwd()
    os.chdir(work)
    try:
        assert runner.invoke(app, ["train", "recipe.yaml", "--out", "run", "--quiet"]).exit_code == 0
        assert runner.invoke(app, ["export", "run", "--out", "bundle"]).exit_code == 0
    finally:
        os.chdir(previous)
    return work


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.name.endswith((".tmp", ".lock")))


# --- signals ---------------------------------------------------------------------------------------


def terminated(
    process: subprocess.Popen[str], wait: float = 3.0, ready: Callable[[], bool] | None = None
) -> tuple[int, str, str]:
    """SIGTERM ``process`` once ``ready()`` holds (else after ``wait`` seconds: it has started and
    blocks on its input), then its exit code, stdout and stderr."""
    if ready is None:
        time.sleep(wait)
    else:
        until(ready)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


def until(condition: Callable[[], bool], timeout: float = 120.0) -> None:
    """Poll ``condition`` until it holds: a fixed sleep would race a slow start on a loaded machine."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the command did not get there in time"
        time.sleep(0.05)


def stdout_lines(process: subprocess.Popen[str]) -> list[str]:
    """The lines ``process`` writes to stdout, collected as they come by a reader thread (the
    list grows while the process runs; its stdout is consumed)."""
    assert process.stdout is not None
    stream, lines = process.stdout, []
    threading.Thread(target=lambda: lines.extend(iter(stream.readline, "")), daemon=True).start()
    return lines


@pytest.mark.parametrize("command", [["recipe", "check", "-"], ["preprocess", "-"], ["train", "-", "--out", "r"]])
def test_sigterm_stops_a_command_with_130(work: Path, tmp_path: Path, command: list[str]) -> None:
    """Each command waits on its recipe from stdin (an open pipe, nothing written) when SIGTERM comes."""
    process = mtl(*command, cwd=tmp_path, stdin=subprocess.PIPE)
    code, _, err = terminated(process)
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_sigterm_while_predicting_to_stdout_keeps_the_rows_scored(work: Path) -> None:
    """Rows already scored reach the reader; the command then exits 130."""
    process = mtl("predict", "bundle", "--chunk-rows", "5", cwd=work, stdin=subprocess.PIPE)
    assert process.stdin is not None
    process.stdin.write("".join(good_data().splitlines(keepends=True)[:11]))  # header + 10 rows
    process.stdin.flush()  # the pipe stays open: predict waits for more
    lines = stdout_lines(process)
    code, _, err = terminated(process, ready=lambda: len(lines) >= 11)
    process.wait(timeout=60)
    assert code == 130, err
    assert "Traceback" not in err
    assert lines[0] == "click,buy\n" and len(lines) == 11


def test_sigterm_while_predicting_to_a_file_leaves_no_file(work: Path, tmp_path: Path) -> None:
    target = tmp_path / "scores.csv"
    process = mtl("predict", work / "bundle", "--chunk-rows", "5", "-o", target, cwd=tmp_path, stdin=subprocess.PIPE)
    assert process.stdin is not None
    process.stdin.write("".join(good_data().splitlines(keepends=True)[:11]))
    process.stdin.flush()
    code, _, err = terminated(process, ready=lambda: any(tmp_path.iterdir()))  # scoring has begun
    assert code == 130, err
    assert "scores.csv was not written" in " ".join(err.split())
    assert list(tmp_path.iterdir()) == []  # no scores.csv, no .scores.csv.*.tmp


# --- full disks and closed pipes ---------------------------------------------------------------------


needs_dev_full = pytest.mark.skipif(not FULL.exists(), reason="/dev/full is not on this system")


@needs_dev_full
@pytest.mark.parametrize(
    "command",
    [
        ["recipe", "show", "recipe.yaml"],
        ["recipe", "components", "--json"],
        ["eval", "run", "--json"],
        ["predict", "bundle", "--input", "data.csv"],
        ["export", "run", "--out", "b2", "--json"],
    ],
)
def test_a_full_disk_on_stdout_is_one_line_and_exit_3(work: Path, command: list[str]) -> None:
    with FULL.open("w") as full:
        process = subprocess.run(
            [sys.executable, "-m", "mtlcli", *command], cwd=work, stdout=full, stderr=subprocess.PIPE, text=True
        )
    assert process.returncode == 3, process.stderr
    assert process.stderr.strip().splitlines() == [
        "error: cannot write standard output: No space left on device; free some space (or write elsewhere) and "
        "run it again"
    ]
    assert not leftovers(work)


@needs_dev_full
def test_predict_into_dev_full(work: Path) -> None:
    process = subprocess.run(
        [sys.executable, "-m", "mtlcli", "predict", "bundle", "--input", "data.csv", "-o", str(FULL)],
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert process.returncode == 3, process.stderr
    assert "No space left on device" in process.stderr and "Traceback" not in process.stderr


def test_a_closed_pipe_is_a_quiet_exit_0(work: Path) -> None:
    process = mtl("recipe", "components", "--json", cwd=work)
    assert process.stdout is not None
    process.stdout.close()  # the reader is gone before the command writes
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert err == ""


def test_a_full_disk_while_training_names_the_file_and_leaves_no_run(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """safetensors reports a full disk as its own error; it becomes one line naming the file, exit 3."""
    from safetensors import SafetensorError

    import mtlcli.train.checkpoint as checkpoint

    def full(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    monkeypatch.chdir(work)
    result = runner.invoke(app, ["train", "recipe.yaml", "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 3, result.output
    assert "cannot write" in result.output and "model.safetensors: No space left on device" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
    assert not leftovers(tmp_path)


def test_a_file_write_failure_names_its_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mtlcli.fileio import write_text

    def fail(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", fail)
    with pytest.raises(OSError) as caught:
        write_text(tmp_path / "summary.json", "{}")
    assert caught.value.filename == str(tmp_path / "summary.json")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


# --- JSON ---------------------------------------------------------------------------------------------


def strict(text: str) -> object:
    def refuse(name: str) -> None:
        raise ValueError(f"bare {name} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_one_encoder_writes_null_for_non_finite_numbers() -> None:
    import numpy as np

    value = {"auc": math.nan, "loss": [math.inf, -math.inf, 1.5], "n": np.float32(2.5), "path": Path("a/b")}
    assert strict(to_json(value)) == {"auc": None, "loss": [None, None, 1.5], "n": 2.5, "path": "a/b"}


def test_a_run_with_an_undefined_metric_writes_strict_json(work: Path, tmp_path: Path) -> None:
    """Every valid row negative for buy: its AUC is undefined; summary.json, metrics.jsonl and
    --json hold null for it, never a bare NaN."""
    lines = good_data().splitlines()
    rows = [lines[0]] + [
        ",".join([*line.split(",")[:4], "0"]) if i % 4 == 1 else line for i, line in enumerate(lines[1:])
    ]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "recipe.yaml").write_text((work / "recipe.yaml").read_text())
    previous = Path.cwd()
    os.chdir(tmp_path)
    try:
        result = runner.invoke(app, ["train", "recipe.yaml", "--out", "run", "--json", "--quiet"])
    finally:
        os.chdir(previous)
    assert result.exit_code == 0, result.output
    summary = strict(result.stdout)
    assert isinstance(summary, dict) and summary["valid"]["buy"]["auc"] is None
    strict((tmp_path / "run" / "summary.json").read_text())
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        strict(line)


# --- the lock file and warnings -------------------------------------------------------------------------


def test_no_lock_file_is_left_beside_a_run(work: Path) -> None:
    assert not (work / ".run.lock").exists()
    assert not leftovers(work)


def test_degenerate_data_is_warned_about(work: Path, tmp_path: Path) -> None:
    """No positive buy row in train, and an empty numeric column: warnings on stderr and in --json."""
    lines = good_data().splitlines()
    rows = [lines[0]] + [",".join([*line.split(",")[:2], "", line.split(",")[3], "0"]) for line in lines[1:]]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "recipe.yaml").write_text((work / "recipe.yaml").read_text())
    previous = Path.cwd()
    os.chdir(tmp_path)
    try:
        result = runner.invoke(app, ["preprocess", "recipe.yaml", "--json", "--quiet"])
    finally:
        os.chdir(previous)
    assert result.exit_code == 0, result.output
    warnings = strict(result.stdout)["warnings"]  # type: ignore[index]
    assert "task 'buy' has no positive rows in train: it cannot learn to predict them" in warnings
    assert "numeric feature 'age' has no value in any train row: it carries no information" in warnings
    assert "warning: task 'buy' has no positive rows in train" in result.stderr
