"""Preprocessing on small hand-made CSVs: train-only fitting, splits, labels, data errors, the cache;
and one check of the census protocol on the real file."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch
import yaml

from mtlcli.data.schema import FIRST_ID, MISSING_ID, OOV_ID, DataSchema
from mtlcli.data.store import Prepared, prepare
from mtlcli.errors import DataError
from mtlcli.recipe import Recipe, load_recipe, recipe_from_text

REPO = Path(__file__).resolve().parents[2]
CENSUS_DIR = REPO.parent / "shared" / "data" / "census-income"

N = 20
TRAIN_IDS = [i for i in range(N) if i % 5 not in (0, 1)]
VALID_IDS = [i for i in range(N) if i % 5 == 1]
TEST_IDS = [i for i in range(N) if i % 5 == 0]


def color_of(i: int) -> str | None:
    """red/blue on every split; 'rare' once on train; 'green' only on test, 'purple' only on
    valid; missing on rows 3 (train), 10 (test) and 17 (train)."""
    special = {2: "rare", 5: "green", 6: "purple", 3: None, 10: None, 17: None}
    return special[i] if i in special else ("red" if i % 2 == 0 else "blue")


def price_of(i: int) -> float | None:
    return None if i == 4 else 1.5 * i + 1.0


def base_rows() -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "color": color_of(i),
            "price": price_of(i),
            "click": i % 2,
            "buy": "pos" if i % 4 == 0 else ("maybe" if i % 4 == 1 else "neg"),
            "score": 10 * i,
        }
        for i in range(N)
    ]


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    lines = [",".join(columns)]
    for row in rows:
        lines.append(",".join("" if row.get(c) is None else str(row[c]) for c in columns))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_recipe(tmp_path: Path, source: Path | None = None, **sections: Any) -> Recipe:
    """A recipe over ``source`` (default: the base rows) with an absolute cache in tmp_path.

    Keyword arguments replace whole sections (``features``, ``tasks``) or, with a ``data_``
    prefix, keys of the data section (``data_split``)."""
    if source is None:
        source = write_csv(tmp_path / "data.csv", base_rows())
    data: dict[str, Any] = {
        "source": str(source),
        "split": {"by": "modulo"},
        "cache_dir": str(tmp_path / "cache"),
    }
    for key, value in list(sections.items()):
        if key.startswith("data_"):
            data[key.removeprefix("data_")] = value
            del sections[key]
    recipe = {
        "data": data,
        "features": sections.pop(
            "features", {"numeric": {"id": {"transform": "none"}, "price": None}, "categorical": ["color"]}
        ),
        "tasks": sections.pop("tasks", {"click": {"label": "click"}}),
        **sections,
    }
    return recipe_from_text(yaml.safe_dump(recipe, sort_keys=False), "test-recipe")


def frame(prepared: Prepared, split: str) -> pl.DataFrame:
    return pl.read_parquet(prepared.directory / f"{split}.parquet")


def by_id(prepared: Prepared, split: str, column: str) -> dict[int, Any]:
    """{row id: encoded value of ``column``} for one split (the recipe keeps ``id`` as is)."""
    part = frame(prepared, split)
    return dict(zip((int(v) for v in part.get_column("id")), part.get_column(column).to_list(), strict=True))


def data_error(recipe: Recipe) -> DataError:
    with pytest.raises(DataError) as caught:
        prepare(recipe)
    return caught.value


# --- vocabularies -------------------------------------------------------------------------------


def test_vocabulary_is_fitted_on_train_rows_only(tmp_path: Path) -> None:
    prepared = prepare(make_recipe(tmp_path))
    (color,) = prepared.schema.categorical
    # train holds red x5, blue x4 (rows 7, 9, 13, 19), rare x1; most frequent first
    assert color.vocab == ["red", "blue", "rare"]
    ids = {**by_id(prepared, "train", "color"), **by_id(prepared, "valid", "color"), **by_id(prepared, "test", "color")}
    assert ids[5] == OOV_ID  # 'green' appears only on test
    assert ids[6] == OOV_ID  # 'purple' appears only on valid
    assert ids[3] == ids[10] == ids[17] == MISSING_ID
    assert ids[0] == ids[4] == ids[16] == FIRST_ID + 0  # red on test, train, valid
    assert ids[15] == ids[19] == ids[11] == FIRST_ID + 1  # blue on test, train, valid
    assert ids[2] == FIRST_ID + 2  # rare
    assert color.cardinality == FIRST_ID + 3
    splits = prepared.schema.splits
    assert splits["test"].oov_rate["color"] == pytest.approx(1 / 3)  # rows 0, 5, 15 present; 5 unseen
    assert splits["valid"].oov_rate["color"] == pytest.approx(1 / 4)
    assert splits["train"].oov_rate["color"] == 0.0


def test_min_count_sends_rare_values_to_oov(tmp_path: Path) -> None:
    features = {"numeric": {"id": {"transform": "none"}}, "categorical": {"color": {"min_count": 5}}}
    prepared = prepare(make_recipe(tmp_path, features=features))
    (color,) = prepared.schema.categorical
    assert color.vocab == ["red"]  # blue is seen 4 times on train, rare once
    ids = by_id(prepared, "train", "color")
    assert ids[2] == OOV_ID
    assert ids[7] == OOV_ID
    assert ids[12] == FIRST_ID
    assert ids[3] == MISSING_ID


def expected_bucket(value: str, buckets: int) -> int:
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
    return FIRST_ID + int.from_bytes(digest, "little") % buckets


def test_hash_buckets_are_in_range_and_stable(tmp_path: Path) -> None:
    features = {"numeric": {"id": {"transform": "none"}}, "categorical": {"color": {"hash_buckets": 3}}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = prepare(make_recipe(tmp_path / "a", features=features))
    second = prepare(make_recipe(tmp_path / "b", features=features))
    (color,) = first.schema.categorical
    assert color.vocab == []
    assert color.cardinality == FIRST_ID + 3
    for split in ("train", "valid", "test"):
        ids = by_id(first, split, "color")
        assert ids == by_id(second, split, "color")  # same ids from an independent run
        for row, value in ids.items():
            if color_of(row) is None:
                assert value == MISSING_ID
            else:
                assert FIRST_ID <= value < FIRST_ID + 3
                # a fixed hash: values unseen on train (green, purple) get a bucket too
                assert value == expected_bucket(str(color_of(row)), 3)


# --- numeric statistics and transforms ----------------------------------------------------------


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def pstd(values: list[float]) -> float:
    centre = mean(values)
    return math.sqrt(sum((v - centre) ** 2 for v in values) / len(values))


def train_prices() -> list[float]:
    return [p for i in TRAIN_IDS if (p := price_of(i)) is not None]


def test_numeric_statistics_come_from_train_only(tmp_path: Path) -> None:
    prepared = prepare(make_recipe(tmp_path))
    price = next(f for f in prepared.schema.numeric if f.name == "price")
    fill = mean(train_prices())  # row 4 (train) is missing and filled with the train mean
    filled = [fill if (p := price_of(i)) is None else p for i in TRAIN_IDS]
    assert price.fill_value == pytest.approx(fill)
    assert price.center == pytest.approx(mean(filled))
    assert price.scale == pytest.approx(pstd(filled))
    assert price.transforms == ["standardize"]
    everything = [p for i in range(N) if (p := price_of(i)) is not None]
    assert price.fill_value != pytest.approx(mean(everything))  # valid/test rows would shift it
    test_values = by_id(prepared, "test", "price")
    assert test_values[15] == pytest.approx((price_of(15) - price.center) / price.scale, rel=1e-5)  # type: ignore[operator]
    assert by_id(prepared, "train", "price")[4] == pytest.approx((fill - price.center) / price.scale, rel=1e-5)
    train = frame(prepared, "train").get_column("price")
    assert float(train.mean()) == pytest.approx(0.0, abs=1e-5)  # type: ignore[arg-type]
    assert float(train.std(ddof=0)) == pytest.approx(1.0, abs=1e-5)  # type: ignore[arg-type]
    assert DataSchema.load(prepared.directory / "schema.json") == prepared.schema


def test_log1p_then_standardize(tmp_path: Path) -> None:
    features = {"numeric": {"id": {"transform": "none"}, "price": {"transform": ["log1p", "standardize"]}}}
    prepared = prepare(make_recipe(tmp_path, features=features))
    price = next(f for f in prepared.schema.numeric if f.name == "price")
    fill = mean(train_prices())
    logged = [math.log1p(fill if (p := price_of(i)) is None else p) for i in TRAIN_IDS]
    assert price.log1p is True
    assert price.center == pytest.approx(mean(logged))
    assert price.scale == pytest.approx(pstd(logged))
    assert by_id(prepared, "valid", "price")[6] == pytest.approx(
        (math.log1p(price_of(6)) - price.center) / price.scale,  # type: ignore[arg-type]
        rel=1e-5,
    )


def test_minmax_uses_the_train_range(tmp_path: Path) -> None:
    features = {"numeric": {"id": {"transform": "none"}, "price": {"transform": "minmax", "fill": "zero"}}}
    prepared = prepare(make_recipe(tmp_path, features=features))
    price = next(f for f in prepared.schema.numeric if f.name == "price")
    assert price.fill_value == 0.0
    low, high = 0.0, max(train_prices())  # the filled zero is the train minimum
    assert (price.center, price.scale) == pytest.approx((low, high - low))
    train = by_id(prepared, "train", "price")
    assert train[4] == pytest.approx(0.0)
    assert train[19] == pytest.approx(1.0)
    assert min(train.values()) == pytest.approx(0.0)
    assert max(train.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("fill", "expected"),
    [("median", sorted(train_prices())[len(train_prices()) // 2]), (-7.0, -7.0), ("zero", 0.0)],
)
def test_fill_value(tmp_path: Path, fill: Any, expected: float) -> None:
    features = {"numeric": {"id": {"transform": "none"}, "price": {"transform": "none", "fill": fill}}}
    prepared = prepare(make_recipe(tmp_path, features=features))
    assert len(train_prices()) % 2 == 1  # the median is one of the values
    assert by_id(prepared, "train", "price")[4] == pytest.approx(expected)
    assert by_id(prepared, "train", "price")[7] == pytest.approx(price_of(7))


def test_auto_features_split_numbers_from_text(tmp_path: Path) -> None:
    features = {"numeric": "auto", "categorical": "auto", "exclude": ["score"]}
    prepared = prepare(
        make_recipe(tmp_path, features=features, tasks={"buy": {"label": {"column": "buy", "positive": ["pos"]}}})
    )
    assert [f.name for f in prepared.schema.numeric] == ["id", "price", "click"]
    assert [f.name for f in prepared.schema.categorical] == ["color"]


def test_synthetic_source(tmp_path: Path) -> None:
    text = yaml.safe_dump(
        {
            "data": {
                "synthetic": {"rows": 400, "dim": 3, "seed": 5},
                "split": {"by": "random", "valid": 0.25, "test": 0.25, "seed": 1},
                "cache_dir": str(tmp_path),
            },
            "features": {"numeric": "auto"},
            "tasks": {"y1": {"type": "regression", "label": "y1"}, "y2": {"type": "regression", "label": "y2"}},
            "train": {"early_stopping": {"metric": "rmse"}},
        }
    )
    prepared = prepare(recipe_from_text(text))
    assert [f.name for f in prepared.schema.numeric] == ["x0", "x1", "x2"]  # the labels are not inputs
    assert prepared.schema.categorical == []
    assert sum(info.rows for info in prepared.schema.splits.values()) == 400
    assert prepare(recipe_from_text(text)).reused


# --- splits -------------------------------------------------------------------------------------


def test_modulo_split_puts_row_i_in_test_iff_i_mod_5_is_0(tmp_path: Path) -> None:
    prepared = prepare(make_recipe(tmp_path))
    assert sorted(by_id(prepared, "test", "price")) == TEST_IDS
    assert sorted(by_id(prepared, "valid", "price")) == VALID_IDS
    assert sorted(by_id(prepared, "train", "price")) == TRAIN_IDS
    assert list(by_id(prepared, "train", "price")) == TRAIN_IDS  # file order is kept
    rows = {name: info.rows for name, info in prepared.schema.splits.items()}
    assert rows == {"train": 12, "valid": 4, "test": 4}


def test_modulo_split_with_other_residues(tmp_path: Path) -> None:
    split = {"by": "modulo", "modulus": 4, "test": [1, 2], "valid": [3]}
    prepared = prepare(make_recipe(tmp_path, data_split=split))
    assert sorted(by_id(prepared, "test", "price")) == [i for i in range(N) if i % 4 in (1, 2)]
    assert sorted(by_id(prepared, "valid", "price")) == [i for i in range(N) if i % 4 == 3]
    assert sorted(by_id(prepared, "train", "price")) == [i for i in range(N) if i % 4 == 0]


def test_empty_valid_split_is_an_error(tmp_path: Path) -> None:
    error = data_error(make_recipe(tmp_path, data_split={"by": "modulo", "modulus": 4, "test": [0], "valid": []}))
    assert "valid split is empty" in error.message


def random_split_ids(tmp_path: Path, seed: int) -> dict[str, list[int]]:
    tmp_path.mkdir()
    rows = [{"id": i, "price": float(i), "click": i % 2} for i in range(200)]
    source = write_csv(tmp_path / "many.csv", rows)
    recipe = make_recipe(
        tmp_path,
        source=source,
        data_split={"by": "random", "valid": 0.2, "test": 0.3, "seed": seed},
        data_cache_dir=str(tmp_path / f"cache-{seed}"),
        features={"numeric": {"id": {"transform": "none"}, "price": None}},
    )
    prepared = prepare(recipe)
    return {split: sorted(by_id(prepared, split, "price")) for split in ("train", "valid", "test")}


def test_random_split_is_reproducible_with_its_seed(tmp_path: Path) -> None:
    first = random_split_ids(tmp_path / "a", seed=7)
    again = random_split_ids(tmp_path / "b", seed=7)
    other = random_split_ids(tmp_path / "c", seed=8)
    assert first == again
    assert first != other
    assert sorted(first["train"] + first["valid"] + first["test"]) == list(range(200))
    assert 20 <= len(first["valid"]) <= 60
    assert 35 <= len(first["test"]) <= 85


def splitmix_draw(row: int, seed: int) -> float:
    """The documented draw of the random split (docs/recipe.md), in plain Python integers."""
    mask = (1 << 64) - 1
    x = (row + 0x9E3779B97F4A7C15 * (seed + 1)) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    x ^= x >> 31
    return (x >> 11) / float(1 << 53)


def test_random_split_is_the_documented_function_of_row_and_seed(tmp_path: Path) -> None:
    """Each row's split follows from its position and the seed alone (splitmix64), so it does not
    depend on the row count, memory or the polars version."""
    ids = random_split_ids(tmp_path / "a", seed=7)
    expected: dict[str, list[int]] = {"train": [], "valid": [], "test": []}
    for row in range(200):
        u = splitmix_draw(row, 7)
        expected["test" if u < 0.3 else "valid" if u < 0.5 else "train"].append(row)
    assert ids == expected


def test_max_size_keeps_the_most_frequent_values(tmp_path: Path) -> None:
    # on train (rows i % 5 not in 0, 1): a x4, b x3, c x2, d x1; e only on test
    kinds = ["e", "z", "a", "a", "b", "e", "z", "a", "a", "b", "x", "y", "b", "c", "c", "q", "w", "d"]
    rows = [{"id": i, "kind": k, "click": i % 2} for i, k in enumerate(kinds)]
    source = write_csv(tmp_path / "k.csv", rows)
    recipe = make_recipe(
        tmp_path, source=source, features={"categorical": {"kind": {"max_size": 2}}, "numeric": {"id": None}}
    )
    prepared = prepare(recipe)
    feature = prepared.schema.categorical[0]
    assert feature.vocab == ["a", "b"] and feature.max_size == 2
    assert frame(prepared, "train")["kind"].to_list() == [
        FIRST_ID if kinds[i] == "a" else FIRST_ID + 1 if kinds[i] == "b" else OOV_ID
        for i in range(len(kinds))
        if i % 5 not in (0, 1)
    ]


def test_column_split(tmp_path: Path) -> None:
    parts = ["tr", "va", "te", "tr", "xx", "tr", "va", "te"]
    rows = [{"id": i, "part": p, "kind": "a" if i < 4 else "b", "click": i % 2} for i, p in enumerate(parts)]
    rows[7]["kind"] = "c"  # only on test
    source = write_csv(tmp_path / "c.csv", rows)
    recipe = make_recipe(
        tmp_path,
        source=source,
        data_split={"by": "column", "column": "part", "train": "tr", "valid": ["va"], "test": "te"},
        features={"numeric": {"id": {"transform": "none"}}, "categorical": "auto"},
    )
    prepared = prepare(recipe)
    assert [f.name for f in prepared.schema.categorical] == ["kind"]  # the split column is not an input
    assert sorted(by_id(prepared, "train", "kind")) == [0, 3, 5]
    assert sorted(by_id(prepared, "valid", "kind")) == [1, 6]
    assert sorted(by_id(prepared, "test", "kind")) == [2, 7]  # row 4 ('xx') is dropped
    assert by_id(prepared, "test", "kind")[7] == OOV_ID


def test_files_split(tmp_path: Path) -> None:
    rows = base_rows()
    files = {}
    for split, ids in (("train", TRAIN_IDS), ("valid", VALID_IDS), ("test", TEST_IDS)):
        files[split] = str(write_csv(tmp_path / f"{split}.csv", [rows[i] for i in ids]))
    recipe = recipe_from_text(
        yaml.safe_dump(
            {
                "data": {"split": {"by": "files", **files}, "cache_dir": str(tmp_path / "cache")},
                "features": {"numeric": {"id": {"transform": "none"}}, "categorical": ["color"]},
                "tasks": {"click": {"label": "click"}},
            }
        )
    )
    prepared = prepare(recipe)
    assert sorted(by_id(prepared, "train", "color")) == TRAIN_IDS
    assert sorted(by_id(prepared, "valid", "color")) == VALID_IDS
    assert sorted(by_id(prepared, "test", "color")) == TEST_IDS
    assert prepared.schema.categorical[0].vocab == ["red", "blue", "rare"]
    assert by_id(prepared, "test", "color")[5] == OOV_ID
    assert [f["split"] for f in prepared.schema.source["files"]] == ["train", "valid", "test"]


# --- labels -------------------------------------------------------------------------------------


def test_labels_from_positive_values_threshold_and_01_column(tmp_path: Path) -> None:
    tasks = {
        "click": {"label": "click"},
        "buy": {"label": {"column": "buy", "positive": ["pos", "maybe"]}},
        "high": {"label": {"column": "score", "threshold": 95}},
        "value": {"type": "regression", "label": "score"},
    }
    features = {"numeric": {"id": {"transform": "none"}}, "categorical": ["color"]}
    prepared = prepare(make_recipe(tmp_path, tasks=tasks, features=features, train={"early_stopping": None}))
    assert prepared.schema.task_names == ["click", "buy", "high", "value"]
    for split in ("train", "valid", "test"):
        for i, label in by_id(prepared, split, "label:click").items():
            assert label == i % 2
        for i, label in by_id(prepared, split, "label:buy").items():
            assert label == (1.0 if i % 4 in (0, 1) else 0.0)
        for i, label in by_id(prepared, split, "label:high").items():
            assert label == (1.0 if 10 * i > 95 else 0.0)
        for i, label in by_id(prepared, split, "label:value").items():
            assert label == 10 * i
    train = prepared.schema.splits["train"]
    assert train.positives["click"] == sum(i % 2 for i in TRAIN_IDS)
    assert train.positives["high"] == sum(10 * i > 95 for i in TRAIN_IDS)
    assert train.label_mean["value"] == pytest.approx(mean([10.0 * i for i in TRAIN_IDS]))
    assert "value" not in train.positives


def test_true_false_column_is_a_binary_label(tmp_path: Path) -> None:
    rows = [{"id": i, "price": float(i), "flag": "true" if i % 3 == 0 else "False"} for i in range(N)]
    recipe = make_recipe(
        tmp_path,
        source=write_csv(tmp_path / "f.csv", rows),
        features={"numeric": ["price"]},
        tasks={"f": {"label": "flag"}},
    )
    labels = frame(prepare(recipe), "train").get_column("label:f").to_list()
    assert labels == [1.0 if i % 3 == 0 else 0.0 for i in TRAIN_IDS]


# --- data errors --------------------------------------------------------------------------------


def test_missing_data_file(tmp_path: Path) -> None:
    error = data_error(make_recipe(tmp_path, source=tmp_path / "nope.csv"))
    assert "data.source[0]: data file not found" in error.message
    assert "nope.csv" in error.message


def test_label_column_absent_suggests_the_close_name(tmp_path: Path) -> None:
    error = data_error(make_recipe(tmp_path, tasks={"click": {"label": "clik"}}))
    assert error.message.startswith("tasks.click.label.column: ")
    assert "column 'clik' is not in the data (did you mean 'click'?)" in error.message
    assert error.hint is not None
    assert "id, color, price, click, buy, score" in error.hint
    assert "__" not in error.hint  # internal columns stay internal


def test_feature_column_absent(tmp_path: Path) -> None:
    error = data_error(make_recipe(tmp_path, features={"numeric": ["prise"]}))
    assert error.message.startswith("features.numeric: column 'prise' is not in the data")
    assert "did you mean 'price'?" in error.message
    error = data_error(make_recipe(tmp_path, features={"categorical": ["colour"], "numeric": ["price"]}))
    assert "features.categorical: column 'colour'" in error.message


def test_unreadable_label_value_names_the_row(tmp_path: Path) -> None:
    rows = base_rows()
    rows[6]["click"] = "abc"
    error = data_error(make_recipe(tmp_path, source=write_csv(tmp_path / "d.csv", rows)))
    assert error.message.startswith("tasks.click.label: column 'click'")
    assert "'abc'" in error.message
    assert "data row 7" in error.message  # 1-based, header not counted


def test_label_outside_0_1_names_the_row(tmp_path: Path) -> None:
    rows = base_rows()
    rows[11]["click"] = 2
    error = data_error(make_recipe(tmp_path, source=write_csv(tmp_path / "d.csv", rows)))
    assert "binary label column 'click' holds '2' at data row 12, not 0/1" in error.message
    assert error.hint is not None
    assert "positive" in error.hint


def test_nan_label(tmp_path: Path) -> None:
    rows = base_rows()
    rows[8]["click"] = "NaN"
    source = write_csv(tmp_path / "d.csv", rows)
    error = data_error(make_recipe(tmp_path, source=source, data_missing=[""]))
    assert "column 'click' is NaN or infinite at data row 9" in error.message
    error = data_error(make_recipe(tmp_path, source=source))  # NaN is a missing marker by default
    assert "column 'click' is empty in 1 rows (first: data row 9)" in error.message


def test_positive_value_that_never_occurs(tmp_path: Path) -> None:
    error = data_error(make_recipe(tmp_path, tasks={"buy": {"label": {"column": "buy", "positive": ["pos", "poss"]}}}))
    assert error.message.startswith("tasks.buy.label.positive: 'poss'")
    assert "column 'buy'" in error.message
    assert "did you mean 'pos'?" in error.message
    assert error.hint is not None
    assert "'maybe', 'neg', 'pos'" in error.hint


def test_header_only_file(tmp_path: Path) -> None:
    source = tmp_path / "h.csv"
    source.write_text("id,color,price,click\n")
    error = data_error(make_recipe(tmp_path, source=source))
    assert error.message == f"{source}: the file has no data rows"


def test_zero_byte_file(tmp_path: Path) -> None:
    source = tmp_path / "z.csv"
    source.write_bytes(b"")
    error = data_error(make_recipe(tmp_path, source=source))
    assert error.message == f"{source}: the file is empty"


def test_wrong_number_of_columns(tmp_path: Path) -> None:
    source = tmp_path / "nohead.csv"
    source.write_text("1,red,2.5,1\n2,blue,3.5,0\n")
    recipe = make_recipe(tmp_path, source=source, data_header=False, data_columns=["id", "color", "click"])
    error = data_error(recipe)
    assert "the file has 4 columns but data.columns names 3" in error.message


def test_columns_name_a_headerless_file(tmp_path: Path) -> None:
    source = tmp_path / "nohead.csv"
    source.write_text("".join(f"{i}, {color_of(i) or '?'}, {i % 2}\n" for i in range(N)))
    recipe = make_recipe(
        tmp_path,
        source=source,
        data_header=False,
        data_columns=["id", "color", "click"],
        data_missing=["?"],
        features={"numeric": {"id": {"transform": "none"}}, "categorical": ["color"]},
    )
    prepared = prepare(recipe)
    assert prepared.schema.categorical[0].vocab == ["red", "blue", "rare"]  # ", " separators are stripped
    assert by_id(prepared, "train", "color")[3] == MISSING_ID


def test_header_names_are_stripped_like_values(tmp_path: Path) -> None:
    source = tmp_path / "spaced.csv"
    source.write_text("id, color, click\n" + "".join(f"{i}, {color_of(i) or ''}, {i % 2}\n" for i in range(N)))
    prepared = prepare(make_recipe(tmp_path, source=source, features={"numeric": ["id"], "categorical": ["color"]}))
    assert prepared.schema.categorical[0].vocab == ["red", "blue", "rare"]


@pytest.mark.parametrize("where", ["middle", "end"])
def test_a_blank_line_is_refused_as_predict_refuses_it(tmp_path: Path, where: str) -> None:
    """polars reads a blank line as a row of missing values; it is no row (it was an empty label,
    or with nullable columns a row of missing values)."""
    lines = write_csv(tmp_path / "data.csv", base_rows()).read_text().splitlines(keepends=True)
    lines.insert(5 if where == "middle" else len(lines), "\n")
    (tmp_path / "data.csv").write_text("".join(lines))
    error = data_error(make_recipe(tmp_path, source=tmp_path / "data.csv"))
    assert error.message == f"{tmp_path / 'data.csv'}: line {6 if where == 'middle' else len(lines)} is blank"


def test_a_parquet_file_is_known_by_its_magic_bytes_whatever_its_name(tmp_path: Path) -> None:
    """`format: auto` reads a Parquet file named data.dat as Parquet; `format: csv` says what it is
    (it was "not UTF-8 text" with an iconv hint)."""
    source = tmp_path / "data.dat"
    pl.DataFrame(base_rows()).write_parquet(source)
    named = tmp_path / "data.parquet"
    pl.DataFrame(base_rows()).write_parquet(named)
    expected = frame(prepare(make_recipe(tmp_path, source=named)), "train")
    assert frame(prepare(make_recipe(tmp_path, source=source)), "train").equals(expected)
    error = data_error(make_recipe(tmp_path, source=source, data_format="csv"))
    assert error.message == f"{source}: cannot read it as CSV: it is a Parquet file (it starts with PAR1)"
    assert error.hint == "set data.format: parquet (or leave it auto)"


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_byte_order_mark_and_crlf_line_ends_read_as_plain_csv(tmp_path: Path, newline: str) -> None:
    plain = write_csv(tmp_path / "plain.csv", base_rows())
    marked = tmp_path / "marked.csv"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes().replace(b"\n", newline.encode()))
    expected = frame(prepare(make_recipe(tmp_path, source=plain)), "train")
    assert frame(prepare(make_recipe(tmp_path, source=marked)), "train").equals(expected)


# --- cache --------------------------------------------------------------------------------------


def test_cache_is_reused_and_rebuilt_when_the_source_changes(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "data.csv", base_rows())
    recipe = make_recipe(tmp_path, source=source)
    first = prepare(recipe)
    assert not first.reused
    assert first.directory.parent == tmp_path / "cache"
    second = prepare(recipe)
    assert second.reused
    assert second.directory == first.directory
    assert second.schema == first.schema

    assert not prepare(recipe, force=True).reused

    rows = [*base_rows(), {**base_rows()[2], "id": N, "color": "violet"}]  # row 20: test
    write_csv(source, rows)
    third = prepare(recipe)
    assert not third.reused
    assert third.directory != first.directory
    assert third.schema.splits["test"].rows == 5
    assert third.schema.data_key != first.schema.data_key


def test_cache_key_follows_the_features_section(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "data.csv", base_rows())
    first = prepare(make_recipe(tmp_path, source=source))
    other = prepare(make_recipe(tmp_path, source=source, features={"numeric": ["price"], "categorical": ["color"]}))
    assert not other.reused
    assert other.directory != first.directory


def test_damaged_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path)
    first = prepare(recipe)
    (first.directory / "schema.json").write_text("{not json")
    again = prepare(recipe)
    assert not again.reused
    assert again.schema == first.schema


# --- the real census file -----------------------------------------------------------------------


def test_census_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not (CENSUS_DIR / "census-income.test.gz").is_file():
        pytest.skip(f"census data not found at {CENSUS_DIR} (expected in ../shared/data next to the repository)")
    monkeypatch.chdir(REPO)  # the recipe names its data relative to the repository root
    recipe = load_recipe(REPO / "recipes" / "census-mmoe.yaml", [f"data.cache_dir={tmp_path}"])
    prepared = prepare(recipe)
    schema = prepared.schema
    assert {name: info.rows for name, info in schema.splits.items()} == {"train": 59856, "valid": 19953, "test": 19953}
    inputs = {f.name for f in schema.categorical} | {f.name for f in schema.numeric}
    assert not inputs & {"income", "marital status", "education", "instance weight"}
    assert len(inputs) == 42 - 4
    assert schema.task_names == ["income", "marital"]
    assert 0.0 < schema.splits["train"].label_mean["income"] < 0.1


def test_an_unchanged_source_file_is_not_hashed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache key remembers each file's sha256 with its identity (size, mtime, inode, both ends):
    a second run reads only the ends; a change of a byte, same size and mtime, is still caught
    when it lies in the first or last 64 KiB."""
    import os

    import mtlcli.fileio as fileio
    from mtlcli.data.store import data_key

    source = tmp_path / "data.csv"
    write_csv(source, base_rows())
    recipe = make_recipe(tmp_path, source=source)
    first = data_key(recipe)[0]
    assert (tmp_path / "cache" / "file-hashes.json").is_file()

    def no_full_read(path: Path) -> str:
        raise AssertionError(f"{path} was hashed in full again")

    monkeypatch.setattr(fileio, "sha256_file", no_full_read)
    assert data_key(recipe)[0] == first
    monkeypatch.undo()
    stat = source.stat()
    text = source.read_text()
    source.write_text(text.replace("red", "rex", 1))  # same size
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime
    assert data_key(recipe)[0] != first


