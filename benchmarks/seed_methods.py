"""CSRec, CrossDistil and DEPHN's gate control, each beside its own baseline and its ablations, over
several seeds, on census, the generated click log and the sequences recipe.

Run by hand from the repository root (not part of the tests):

    python benchmarks/seed_methods.py                          # census, seeds 0 1 2
    python benchmarks/seed_methods.py --data click_log         # a 400k-row generated click log
    python benchmarks/seed_methods.py --data sequences         # recipes/sequences-mmoe.yaml's data
    python benchmarks/seed_methods.py --data census --rows csrec csrec-joint sparse-sharing
    python benchmarks/seed_methods.py --tables-only            # the tables of what is cached

The training, testing and caching are ``benchmarks/scheme_results.py``'s (``run_one``, the same
``WORK/results.json``: a census row that is also a scheme there, ``sparse-sharing`` or ``mmoe``,
is trained once for both). Each row is a recipe and its overrides, ``train.seed=S`` and one thread.
The rows of one baseline run side by side, seed after seed (all rows at seed 0, then seed 1, ...),
so that their samples/s ratios see the same load; CrossDistil's group (``mmoe`` and its two rows)
runs last.

Rows, per data set:

- ``sparse-sharing``, the baseline of ``csrec``, ``csrec-joint`` (``update: joint``: the
  specification's ablation of alternating training) and ``csrec-no-contrastive``
  (``contrastive_weight: 0``: without the contrastive subnet loss);
- ``hetero-mmoe``, the baseline of ``gate-control`` and ``gate-control-kappa0`` (``kappa: 0``:
  λ ≡ 1, only the per-task explicit field mapping is left); the specification's ablation,
  ``gate_control: false``, is ``hetero-mmoe`` itself;
- ``mmoe``, the scheme ``recipes/census-crossdistil.yaml`` wraps, the baseline of ``crossdistil``
  and ``crossdistil-no-ec`` (``error_correction: false``, the specification's ablation).

On census the rows are the shipped recipes ``recipes/census-*.yaml``. On the other data sets the
network sizes are the data's own MMoE recipe's (embedding width, towers; experts: the MMoE's;
``sparse-sharing``'s bottom is half the MMoE's total expert width, as on census, 64 against
8 × 16) and the method keys are the census method recipes' (the same ``gate_control``,
``objective`` and CSRec settings).

The click log (``benchmarks/click_log.py``, ``--click-rows`` rows, users and items scaled with the
rows) has ``purchase`` inside ``click``'s sample space, where ``click`` is always 1: CrossDistil's
augmented orders need both labels observed and varying, so there it is refused (no partner for
``click``). Its CrossDistil group therefore scores purchase over every impression
(``tasks.purchase.space=null``: purchase is 0 without a click, so the label is the impression's
click-and-purchase), ``mmoe`` included; the other rows keep the click space.

On the sequences recipe every row trains the recipe's 10 epochs and keeps the best by mean valid
AUC without stopping early: the valid AUC stays flat for the first epochs, and the recipe's
patience of 2 stopped some rows there, at chance, which compared the stopping and not the methods.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `mtlcli` when run as a script

from benchmarks.scheme_results import (
    ACCEPTANCE,
    DOCS,
    RECIPES,
    ROOT,
    ResultCache,
    fingerprint,
    fmt,
    machine,
    mean_std,
    run_one,
)
from mtlcli.fileio import write_text
from mtlcli.recipe import load_recipe


@dataclass(frozen=True)
class Row:
    name: str
    baseline: str  # the row it is compared with ("" for a baseline)
    what: str  # one line for the table's notes
    recipe: str = ""  # census: the recipe file under recipes/
    overrides: tuple[str, ...] = ()
    group: str = "other"  # "crossdistil" runs last


@dataclass
class DataSet:
    name: str
    title: str
    tasks: tuple[str, str]
    recipe: Path  # the baseline recipe every non-census row overrides
    rows: list[Row] = field(default_factory=list)
    bars: dict[str, float] = field(default_factory=dict)  # acceptance: test AUC per task


CENSUS_ROWS = [
    Row("sparse-sharing", "", "CSRec's baseline", "census-sparse-sharing.yaml"),
    Row("csrec", "sparse-sharing", "CSRec (`update: alternate`)", "census-csrec.yaml"),
    Row("csrec-joint", "sparse-sharing", "ablation: `update: joint`", "census-csrec.yaml", ("model.update=joint",)),
    Row(
        "csrec-no-contrastive",
        "sparse-sharing",
        "ablation: `contrastive_weight: 0`",
        "census-csrec.yaml",
        ("model.contrastive_weight=0",),
    ),
    Row("hetero-mmoe", "", "gate control's baseline (= `gate_control: false`)", "census-hetero-mmoe.yaml"),
    Row("gate-control", "hetero-mmoe", "DEPHN's gate control", "census-gate-control.yaml"),
    Row(
        "gate-control-kappa0",
        "hetero-mmoe",
        "ablation: `kappa: 0` (λ ≡ 1, field mapping only)",
        "census-gate-control.yaml",
        ("model.gate_control={kappa: 0}",),
    ),
    Row("mmoe", "", "the scheme CrossDistil wraps", "census-mmoe.yaml", group="crossdistil"),
    Row("crossdistil", "mmoe", "CrossDistil over MMoE", "census-crossdistil.yaml", group="crossdistil"),
    Row(
        "crossdistil-no-ec",
        "mmoe",
        "ablation: `error_correction: false`",
        "census-crossdistil.yaml",
        ("objective.error_correction=false",),
        group="crossdistil",
    ),
]


def method_keys() -> dict[str, dict[str, Any]]:
    """The census method recipes' own settings, to lay on other data sets' networks."""
    gate = load_recipe(RECIPES / "census-gate-control.yaml").to_dict()["model"]["gate_control"]
    csrec = load_recipe(RECIPES / "census-csrec.yaml").to_dict()["model"]
    sparse = load_recipe(RECIPES / "census-sparse-sharing.yaml").to_dict()["model"]
    objective = load_recipe(RECIPES / "census-crossdistil.yaml").to_dict()["objective"]
    return {
        "gate_control": gate,
        "csrec": {k: v for k, v in csrec.items() if k not in sparse},
        "search": {k: sparse[k] for k in ("density", "prune_rate", "warmup_steps")},
        "objective": objective,
    }


def flow(value: Any) -> str:
    """A value as YAML flow text for --set."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def generic_rows(
    mmoe: dict[str, Any], crossdistil_extra: tuple[str, ...] = (), every: tuple[str, ...] = (), note: str = ""
) -> list[Row]:
    """The census rows on another data set's MMoE recipe (its resolved ``model`` section); ``every``
    row gets those overrides too, CrossDistil's group ``crossdistil_extra``, noted by ``note``."""
    keys = method_keys()
    n, units = mmoe["n_experts"], mmoe["expert_units"]
    common = {"embedding_dim": mmoe["embedding_dim"], "tower_units": mmoe["tower_units"]}
    sparse = {"scheme": "sparse_sharing", **common, "bottom_units": [n * units[0] // 2], **keys["search"]}
    csrec = {**sparse, "scheme": "csrec", **keys["csrec"]}
    kinds = ["mlp"] * (n // 2) + ["fm"] * (n // 4) + ["cross"] * (n - n // 2 - n // 4)
    hetero = {**mmoe, "expert_kinds": kinds, "gate_control": None}
    gate = {**hetero, "gate_control": keys["gate_control"]}
    model = {
        "sparse-sharing": sparse,
        "csrec": csrec,
        "hetero-mmoe": hetero,
        "gate-control": gate,
        "mmoe": {**mmoe, "gate_control": None},
    }
    network = {"csrec-joint": "csrec", "csrec-no-contrastive": "csrec", "gate-control-kappa0": "gate-control"}
    network |= {"crossdistil": "mmoe", "crossdistil-no-ec": "mmoe"}
    rows = []
    for row in CENSUS_ROWS:
        overrides = [*every, f"model={flow(model[network.get(row.name, row.name)])}"]
        what = row.what
        if row.group == "crossdistil":
            overrides += crossdistil_extra
            what += note
            if row.name != "mmoe":
                overrides.append(f"objective={flow(keys['objective'])}")
        rows.append(Row(row.name, row.baseline, what, "", (*overrides, *row.overrides), row.group))
    return rows


def click_log(work: Path, rows: int) -> Path:
    """The generated click log (``benchmarks/click_log.py``) under ``work``; its recipe file."""
    out = work / f"click-log-{rows}"
    recipe = out / "recipe.yaml"
    if not recipe.is_file():
        scale = rows / 2_000_000  # click_log.py's defaults are for 2M rows
        users, items = max(1000, int(650_000 * scale)), max(500, int(200_000 * scale))
        sizes = ["--rows", str(rows), "--users", str(users), "--items", str(items)]
        subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "click_log.py"), "--out", str(out), *sizes], check=True
        )
    return recipe


