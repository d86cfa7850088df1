"""Scoring raw rows with a bundle: read in chunks, encode with the bundle's schema, predict, fuse.

Everything here is a pure function or a generator; nothing prints. ``predict_chunks`` yields one
output frame per input chunk, so memory stays flat however long the input is.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import io
import itertools
import json
import math
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from mtlcli.data.batch import Batch, SplitTensors
from mtlcli.data.checks import ROW_COLUMN, checked_numbers, enforce_frame, number_exprs
from mtlcli.data.encode import (
    categorical_expr,
    encode_numeric,
    group_expr,
    history_checks,
    history_exprs,
    input_columns,
    list_columns,
)
from mtlcli.data.labels import LABEL_PREFIX, make_labels
from mtlcli.data.load import label_mask, sequence_arrays
from mtlcli.data.scan import NOT_UTF8, UTF16, is_utf8_error, require_columns, utf16_text
from mtlcli.data.schema import DataSchema, SequenceFeature
from mtlcli.errors import DataError, MtlError
from mtlcli.recipe.schema import Recipe
from mtlcli.registry import did_you_mean

DEFAULT_CHUNK_ROWS = 25_000  # peak memory ~600 MiB on census rows; 50,000 took ~920 MiB for no speed-up
Engine = Literal["torch", "onnxruntime"]


# --- reading raw rows in chunks -----------------------------------------------------------------


@dataclass(frozen=True)
class InputFormat:
    """How raw rows are laid out: the recipe's data section, with ``header`` overridable."""

    fmt: Literal["csv", "parquet", "jsonl"]
    header: bool
    columns: list[str] | None
    separator: str
    strip: bool
    missing: list[str]
    labels: tuple[str, ...] = ()  # columns that header-less rows may leave out
    lists: dict[str, str] = field(default_factory=dict)  # list columns -> the separator of their text form

    @classmethod
    def from_recipe(cls, recipe: Recipe, schema: DataSchema, name: str, header: bool | None = None) -> InputFormat:
        data = recipe.data
        fmt: Literal["csv", "parquet", "jsonl"]
        if name.endswith((".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")):
            fmt = "jsonl"  # one JSON object per line: lists (behaviour histories) as arrays
        elif data.format == "auto":
            fmt = "parquet" if name.endswith((".parquet", ".pq")) else "csv"
        else:
            fmt = data.format
        use_header = data.header if header is None else header
        # A file with its own header names its columns; the recipe's list is for header-less files.
        columns = None if (header and not data.header) else data.columns
        labels = tuple(t.column for t in schema.tasks)
        separator = data.separator.strip() or data.separator
        return cls(fmt, use_header, columns, separator, data.strip, list(data.missing), labels, list_columns(schema))


def open_input(source: str | Path, stdin: IO[bytes] | None = None) -> IO[bytes]:
    """A binary stream for a path or ``-`` (stdin); gzip is recognised by its magic bytes."""
    if str(source) == "-":
        if stdin is None:
            raise DataError("--input -: no standard input")
        stream: Any = stdin if hasattr(stdin, "peek") else io.BufferedReader(stdin)  # type: ignore[type-var]
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"{source}: input file not found", "give a CSV/Parquet file, or - for standard input")
        stream = path.open("rb")
    if stream.peek(2)[:2] == b"\x1f\x8b":
        name = "standard input" if str(source) == "-" else str(source)
        return io.BufferedReader(_Gunzip(stream, name))
    return stream  # type: ignore[no-any-return]


class _Gunzip(io.RawIOBase):
    """The decompressed bytes of a gzip stream; damaged or truncated gzip data is a DataError
    naming the input, at the point where it is read."""

    def __init__(self, stream: IO[bytes], name: str) -> None:
        super().__init__()
        self._gzip = gzip.GzipFile(fileobj=stream)
        self._name = name

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._gzip.read1(len(buffer))
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise DataError(
                f"{self._name}: the gzip data is truncated or damaged ({_first_line(exc)})",
                "compress the file again (gzip -t FILE tests one), or give it uncompressed",
            ) from None
        buffer[: len(data)] = data
        return len(data)


