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
