"""Histories derived from an event log: the user's events strictly before the impression, no
leakage of the impression's own event or any later one."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from mtlcli.data import store
from mtlcli.data.events import event_indexes
from mtlcli.data.scan import scan_source
from mtlcli.data.schema import FIRST_ID, OOV_ID
from mtlcli.data.store import prepare
from mtlcli.errors import ArtifactError, DataError
from mtlcli.recipe import recipe_from_text
from mtlcli.train.metrics import auc


def recipe_for(tmp_path: Path, events: dict[str, Any], max_len: int = 5, **sequence: Any) -> Any:
    recipe = {
        "data": {"source": str(tmp_path / "rows.parquet"), "split": {"by": "modulo", "modulus": 4, "test": [0],
                 "valid": [1]}, "cache_dir": str(tmp_path / "cache")},
        "features": {"categorical": ["item"], "exclude": ["time"],
                     "sequences": {"history": {"events": {"source": [str(tmp_path / "events.parquet")], **events},
                                               "vocabulary": "item", "max_len": max_len, **sequence}}},
        "tasks": {"label": {"label": "label"}},
    }  # fmt: skip
    return recipe_from_text(yaml.safe_dump(recipe, sort_keys=False), "test-recipe")


def make_log(
    tmp_path: Path, seed: int, leak_signal: bool = False, users: int = 20
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``users`` users; events at integer times 0..60 with many ties; impressions at the same times.
    With ``leak_signal`` a positive impression has its own event (same time, its item) and a
    later one: a history that leaked them would predict the label perfectly."""
    rng = random.Random(seed)
    events = []
    rows = []
    for u in range(users):
        for _ in range(30):
            events.append({"user": f"u{u}", "item": f"i{rng.randrange(400)}", "time": rng.randrange(60),
                           "kind": rng.choice(["click", "buy"])})  # fmt: skip
        for _ in range(20):
            t, item, label = rng.randrange(60), f"i{rng.randrange(400)}", rng.randrange(2)
            rows.append({"user": f"u{u}", "time": t, "item": item, "label": label})
            if leak_signal and label:
                events.append({"user": f"u{u}", "item": item, "time": t, "kind": "click"})
                events.append({"user": f"u{u}", "item": item, "time": t + 1 + rng.randrange(5), "kind": "click"})
    rng.shuffle(events)
    ev, rw = pl.DataFrame(events), pl.DataFrame(rows)
    ev.write_parquet(tmp_path / "events.parquet")
    rw.write_parquet(tmp_path / "rows.parquet")
    return ev, rw


def brute_force(events: pl.DataFrame, rows: pl.DataFrame, kinds: set[str] | None, max_len: int) -> list[list[str]]:
    out = []
    log = events.to_dicts()
    for row in rows.to_dicts():
        before = sorted(
            (e["time"], e["item"])
            for e in log
            if e["user"] == row["user"] and e["time"] < row["time"] and (kinds is None or e["kind"] in kinds)
        )
        out.append([item for _, item in before][-max_len:])
    return out