def _check_input_columns(names: list[str], only: list[str] | None, source: str, separator: str = ",") -> None:
    """The input's column names are unique and hold every column that prediction reads."""
    twice = [c for i, c in enumerate(names) if c in names[:i]]
    if twice:
        raise DataError(f"{source}: the header names column {twice[0]!r} twice", "rename one of them")
    missing = [c for c in only or [] if c not in names]
    if missing:
        hint = f"the input has {len(names)} columns: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}"
        others = [mark for mark in ",;\t|" if len(names) == 1 and mark in names[0] and mark != separator]
        if others:  # a header read as one column: the file has another separator than the recipe's
            hint = (
                f"the header is one column {names[0]!r}: its fields are split by {others[0]!r}, "
                f"not {separator!r} (data.separator)"
            )
        raise DataError(f"{source}: column {missing[0]!r} is not in the input{did_you_mean(missing[0], names)}", hint)


def read_chunks(
    stream: IO[bytes], layout: InputFormat, name: str, chunk_rows: int, only: list[str] | None = None
) -> Iterator[pl.DataFrame]:
    """Raw rows as frames of at most ``chunk_rows`` rows, cleaned like preprocessing does (names
    from the header or the recipe, values stripped, missing markers -> null) with a ``__row`` index.

    A UTF-8 byte-order mark is skipped. CSV is split at line ends, except inside a quoted value (a
    chunk is extended until its quotes balance), and every row must have the first row's number of
    fields (``_check_fields``), so that no row is read differently where a chunk starts. Parquet (the recipe's format, or any input starting with Parquet's magic bytes) is
    read a slice at a time from the file (a stream, e.g. standard input, is
    first spooled to a temporary file, since Parquet is read from its end). ``only`` keeps just
    those columns (the ones present; the caller reports missing ones), which saves cleaning the rest.
    """
    if chunk_rows < 1:
        raise DataError(f"--chunk-rows must be at least 1, not {chunk_rows}")
    offset = 0
    peek = getattr(stream, "peek", None)
    if callable(peek) and peek(3)[:3] == codecs.BOM_UTF8:  # a byte-order mark says UTF-8; it is no value
        stream.read(3)
    if callable(peek) and layout.fmt != "parquet" and utf16_text(peek(2)):
        raise DataError(f"{name}: cannot read it as text: {UTF16[0]}", UTF16[1])
    if layout.fmt == "parquet" or (callable(peek) and peek(4)[:4] == b"PAR1"):  # Parquet's magic bytes
        yield from _parquet_chunks(stream, layout, name, chunk_rows, only)
        return
    if layout.fmt == "jsonl" or (callable(peek) and peek(1)[:1] == b"{"):  # JSON lines
        yield from _jsonl_chunks(stream, layout, name, chunk_rows, only)
        return
    names = layout.columns
    if layout.header:
        first = stream.readline()
        if not first.strip():
            raise DataError(f"{name}: the input is empty (no header line)", "give at least one row to score")
        header = _parse_csv(first, layout, name, None, has_header=True).columns
        cells = next(csv.reader([first.decode("utf-8", "replace")], delimiter=layout.separator.strip() or ","), [])
        cells = [c.strip() for c in cells] if layout.strip else cells
        _check_input_columns(cells, None, name)  # polars renames a repeated name: look at the line itself
        if layout.columns is None:
            names = [c.strip() for c in header] if layout.strip else header
        elif len(header) != len(layout.columns):
            raise DataError(
                f"{name}: the header has {len(header)} columns but data.columns names {len(layout.columns)}",
                "list exactly one name per column, in file order",
            )
    if names is not None:
        _check_input_columns(names, only, name, layout.separator)
    lines = iter(stream)
    number = 2 if layout.header else 1  # the file line of the chunk's first line
    width: int | None = None  # fields per row: the first row's, for the whole input
    single = names is not None and len(names) == 1
    while True:
        block = list(itertools.islice(lines, chunk_rows))
        if not block:
            break
        quotes = sum(line.count(b'"') for line in block)
        if quotes % 2:  # a quoted value holds a line break: read on to its end
            for line in lines:
                block.append(line)
                quotes += line.count(b'"')
                if quotes % 2 == 0:
                    break  # still unbalanced at the end of input: the CSV reader says so
        if width is None and b'"' not in block[0]:
            width = block[0].count(layout.separator.encode()) + 1
        if width is not None:  # before the reader, whose message would depend on where the chunk starts
            _check_fields(block, number, width, layout.separator, name, single)
        raw = _parse_csv(b"".join(block), layout, name, names)
        if width is None:
            width = raw.width
            _check_fields(block, number, width, layout.separator, name, single)
        yield _clean(raw, layout, offset, only)
        offset += raw.height
        number += len(block)
    if offset == 0:
        raise DataError(f"{name}: the input has no data rows", "give at least one row to score")


