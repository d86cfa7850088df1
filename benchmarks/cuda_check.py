"""The CUDA path against the CPU: census MMoE trained with `train.device: cpu` and `cuda`, the
same seed and batches, test AUC per task and train samples/s; with two GPUs or more also
`--nproc 2` (one GPU a rank, NCCL). For a machine with a GPU (this project's `device` tool);
not part of the tests.

    python benchmarks/cuda_check.py                       # recipes/census-mmoe.yaml, 10 epochs
    python benchmarks/cuda_check.py --epochs 30 --recipe recipes/census-ple.yaml

Prints a table and one line per check: the CUDA run's test AUC within --tolerance of the CPU
run's (float32 kernels differ between devices, and a GPU's dropout draws differ from the CPU's,
so the bar is seed noise, not rounding). Exit code 1 when a check fails, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def train_and_test(recipe: str, run: Path, cache: Path, device: str, epochs: int, nproc: int) -> dict[str, float]:
    sets = [f"train.device={device}", f"train.epochs={epochs}", "train.early_stopping=null", f"data.cache_dir={cache}"]
    args = [sys.executable, "-m", "mtlcli", "train", recipe, "--out", str(run), "--force", "--quiet"]
    args += ["--nproc", str(nproc)] if nproc > 1 else []
    for item in sets:
        args += ["--set", item]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{device} x{nproc}: {done.stderr.strip()}")
    epochs_done = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    test = subprocess.run(
        [sys.executable, "-m", "mtlcli", "eval", str(run), "--split", "test", "--json"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    tasks = json.loads(test.stdout)["tasks"]
    out = {f"auc.{task}": metrics["auc"] for task, metrics in tasks.items() if "auc" in metrics}
    out["samples_per_second"] = statistics.median(e["samples_per_second"] for e in epochs_done[1:] or epochs_done)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/census-mmoe.yaml")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--tolerance", type=float, default=0.002, help="largest test AUC difference to the CPU")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"no CUDA GPU seen by torch {torch.__version__}", file=sys.stderr)
        raise SystemExit(2)
    runs = [("cpu", 1), ("cuda", 1)] + ([("cuda", 2)] if torch.cuda.device_count() >= 2 else [])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for device, nproc in runs:
            run = Path(tmp) / f"{device}-{nproc}"
            results[(device, nproc)] = train_and_test(args.recipe, run, Path(tmp) / "cache", device, args.epochs, nproc)
    names = sorted(k for k in results[("cpu", 1)] if k.startswith("auc."))
    print(f"{args.recipe}, {args.epochs} epochs, {torch.cuda.get_device_name(0)}\n")
    print("| device | processes | " + " | ".join(f"test {n}" for n in names) + " | train samples/s |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for (device, nproc), got in results.items():
        aucs = " | ".join(f"{got[n]:.6f}" for n in names)
        print(f"| {device} | {nproc} | {aucs} | {got['samples_per_second']:,.0f} |")
    failed = False
    for key, got in results.items():
        if key == ("cpu", 1):
            continue
        gap = max(abs(got[n] - results[("cpu", 1)][n]) for n in names)
        ok = gap <= args.tolerance
        failed |= not ok
        print(f"{'ok' if ok else 'FAILED'}: {key[0]} x{key[1]} test AUC within {gap:.2e} of the CPU run")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
