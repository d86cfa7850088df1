"""Scale figures: preprocess and train on generated click logs of 2M and 20M rows, each command a
fresh process whose peak RSS is read from the kernel (``wait4``), and the embedding step at three
vocabulary sizes.

Run by hand from the repository root (minutes; not part of the tests):

    python benchmarks/scale.py --out /tmp/scale                      # 2M and 20M rows
    python benchmarks/scale.py --out /tmp/scale --rows 2000000       # one size
    python benchmarks/scale.py --out /tmp/scale --histories --preprocess-only   # with a click history

Prints, per size: preprocess rows/s and peak RSS (streamed, cache rebuilt), a full epoch of
``mtl train`` with the full vocabularies (samples/s, peak RSS) and the same run with every
categorical feature hashed into 1,000 buckets (same code path, same model); then the embedding
step at vocabularies of 1k, 1M and 10M rows (``embedding_step.py``). Logs that exist in ``--out``
are reused.

``--histories`` adds, per size, the same log with a ``time`` column (each row's position) and a
history derived from an event log (``features.sequences.clicked.events``: the user's earlier
clicks, the last 50, sharing the item vocabulary), preprocessed after the log without it.
``--preprocess-only`` leaves training (and the embedding step) out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import yaml

HERE = Path(__file__).resolve().parent
HASHED = "features.defaults.categorical.hash_buckets=1000"
SHAPES = {2_000_000: (650_000, 200_000), 20_000_000: (1_000_000, 200_000)}  # rows: (users, items)


def measure(argv: list[str], cwd: Path) -> tuple[float, float, str]:
    """Like ``run``, but the peak is this command's alone (a helper process reports it)."""
    wrapper = (
        "import os, subprocess, sys, time, json;"
        "t = time.perf_counter(); p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE);"
        "out, _ = p.communicate(); sys.stdout.write(out.decode());"
        "import resource; r = resource.getrusage(resource.RUSAGE_CHILDREN);"
        "sys.stderr.write(json.dumps({'seconds': time.perf_counter() - t, 'rss': r.ru_maxrss, 'rc': p.returncode}))"
    )
    process = subprocess.run(
        [sys.executable, "-c", wrapper, *argv], cwd=cwd, capture_output=True, text=True, check=False
    )
    report = json.loads(process.stderr.strip().splitlines()[-1])
    if report["rc"] != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {report['rc']})")
    return report["seconds"], report["rss"] / 2**20, process.stdout


def with_history(log: Path) -> Path:
    """``log``'s shards with a ``time`` column (the row's position in the log) and its clicks as an
    event log (user, item, time), one shard at a time, beside a recipe with a click history."""
    out = log.parent / f"{log.name}-histories"
    if (out / "recipe.yaml").is_file():
        return out
    out.mkdir(exist_ok=True)
    offset = 0
    for shard in sorted(log.glob("part-*.parquet")):
        rows = pl.read_parquet(shard).with_row_index("time", offset=offset)
        rows.write_parquet(out / shard.name)
        rows.filter(pl.col("click") == 1).select("user", "item", "time").write_parquet(out / f"events-{shard.name}")
        offset += rows.height
    spec = yaml.safe_load((log / "recipe.yaml").read_text())
    spec["data"]["source"] = str(out / "part-*.parquet")
    spec["features"]["exclude"] = [*spec["features"].get("exclude", []), "time"]
    clicked = {"events": {"source": [str(out / "events-*.parquet")]}, "vocabulary": "item", "max_len": 50}
    spec["features"]["sequences"] = {"clicked": clicked}
    (out / "recipe.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=list(SHAPES))
    parser.add_argument("--skip-embedding", action="store_true")
    parser.add_argument("--histories", action="store_true", help="also preprocess with a click history")
    parser.add_argument("--preprocess-only", action="store_true", help="no training, no embedding step")
    args = parser.parse_args()
    mtl = [sys.executable, "-m", "mtlcli"]
    for rows in args.rows:
        users, items = SHAPES.get(rows, (650_000, 200_000))
        log = args.out / f"log{rows}"
        if not (log / "recipe.yaml").is_file():
            subprocess.run(
                [sys.executable, str(HERE / "click_log.py"), "--rows", str(rows), "--users", str(users),
                 "--items", str(items), "--out", str(log)],
                check=True,
            )  # fmt: skip
        # threads pinned: with train.threads auto the hashed model (under 1M parameters) would get one
        threads = ["--set", f"train.threads={os.cpu_count() or 1}"]
        variants = (("full vocabularies", threads), ("hashed into 1,000", [*threads, "--set", HASHED]))
        variants = variants[:1] if args.preprocess_only else variants
        for label, sets in variants:
            seconds, peak, _ = measure([*mtl, "preprocess", "recipe.yaml", "--force", "--quiet", *sets], log)
            print(
                f"{rows:,} rows, {label}: preprocess {rows / seconds:,.0f} rows/s ({seconds:.1f} s), peak RSS {peak:.2f} GiB"
            )
            if args.preprocess_only:
                continue
            argv = [
                *mtl,
                "train",
                "recipe.yaml",
                "--out",
                f"run-{label.split()[0]}",
                "--force",
                "--json",
                "--quiet",
                *sets,
            ]
            seconds, peak, out = measure(argv, log)
            summary = json.loads(out)
            valid = summary["valid"]
            print(
                f"{rows:,} rows, {label}: train {summary['train_samples_per_second']:,.0f} samples/s, "
                f"peak RSS {peak:.2f} GiB, {summary['parameters']:,} parameters, "
                f"valid AUC click {valid['click']['auc']:.4f} purchase {valid['purchase']['auc']:.4f} "
                f"(command {seconds:.0f} s)"
            )  # fmt: skip
        if args.histories:
            histories = with_history(log)
            seconds, peak, _ = measure([*mtl, "preprocess", "recipe.yaml", "--force", "--quiet"], histories)
            print(
                f"{rows:,} rows, full vocabularies, click history (last 50): preprocess {rows / seconds:,.0f} rows/s "
                f"({seconds:.1f} s), peak RSS {peak:.2f} GiB"
            )
    if not args.skip_embedding and not args.preprocess_only:
        subprocess.run([sys.executable, str(HERE / "embedding_step.py")], check=True)


if __name__ == "__main__":
    main()
