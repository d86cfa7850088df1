"""Stages 4 and 5 of preprocessing, store: run the pipeline (scan -> checks -> fit -> encode) and
write the encoded splits and ``schema.json`` atomically into a cache entry keyed by the recipe's
data part and the source files' identity.

``prepare(recipe)`` is what commands call: it returns the encoded data for a recipe, running
``preprocess`` only when the cache entry is missing. Each encoded split is one Parquet file in
row groups of ``ROW_GROUP`` rows, which ``mtlcli.data.load`` reads whole or window by window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mtlcli.data.batch import SplitTensors
from mtlcli.data.checks import declared_types, enforce, number_checks
from mtlcli.data.encode import (
    GROUP_COLUMN,
    categorical_expr,
    group_expr,
    history_checks,
    history_exprs,
    numeric_expr,
    type_lists,
    with_event_histories,
)
from mtlcli.data.events import EventIndex, event_files, event_indexes, newest_first, train_counts
from mtlcli.data.fit import choose_features, fit_categorical, fit_numeric, fit_sequence, recipe_field, sequence_spec
from mtlcli.data.labels import LABEL_PREFIX, MASK_PREFIX, label_exprs
from mtlcli.data.load import SplitFile, history_path
from mtlcli.data.scan import (
    SPLIT_COLUMN,
    SPLITS,
    Scanned,
    file_format,
    require_columns,
    scan_source,
    source_files,
    split_rows,
)
from mtlcli.data.schema import MISSING_ID, OOV_ID, CategoricalFeature, DataSchema, SequenceFeature, SplitInfo, TaskInfo
from mtlcli.errors import ArtifactError
from mtlcli.fileio import atomic_dir, sha256_file_remembered, sha256_json
from mtlcli.recipe.schema import Recipe

ROW_GROUP = 65_536  # rows per Parquet row group of an encoded split: the unit a stream reads
HISTORY_BYTES = 64 << 20  # ids held at a time per chunk of rows with histories from events (history_rows)
HISTORY_ROWS: int | None = None  # rows per chunk instead (tests set it: the result must not depend on it)
FILE_HASHES = "file-hashes.json"  # in data.cache_dir: each source file's sha256 with its identity
FORMAT = 2  # of the encoded data (2: streamed preprocessing, hashed random split)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Prepared:
    """Encoded data on disk: ``directory`` holds schema.json, {train,valid,test}.parquet and, for
    each history from events, its ids (``history_path``) that the splits' windows point into."""

    directory: Path
    schema: DataSchema
    reused: bool

    def file(self, split: str) -> SplitFile:
        return SplitFile(self.directory / f"{split}.parquet", self.schema)

    def load(self, split: str) -> SplitTensors:
        """The split as contiguous tensors."""
        return self.file(split).load()


def data_key(recipe: Recipe) -> tuple[str, dict[str, Any]]:
    """The cache key: the data, features and tasks sections plus the source files' sha256 (each
    remembered with the file's identity, so an unchanged file is not read again; see
    ``fileio.sha256_file_remembered`` for what the identity catches)."""
    memo = Path(recipe.data.cache_dir) / FILE_HASHES
    named = [*source_files(recipe), *event_files(recipe)]
    files = [{"split": s, "path": str(f), "sha256": sha256_file_remembered(f, memo)} for s, f in named]
    source = {"files": files, "synthetic": recipe.data.synthetic.model_dump() if recipe.data.synthetic else None}
    spec = recipe.to_dict()
    # data.group is left out while unset, so that recipes written before it keep their cache keys;
    # where the cache lives and how much memory preprocessing may use do not change the data
    data_part = {
        k: v
        for k, v in spec["data"].items()
        if k not in ("cache_dir", "memory_budget") and not (k == "group" and v is None)
    }
    # pos_weight shapes the loss, not the data: left out so that changing it reuses the cache
    tasks = {name: {k: v for k, v in task.items() if k != "pos_weight"} for name, task in spec["tasks"].items()}
    key_input = {
        "data": data_part,
        "features": spec["features"],
        "tasks": tasks,
        "files": [f["sha256"] for f in files],
        "format": FORMAT,
    }
    return sha256_json(key_input)[:20], source


FEW_ROWS = 10  # a split this small gives metrics that are noise


