"""What serving reads is decided per value and per input, never per chunk: a JSON history given as
an array or as text, empty, null or left out scores the same at every `--chunk-rows`, and the same
as from Parquet or CSV (a property test draws such rows); a file whose only history is empty is an
empty history, as preprocessing reads it; a CSV row of another width is refused wherever a chunk
starts. Around it: byte-order marks, encodings, truncated gzip, --rejects and --keep with
histories, and `mtl export --force` under a concurrent reader. One small model with parallel type
and time lists is trained for the module."""

from __future__ import annotations

import gzip
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mtlcli.cli.app import app
from mtlcli.recipe import recipe_from_text
from mtlcli.train.run import train_run
from tests.export.test_serving_roundtrip import ITEMS, SHAPES, raw_rows, recipe_text
from tests.numerics import assert_kernel_close

pytestmark = pytest.mark.numerics
runner = CliRunner()
TASKS = ["click", "buy"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of histories with parallel type and time lists and a row time ("hist", "kinds",
    "times", "t"), and categorical user and item, numeric x."""
    work = tmp_path_factory.mktemp("serving")
    rows, _ = raw_rows()
    rows.write_parquet(work / "rows.parquet")
    text = recipe_text(SHAPES["parallel types and times"])
    recipe = yaml.safe_load(text)
    recipe["data"] |= {"source": str(work / "rows.parquet"), "cache_dir": str(work / "cache")}
    train_run(recipe_from_text(yaml.safe_dump(recipe), "serving"), work / "run")
    result = runner.invoke(app, ["export", str(work / "run"), "--out", str(work / "bundle")])
    assert result.exit_code == 0, result.output
    return work / "bundle"


def predict(bundle: Path, data: bytes | Path, *args: str) -> pl.DataFrame:
    """`mtl predict` of ``data`` (a file, or bytes on stdin) as a frame of the task columns."""
    source = ["-"] if isinstance(data, bytes) else [str(data)]
    result = runner.invoke(
        app, ["predict", str(bundle), *source, "-f", "jsonl", *args], input=data if isinstance(data, bytes) else None
    )
    assert result.exit_code == 0, result.output
    return pl.read_ndjson(io.BytesIO(result.stdout_bytes)) if result.stdout_bytes.strip() else pl.DataFrame()


def fails(bundle: Path, data: bytes | Path, *args: str) -> str:
    source = ["-"] if isinstance(data, bytes) else [str(data)]
    result = runner.invoke(
        app, ["predict", str(bundle), *source, *args], input=data if isinstance(data, bytes) else None
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


BASE = {"user": "u1", "item": "i3", "x": 0.5, "t": 50}
ARRAYS = {"hist": ["i3", "i4", "i5"], "kinds": ["click", "buy", "click"], "times": [1, 2, 3]}
TEXT = {"hist": "i3|i4|i5", "kinds": "click|buy|click", "times": "1|2|3"}
EMPTY = {"hist": [], "kinds": [], "times": []}
NULL = {"hist": None, "kinds": None, "times": None}


def scores(frame: pl.DataFrame) -> Any:
    return frame.select(TASKS).to_numpy()


def test_an_array_and_text_score_the_same_next_to_each_other(bundle: Path) -> None:
    """A JSON history as an array or as "|"-separated text is the same history, whatever its
    neighbours are (an array next to text was read as the text ["i3", "i4", "i5"])."""
    alone = predict(bundle, jsonl([BASE | ARRAYS]))
    for mixed in ([BASE | ARRAYS, BASE | TEXT], [BASE | TEXT, BASE | ARRAYS]):
        got = predict(bundle, jsonl(mixed))
        for row in range(2):
            assert_kernel_close(scores(got)[row], scores(alone)[0], floor=1.0, what="array and text")
    parquet = io.BytesIO()
    pl.DataFrame([BASE | ARRAYS]).write_parquet(parquet)
    assert_kernel_close(scores(predict(bundle, parquet.getvalue())), scores(alone), floor=1.0, what="parquet")


@pytest.mark.parametrize("chunk", ["1", "2", "3", "1000"])
def test_empty_null_and_left_out_histories_do_not_depend_on_the_chunking(bundle: Path, chunk: str) -> None:
    """`[]`, null, a left-out key and an empty text are one empty history at any --chunk-rows."""
    left_out = dict(BASE)
    rows = [BASE | ARRAYS, BASE | EMPTY, BASE | NULL, left_out, BASE | {"hist": "", "kinds": "", "times": ""}]
    got = scores(predict(bundle, jsonl(rows), "--chunk-rows", chunk))
    empty = scores(predict(bundle, jsonl([BASE | EMPTY])))[0]
    for row in range(1, len(rows)):
        assert_kernel_close(got[row], empty, floor=1.0, what=f"row {row} at chunk {chunk}")


@pytest.mark.parametrize("value", [[], None])
@pytest.mark.parametrize("form", ["jsonl", "parquet"])
def test_a_file_whose_only_history_is_empty_is_an_empty_history(
    bundle: Path, tmp_path: Path, value: Any, form: str
) -> None:
    """The only row's history [] or null (polars types such a column null, or a list of nulls)
    is scored as an empty history, in predict, eval --data and preprocessing alike."""
    row = BASE | {"hist": value, "kinds": value, "times": value, "click": 1, "buy": 0}
    path = tmp_path / f"one.{form}"
    if form == "jsonl":
        path.write_bytes(jsonl([row]))
    else:
        pl.DataFrame([row]).write_parquet(path)
    expected = scores(predict(bundle, jsonl([BASE | EMPTY])))
    assert_kernel_close(scores(predict(bundle, path)), expected, floor=1.0, what=f"{form} {value}")
    evaluated = runner.invoke(app, ["eval", str(bundle), "--data", str(path), "--json"])
    assert evaluated.exit_code == 0, evaluated.output


def test_a_byte_order_mark_is_read_past(bundle: Path) -> None:
    body = jsonl([BASE | ARRAYS])
    assert_kernel_close(
        scores(predict(bundle, b"\xef\xbb\xbf" + body)), scores(predict(bundle, body)), floor=1.0, what="BOM"
    )
    csv = b"user,item,x,t,hist,kinds,times\nu1,i3,0.5,50,i3|i4|i5,click|buy|click,1|2|3\n"
    assert_kernel_close(
        scores(predict(bundle, b"\xef\xbb\xbf" + csv)), scores(predict(bundle, body)), floor=1.0, what="CSV BOM"
    )


def test_the_first_json_row_names_the_columns(bundle: Path) -> None:
    rows = [{k: v for k, v in (BASE | ARRAYS).items() if k != "kinds"}, BASE | ARRAYS]
    assert "the first row (line 1) has no key 'kinds'" in fails(bundle, jsonl(rows))


def test_a_truncated_gzip_is_named(bundle: Path, tmp_path: Path) -> None:
    body = gzip.compress(jsonl([BASE | ARRAYS] * 2000))
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(body[: len(body) // 2])
    assert "rows.jsonl.gz: the gzip data is truncated or damaged" in fails(bundle, path)
    evaluated = runner.invoke(app, ["eval", str(bundle), "--data", str(path)])
    assert evaluated.exit_code == 2 and "the gzip data is truncated or damaged" in evaluated.output


def test_export_force_never_leaves_a_reader_without_a_bundle(bundle: Path) -> None:
    """`mtl export --force` builds the new bundle beside the old and swaps the two in one step: a
    reader polling the bundle meanwhile always finds a manifest (two renames left a gap)."""
    import threading

    from mtlcli.export.bundle import load_bundle

    target = bundle.parent / "swapped"
    run = bundle.parent / "run"
    assert runner.invoke(app, ["export", str(run), "--out", str(target)]).exit_code == 0
    missing: list[int] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            if not (target / "manifest.json").is_file():
                missing.append(1)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(5):
            result = runner.invoke(app, ["export", str(run), "--out", str(target), "--force"])
            assert result.exit_code == 0, result.output
    finally:
        done.set()
        reader.join()
    assert not missing, f"no bundle at {target} {len(missing)} times"
    load_bundle(target)
    assert sorted(p.name for p in bundle.parent.iterdir() if p.name.startswith(".")) == []


# --- the property: no score depends on the chunking or the input's format --------------------------

Event = tuple[str, str, int]  # (id, behaviour type, timestamp)
HISTORY = st.one_of(
    st.none(),
    st.lists(
        st.tuples(st.sampled_from([*ITEMS[:6], "new", ""]), st.sampled_from(["click", "buy"]), st.integers(0, 99)),
        max_size=5,
    )
    .filter(lambda events: [e[0] for e in events] != [""])  # as text, one empty id is no id: an empty history
    .map(lambda events: sorted(events, key=lambda e: e[2])),
)
ROW = st.fixed_dictionaries(
    {
        "user": st.sampled_from(["u1", "u2", "u7", "nobody", None]),
        "item": st.sampled_from([*ITEMS[:4], None]),
        "x": st.one_of(st.none(), st.floats(-3, 3, allow_nan=False).map(lambda v: round(v, 3))),
        "t": st.integers(0, 99),
        "history": HISTORY,
        "form": st.sampled_from(["array", "text", "empty-array", "null", "left out", "empty text"]),
        "numbers as text": st.booleans(),
        "click": st.integers(0, 1),
        "buy": st.integers(0, 1),
    }
)


def as_lists(history: list[Event] | None) -> dict[str, list[Any] | None]:
    if history is None:
        return {"hist": None, "kinds": None, "times": None}
    return {"hist": [e[0] for e in history], "kinds": [e[1] for e in history], "times": [e[2] for e in history]}


def json_row(row: dict[str, Any], first: bool) -> dict[str, Any]:
    """One logical row as a JSON object, its history in the row's drawn form (an empty history in
    any of the empty forms; the first row names every key)."""
    out = {k: row[k] for k in ("user", "item", "x", "t", "click", "buy")}
    if row["numbers as text"]:
        out |= {"x": None if row["x"] is None else str(row["x"]), "t": str(row["t"])}
    lists = as_lists(row["history"])
    form = row["form"]
    if row["history"]:
        if form == "text":
            return out | {k: "|".join(map(str, v or [])) for k, v in lists.items()}
        return out | lists
    empty = {"array": [], "text": "", "empty-array": [], "null": None, "empty text": "", "left out": None}[form]
    if form == "left out" and not first:
        return out
    return out | {k: empty for k in lists}


def write_formats(rows: list[dict[str, Any]], directory: Path) -> dict[str, Path]:
    """The same logical rows as JSON lines (mixed forms), CSV ("|" between items) and Parquet."""
    paths = {"jsonl": directory / "rows.jsonl", "csv": directory / "rows.csv", "parquet": directory / "rows.parquet"}
    paths["jsonl"].write_bytes(jsonl([json_row(row, index == 0) for index, row in enumerate(rows)]))
    table = pl.DataFrame(
        [{k: row[k] for k in ("user", "item", "x", "t", "click", "buy")} | as_lists(row["history"]) for row in rows],
        schema={"user": pl.String, "item": pl.String, "x": pl.Float64, "t": pl.Int64, "click": pl.Int64,
                "buy": pl.Int64, "hist": pl.List(pl.String), "kinds": pl.List(pl.String), "times": pl.List(pl.Int64)},
    )  # fmt: skip
    table.write_parquet(paths["parquet"])
    table.with_columns(pl.col(c).cast(pl.List(pl.String)).list.join("|") for c in ("hist", "kinds", "times")).write_csv(
        paths["csv"]
    )
    return paths


@settings(max_examples=12, deadline=None)
@given(rows=st.lists(ROW, min_size=1, max_size=9), chunk=st.integers(1, 4))
def test_scores_do_not_depend_on_the_chunking_or_the_format_and_match_eval(
    bundle: Path, rows: list[dict[str, Any]], chunk: int
) -> None:
    from mtlcli.train.metrics import auc

    with tempfile.TemporaryDirectory() as scratch:
        paths = write_formats(rows, Path(scratch))
        whole = scores(predict(bundle, paths["jsonl"], "--chunk-rows", "1000"))
        for fmt, path in paths.items():
            for rows_at_a_time in (str(chunk), "1000"):
                got = scores(predict(bundle, path, "--chunk-rows", rows_at_a_time))
                assert_kernel_close(got, whole, floor=1.0, what=f"{fmt} in chunks of {rows_at_a_time}")
            evaluated = runner.invoke(app, ["eval", str(bundle), "--data", str(path), "--json"])
            assert evaluated.exit_code == 0, evaluated.output
            metrics = json.loads(evaluated.stdout)["tasks"]
            for k, task in enumerate(TASKS):
                labels = torch.tensor([float(row[task]) for row in rows])
                expected = auc(torch.from_numpy(whole[:, k]), labels) if 0 < labels.sum() < len(rows) else None
                if expected is None or metrics[task]["auc"] is None:
                    assert expected is None and metrics[task]["auc"] is None, (fmt, task, metrics[task])
                else:
                    assert metrics[task]["auc"] == pytest.approx(expected, abs=1e-6), (fmt, task)


# --- CSV rows whose reading depended on where a chunk started ---------------------------------------

CSV_HEADER = b"user,item,x,t,hist,kinds,times\n"
CSV_ROW = b"u1,i3,0.5,50,i3|i4|i5,click|buy|click,1|2|3\n"


@pytest.mark.parametrize("chunk", ["1", "2", "1000"])
@pytest.mark.parametrize(
    ("body", "expect"),
    [
        (CSV_ROW + b"u1,i3,0.5\n" + CSV_ROW, "line 3 has 3 fields, not 7 as the first row"),
        (CSV_ROW + CSV_ROW.replace(b"\n", b",9\n"), "line 3 has 8 fields, not 7 as the first row"),
        (CSV_ROW + b"\n" + CSV_ROW, "line 3 is blank"),
    ],
    ids=["short row", "long row", "blank line"],
)
def test_a_row_of_another_width_is_refused_at_any_chunking(bundle: Path, chunk: str, body: bytes, expect: str) -> None:
    """A short row was filled with missing values (scored, exit 0) or refused depending on
    --chunk-rows; a blank line was scored as a row of missing values."""
    assert f"standard input: {expect}" in fails(bundle, CSV_HEADER + body, "--chunk-rows", chunk)


def test_crlf_line_ends_read_as_plain_lines(bundle: Path) -> None:
    plain = scores(predict(bundle, CSV_HEADER + CSV_ROW * 3))
    crlf = scores(predict(bundle, (CSV_HEADER + CSV_ROW * 3).replace(b"\n", b"\r\n"), "--chunk-rows", "2"))
    assert_kernel_close(crlf, plain, floor=1.0, what="CRLF")
    quoted = CSV_HEADER + b'u1,i3,0.5,50,"i3|i4|i5",click|buy|click,1|2|3\r\n' + CSV_ROW
    assert_kernel_close(scores(predict(bundle, quoted))[0], plain[0], floor=1.0, what="quoted")


def test_rejected_rows_and_kept_histories_are_written_as_csv_text(bundle: Path, tmp_path: Path) -> None:
    """--rejects sets aside a row whose row time (or numeric value) is not finite, writing its
    lists as separated text (CSV holds no lists: this was a polars traceback), and --keep of a
    history writes it the same way into CSV output."""
    rows = [BASE | ARRAYS | {"t": "inf"}, BASE | ARRAYS | {"x": "-inf"}, BASE | ARRAYS]
    rejects = tmp_path / "rejects.csv"
    scored = predict(bundle, jsonl(rows), "--rejects", str(rejects))
    assert scored.height == 1
    assert pl.read_csv(rejects).select("row", "hist", "times", "reason").rows() == [
        (1, "i3|i4|i5", "1|2|3", "column 't': infinite value: inf"),
        (2, "i3|i4|i5", "1|2|3", "column 'x': infinite value: -inf"),
    ]
    result = runner.invoke(app, ["predict", str(bundle), "-", "--keep", "user,hist"], input=jsonl([BASE | ARRAYS]))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1].startswith("u1,i3|i4|i5,")


def test_a_parquet_input_without_a_feature_is_named_with_rejects(bundle: Path, tmp_path: Path) -> None:
    path = tmp_path / "nox.parquet"
    pl.DataFrame([BASE | ARRAYS]).drop("x").write_parquet(path)
    assert "input: column 'x' is not in the data" in fails(bundle, path, "--rejects", str(tmp_path / "r.csv"))


@pytest.mark.parametrize(
    ("data", "expect"),
    [
        (
            (CSV_HEADER + CSV_ROW).decode().encode("utf-16"),
            "cannot read it as text: it is UTF-16 text (it starts with a UTF-16 byte-order mark) "
            "hint: convert it first: iconv -f utf-16 -t utf-8",
        ),
        (
            CSV_HEADER + CSV_ROW.replace(b"u1", b"\xe9t\xe9"),
            "cannot read it as CSV: it is not UTF-8 text hint: convert it to UTF-8 first",
        ),
        (jsonl([BASE | ARRAYS]).replace(b"u1", b"\xe9"), "line 1: it is not UTF-8 text"),
        (
            CSV_HEADER.replace(b",", b";") + CSV_ROW.replace(b",", b";"),
            "column 'user' is not in the input hint: the header is one column 'user;item;x;t;hist;kinds;times': "
            "its fields are split by ';', not ','",
        ),
        (
            jsonl([BASE | {"hist": [["i3"]], "kinds": ["click"], "times": [1]}]),
            "line 1, key 'hist': holds an array inside its list",
        ),
    ],
    ids=["utf-16", "latin-1 csv", "latin-1 jsonl", "other separator", "nested list"],
)
def test_text_that_cannot_be_read_says_why(bundle: Path, data: bytes, expect: str) -> None:
    assert f"standard input: {expect}" in fails(bundle, data)