def data_set(name: str, work: Path, click_rows: int) -> DataSet:
    if name == "census":
        return DataSet(
            "census",
            "Census-Income, tasks income and marital (the protocol of `../shared/data/README.md`), "
            "the shipped recipes `recipes/census-*.yaml`",
            ("income", "marital"),
            RECIPES / "census-mmoe.yaml",
            CENSUS_ROWS,
            dict(ACCEPTANCE),
        )
    if name == "click_log":
        recipe = click_log(work, click_rows)
        mmoe = load_recipe(recipe).to_dict()["model"]
        return DataSet(
            "click_log",
            f"the generated click log (`benchmarks/click_log.py --rows {click_rows:,}`, users and items scaled "
            "to the rows; split by day), tasks click and purchase (purchase in click's space), the recipe it "
            "writes (MMoE, 8 experts of 64, embeddings of 16, towers of 32, batch 2048, one epoch)",
            ("click", "purchase"),
            recipe,
            generic_rows(mmoe, ("tasks.purchase.space=null",), note=" (purchase over every impression)"),
        )
    if name == "sequences":
        recipe = RECIPES / "sequences-mmoe.yaml"
        mmoe = load_recipe(recipe).to_dict()["model"]
        return DataSet(
            "sequences",
            "the generated behaviour histories of `recipes/sequences-mmoe.yaml` (40,000 rows, tasks click and "
            "buy), at that recipe's sizes (embeddings of 8, 4 experts of 32, towers of 16; heterogeneous MMoE: "
            "2 mlp, 1 fm, 1 cross experts; sparse-sharing: a bottom of 64) and 10 epochs (`train.epochs=10`), keeping the best "
            "epoch by mean valid AUC but without stopping early (`train.early_stopping={patience: 10}`: the "
            "valid AUC stays flat for the first epochs, and the recipe's patience of 2 stopped some rows "
            "there, at chance)",
            ("click", "buy"),
            recipe,
            generic_rows(mmoe, every=("train.epochs=10", "train.early_stopping={patience: 10}")),
        )
    raise ValueError(name)