def _check_fields(block: list[bytes], number: int, width: int, separator: str, name: str, single: bool) -> None:
    """Every line of ``block`` (the first is file line ``number``) that holds no quote and starts
    outside a quoted value has ``width`` fields: the CSV reader would fill a short row with
    missing values, or refuse it, depending on where the chunk starts. A blank line is no row
    (unless the rows have a ``single`` column, where it is a missing value)."""
    mark = separator.encode()
    inside = False
    for offset, line in enumerate(block):
        if not inside and b'"' not in line:
            fields = line.count(mark) + 1
            if not line.strip() and not single:
                raise DataError(f"{name}: line {number + offset} is blank", "remove blank lines: each line is a row")
            if fields != width:
                raise DataError(
                    f"{name}: line {number + offset} has {fields} fields, not {width} as the first row",
                    "give every row the same columns (fix or drop that row, or check the separator)",
                )
        inside ^= line.count(b'"') % 2 == 1


def _local_file(stream: IO[bytes]) -> str | None:
    """The path of ``stream`` when it reads a regular file directly (not gzip, not a pipe)."""
    raw = getattr(stream, "raw", None)
    path = getattr(raw, "name", None)
    if isinstance(raw, io.FileIO) and isinstance(path, str) and Path(path).is_file():
        return path
    return None


def _parquet_chunks(
    stream: IO[bytes], layout: InputFormat, name: str, chunk_rows: int, only: list[str] | None
) -> Iterator[pl.DataFrame]:
    with contextlib.ExitStack() as stack:
        path = _local_file(stream)
        if path is None:
            spool = stack.enter_context(tempfile.NamedTemporaryFile(prefix="mtl-input-", suffix=".parquet"))
            shutil.copyfileobj(stream, spool, 1 << 20)
            spool.flush()
            path = spool.name
        try:
            lazy = pl.scan_parquet(path)
            total = int(lazy.select(pl.len()).collect().item())
            if only is not None:
                present = lazy.collect_schema().names()
                lazy = lazy.select([c for c in dict.fromkeys(only) if c in present])
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise DataError(f"{name}: cannot read it as Parquet: {_first_line(exc)}") from None
        if total == 0:
            raise DataError(f"{name}: the input has no data rows", "give at least one row to score")
        step = min(chunk_rows, total)  # a slice longer than the file is refused by polars
        for start in range(0, total, step):
            try:
                frame = lazy.slice(start, step).collect()
            except (pl.exceptions.PolarsError, OSError) as exc:
                raise DataError(f"{name}: cannot read it as Parquet: {_first_line(exc)}") from None
            yield _clean(frame, layout, start, only)