def derived(recipe: Any) -> list[list[str]]:
    """Each row's history as the event index finds it (text ids, oldest first)."""
    scanned, indexes = event_indexes(scan_source(recipe), recipe)
    index = indexes["history"]
    rows = scanned.frame.select(index.user, index.time).collect()
    start, end = index.rows(rows, recipe.features.sequences["history"].max_len)
    items = index.items.to_list()
    return [items[a:b] for a, b in zip(start.tolist(), end.tolist(), strict=True)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kinds", [None, {"buy"}])
def test_histories_are_the_users_earlier_events_in_time_order(
    tmp_path: Path, seed: int, kinds: set[str] | None
) -> None:
    events, rows = make_log(tmp_path, seed)
    options = {"type": "kind", "types": sorted(kinds)} if kinds else {}
    assert derived(recipe_for(tmp_path, options, max_len=7)) == brute_force(events, rows, kinds, 7)


def test_histories_of_one_log_share_its_search(tmp_path: Path) -> None:
    """Two histories of the same log (clicks, buys) search it once, each its own events only; a
    third reading the rows' time from another column searches apart."""
    events, rows = make_log(tmp_path, 7)
    rows.with_columns((pl.col("time") + 3).alias("later")).write_parquet(tmp_path / "rows.parquet")
    log = {"source": [str(tmp_path / "events.parquet")], "type": "kind"}
    sequences = {
        "clicks": {"events": {**log, "types": ["click"]}, "vocabulary": "item", "max_len": 6},
        "buys": {"events": {**log, "types": ["buy"]}, "vocabulary": "item", "max_len": 3},
        "all": {"events": {**log, "row_time": "later"}, "vocabulary": "item", "max_len": 4},
    }
    spec = recipe_for(tmp_path, {}).to_dict()
    spec["features"]["sequences"] = sequences
    spec["features"]["exclude"] = ["time", "later"]
    recipe = recipe_from_text(yaml.safe_dump(spec, sort_keys=False), "test-recipe")
    scanned, indexes = event_indexes(scan_source(recipe), recipe)
    assert indexes["clicks"].log is indexes["buys"].log is not indexes["all"].log
    frame = scanned.frame.select(
        *{e.meta.output_name(): e for i in indexes.values() for e in (i.user, i.time)}.values()
    )
    batch = frame.collect()
    later = rows.with_columns(pl.col("time") + 3)
    for name, kinds, max_len, impressions in (
        ("clicks", {"click"}, 6, rows),
        ("buys", {"buy"}, 3, rows),
        ("all", None, 4, later),
    ):
        start, end = indexes[name].rows(batch, max_len)
        items = indexes[name].items.to_list()
        found = [items[a:b] for a, b in zip(start.tolist(), end.tolist(), strict=True)]
        assert found == brute_force(events, impressions, kinds, max_len), name


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("streamed", [False, True])
def test_encoded_histories_do_not_depend_on_the_chunk_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared: bool, streamed: bool
) -> None:
    """Rows are encoded a chunk at a time (one row, seven, all at once), from the source held in
    memory or streamed from its file (``data.memory_budget`` of one byte): the encoded splits are
    the brute-force histories (most recent first, in the fitted vocabulary), and so is a history's
    own vocabulary, counted over the train rows' histories chunk by chunk."""
    events, rows = make_log(tmp_path, 6, users=3)
    expected = brute_force(events, rows, {"click"}, 4)
    sequence = {} if shared else {"vocabulary": None}
    recipe = recipe_for(tmp_path, {"type": "kind", "types": ["click"]}, max_len=4, **sequence)
    if streamed:
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"memory_budget": 1})})
    results = []
    for size in (1, 7, None):
        monkeypatch.setattr(store, "HISTORY_ROWS", size)
        prepared = prepare(recipe, out=tmp_path / f"chunks-{size}")
        feature = prepared.schema.sequences[0]
        vocab = prepared.schema.categorical[0].vocab if shared else feature.vocab
        position = {item: FIRST_ID + i for i, item in enumerate(vocab)}
        for index, split in enumerate(("test", "valid")):
            encoded = prepared.file(split).histories("history")
            want = [[position.get(item, OOV_ID) for item in reversed(h)] for h in expected[index::4]]
            assert encoded == want, (size, split)
        train = pl.read_parquet(prepared.directory / "train.parquet")
        results.append((vocab, train.to_dicts()))
    assert results[0] == results[1] == results[2]
    assert not list((tmp_path / "cache").glob("*.tmp")), "a spill was left in the cache"
    if not shared:
        counts: dict[str, int] = {}
        for history in (h for i, h in enumerate(expected) if i % 4 > 1):
            for item in history:
                counts[item] = counts.get(item, 0) + 1
        assert results[0][0] == sorted(counts, key=lambda item: (-counts[item], item))


def test_no_leakage_of_the_impressions_own_event_or_later_ones(tmp_path: Path) -> None:
    """Each positive impression has its own click (same time) and a later click of its item: if
    either leaked into the history, "the candidate is in the history" would give AUC about 1."""
    _, rows = make_log(tmp_path, 5, leak_signal=True)
    recipe = recipe_for(tmp_path, {}, max_len=1000)
    histories = derived(recipe)
    inside = torch.tensor([r["item"] in h for r, h in zip(rows.to_dicts(), histories, strict=True)])
    labels = torch.tensor(rows.get_column("label").to_list(), dtype=torch.float32)
    assert 0.35 < auc(inside.float(), labels) < 0.65
    # the same log with the impression's time included (<=) is the leak this guards against
    leaked = [
        r["item"] in [e for e, t in zip(*_events_of(tmp_path, r["user"]), strict=True) if t <= r["time"]]
        for r in rows.to_dicts()
    ]
    assert auc(torch.tensor(leaked, dtype=torch.float32), labels) > 0.95, "precondition: the log does leak at <="


def _events_of(tmp_path: Path, user: str) -> tuple[list[str], list[int]]:
    log = pl.read_parquet(tmp_path / "events.parquet").filter(pl.col("user") == user)
    return log.get_column("item").to_list(), log.get_column("time").to_list()