def data_warnings(splits: dict[str, SplitInfo], tasks: list[TaskInfo], empty_numeric: list[str]) -> list[str]:
    """Data that trains without error but cannot give a meaningful model or metric."""
    out = [
        f"numeric feature {name!r} has no value in any train row: it carries no information" for name in empty_numeric
    ]
    train = splits["train"]
    for task in tasks:
        if task.type != "binary":
            continue
        rows = train.space_rows.get(task.name, train.rows)
        positives = train.positives.get(task.name, 0)
        if positives == 0:
            out.append(f"task {task.name!r} has no positive rows in train: it cannot learn to predict them")
        elif positives == rows:
            out.append(f"task {task.name!r} has no negative rows in train: it cannot learn to tell rows apart")
    for name, info in splits.items():
        if 0 < info.rows < FEW_ROWS:
            out.append(
                f"the {name} split has only {info.rows} row{'s' if info.rows != 1 else ''}: its metrics are noise"
            )
    return out


def task_infos(recipe: Recipe) -> list[TaskInfo]:
    return [
        TaskInfo(
            name,
            spec.type,
            spec.label.column,
            spec.label.positive,
            spec.label.threshold,
            spec.space.task if spec.space else None,
            spec.space.column if spec.space else None,
        )
        for name, spec in recipe.tasks.items()
    ]


TEXT_FACTOR = 3  # bytes in memory per byte of CSV text
VALUE_BYTES = 24  # bytes in memory per value read from Parquet (a short string with its offsets)


def source_bytes(scanned: Scanned) -> int:
    """An estimate of the source's size in memory: CSV text at ``TEXT_FACTOR`` times its size on
    disk, Parquet (compressed on disk, often tenfold) at ``VALUE_BYTES`` per value, from the row
    counts in the files' footers."""
    total = 0
    for path in scanned.files:
        if file_format(path, scanned.recipe) == "parquet":
            lazy = pl.scan_parquet(path)
            rows = int(scanned.collect(lazy.select(pl.len())).item())
            total += rows * len(lazy.collect_schema()) * VALUE_BYTES
        else:
            total += path.stat().st_size * TEXT_FACTOR
    return total


def _in_memory(scanned: Scanned, budget: int) -> Scanned:
    """The source read once into memory when it fits ``budget``, so that the stages' queries do
    not each read the files again; else the source as it is, each query streaming the files."""
    if source_bytes(scanned) > budget:
        return scanned
    return Scanned(scanned.collect(scanned.frame).lazy(), scanned.files, scanned.recipe, in_memory=True)


def preprocess(recipe: Recipe, out_dir: Path, progress: Progress | None = None) -> DataSchema:
    """Scan, check, fit on train, encode and write ``out_dir`` atomically; memory bounded by the
    vocabularies and ``data.memory_budget``, not by the number of rows."""
    say = progress or (lambda _: None)
    key, source = data_key(recipe)
    say("reading the source")
    scanned, indexes = event_indexes(_in_memory(scan_source(recipe), recipe.data.memory_budget), recipe)
    frame, collect = scanned.frame, scanned.collect
    split_rows(scanned)
    say("checking every row")
    labels, checks = label_exprs(frame, recipe, collect)
    categorical, numeric, withheld = choose_features(frame, recipe, collect)
    raw = scanned.schema
    for name in numeric:
        checks += number_checks(name, raw[name], f"features.numeric.{name}")
    group = recipe.data.group
    if group is not None:
        require_columns(list(raw), [group], "data.group")
    seq_specs = [sequence_spec(name, options) for name, options in recipe.features.sequences.items()]
    for spec in seq_specs:
        if spec.name not in indexes:  # a history from events has no list column to check
            checks += history_checks(spec, raw, recipe_field)
    enforce(frame, checks, collect)
    type_warnings = [*scanned.warnings, *_type_warnings(frame, seq_specs, raw, collect)]
    say("fitting vocabularies and statistics on train")
    cat_specs = fit_categorical(frame, categorical, collect)
    num_specs, empty = fit_numeric(frame, raw, numeric, collect)
    seq_specs = [
        fit_sequence(frame, spec, raw, cat_specs, collect, _counter(scanned, indexes, spec)) for spec in seq_specs
    ]
    exprs = [_categorical(scanned, f) for f in cat_specs] + [numeric_expr(f, raw[f.name]) for f in num_specs]
    listed = iter(history_exprs([f for f in seq_specs if f.name not in indexes], cat_specs, raw, recipe_field))
    searched = set()  # each event log's rows' user and time, once for the histories that share it
    for f in seq_specs:  # a history from events is encoded chunk by chunk (with_event_histories)
        if f.name not in indexes:
            exprs.append(next(listed))
            continue
        if indexes[f.name].log.name not in searched:
            searched.add(indexes[f.name].log.name)
            exprs += [indexes[f.name].user, indexes[f.name].time]
    exprs += labels
    if group is not None:
        exprs.append(group_expr(collect(frame.select(pl.col(group).cast(pl.String).unique())).to_series(), group))
    tasks = task_infos(recipe)
    with atomic_dir(out_dir) as tmp:
        # one pass encodes every row (the source is read once), a second splits the small encoded
        # file: encoding into three files at once held three writers' buffers (1.0 GB instead of
        # 0.8 GB at the peak on the 20M-row click log)
        say("encoding every row")
        query = frame.select([*exprs, pl.col(SPLIT_COLUMN)])
        paths = {split: tmp / f"{split}.parquet" for split in SPLITS}
        if indexes:
            histories = _event_histories(seq_specs, cat_specs, indexes)
            _encode_chunks(scanned, query, histories, paths, say)
            for feature, _, reversed_ids in histories:  # the ids the splits' windows point into
                with history_path(tmp, seq_specs.index(feature)).open("wb") as out:
                    np.save(out, reversed_ids, allow_pickle=False)
        else:
            whole = tmp / "encoded.parquet"
            scanned.sink(query, whole, ROW_GROUP)
            say("writing the splits")
            encoded = pl.scan_parquet(whole)
            sinks = [
                encoded.filter(pl.col(SPLIT_COLUMN) == i)
                .drop(SPLIT_COLUMN)
                .sink_parquet(paths[split], row_group_size=ROW_GROUP, lazy=True)
                for i, split in enumerate(SPLITS)
            ]
            pl.collect_all(sinks, engine="streaming")
            whole.unlink()
        splits = {split: split_info(path, cat_specs, tasks) for split, path in paths.items()}
        warnings = withheld + type_warnings + data_warnings(splits, tasks, empty)
        schema = DataSchema(
            cat_specs, num_specs, tasks, splits, source, key, group=group, warnings=warnings, sequences=seq_specs
        )
        schema.save(tmp / "schema.json")
    return schema