# --- table ------------------------------------------------------------------------------------


def seed_of(result: dict[str, Any]) -> int:
    """The ``train.seed`` a cached result was trained with."""
    return int(next(o for o in result["overrides"] if o.startswith("train.seed=")).split("=", 1)[1])


def aucs(runs: Sequence[dict[str, Any]], task: str) -> list[float]:
    return [r["test"][task]["auc"] for r in runs]


NOISE_FLOOR = 0.0002  # differences this small come and go between reruns of one recipe


def verdict(delta: float, spread: float) -> str:
    if abs(delta) <= max(spread, NOISE_FLOOR):
        return "within the seeds' spread"
    return "better" if delta > 0 else "**worse**"


def table(data: DataSet, results: dict[str, list[dict[str, Any]]], seeds: Sequence[int]) -> list[str]:
    """One markdown row per row of ``data`` that has results for every seed, then the verdicts."""
    t1, t2 = data.tasks
    lines = [
        f"| row | what | {t1} AUC | worst | {t2} AUC | worst | Δ {t1} | Δ {t2} | samples/s | × baseline | "
        "parameters | epochs (best/run) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pending, below, notes = [], [], []
    speed = {name: statistics.median(r["train_samples_per_second"] for r in runs) for name, runs in results.items()}
    for row in data.rows:
        runs = results.get(row.name)
        if runs is None:
            pending.append(f"`{row.name}`")
            continue
        base = results.get(row.baseline)
        cells = [
            f"`{row.name}`" + ("" if len(runs) == len(seeds) else f" ({len(runs)} of {len(seeds)} seeds)"),
            row.what,
        ]
        for task in data.tasks:
            cells += [fmt(aucs(runs, task)), f"{min(aucs(runs, task)):.4f}"]
        # against the baseline on the seeds both have (all of them once the table is complete)
        common = sorted({seed_of(r) for r in runs} & {seed_of(r) for r in base or []})
        mine = [r for r in runs if seed_of(r) in common]
        theirs = [r for r in base or [] if seed_of(r) in common]
        on = (
            ""
            if len(common) == len(seeds)
            else f" (on seed{'s' if len(common) > 1 else ''} {', '.join(map(str, common))})"
        )
        for task in data.tasks:
            if not row.baseline:
                cells.append("(baseline)")
            elif not common:
                cells.append("pending")
            else:
                delta = statistics.fmean(aucs(mine, task)) - statistics.fmean(aucs(theirs, task))
                cells.append(f"{delta:+.4f}" + ("*" if on else ""))
        cells.append(f"{speed[row.name]:,.0f}")
        cells.append(f"{speed[row.name] / speed[row.baseline]:.2f}" if base else ("1.00" if not row.baseline else ""))
        cells.append(f"{runs[0]['parameters']:,}")
        cells.append(", ".join(f"{r['best_epoch']}/{r['epochs_run']}" for r in runs))
        lines.append("| " + " | ".join(cells) + " |")
        for r in runs:
            seed = seed_of(r)
            for task, bar in data.bars.items():
                if r["test"][task]["auc"] < bar:
                    below.append(f"`{row.name}` seed {seed} {task} {r['test'][task]['auc']:.4f}")
        if row.baseline and common:
            parts = []
            for task in data.tasks:
                delta = statistics.fmean(aucs(mine, task)) - statistics.fmean(aucs(theirs, task))
                if len(common) < 2:
                    parts.append(f"{task} {delta:+.4f}")
                    continue
                spread = max(mean_std(aucs(mine, task))[1], mean_std(aucs(theirs, task))[1])
                parts.append(f"{task} {delta:+.4f} ({verdict(delta, spread)})")
            verdicts = "" if len(common) > 1 else " (one seed: no verdict yet)"
            notes.append(f"`{row.name}` against `{row.baseline}`{on}: " + ", ".join(parts) + verdicts + ".")
    lines.append("")
    if data.bars:
        bars = ", ".join(f"≥ {bar} {task}" for task, bar in data.bars.items())
        lines.append(
            f"Below the acceptance bar (test AUC {bars}): " + "; ".join(below) + "."
            if below
            else f"Every row passes the acceptance bar (test AUC {bars}) on every seed."
        )
        lines.append("")
    if notes:
        lines += [
            "Against the baseline (difference of mean test AUCs; *within the seeds' spread* when it is no larger "
            f"than the larger of the two sample stds, or than {NOISE_FLOOR}; a Δ marked * is taken on the seeds "
            "both rows have so far):",
            "",
            *(f"- {n}" for n in notes),
            "",
        ]
    if pending:
        lines += [f"Pending (not yet run): {', '.join(pending)}.", ""]
    return lines


# --- docs/results.md --------------------------------------------------------------------------

START, END = "<!-- results26:start -->", "<!-- results26:end -->"
TITLE = "## CSRec, CrossDistil and gate control"
BEFORE = "## MMoE vs shared-bottom on synthetic data"
SUB = {"census": "### Census", "click_log": "### Generated click log", "sequences": "### Behaviour sequences"}


def update_docs(path: Path, name: str, body: list[str]) -> None:
    """Replace data set ``name``'s subsection inside this benchmark's markers (the markers and the
    section title are added before the synthetic section when missing); other ``###`` subsections
    there (written by hand) are kept, after the tables."""
    text = path.read_text()
    if START not in text:
        block = f"{TITLE}\n\n{START}\n{END}\n\n"
        text = text.replace(BEFORE, block + BEFORE, 1) if BEFORE in text else text.rstrip() + "\n\n" + block
    head, rest = text.split(START, 1)
    inside, tail = rest.split(END, 1)
    parts = dict(re.findall(r"(### [^\n]+)\n(.*?)(?=\n### |\Z)", inside.strip("\n") + "\n", re.DOTALL))
    parts[SUB[name]] = "\n" + "\n".join(body).rstrip() + "\n"
    titles = [t for t in SUB.values() if t in parts] + [t for t in parts if t not in SUB.values()]  # notes last
    ordered = [f"{title}\n\n{parts[title].strip(chr(10))}\n" for title in titles]
    write_text(path, head + START + "\n" + "\n".join(ordered) + END + tail)


# --- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["census", "click_log", "sequences"], default="census")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "scheme-results", help="scheme_results.py's")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", help="only these rows (default: all)")
    parser.add_argument("--click-rows", type=int, default=400_000)
    parser.add_argument("--tables-only", action="store_true", help="print (and write) the cached results only")
    parser.add_argument(
        "--also",
        type=Path,
        nargs="+",
        default=[],
        help="with --tables-only: more work directories to read results from",
    )
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    import os

    os.chdir(ROOT)
    torch.set_num_threads(1)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache = ResultCache(work / "results.json")
    caches = [cache, *(ResultCache(w.resolve() / "results.json") for w in args.also)]
    data = data_set(args.data, work, args.click_rows)
    wanted = [r for r in data.rows if args.rows is None or r.name in args.rows]
    key = {r.name: (f"census-{r.name}" if data.name == "census" else f"{data.name}-{r.name}") for r in data.rows}

    def log(message: str) -> None:
        print(f"[{dt.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)

    def file_of(row: Row) -> Path:
        return RECIPES / row.recipe if row.recipe else data.recipe

    results: dict[str, list[dict[str, Any]]] = {}
    if args.tables_only:
        for row in data.rows:
            found = []
            for seed in args.seeds:
                overrides = [*row.overrides, f"train.seed={seed}"]
                recipe = load_recipe(file_of(row), [*overrides, "train.threads=1", f"data.cache_dir={work / 'cache'}"])
                hits = (c.get(f"{key[row.name]}-seed{seed}", fingerprint(recipe)) for c in caches)
                hit = next((h for h in hits if h is not None), None)
                if hit is not None:
                    found.append(hit)
            if found:  # a row with fewer seeds is shown as such
                results[row.name] = found
    else:
        for group in ("other", "crossdistil"):  # CrossDistil's rows last
            runs: dict[str, list[dict[str, Any]]] = {r.name: [] for r in wanted if r.group == group}
            for seed in args.seeds:  # side by side: every row at one seed, then the next seed
                for row in (r for r in wanted if r.group == group):
                    overrides = [*row.overrides, f"train.seed={seed}"]
                    try:
                        runs[row.name].append(
                            run_one(cache, work, f"{key[row.name]}-seed{seed}", file_of(row), overrides, log)
                        )
                    except Exception as exc:  # one refused row must not lose the others
                        log(f"{key[row.name]}-seed{seed}: {type(exc).__name__}: {exc}")
            results.update({name: r for name, r in runs.items() if len(r) == len(args.seeds)})
    seeds_text = ", ".join(map(str, args.seeds))
    body = [
        f"{data.title[0].upper()}{data.title[1:]}; seeds {seeds_text} (`train.seed`), one thread each; run on "
        f"{dt.date.today().isoformat()} "
        f"on {machine()}. Test AUC mean ± sample std over the seeds and the worst seed; Δ is the row's mean "
        "test AUC minus its baseline's; samples/s is the median over the seeds of the run's "
        "`train_samples_per_second` (the rows of one baseline ran side by side, seed after seed; treat "
        "ratios within about 20% as noise). Reproduce with "
        f"`python benchmarks/seed_methods.py --data {data.name}`.",
        "",
        *table(data, results, args.seeds),
    ]
    print("\n".join(body))
    if not args.no_docs and results:
        update_docs(args.docs, data.name, body)
        log(f"wrote {args.docs}")


if __name__ == "__main__":
    main()