def _jsonl_chunks(
    stream: IO[bytes], layout: InputFormat, name: str, chunk_rows: int, only: list[str] | None
) -> Iterator[pl.DataFrame]:
    """JSON lines, ``chunk_rows`` at a time: one object per line (blank lines are skipped).

    Each value is read on its own, never typed by its neighbours, so no result depends on the
    chunking: a list column's value (a history's ids, types or timestamps) is an array, or text
    with the items between the history's separator; any other value is text, as a CSV cell
    (numbers written out, true/false); null or a key left out of a row is a missing value. The
    first row names the columns: it must hold every column that is read (``only``; all of its
    keys without it)."""
    offset = 0
    columns: list[str] | None = None
    lines = ((number, line) for number, line in enumerate(stream, start=1) if line.strip())
    while True:
        block = list(itertools.islice(lines, chunk_rows))
        if not block:
            break
        objects = [_json_object(line, number, name) for number, line in block]
        if columns is None:
            columns = _first_row_columns(objects[0], only, name, block[0][0])
        values = {column: [row.get(column) for row in objects] for column in columns}
        frame = pl.DataFrame(
            [_json_series(column, values[column], layout, name, block) for column in columns],
            schema={c: pl.List(pl.String) if c in layout.lists else pl.String for c in columns},
        )
        yield _clean(frame, layout, offset, only)
        offset += frame.height
    if offset == 0:
        raise DataError(f"{name}: the input has no data rows", "give at least one row to score")