def test_derived_histories_train_and_key_the_cache(tmp_path: Path) -> None:
    make_log(tmp_path, 3)
    recipe = recipe_for(tmp_path, {"type": "kind", "types": ["click"]}, pooling="attention")
    prepared = prepare(recipe)
    assert prepared.schema.sequences[0].column == "history"
    tensors = prepared.load("train")
    assert tensors.history_ids is not None and int(tensors.sequence_lengths.max()) == 5  # type: ignore[union-attr]
    again = prepare(recipe)
    assert again.reused
    events = pl.read_parquet(tmp_path / "events.parquet")
    events.with_columns(pl.col("time") + 1).write_parquet(tmp_path / "events.parquet")
    assert not prepare(recipe).reused, "a changed event log makes a new cache entry"


@pytest.mark.parametrize(
    ("damage", "expect"),
    [
        ("text times", "column 'time' holds 'soon' at row"),
        ("missing column", "has no column 'item'"),
        ("no user column in rows", "row_user: column 'who' is not in the data"),
    ],
)
def test_bad_event_logs_are_named(tmp_path: Path, damage: str, expect: str) -> None:
    events, _ = make_log(tmp_path, 4)
    options: dict[str, Any] = {}
    if damage == "text times":
        events.with_columns(pl.col("time").cast(pl.String)).with_columns(
            pl.when(pl.int_range(pl.len()) == 3).then(pl.lit("soon")).otherwise(pl.col("time")).alias("time")
        ).write_parquet(tmp_path / "events.parquet")
    elif damage == "missing column":
        events.drop("item").write_parquet(tmp_path / "events.parquet")
    else:
        options = {"row_user": "who"}
    with pytest.raises(DataError) as caught:
        prepare(recipe_for(tmp_path, options))
    assert expect in caught.value.message


def test_a_kept_event_type_that_never_occurs_is_named(tmp_path: Path) -> None:
    """types: [click, clik] warns about 'clik' (naming the types seen); types: [clik] alone would
    leave every history empty, and is refused."""
    make_log(tmp_path, seed=3)
    prepared = prepare(recipe_for(tmp_path, {"type": "kind", "types": ["click", "clik"]}))
    assert (
        "features.sequences.history.events.types: the type 'clik' never occurs in column 'kind' "
        "(types seen: 'buy', 'click'); it keeps no id"
    ) in prepared.schema.warnings
    with pytest.raises(
        DataError, match=r"none of the types 'clik' occurs in column 'kind'.*types seen: 'buy', 'click'"
    ):
        prepare(recipe_for(tmp_path, {"type": "kind", "types": ["clik"]}))


def test_a_split_stores_each_rows_window_and_reads_back_the_same_histories(tmp_path: Path) -> None:
    """An encoded split holds two numbers a row per history from events (where its window of the
    history's ids starts and how long it is), not the ids: the split's size does not grow with
    ``max_len``. Read whole (packed) or a window of rows at a time (padded), the histories are
    the brute force's."""
    events, rows = make_log(tmp_path, 3)
    recipe = recipe_for(tmp_path, {}, max_len=7)
    prepared = prepare(recipe)
    columns = pl.read_parquet_schema(prepared.directory / "train.parquet")
    assert columns["seq_at:history"] == pl.Int64 and columns["seq_len:history"] == pl.Int32
    assert "seq:history" not in columns
    vocab = prepared.schema.categorical[0].vocab
    position = {item: FIRST_ID + i for i, item in enumerate(vocab)}
    expected = brute_force(events, rows, None, 7)
    want = [[position.get(item, OOV_ID) for item in reversed(h)] for h in expected[0::4]]  # the test rows
    split = prepared.file("test")
    whole = split.load()
    assert whole.history_ids is not None and whole.history_starts is not None
    lengths = whole.sequence_lengths[:, 0].tolist()
    packed = [
        whole.history_ids[s : s + n].tolist() for s, n in zip(whole.history_starts[:, 0].tolist(), lengths, strict=True)
    ]
    assert packed == want
    for offset in (0, 3):
        padded = split.window(offset, 5)
        got = [
            row[:n].tolist() for row, n in zip(padded["sequences"][:, 0], padded["sequence_lengths"][:, 0], strict=True)
        ]
        assert got == want[offset : offset + 5]


@pytest.mark.parametrize("damage", ["missing", "not an array", "too short"])
def test_a_damaged_history_file_is_named_with_what_to_do(tmp_path: Path, damage: str) -> None:
    make_log(tmp_path, 4)
    prepared = prepare(recipe_for(tmp_path, {}, max_len=7))
    path = prepared.directory / "history-0.npy"
    if damage == "missing":
        path.unlink()
    elif damage == "not an array":
        path.write_bytes(b"\x93NUMPY garbage")
    else:
        np.save(path, np.zeros(3, np.int32))
    with pytest.raises(ArtifactError) as caught:
        prepared.load("train")
    assert "history" in caught.value.message and caught.value.hint == "re-run `mtl preprocess`"