def test_shards_by_glob_read_as_one_file(tmp_path: Path) -> None:
    """`data.source: shards/part-*.parquet` reads the shards in sorted order, as one file would."""
    rows = base_rows()
    shards = tmp_path / "shards"
    shards.mkdir()
    for index, start in enumerate(range(0, N, 7)):
        pl.DataFrame(rows[start : start + 7]).write_parquet(shards / f"part-{index:03d}.parquet")
    whole = tmp_path / "whole.parquet"
    pl.DataFrame(rows).write_parquet(whole)
    from_shards = prepare(make_recipe(tmp_path, source=Path(str(shards / "part-*.parquet"))))
    from_file = prepare(make_recipe(tmp_path, source=whole))
    for split in ("train", "valid", "test"):
        a, b = from_shards.load(split), from_file.load(split)
        assert torch.equal(a.categorical, b.categorical) and torch.equal(a.numeric, b.numeric)
        assert torch.equal(a.labels, b.labels)


@pytest.mark.parametrize(
    ("damage", "expect"),
    [
        ("nothing matches", "the pattern"),
        ("a shard lacks a column", "part-001.parquet: lacks column 'buy'"),
        ("a shard has another column", "part-001.parquet: has column 'extra'"),
        ("a truncated shard", "part-001.parquet: cannot read it as PARQUET"),
    ],
)
def test_bad_shards_are_named(tmp_path: Path, damage: str, expect: str) -> None:
    rows = base_rows()
    shards = tmp_path / "shards"
    shards.mkdir()
    pl.DataFrame(rows[:10]).write_parquet(shards / "part-000.parquet")
    second = pl.DataFrame(rows[10:])
    if damage == "a shard lacks a column":
        second = second.drop("buy")
    elif damage == "a shard has another column":
        second = second.with_columns(pl.lit(1).alias("extra"))
    second.write_parquet(shards / "part-001.parquet")
    if damage == "a truncated shard":
        raw = (shards / "part-001.parquet").read_bytes()
        (shards / "part-001.parquet").write_bytes(raw[: len(raw) // 2])
    pattern = "nothing-*.parquet" if damage == "nothing matches" else "part-*.parquet"
    with pytest.raises(DataError, match=re.escape(expect)):
        prepare(make_recipe(tmp_path, source=Path(str(shards / pattern))))


def test_streamed_preprocessing_equals_the_in_memory_one(census_file: Path, in_repo: Path, tmp_path: Path) -> None:
    """data.memory_budget decides whether the source is read into memory once or streamed through
    every stage; the encoded data and the schema are the same either way, but for the order in
    which the streaming engine sums a column (numeric statistics within 1e-12 relative, float64)."""
    sets = [f"data.cache_dir={tmp_path / 'cache'}"]
    memory = prepare(load_recipe("recipes/census-mmoe.yaml", sets), out=tmp_path / "memory")
    tiny = [*sets, "data.memory_budget=1"]
    streamed = prepare(load_recipe("recipes/census-mmoe.yaml", tiny), out=tmp_path / "stream")
    a, b = memory.schema.to_dict(), streamed.schema.to_dict()
    for one, other in zip(a.pop("numeric"), b.pop("numeric"), strict=True):
        for key in ("fill_value", "center", "scale"):
            assert one.pop(key) == pytest.approx(other.pop(key), rel=1e-12), (one["name"], key)
        assert one == other
    assert a == b
    for split in ("train", "valid", "test"):
        x, y = memory.load(split), streamed.load(split)
        assert torch.equal(x.categorical, y.categorical) and torch.equal(x.labels, y.labels), split
        assert torch.allclose(x.numeric, y.numeric, rtol=1e-6, atol=1e-6), split


def test_a_value_far_outside_the_train_range_is_clipped_not_overflowed(tmp_path: Path) -> None:
    """Train holds 0 and 1e-77 (a scale of ~1e-77), test holds 1: unclipped, 1e77 would be inf in
    float32 and every output NaN (a case the property test found)."""
    rows = [{"id": i, "price": 1.0 if i % 5 == 0 else (1e-77 if i == 2 else 0.0), "click": i % 2} for i in range(20)]
    source = write_csv(tmp_path / "tiny.csv", rows)
    prepared = prepare(make_recipe(tmp_path, source=source, features={"numeric": {"price": None}}))
    test = prepared.load("test").numeric[:, 0]
    assert torch.isfinite(test).all() and float(test.max()) == pytest.approx(1e6)