def _json_object(line: bytes, number: int, name: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except UnicodeDecodeError:
        raise DataError(f"{name}: line {number}: {NOT_UTF8[0]}", NOT_UTF8[1]) from None
    except ValueError as exc:
        raise DataError(
            f"{name}: line {number} is not JSON: {_first_line(exc)}", "give one JSON object per line"
        ) from None
    if not isinstance(value, dict):
        raise DataError(
            f"{name}: line {number} holds a JSON {type(value).__name__}, not an object",
            'give one JSON object per line, e.g. {"user": "u1", "hist": ["i3", "i4"]}',
        )
    return value


def _first_row_columns(first: dict[str, Any], only: list[str] | None, name: str, number: int) -> list[str]:
    if only is None:
        return list(first)
    missing = [c for c in only if c not in first]
    if missing:
        raise DataError(
            f"{name}: the first row (line {number}) has no key {missing[0]!r}{did_you_mean(missing[0], list(first))}",
            f'the first row names the columns read: write "{missing[0]}": null there for a missing value '
            "(later rows may leave a key out)",
        )
    return list(dict.fromkeys(only))


def _json_series(
    column: str, values: list[Any], layout: InputFormat, name: str, block: list[tuple[int, bytes]]
) -> pl.Series:
    """One column of a chunk of JSON objects: text, or lists of text for a list column."""
    separator = layout.lists.get(column)
    if separator is None:
        texts = [_json_text(v, name, block[i][0], column) for i, v in enumerate(values)]
        return pl.Series(column, texts, pl.String)
    items: list[str | None] = []  # every row's items, one after the other
    owners: list[int] = []  # the row of each item
    present: list[bool] = []  # the row has a list (maybe empty), not a missing value
    for index, value in enumerate(values):
        line = block[index][0]
        parts: list[str | None] | None
        if isinstance(value, list):
            parts = [_json_text(item, name, line, column, "inside its list") for item in value]
        else:
            text = _json_text(value, name, line, column)
            missing = text is None or (text.strip() if layout.strip else text) in layout.missing
            parts = None if missing or text is None else list(text.split(separator))
        present.append(parts is not None)
        if parts:
            items += parts
            owners += [index] * len(parts)
    # the lists built in one grouping: a polars list per row built from Python took most of the time
    flat = pl.DataFrame({"row": owners, "item": items}, schema={"row": pl.Int64, "item": pl.String})
    grouped = flat.group_by("row", maintain_order=True).agg(pl.col("item"))
    rows = pl.DataFrame(
        {"row": range(len(values)), "present": present}, schema={"row": pl.Int64, "present": pl.Boolean}
    )
    joined = rows.join(grouped, on="row", how="left", maintain_order="left")
    lists = pl.when(pl.col("present")).then(pl.col("item").fill_null(pl.lit([], pl.List(pl.String))))
    return joined.select(lists.alias(column)).to_series()


def _json_text(
    value: Any, name: str, line: int, column: str, place: str = "where a single value belongs"
) -> str | None:
    """A JSON scalar as the text a CSV cell would hold (null -> None); ``place`` says where it
    was, for the error about an array or object."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    kind = "an array" if isinstance(value, list) else "an object"
    raise DataError(
        f"{name}: line {line}, key {column!r}: holds {kind} {place}",
        "give a number, a text or null" + (" for each item" if place == "inside its list" else ""),
    )


def _parse_csv(
    data: bytes, layout: InputFormat, name: str, names: list[str] | None, has_header: bool = False
) -> pl.DataFrame:
    try:
        frame = pl.read_csv(data, has_header=has_header, separator=layout.separator, infer_schema=False, quote_char='"')
    except (pl.exceptions.PolarsError, OSError) as exc:
        if is_utf8_error(_first_line(exc)):
            raise DataError(f"{name}: cannot read it as CSV: {NOT_UTF8[0]}", NOT_UTF8[1]) from None
        raise DataError(
            f"{name}: cannot read it as CSV: {_first_line(exc)}", "check the separator and the header option"
        ) from None
    if names is not None:
        short = [c for c in names if c not in layout.labels]
        if frame.width == len(short) and frame.width != len(names):
            names = short  # rows without the label columns
        if frame.width != len(names):
            raise DataError(
                f"{name}: a row has {frame.width} columns but {len(names)} are expected ({', '.join(names[:6])}, ...)",
                "give rows in the recipe's column order, or a file with a header (--header)",
            )
        frame.columns = names
    return frame


def _clean(frame: pl.DataFrame, layout: InputFormat, offset: int, only: list[str] | None) -> pl.DataFrame:
    if only is not None:
        frame = frame.select([c for c in dict.fromkeys(only) if c in frame.columns])
    strings = [c for c, t in frame.schema.items() if t == pl.String]
    exprs = []
    for column in strings:
        col = pl.col(column).str.strip_chars() if layout.strip else pl.col(column)
        exprs.append(pl.when(col.is_in(layout.missing)).then(None).otherwise(col).alias(column))
    return frame.with_columns(exprs).with_row_index(ROW_COLUMN, offset=offset)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- encoding -------------------------------------------------------------------------------------


Inputs = dict[str, Tensor]  # the model's inputs by Batch field: categorical, numeric, and histories


def encode_inputs(frame: pl.DataFrame, schema: DataSchema) -> Inputs:
    """Raw rows -> the model's inputs, exactly as preprocessing encoded the training data (unseen
    values -> id 0, missing -> id 1): ``categorical`` int64 [N, F_cat], ``numeric`` float32
    [N, F_num], and with behaviour histories ``sequences`` int64 [N, S, L] and
    ``sequence_lengths`` [N, S] (the caller passes each row's history lists: the bundle holds no
    event log)."""
    require_columns(frame.columns, input_columns(schema), "input")
    n = frame.height
    # every feature in one query
    cats = frame.select([categorical_expr(f, frame.get_column(f.name)) for f in schema.categorical]).get_columns()
    nums = [encode_numeric(checked_numbers(frame, f.name, f"input column {f.name!r}"), f) for f in schema.numeric]
    inputs = {
        "categorical": torch.from_numpy(np.require(pl.DataFrame(cats).to_numpy(), np.int64, ["C", "W"]))
        if cats
        else torch.zeros((n, 0), dtype=torch.int64),
        "numeric": torch.from_numpy(np.require(pl.DataFrame(nums).to_numpy(), np.float32, ["C", "W"]))
        if nums
        else torch.zeros((n, 0), dtype=torch.float32),
    }
    if schema.sequences:
        types = dict(frame.schema)

        def where(f: SequenceFeature, key: str) -> str:
            return f"input column {f.columns()[key]!r}"

        enforce_frame(frame, [check for f in schema.sequences for check in history_checks(f, types, where)])
        exprs = history_exprs(schema.sequences, schema.categorical, types, where)
        ids, lengths = sequence_arrays(frame.select(exprs), schema, n)
        inputs["sequences"], inputs["sequence_lengths"] = torch.from_numpy(ids), torch.from_numpy(lengths)
    return inputs


# --- running the model ------------------------------------------------------------------------------


class Scorer(Protocol):
    def __call__(self, categorical: Tensor, numeric: Tensor, **histories: Tensor) -> Tensor:
        """Encoded inputs (see ``encode_inputs``) -> logits [N, T]."""
        ...


class TorchScorer:
    def __init__(self, model: nn.Module, n_tasks: int, batch_size: int = 65536) -> None:
        self.model = model.eval()
        self.n_tasks = n_tasks
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, categorical: Tensor, numeric: Tensor, **histories: Tensor) -> Tensor:
        n = categorical.shape[0]
        labels = torch.zeros((n, self.n_tasks))
        data = SplitTensors(categorical, numeric, labels, torch.ones_like(labels, dtype=torch.bool), **histories)
        outs = [self.model(batch) for batch in data.batches(self.batch_size)]
        return torch.cat(outs) if outs else labels


class OnnxScorer:
    def __init__(self, session: Any) -> None:
        self.session = session

    def __call__(self, categorical: Tensor, numeric: Tensor, **histories: Tensor) -> Tensor:
        feed = {"categorical": categorical.numpy(), "numeric": numeric.numpy()}
        feed |= {name: value.numpy() for name, value in histories.items()}
        out = self.session.run(None, feed)[0]
        return torch.from_numpy(out)


class BatchInputs(nn.Module):
    """The model as a function of the encoded tensors (what ONNX export traces): categorical and
    numeric, then the histories and their lengths when the model reads any."""

    def __init__(self, model: nn.Module, n_tasks: int) -> None:
        super().__init__()
        self.model = model
        self.n_tasks = n_tasks

    def forward(
        self,
        categorical: Tensor,
        numeric: Tensor,
        sequences: Tensor | None = None,
        sequence_lengths: Tensor | None = None,
    ) -> Tensor:
        n = categorical.shape[0]
        labels = torch.zeros((n, self.n_tasks), dtype=numeric.dtype)
        mask = torch.ones_like(labels, dtype=torch.bool)
        return self.model(Batch(categorical, numeric, labels, mask, None, sequences, sequence_lengths))


def task_outputs(logits: Tensor, schema: DataSchema) -> dict[str, np.ndarray]:
    """Per task: the probability (float64 sigmoid of the logit) for binary tasks, the value otherwise."""
    z = logits.double().numpy()
    out = {}
    for k, task in enumerate(schema.tasks):
        out[task.name] = 1.0 / (1.0 + np.exp(-z[:, k])) if task.type == "binary" else z[:, k].copy()
    return out


# --- score fusion ------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<name>[A-Za-z_][\w.\-]*)|(?P<op>[*^]))"
)


@dataclass(frozen=True)
class ScoreSpec:
    """score = Π_k p_k^{w_k} (× factor column): the PLE paper's ranking fusion."""

    weights: dict[str, float]
    factor: str | None = None

    def apply(self, outputs: dict[str, np.ndarray], factor: np.ndarray | None) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            score = np.ones_like(next(iter(outputs.values())))
            for task, weight in self.weights.items():
                score = score * np.power(outputs[task], weight)
            if factor is not None:
                score = score * factor
        return score


