"""`mtl predict` throughput and peak memory on a large raw input, PyTorch vs ONNX Runtime.

Run by hand from the repository root (not part of the tests):

    python benchmarks/predict_speed.py                 # 2,000,000 rows
    python benchmarks/predict_speed.py --rows 200000   # quicker

It trains a 1-epoch census MMoE run, exports it with --format onnx (plain safetensors when
onnxruntime is missing), writes a CSV of ``--rows`` raw rows by repeating the census file into a
temporary directory, then runs `mtl predict` in a subprocess per engine, output to /dev/null,
and prints rows/second and the subprocess's peak resident memory.
"""

from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CENSUS = REPO.parent / "shared" / "data" / "census-income" / "census-income.test.gz"


def make_input(path: Path, rows: int) -> None:
    lines = gzip.decompress(CENSUS.read_bytes()).splitlines(keepends=True)
    with path.open("wb") as handle:
        written = 0
        while written < rows:
            take = lines[: rows - written]
            handle.writelines(take)
            written += len(take)


def run_predict(bundle: Path, data: Path, engine: str, chunk_rows: int) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of one `mtl predict` subprocess."""
    command = [sys.executable, "-m", "mtlcli", "predict", str(bundle), "--input", str(data), "--engine", engine]
    command += ["--chunk-rows", str(chunk_rows), "--output", os.devnull]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"mtl predict --engine {engine} failed ({proc.returncode}): {stderr}")
    return seconds, usage.ru_maxrss * 1024  # Linux reports kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--chunk-rows", type=int, default=25_000)
    args = parser.parse_args()
    if not CENSUS.is_file():
        raise SystemExit(f"census data not found at {CENSUS}")
    try:
        import onnxruntime  # noqa: F401

        engines = ["torch", "onnxruntime"]
    except ImportError:
        engines = ["torch"]
    with tempfile.TemporaryDirectory(prefix="mtl-predict-bench-") as tmp:
        work = Path(tmp)
        mtl = [sys.executable, "-m", "mtlcli"]
        overrides = ["-s", f"data.source={CENSUS}", "-s", f"data.cache_dir={work / 'cache'}"]
        overrides += ["-s", "train.epochs=1", "-s", "train.threads=1"]
        recipe = REPO / "recipes" / "census-mmoe.yaml"
        subprocess.run([*mtl, "train", str(recipe), "--out", str(work / "run"), "-q", *overrides], check=True)
        fmt = "onnx" if "onnxruntime" in engines else "safetensors"
        export = [*mtl, "export", str(work / "run"), "--out", str(work / "bundle"), "--format", fmt]
        subprocess.run(export, check=True, stderr=subprocess.DEVNULL)
        data = work / "rows.csv"
        make_input(data, args.rows)
        size = data.stat().st_size
        print(f"input: {args.rows:,} raw census rows, {size / 2**20:.0f} MiB CSV, chunks of {args.chunk_rows:,} rows")
        for engine in engines:
            seconds, peak = run_predict(work / "bundle", data, engine, args.chunk_rows)
            print(
                f"{engine:>12}: {args.rows / seconds:>10,.0f} rows/s  ({seconds:.1f} s, peak RSS {peak / 2**20:.0f} MiB)"
            )


if __name__ == "__main__":
    main()
