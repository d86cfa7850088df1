"""``schema.json``: what preprocessing learnt on train (vocabularies, statistics) and the tasks.

Training, evaluation and export all read it; a model is only ever fed data encoded with the
schema it was trained with.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mtlcli.errors import ArtifactError
from mtlcli.fileio import write_json

SCHEMA_VERSION = 1
OOV_ID = 0
MISSING_ID = 1
FIRST_ID = 2
SPLIT_NAMES = ("train", "valid", "test")


@dataclass(frozen=True)
class CategoricalFeature:
    """Ids: 0 = out of vocabulary (unseen on train or rarer than min_count), 1 = missing,
    2.. = the vocabulary in order (most frequent first). With ``hash_buckets`` there is no
    vocabulary and id = 2 + bucket."""

    name: str
    vocab: list[str]
    min_count: int = 1
    hash_buckets: int | None = None
    max_size: int | None = None  # the vocabulary was cut to this many most frequent values

    @property
    def cardinality(self) -> int:
        return FIRST_ID + (self.hash_buckets if self.hash_buckets else len(self.vocab))


@dataclass(frozen=True)
class SequenceFeature:
    """A history of ids from list column ``column``, encoded most recent first, cut to
    ``max_len``. With ``vocabulary`` (a categorical feature) its ids are that feature's ids and
    share its embedding rows; else ``vocab`` is its own (ids as for CategoricalFeature).

    ``type_column`` and ``time_column`` name parallel lists (one behaviour type, one timestamp per
    id): only ids whose type is in ``types`` are kept (all when empty), and with ``row_time`` only
    ids whose timestamp is strictly before the row's. Timestamps are oldest first."""

    name: str
    column: str
    max_len: int
    pooling: str
    vocabulary: str | None = None
    target: str | None = None
    vocab: list[str] = field(default_factory=list)
    min_count: int = 1
    separator: str = "|"
    type_column: str | None = None
    types: list[str] = field(default_factory=list)
    time_column: str | None = None
    row_time: str | None = None
    weights: str = "din"  # attention: DIN's scores as they are, or "softmax" (absent in older schemas)

    @property
    def cardinality(self) -> int:
        return FIRST_ID + len(self.vocab)

    def columns(self) -> dict[str, str]:
        """The raw columns it reads, by recipe key: ``column`` and those of the set parallel lists."""
        keys = {"column": self.column, "type_column": self.type_column}
        keys |= {"time_column": self.time_column, "row_time": self.row_time}
        return {key: column for key, column in keys.items() if column is not None}


@dataclass(frozen=True)
class NumericFeature:
    """x -> fill nulls with ``fill_value`` -> signed log1p if ``log1p`` -> (x - center) / scale."""

    name: str
    fill_value: float
    log1p: bool
    center: float
    scale: float
    transforms: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TaskInfo:
    name: str
    type: str
    column: str
    positive: list[str] | None = None
    threshold: float | None = None
    space_task: str | None = None
    space_column: str | None = None

    @property
    def has_space(self) -> bool:
        return self.space_task is not None or self.space_column is not None

    @property
    def space(self) -> str | None:
        """A human description of the task's sample space, or None."""
        if self.space_task is not None:
            return f"{self.space_task} = 1"
        if self.space_column is not None:
            return f"{self.space_column} is true"
        return None


@dataclass(frozen=True)
class SplitInfo:
    rows: int
    label_mean: dict[str, float]
    positives: dict[str, int]
    oov_rate: dict[str, float]
    space_rows: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSchema:
    categorical: list[CategoricalFeature]
    numeric: list[NumericFeature]
    tasks: list[TaskInfo]
    splits: dict[str, SplitInfo]
    source: dict[str, Any]
    data_key: str
    version: int = SCHEMA_VERSION
    group: str | None = None  # data.group: the encoded splits carry its ids for GAUC
    warnings: list[str] = field(default_factory=list)  # degenerate data, found by preprocessing
    sequences: list[SequenceFeature] = field(default_factory=list)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def cardinalities(self) -> list[int]:
        return [f.cardinality for f in self.categorical]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "schema") -> DataSchema:
        try:
            if data.get("version") != SCHEMA_VERSION:
                raise ArtifactError(
                    f"{where}: schema version {data.get('version')!r} is not {SCHEMA_VERSION}",
                    "re-run `mtl preprocess` with this version of mtl",
                )
            return cls(
                categorical=[CategoricalFeature(**f) for f in data["categorical"]],
                numeric=[NumericFeature(**f) for f in data["numeric"]],
                tasks=[TaskInfo(**t) for t in data["tasks"]],
                splits={k: SplitInfo(**v) for k, v in data["splits"].items()},
                source=dict(data["source"]),
                data_key=str(data["data_key"]),
                version=int(data["version"]),
                group=data.get("group"),
                warnings=[str(w) for w in data.get("warnings", [])],
                sequences=[SequenceFeature(**f) for f in data.get("sequences", [])],
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ArtifactError(f"{where}: not a valid mtl schema ({exc!r})", "re-run `mtl preprocess`") from None

    @classmethod
    def load(cls, path: Path) -> DataSchema:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ArtifactError(f"{path}: no schema.json here", "run `mtl preprocess RECIPE` first") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{path}: not valid JSON ({exc})", "re-run `mtl preprocess`") from None
        if not isinstance(data, dict):
            raise ArtifactError(f"{path}: not a valid mtl schema", "re-run `mtl preprocess`")
        return cls.from_dict(data, str(path))