def parse_score(expression: str, tasks: list[str]) -> dict[str, float]:
    """Parse ``"click^1 * like^0.5"`` into {task: power}. A bare name has power 1. Never evaluates code."""
    tokens: list[tuple[str, str]] = []
    position = 0
    text = expression.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise MtlError(
                f"--score: cannot read {text[position:].strip()!r} in {expression!r}",
                'write task^power terms joined by *, e.g. "click^1 * like^0.5"',
            )
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind)))
        position = match.end()
    weights: dict[str, float] = {}
    index = 0

    def fail(why: str) -> MtlError:
        return MtlError(
            f"--score: {why} in {expression!r}", 'write task^power terms joined by *, e.g. "click^1 * like^0.5"'
        )

    while True:
        if index >= len(tokens) or tokens[index][0] != "name":
            raise fail("expected a task name")
        name = tokens[index][1]
        if name not in tasks:
            raise MtlError(
                f"--score: {name!r} is not a task of this model{did_you_mean(name, tasks)}",
                f"tasks: {', '.join(tasks)}",
            )
        if name in weights:
            raise fail(f"{name!r} appears twice")
        index += 1
        power = 1.0
        if index < len(tokens) and tokens[index] == ("op", "^"):
            if index + 1 >= len(tokens) or tokens[index + 1][0] != "number":
                raise fail(f"expected a number after {name}^")
            power = float(tokens[index + 1][1])
            if not math.isfinite(power):
                raise fail(f"the power of {name} is not finite")
            index += 2
        weights[name] = power
        if index == len(tokens):
            return weights
        if tokens[index] != ("op", "*"):
            raise fail(f"expected * after {name}")
        index += 1