EventHistories = list[tuple[SequenceFeature, EventIndex, np.ndarray]]


def _counter(
    scanned: Scanned, indexes: dict[str, EventIndex], spec: SequenceFeature
) -> Callable[[], pl.DataFrame] | None:
    """For a history from events, how to count its ids in the train rows' histories."""
    if spec.name not in indexes:
        return None
    return lambda: train_counts(scanned, indexes[spec.name], spec.max_len, history_rows([spec]))


def _event_histories(
    specs: list[SequenceFeature], categorical: list[CategoricalFeature], indexes: dict[str, EventIndex]
) -> EventHistories:
    """Each history from events with its index and its events' ids in the vocabulary it uses
    (``newest_first``)."""
    vocab_of = {f.name: f.vocab for f in categorical}
    return [
        (f, indexes[f.name], newest_first(indexes[f.name].ids(vocab_of[f.vocabulary] if f.vocabulary else f.vocab)))
        for f in specs
        if f.name in indexes
    ]


def history_rows(specs: list[SequenceFeature]) -> int:
    """Rows encoded at a time with histories from events: ``HISTORY_ROWS`` when set, else as
    many as ``HISTORY_BYTES`` of ids hold at every history's ``max_len``, at most two row
    groups (a chunk costs a few times its ids at the peak: on the 2M-row click log with a
    history of 50, chunks of 335,000 rows peaked at 1.01 GB, of 84,000 at 0.88 GB)."""
    return HISTORY_ROWS or max(1, min(2 * ROW_GROUP, HISTORY_BYTES // (4 * sum(f.max_len for f in specs))))


def _encode_chunks(
    scanned: Scanned, query: pl.LazyFrame, histories: EventHistories, paths: dict[str, Path], say: Progress
) -> None:
    """Encode the rows ``history_rows`` at a time, each chunk's histories from events added in
    Python (``with_event_histories``), each chunk's rows of a split written to a part of it; a
    split in one part is that part, a split in several is joined from them in one more pass (the
    rows stay in data order)."""
    parts: dict[str, list[Path]] = {split: [] for split in SPLITS}
    empty: list[pl.DataFrame] = []

    def write(batch: pl.DataFrame) -> None:
        batch = with_event_histories(batch, histories)  # two numbers a row per history: cheap to split after
        for i, (split, done) in enumerate(parts.items()):
            rows = batch.filter(pl.col(SPLIT_COLUMN) == i).drop(SPLIT_COLUMN)
            if rows.height:
                done.append(paths[split].with_name(f"{split}-{len(done):06d}.parquet"))
                rows.write_parquet(done[-1], row_group_size=ROW_GROUP)
            elif not empty:
                empty.append(rows)

    scanned.each_batch(query, history_rows([f for f, _, _ in histories]), write)
    say("writing the splits")
    for split, done in parts.items():  # one split at a time: one reader and one writer at the peak
        if not done:
            empty[0].write_parquet(paths[split])
        elif len(done) == 1:
            done.pop().rename(paths[split])
        else:
            pl.scan_parquet(done).sink_parquet(paths[split], row_group_size=ROW_GROUP, engine="streaming")
    for part in (part for done in parts.values() for part in done):
        part.unlink()


def _type_warnings(
    frame: pl.LazyFrame, specs: list[SequenceFeature], raw: dict[str, pl.DataType], collect: Callable[..., pl.DataFrame]
) -> list[str]:
    """``declared_types`` for every history that keeps some behaviour types of its type lists
    (one pass for all of them)."""
    typed = [f for f in specs if f.type_column is not None and f.types]
    if not typed:
        return []
    seen = collect(
        frame.select(
            type_lists(f, raw, recipe_field).explode().drop_nulls().unique().implode().alias(f.name) for f in typed
        )
    )
    out = []
    for f in typed:
        assert f.type_column is not None
        out += declared_types(recipe_field(f, "types"), f.type_column, f.types, seen.get_column(f.name)[0].to_list())
    return out


def _categorical(scanned: Scanned, feature: CategoricalFeature) -> pl.Expr:
    if not feature.hash_buckets:
        return categorical_expr(feature)
    distinct = scanned.collect(scanned.frame.select(pl.col(feature.name).cast(pl.String).unique())).to_series()
    return categorical_expr(feature, distinct)


def split_info(path: Path, cats: list[CategoricalFeature], tasks: list[TaskInfo]) -> SplitInfo:
    """Rows, label means and positives (inside each task's space) and OOV rates of an encoded split."""
    aggregations = [pl.len().alias("rows")]
    for task in tasks:
        label = pl.col(LABEL_PREFIX + task.name).cast(pl.Float64)
        inside = pl.col(MASK_PREFIX + task.name) if task.has_space else pl.lit(True)
        aggregations += [
            label.filter(inside).mean().alias(f"mean:{task.name}"),
            label.filter(inside).sum().alias(f"sum:{task.name}"),
            inside.sum().alias(f"space:{task.name}"),
        ]
    for feature in cats:
        ids = pl.col(feature.name)
        aggregations += [
            (ids != MISSING_ID).sum().alias(f"present:{feature.name}"),
            (ids == OOV_ID).sum().alias(f"oov:{feature.name}"),
        ]
    found = pl.scan_parquet(path).select(aggregations).collect(engine="streaming").row(0, named=True)
    rows = int(found["rows"])
    means, positives, space_rows = {}, {}, {}
    for task in tasks:
        means[task.name] = float(found[f"mean:{task.name}"] or 0.0)
        if task.has_space:
            space_rows[task.name] = int(found[f"space:{task.name}"] or 0)
        if task.type == "binary":
            positives[task.name] = int(found[f"sum:{task.name}"] or 0)
    oov = {}
    for feature in cats:
        present = int(found[f"present:{feature.name}"] or 0)
        oov[feature.name] = int(found[f"oov:{feature.name}"] or 0) / present if present else 0.0
    return SplitInfo(rows, means, positives, oov, space_rows)


def cache_dir_for(recipe: Recipe, key: str) -> Path:
    return Path(recipe.data.cache_dir).expanduser() / key


def prepare(recipe: Recipe, out: Path | None = None, force: bool = False, progress: Progress | None = None) -> Prepared:
    """The encoded data for ``recipe``: reused from the cache when its key matches, else built."""
    key, _ = data_key(recipe)
    directory = out if out is not None else cache_dir_for(recipe, key)
    schema_file = directory / "schema.json"
    if not force and schema_file.is_file():
        try:
            schema = DataSchema.load(schema_file)
            if schema.data_key == key and all((directory / f"{s}.parquet").is_file() for s in SPLITS):
                return Prepared(directory, schema, reused=True)
        except ArtifactError:
            pass
    return Prepared(directory, preprocess(recipe, directory, progress), reused=False)


__all__ = ["GROUP_COLUMN", "Prepared", "data_key", "prepare", "preprocess"]
