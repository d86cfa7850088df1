"""Batch sources: the in-memory split and the streamed one (windows read from the encoded Parquet
file, shuffled in a bounded buffer, read ahead on a thread) give the orders they promise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from mtlcli.data.load import SplitFile
from mtlcli.data.source import StreamedSplit, open_source
from mtlcli.data.store import Prepared, prepare
from mtlcli.errors import DataError
from mtlcli.recipe import recipe_from_text

ROWS = 1000


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """1,000 rows of ids, a number and two labels, encoded with row groups of 64 rows... and a
    whole-file split so that the stream crosses many blocks."""
    base = tmp_path_factory.mktemp("source")
    rng = np.random.default_rng(0)
    pl.DataFrame(
        {
            "row": np.arange(ROWS),  # a numeric feature that names the row
            "user": [f"u{i}" for i in rng.integers(0, 50, ROWS)],
            "click": rng.integers(0, 2, ROWS),
            "buy": rng.integers(0, 2, ROWS),
            "part": ["train"] * ROWS,
        }
    ).with_columns(
        pl.when(pl.col("row") < 10).then(pl.lit("valid")).otherwise(pl.col("part")).alias("part")
    ).write_parquet(base / "data.parquet")
    recipe = recipe_from_text(
        f"""
data: {{source: {base / "data.parquet"}, split: {{by: column, column: part}}, cache_dir: {base / "cache"}}}
features: {{numeric: {{row: {{transform: none}}}}, categorical: [user]}}
tasks: {{click: {{label: click}}, buy: {{label: buy}}}}
""",
        "test",
    )
    return prepare(recipe)


def rows_of(batches: list[object]) -> list[int]:
    return [int(v) for b in batches for v in b.numeric[:, 0].tolist()]  # type: ignore[attr-defined]


def stream(prepared: Prepared, window: int, block: int = 64, read_ahead: bool = True) -> StreamedSplit:
    return StreamedSplit(prepared.file("train"), window, block_rows=block, read_ahead=read_ahead)


def test_the_encoded_split_keeps_the_source_order(prepared: Prepared) -> None:
    data = prepared.load("train")
    assert data.numeric[:, 0].tolist() == [float(i) for i in range(10, ROWS)]


def test_a_buffer_holding_the_whole_split_gives_the_in_memory_order(prepared: Prepared) -> None:
    memory = prepared.load("train")
    streamed = stream(prepared, window=ROWS)
    for seed in (0, 1):
        a = list(memory.batches(32, True, torch.Generator().manual_seed(seed)))
        b = list(streamed.batches(32, True, torch.Generator().manual_seed(seed)))
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x.categorical, y.categorical) and torch.equal(x.numeric, y.numeric)
            assert torch.equal(x.labels, y.labels) and torch.equal(x.label_mask, y.label_mask)


def test_a_small_buffer_visits_every_row_once_in_a_seeded_order(prepared: Prepared) -> None:
    source = stream(prepared, window=200)
    generator = torch.Generator().manual_seed(3)
    epoch1 = rows_of(list(source.batches(32, True, generator)))
    epoch2 = rows_of(list(source.batches(32, True, generator)))
    assert sorted(epoch1) == sorted(epoch2) == list(range(10, ROWS))
    assert epoch1 != epoch2, "each epoch draws a new order"
    again = rows_of(list(source.batches(32, True, torch.Generator().manual_seed(3))))
    assert again == epoch1, "the order is a function of the generator"
    assert epoch1 != sorted(epoch1)
    # rows are shuffled within a window only: the first 192 rows given are one window of three
    # blocks of 64 rows, where a full shuffle would touch all 16 blocks
    assert len({(r - 10) // 64 for r in epoch1[:192]}) == 3


def test_reads_stay_within_the_window(prepared: Prepared, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    original = SplitFile.window

    def spy(self: SplitFile, offset: int, rows: int) -> object:
        sizes.append(rows)
        return original(self, offset, rows)

    monkeypatch.setattr(SplitFile, "window", spy)
    list(stream(prepared, window=200).batches(32, True, torch.Generator().manual_seed(0)))
    assert sizes and max(sizes) <= 200


@pytest.mark.parametrize("window", [200, ROWS])
@pytest.mark.parametrize("read_ahead", [True, False])
def test_skipping_batches_resumes_the_same_order(prepared: Prepared, window: int, read_ahead: bool) -> None:
    source = stream(prepared, window=window, read_ahead=read_ahead)
    full = rows_of(list(source.batches(32, True, torch.Generator().manual_seed(5))))
    for skip in (1, 6, 7, 30):
        rest = rows_of(list(source.batches(32, True, torch.Generator().manual_seed(5), skip=skip)))
        assert rest == full[skip * 32 :], skip


def test_a_stream_in_file_order_gives_the_rows_in_order(prepared: Prepared) -> None:
    assert rows_of(list(stream(prepared, window=200).batches(100))) == list(range(10, ROWS))


@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_slices_make_up_each_global_batch(prepared: Prepared, world: int) -> None:
    for source in (prepared.load("train"), stream(prepared, window=200)):
        whole = list(source.batches(48, True, torch.Generator().manual_seed(2)))
        slices = [
            list(source.batches(48, True, torch.Generator().manual_seed(2), rank=r, world=world)) for r in range(world)
        ]
        for k, batch in enumerate(whole):
            parts = [slices[r][k].numeric for r in range(world)]
            assert torch.equal(torch.cat(parts), batch.numeric)
            assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_auto_streams_a_split_larger_than_the_budget(prepared: Prepared) -> None:
    file = prepared.file("train")
    size = file.rows * file.row_bytes
    assert not isinstance(open_source(file, "auto", size, "auto", 32, "b"), StreamedSplit)
    streamed = open_source(file, "auto", size - 1, "auto", 32, "b")
    assert isinstance(streamed, StreamedSplit) and streamed.window_rows == (size - 1) // (5 * file.row_bytes)
    assert isinstance(open_source(file, "stream", 1 << 30, 100, 32, "b"), StreamedSplit)
    assert not isinstance(open_source(file, "memory", 1, "auto", 32, "b"), StreamedSplit)


def test_a_budget_too_small_for_one_batch_is_refused(prepared: Prepared) -> None:
    file = prepared.file("train")
    with pytest.raises(
        DataError, match=r"data.memory_budget .* too small for one batch of train.batch_size \(64 rows\)"
    ):
        open_source(file, "stream", 63 * 5 * file.row_bytes, "auto", 64, "train.batch_size")
    with pytest.raises(DataError, match=r"train.shuffle_buffer \(10 rows\) is too small"):
        open_source(file, "stream", 1 << 30, 10, 64, "train.batch_size")


def test_a_read_error_on_the_thread_reaches_the_consumer(prepared: Prepared, tmp_path: Path) -> None:
    from mtlcli.errors import ArtifactError

    broken = tmp_path / "train.parquet"
    data = prepared.file("train").path.read_bytes()
    broken.write_bytes(data)
    source = StreamedSplit(SplitFile(broken, prepared.schema), 200, block_rows=64)
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="unreadable"):
        list(source.batches(32, True, torch.Generator().manual_seed(0)))


@pytest.mark.slow
def test_census_streamed_with_a_whole_buffer_equals_in_memory(census_file: Path, in_repo: Path, tmp_path: Path) -> None:
    """The issue's equivalence: with a buffer holding the whole split, streamed training and
    evaluation give the in-memory metrics (within 1e-6), epoch by epoch."""
    from mtlcli.recipe import load_recipe
    from mtlcli.train.run import train_run

    sets = ["train.epochs=2", "train.early_stopping=null", f"data.cache_dir={tmp_path / 'cache'}"]
    histories = []
    for loading in (["train.loading=memory"], ["train.loading=stream", "train.shuffle_buffer=100000"]):
        recipe = load_recipe("recipes/census-mmoe.yaml", [*sets, *loading])
        train_run(recipe, tmp_path / loading[0].split("=")[1])
        lines = (tmp_path / loading[0].split("=")[1] / "metrics.jsonl").read_text().splitlines()
        histories.append([json.loads(line) for line in lines])
    for memory, streamed in zip(*histories, strict=True):
        for task, metrics in memory["valid"].items():
            for name, value in metrics.items():
                if isinstance(value, float):
                    assert streamed["valid"][task][name] == pytest.approx(value, abs=1e-6), (task, name)
        for task, loss in memory["train_loss"].items():
            assert streamed["train_loss"][task] == pytest.approx(loss, abs=1e-6), task


def sharded(prepared: Prepared, shards: int, window: int = 200, read_ahead: bool = True) -> StreamedSplit:
    return StreamedSplit(prepared.file("train"), window, block_rows=64, read_ahead=read_ahead, shards=shards)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[range]:
    """The row ranges read from the split file, as they are read."""
    seen: list[range] = []
    original = SplitFile.window

    def spy(self: SplitFile, offset: int, rows: int) -> object:
        seen.append(range(offset, offset + rows))
        return original(self, offset, rows)

    monkeypatch.setattr(SplitFile, "window", spy)
    return seen


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_read_only_their_own_shards_and_make_up_the_one_process_batches(
    prepared: Prepared, world: int, reads: list[range]
) -> None:
    """990 rows in 16 blocks of 64 dealt to 4 shards (4 blocks each, the last holding the short
    block): a global batch of 32 is 8 rows of each shard, whichever process reads them."""
    source = sharded(prepared, 4)
    assert source.shard_rows() == [256, 256, 256, 222] and source.steps(32) == 32
    alone = list(source.batches(32, True, torch.Generator().manual_seed(4)))
    assert len(alone) == 32 and sorted(rows_of(alone)) == list(range(10, ROWS))
    assert [len(b) for b in alone[-6:]] == [32, 30, 24, 24, 24, 24]  # the short shard is used up first
    per_rank = []
    for rank in range(world):
        reads.clear()
        per_rank.append(list(source.batches(32, True, torch.Generator().manual_seed(4), rank=rank, world=world)))
        read = sorted(i for r in reads for i in r)
        assert len(read) == len(set(read)), "each row read once"
        mine = {r - 10 for b in per_rank[-1] for r in rows_of([b])}
        assert set(read) == mine, "a rank reads only the rows it trains on"
        assert len(read) <= 4 // world * 256
    for k, batch in enumerate(alone):
        assert all(len(per_rank[r]) == 32 for r in range(world))
        parts = [per_rank[r][k] for r in range(world)]
        assert torch.equal(torch.cat([p.numeric for p in parts]), batch.numeric)
        assert torch.equal(torch.cat([p.labels for p in parts]), batch.labels)
    if world == 4:  # rank 3's shard is used up four steps early: it takes part with no rows
        tail = per_rank[3][-5:]
        assert [len(b) for b in tail] == [6, 0, 0, 0, 0]
        assert tail[1].categorical.shape == (0, 1) and tail[1].labels.shape == (0, 2)


def test_sharded_epochs_draw_new_orders_and_resume_in_place(prepared: Prepared) -> None:
    source = sharded(prepared, 2, read_ahead=False)
    generator = torch.Generator().manual_seed(9)
    first = rows_of(list(source.batches(32, True, generator)))
    second = rows_of(list(source.batches(32, True, generator)))
    assert sorted(first) == sorted(second) == list(range(10, ROWS)) and first != second
    for rank in (0, 1):
        whole = list(source.batches(32, True, torch.Generator().manual_seed(9), rank=rank))
        for skip in (1, 12, 16, 30):
            rest = list(source.batches(32, True, torch.Generator().manual_seed(9), skip=skip, rank=rank))
            assert rows_of(rest) == rows_of(whole[skip:]), (rank, skip)
            assert len(rest) == source.steps(32) - skip


def test_one_shard_keeps_the_one_stream_order(prepared: Prepared) -> None:
    plain = rows_of(list(stream(prepared, window=200).batches(32, True, torch.Generator().manual_seed(1))))
    one = rows_of(list(sharded(prepared, 1).batches(32, True, torch.Generator().manual_seed(1))))
    assert one == plain


def test_a_small_split_is_cut_into_a_block_per_shard(prepared: Prepared) -> None:
    source = StreamedSplit(prepared.file("train"), 5000, shards=3)  # one 65,536-row block would do
    assert source.block_rows == 330 and source.shard_rows() == [330, 330, 330]
    assert sorted(rows_of(list(source.batches(30, True, torch.Generator().manual_seed(0))))) == list(range(10, ROWS))


@pytest.mark.parametrize("world", [2, 3])
def test_evaluation_on_several_ranks_scores_every_row_once_reading_its_own(
    prepared: Prepared, world: int, reads: list[range]
) -> None:
    source = stream(prepared, window=200)
    seen = []
    for rank in range(world):
        reads.clear()
        rows = rows_of(list(source.batches(100, rank=rank, world=world)))
        assert {i + 10 for r in reads for i in r} == set(rows)
        seen += rows
    assert sorted(seen) == list(range(10, ROWS))


def test_shards_that_the_batch_or_the_rows_cannot_fill_are_refused(prepared: Prepared) -> None:
    file = prepared.file("train")
    with pytest.raises(DataError, match=r"train.batch_size \(30\) does not divide evenly among 4 shards"):
        open_source(file, "stream", 1 << 30, 200, 30, "train.batch_size", shards=4)
    with pytest.raises(DataError, match=r"4096 shards need at least one row each; the split has 990"):
        open_source(file, "stream", 1 << 30, 4096, 4096, "train.batch_size", shards=4096)
    made = open_source(file, "stream", 1 << 30, 200, 32, "train.batch_size", shards=4)
    assert isinstance(made, StreamedSplit) and made.shards == 4
    assert open_source(file, "memory", 1 << 30, 200, 30, "b", shards=3).shards == 1
    assert open_source(file, "stream", 1 << 30, 200, 30, "b", shuffled=False, shards=3).shards == 1


def test_a_row_weighs_its_histories_at_their_bound(prepared: Prepared) -> None:
    """Histories decide whether a split fits the budget: a row with one of max_len 200 weighs
    200 int64 ids and a length more, so auto streams it where the row without would be held."""
    import dataclasses

    from mtlcli.data.schema import SequenceFeature

    file = prepared.file("train")
    history = SequenceFeature(name="clicks", column="clicks", max_len=200, pooling="mean")
    longer = SplitFile(file.path, dataclasses.replace(file.schema, sequences=[history]))
    assert longer.row_bytes == file.row_bytes + 8 * 201
    budget = file.rows * file.row_bytes
    assert not isinstance(open_source(file, "auto", budget, "auto", 32, "b"), StreamedSplit)
    assert isinstance(open_source(longer, "auto", budget, "auto", 2, "b"), StreamedSplit)