# --- the whole pipeline ----------------------------------------------------------------------------


def row_problems(chunk: pl.DataFrame, names: list[str]) -> pl.Series:
    """Why each row cannot be scored (a numeric column ``names`` holds a value that is not a
    finite number), or null where it can: [N] strings."""
    reasons: list[pl.Expr] = []
    for name in names:
        values, text = number_exprs(name, chunk.schema[name])
        reasons.append(
            pl.when(values.is_null() & text.is_not_null())
            .then(pl.format("column {}: not a number: {}", pl.lit(repr(name)), text))
            .when(values.is_infinite().fill_null(False))
            .then(pl.format("column {}: infinite value: {}", pl.lit(repr(name)), text))
        )
    if not reasons:
        return pl.Series("reason", [None] * chunk.height, dtype=pl.String)
    return chunk.select(pl.coalesce(reasons).alias("reason")).to_series()


def _lists_as_text(frame: pl.DataFrame, separators: dict[str, str]) -> pl.DataFrame:
    """Each list column as the text a CSV input gives it (items between the history's separator),
    so that rejected rows can be written as CSV and read back."""
    lists = [c for c, t in frame.schema.items() if isinstance(t, pl.List)]
    return frame.with_columns(
        pl.col(c).list.eval(pl.element().cast(pl.String)).list.join(separators.get(c, "|")) for c in lists
    )


def predict_chunks(
    chunks: Iterator[pl.DataFrame],
    schema: DataSchema,
    scorer: Scorer,
    keep: list[str] | None = None,
    score: ScoreSpec | None = None,
    reject: Callable[[pl.DataFrame], None] | None = None,
) -> Iterator[pl.DataFrame]:
    """For each raw chunk: the ``keep`` columns (as read), one column per task, then ``score``.

    With ``reject``, rows that cannot be scored (a numeric value, or a history's row time, that is
    not a finite number) are passed to it, with a ``reason`` column and their lists as text,
    instead of stopping the run; the others are scored."""
    keep = keep or []
    for chunk in chunks:
        extra = keep + ([score.factor] if score and score.factor else [])
        require_columns(chunk.columns, extra, "--keep/--score-factor")
        require_columns(chunk.columns, input_columns(schema), "input")
        if reject is not None:
            row_times = [
                f.row_time for f in schema.sequences if f.row_time and not chunk.schema[f.row_time].is_temporal()
            ]
            checked = [f.name for f in schema.numeric] + row_times + ([score.factor] if score and score.factor else [])
            reasons = row_problems(chunk, checked)
            bad = reasons.is_not_null()
            if bad.any():
                rejected = chunk.filter(bad).with_columns(reasons.filter(bad))
                rows = (rejected.get_column(ROW_COLUMN) + 1).alias("row") if ROW_COLUMN in rejected.columns else None
                rejected = _lists_as_text(rejected.drop(ROW_COLUMN, strict=False), list_columns(schema))
                reject(rejected.insert_column(0, rows) if rows is not None else rejected)
                chunk = chunk.filter(~bad)
        inputs = encode_inputs(chunk, schema)
        outputs = task_outputs(scorer(**inputs), schema)
        columns = [chunk.get_column(c) for c in keep]
        columns += [pl.Series(name, values) for name, values in outputs.items()]
        if score is not None:
            factor = None
            if score.factor:
                factor = checked_numbers(chunk, score.factor, "--score-factor").to_numpy()
            columns.append(pl.Series("score", score.apply(outputs, factor), nan_to_null=True))
        yield pl.DataFrame(columns)


def needed_columns(schema: DataSchema, keep: list[str] | None = None, score: ScoreSpec | None = None) -> list[str]:
    """The input columns prediction reads: the model's (``input_columns``), then ``--keep`` and the
    score factor."""
    return list(
        dict.fromkeys([*input_columns(schema), *(keep or []), *([score.factor] if score and score.factor else [])])
    )


def evaluation_columns(schema: DataSchema) -> list[str]:
    """The input columns evaluating a bundle reads: the model's, each task's label and sample-space
    columns, and data.group."""
    labels = [c for t in schema.tasks for c in (t.column, t.space_column) if c is not None]
    return list(dict.fromkeys([*input_columns(schema), *labels, *([schema.group] if schema.group else [])]))


def labelled_tensors(frame: pl.DataFrame, recipe: Recipe, schema: DataSchema) -> SplitTensors:
    """A labelled raw frame -> encoded tensors with labels (for evaluating a bundle)."""
    inputs = encode_inputs(frame, schema)
    labels_frame = make_labels(frame, recipe)
    names = [LABEL_PREFIX + t for t in schema.task_names]
    labels = torch.from_numpy(np.require(labels_frame.select(names).to_numpy(), np.float32, ["C", "W"]))
    groups = None
    if schema.group is not None:
        require_columns(frame.columns, [schema.group], "data.group")
        ids = frame.select(group_expr(frame.get_column(schema.group), schema.group)).to_series()
        groups = torch.from_numpy(np.require(ids.to_numpy(), np.int64, ["C", "W"]))
    mask = label_mask(labels_frame, schema, labels)
    return SplitTensors(labels=labels, label_mask=mask, groups=groups, **inputs)


def output_columns(schema: DataSchema, keep: list[str] | None, score: bool) -> list[str]:
    return [*(keep or []), *schema.task_names, *(["score"] if score else [])]


def check_output_names(schema: DataSchema, keep: list[str], score: bool) -> None:
    taken = set(schema.task_names) | ({"score"} if score else set())
    clash = [c for c in keep if c in taken]
    if clash:
        raise MtlError(f"--keep: {clash[0]!r} is also an output column name", "keep other columns, or rename the input")
    if len(set(keep)) != len(keep):
        raise MtlError("--keep: a column is listed twice")


def write_chunks(
    frames: Iterator[pl.DataFrame],
    fmt: str,
    sink: IO[bytes],
    spool: Path | None = None,
    separators: dict[str, str] | None = None,
) -> int:
    """Write frames as CSV (one header), JSON lines or Parquet; returns the rows written. In CSV a
    list column (a history kept with --keep) is text with its items between its ``separators``
    entry ("|" by default), as a CSV input holds it.

    Parquet cannot be appended to: each chunk goes to a part file under ``spool`` (a scratch
    directory), and the parts are streamed into one file at the end.
    """
    rows = 0
    if fmt == "parquet":
        if spool is None:
            raise ValueError("parquet output needs a spool directory")
        parts = []
        for index, frame in enumerate(frames):
            part = spool / f"part-{index:06d}.parquet"
            frame.write_parquet(part)
            parts.append(part)
            rows += frame.height
        if parts:
            pl.scan_parquet(parts).sink_parquet(sink)
        return rows
    for index, frame in enumerate(frames):
        buffer = io.BytesIO()
        if fmt == "csv":
            _lists_as_text(frame, separators or {}).write_csv(buffer, include_header=index == 0)
        else:
            frame.write_ndjson(buffer)
        sink.write(buffer.getvalue())
        rows += frame.height
    return rows
