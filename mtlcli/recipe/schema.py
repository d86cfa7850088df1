"""The recipe format: one YAML document with sections data, features, tasks, model, loss, train.

Every section is a pydantic model that refuses unknown keys. The ``model`` and ``loss`` sections
name a component (a sharing scheme, a weighting strategy); their remaining keys are validated
by that component's own parameter schema (see ``mtlcli.recipe.load``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    model_validator,
)


class Strict(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def _as_bytes(value: Any) -> Any:
    """A size: bytes as a number, or text such as ``512MiB``, ``2GiB``, ``1.5GB``."""
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number) :]
        if unit not in _UNITS or not number:
            raise ValueError(f"{value!r} is not a size: give bytes, or a number with KiB, MiB, GiB (or KB, MB, GB)")
        value = float(number) * _UNITS[unit]
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 1:
        raise ValueError(f"{value!r} is not a size: give bytes, or a number with KiB, MiB, GiB (or KB, MB, GB)")
    return int(value)


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str | int | float) else value


StrList = Annotated[list[str], BeforeValidator(_as_list)]

# --- data -------------------------------------------------------------------------------------


class ModuloSplit(Strict):
    """Row i goes to test if i % modulus is in ``test``, to valid if in ``valid``, else to train."""

    by: Literal["modulo"]
    modulus: Annotated[int, Field(ge=2)] = 5
    test: list[NonNegativeInt] = [0]
    valid: list[NonNegativeInt] = [1]

    @model_validator(mode="after")
    def _check(self) -> ModuloSplit:
        for residue in [*self.test, *self.valid]:
            if residue >= self.modulus:
                raise ValueError(f"residue {residue} is not below modulus {self.modulus}")
        if set(self.test) & set(self.valid):
            raise ValueError("test and valid residues overlap")
        if len(set(self.test) | set(self.valid)) >= self.modulus:
            raise ValueError("no residue is left for the train split")
        return self


class RandomSplit(Strict):
    """Each row goes to valid / test with the given probabilities, from a seeded generator."""

    by: Literal["random"]
    valid: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    test: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> RandomSplit:
        if self.valid + self.test >= 1.0:
            raise ValueError("valid + test must leave rows for train (their sum is >= 1)")
        return self


class ColumnSplit(Strict):
    """The value of ``column`` says the split; rows with other values are dropped."""

    by: Literal["column"]
    column: str
    train: StrList = ["train"]
    valid: StrList = ["valid"]
    test: StrList = ["test"]


class FilesSplit(Strict):
    """Each split is its own file (or files); ``data.source`` is not used."""

    by: Literal["files"]
    train: StrList
    valid: StrList
    test: StrList = []


Split = Annotated[ModuloSplit | RandomSplit | ColumnSplit | FilesSplit, Field(discriminator="by")]


class SyntheticSource(Strict):
    """Generated data. ``kind: mmoe``: the MMoE paper's synthetic two-task regression data (Ma et
    al., KDD 2018, section 3.2; ``dim``, ``correlation``, ``scale``, ``sin_terms``, ``noise``).
    ``kind: sequences``: impressions with typed behaviour histories, where clicks follow the
    user's recent clicks and purchases the user's recent purchases (``users``, ``items``,
    ``history``; ``buy_from: clicks`` makes purchases follow the clicks too, a control in which
    the tasks read the same history; see ``mtlcli.data.sequential``)."""

    kind: Literal["mmoe", "sequences"] = "mmoe"
    rows: PositiveInt = 20000
    dim: Annotated[int, Field(ge=2)] = 100
    correlation: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.5
    scale: PositiveFloat = 1.0
    sin_terms: NonNegativeInt = 10
    noise: NonNegativeFloat = 0.1
    seed: int = 0
    users: PositiveInt = 2000
    items: PositiveInt = 500
    history: PositiveInt = 30
    buy_from: Literal["buys", "clicks"] = "buys"


class DataSection(Strict):
    source: StrList = []
    synthetic: SyntheticSource | None = None
    format: Literal["auto", "csv", "parquet"] = "auto"
    header: bool = True
    columns: list[str] | None = None
    separator: str = ","
    strip: bool = True
    missing: StrList = ["", "?", "NA", "NaN", "null"]
    split: Split = RandomSplit(by="random")
    cache_dir: str = ".mtl-cache"
    group: str | None = None  # the column that groups rows for GAUC (a user id, a query id)
    # memory for data: sources smaller than this are read once into memory to preprocess, larger
    # ones are streamed; an encoded split larger than this trains streamed (train.loading: auto)
    memory_budget: Annotated[int, BeforeValidator(_as_bytes)] = 1 << 30

    @model_validator(mode="after")
    def _check(self) -> DataSection:
        files = isinstance(self.split, FilesSplit)
        if self.synthetic is not None and (self.source or files):
            raise ValueError("give either 'synthetic' or data files ('source' / split by files), not both")
        if self.synthetic is None and not self.source and not files:
            raise ValueError("no data: set 'source' to a CSV/Parquet file, or 'synthetic', or split by files")
        if files and self.source:
            raise ValueError("split by files takes its files from split.train/valid/test; remove 'source'")
        if len(self.separator.strip() or self.separator) != 1:
            raise ValueError(f"separator {self.separator!r} must be one character (spaces around it are stripped)")
        if self.columns is not None and len(set(self.columns)) != len(self.columns):
            raise ValueError("'columns' has duplicate names")
        return self


# --- features ---------------------------------------------------------------------------------

Transform = Literal["none", "log1p", "standardize", "minmax"]


class NumericOptions(Strict):
    """How a numeric column is cleaned: the missing-value fill, then the transforms in order."""

    fill: Literal["mean", "median", "zero"] | float = "mean"
    transform: Annotated[list[Transform], BeforeValidator(_as_list)] = ["standardize"]

    @model_validator(mode="after")
    def _check(self) -> NumericOptions:
        steps = [t for t in self.transform if t != "none"]
        scalers = [t for t in steps if t in ("standardize", "minmax")]
        if len(scalers) > 1:
            raise ValueError("choose one of standardize and minmax, not both")
        if steps.count("log1p") > 1:
            raise ValueError("log1p is given twice")
        if scalers and steps[-1] not in ("standardize", "minmax"):
            raise ValueError("log1p must come before the scaling transform")
        return self


class CategoricalOptions(Strict):
    """Vocabulary fitted on train: values seen fewer than ``min_count`` times map to the OOV id,
    and with ``max_size`` only that many of the most frequent values are kept (the rest are OOV).
    With ``hash_buckets`` the value is hashed into that many buckets instead (no vocabulary)."""

    min_count: PositiveInt = 1
    max_size: PositiveInt | None = None
    hash_buckets: PositiveInt | None = None

    @model_validator(mode="after")
    def _check(self) -> CategoricalOptions:
        if self.max_size is not None and self.hash_buckets is not None:
            raise ValueError("give max_size (a capped vocabulary) or hash_buckets (no vocabulary), not both")
        return self


class FeatureDefaults(Strict):
    numeric: NumericOptions = NumericOptions()
    categorical: CategoricalOptions = CategoricalOptions()


def _as_mapping(value: Any) -> Any:
    if isinstance(value, str) and value != "auto":
        value = [value]
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        return dict.fromkeys(value)
    return value


class EventsOptions(Strict):
    """Histories derived from an event log: for each row (impression), the same user's events
    strictly before the row's time (an event at the row's own time counts as later), optionally
    only events of the given ``types``."""

    source: StrList  # event files (CSV or Parquet; globs of shards)
    user: str = "user"  # the user column, in the events and (unless ``row_user``) in the rows
    item: str = "item"  # the id each event contributes to the history
    time: str = "time"  # numeric (or datetime) time, in the events and (unless ``row_time``) the rows
    type: str | None = None  # the behaviour-type column of the events
    types: StrList = []  # keep only events of these types (needs ``type``)
    row_user: str | None = None
    row_time: str | None = None

    @model_validator(mode="after")
    def _check(self) -> EventsOptions:
        if not self.source:
            raise ValueError("give the event files in 'source'")
        if self.types and self.type is None:
            raise ValueError("'types' filters on the event type column: set 'type' too")
        return self


class SequenceOptions(Strict):
    """A behaviour history: a column holding a list of ids per row (a Parquet list, or text with
    ``separator`` between the ids), oldest first; the last ``max_len`` are kept, most recent first.

    ``vocabulary`` names a categorical feature (the candidate item's) whose vocabulary and
    embedding rows the ids share; without it the history has its own vocabulary, fitted on the
    train rows (values seen at least ``min_count`` times). ``pooling`` turns the ids' embeddings
    into one vector: ``mean``, ``sum``, or ``attention`` against the embedding of the
    categorical feature ``target`` (default: ``vocabulary``), as DIN (Zhou et al., KDD 2018).
    ``weights`` (attention only): ``din``, the unit's scores as they are (the paper's weighted sum,
    which grows with the history's length), or ``softmax``, normalised over the row's items.

    A list column may come with parallel lists of the same length: ``type_column`` (each id's
    behaviour type; ``types`` keeps only those types) and ``time_column`` (each id's timestamp,
    oldest first; with ``row_time``, a numeric column of the row, only ids strictly before it)."""

    column: str | None = None  # default: the sequence's own name
    events: EventsOptions | None = None  # derive the history from an event log instead of a column
    vocabulary: str | None = None
    max_len: PositiveInt = 50
    pooling: Literal["mean", "sum", "attention"] = "mean"
    target: str | None = None
    weights: Literal["din", "softmax"] = "din"
    separator: str = "|"
    min_count: PositiveInt = 1
    type_column: str | None = None
    types: StrList = []
    time_column: str | None = None
    row_time: str | None = None

    @model_validator(mode="after")
    def _check(self) -> SequenceOptions:
        if self.pooling == "attention" and self.target is None and self.vocabulary is None:
            raise ValueError("attention pooling compares the history with a categorical feature: set 'target'")
        if self.pooling != "attention" and self.target is not None:
            raise ValueError("'target' is for attention pooling only")
        if self.pooling != "attention" and "weights" in self.model_fields_set:
            raise ValueError("'weights' is for attention pooling only")
        if not self.separator:
            raise ValueError("separator must not be empty")
        if self.events is not None and self.column is not None:
            raise ValueError("a history comes from 'column' or from 'events', not both")
        parallel = {
            "type_column": self.type_column,
            "types": self.types,
            "time_column": self.time_column,
            "row_time": self.row_time,
        }
        given = [key for key, value in parallel.items() if value]
        if self.events is not None and given:
            raise ValueError(f"{given[0]!r} is for list columns; a history from 'events' sets type and time there")
        if self.types and self.type_column is None:
            raise ValueError("'types' keeps the ids of some behaviour types: set 'type_column' too")
        if self.row_time is not None and self.time_column is None:
            raise ValueError("'row_time' keeps the ids before the row's time: set 'time_column' too")
        return self


class FeaturesSection(Strict):
    numeric: Annotated[Literal["auto"] | dict[str, NumericOptions | None], BeforeValidator(_as_mapping)] = {}
    categorical: Annotated[Literal["auto"] | dict[str, CategoricalOptions | None], BeforeValidator(_as_mapping)] = (
        "auto"
    )
    exclude: StrList = []
    defaults: FeatureDefaults = FeatureDefaults()
    sequences: dict[str, SequenceOptions] = {}
    # labels and space columns of tasks that are not in the recipe (the loader adds those of the
    # tasks its file, an ``extends`` parent or --set named before): ``auto`` and patterns never
    # take them as inputs (preprocessing warns); listed by name under numeric/categorical they are
    other_labels: StrList = []

    @model_validator(mode="after")
    def _check(self) -> FeaturesSection:
        if isinstance(self.categorical, dict) and isinstance(self.numeric, dict):
            both = sorted(set(self.categorical) & set(self.numeric))
            if both:
                raise ValueError(f"columns listed as both numeric and categorical: {both}")
        return self


# --- tasks ------------------------------------------------------------------------------------


class LabelSpec(Strict):
    """How a task's label is made from one raw column.

    binary: ``positive`` lists the raw values that mean 1; or ``threshold`` (label = value > threshold);
    or neither, and the column must hold 0/1 (or true/false). regression: the numeric column as is.
    """

    column: str
    positive: Annotated[list[str], BeforeValidator(lambda v: [str(x) for x in _as_list(v)])] | None = None
    threshold: float | None = None

    @model_validator(mode="after")
    def _check(self) -> LabelSpec:
        if self.positive is not None and self.threshold is not None:
            raise ValueError("give 'positive' or 'threshold', not both")
        if self.positive is not None and not self.positive:
            raise ValueError("'positive' is empty: list the raw values that make the label 1")
        return self


class SpaceSpec(Strict):
    """The rows a task lives in (PLE paper's sample spaces; ESMM): where binary task ``task`` is
    positive, or where ``column`` is true (1 / true). Other rows count for neither the task's loss
    nor its metrics."""

    task: str | None = None
    column: str | None = None

    @model_validator(mode="after")
    def _check(self) -> SpaceSpec:
        if (self.task is None) == (self.column is None):
            raise ValueError("give exactly one of 'task' and 'column'")
        return self


class TaskSpec(Strict):
    type: Literal["binary", "regression"] = "binary"
    label: Annotated[LabelSpec, BeforeValidator(lambda v: {"column": v} if isinstance(v, str) else v)]
    space: Annotated[SpaceSpec | None, BeforeValidator(lambda v: {"task": v} if isinstance(v, str) else v)] = None
    pos_weight: PositiveFloat = 1.0  # binary: the factor on the loss of positive rows

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        if self.type == "regression" and (self.label.positive is not None or self.label.threshold is not None):
            raise ValueError("a regression label is the numeric column as is: remove 'positive'/'threshold'")
        if self.type == "regression" and self.pos_weight != 1.0:
            raise ValueError("pos_weight weighs positive rows of a binary task; a regression task has none")
        return self


# --- model and loss (validated further by the named component) --------------------------------


COMPONENTS = {"model": ("scheme", "mmoe"), "loss": ("weighting", "equal")}  # section: (name key, default)


def component_parts(section: str, value: Any) -> tuple[Any, dict[str, Any]]:
    """A ``model`` / ``loss`` section as (the component's name, its other keys): a bare name is
    short for ``{scheme: name}``, a missing name is the default; a section that is not a mapping
    has no keys."""
    key, default = COMPONENTS[section]
    if isinstance(value, str):
        return value, {}
    if not isinstance(value, dict):
        return default, {}
    return value.get(key, default), {k: v for k, v in value.items() if k != key}


def _split_component(section: str) -> Any:
    def split(value: Any) -> Any:
        if value is None or isinstance(value, str) or (isinstance(value, dict) and "params" not in value):
            name, params = component_parts(section, value)
            return {COMPONENTS[section][0]: name, "params": params}
        return value

    return split


class ModelConfig(Strict):
    """``scheme`` names a registered sharing scheme; ``params`` is that scheme's validated params."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True, allow_inf_nan=False)
    scheme: str = COMPONENTS["model"][1]
    params: Any = {}

    _split = model_validator(mode="before")(_split_component("model"))


class LossConfig(Strict):
    """``weighting`` names a registered loss-weighting strategy; ``params`` are its validated params."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True, allow_inf_nan=False)
    weighting: str = COMPONENTS["loss"][1]
    params: Any = {}

    _split = model_validator(mode="before")(_split_component("loss"))


# --- train ------------------------------------------------------------------------------------

Metric = Literal["auc", "gauc", "logloss", "rmse", "mae", "loss"]


class EarlyStopping(Strict):
    """Stop when ``metric`` on valid (one task, or the mean over tasks) has not improved for
    ``patience`` epochs, then restore the best epoch's weights."""

    metric: Metric = "auc"
    task: str = "mean"
    patience: PositiveInt = 3
    min_delta: NonNegativeFloat = 0.0


def _as_kind(value: Any) -> Any:
    return {"kind": value} if isinstance(value, str) else value


class LrSchedule(Strict):
    """The learning rate over training as a factor of ``train.lr``, a function of the global step
    (so a resumed run follows the same curve): linear warm-up over ``warmup_steps``, then
    ``constant``, ``cosine`` or ``linear`` decay to ``min_ratio`` · lr at the last step of the
    epoch budget, or ``step``: times ``gamma`` every ``every_epochs`` epochs."""

    kind: Literal["constant", "cosine", "linear", "step"] = "constant"
    warmup_steps: NonNegativeInt = 0
    min_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    every_epochs: PositiveInt = 10
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1


def _tracker(name: str) -> str:
    """A registered experiment tracker (``mtlcli.train.tracking``)."""
    from mtlcli.registry import did_you_mean
    from mtlcli.train.tracking import TRACKERS

    if name not in TRACKERS:
        known = ", ".join(TRACKERS.names())
        raise ValueError(f"unknown tracker {name!r}{did_you_mean(name, TRACKERS.names())}; known: {known}")
    return name


class TrainSection(Strict):
    optimizer: Literal["adam", "adamw", "sgd", "adagrad"] = "adam"
    lr: PositiveFloat = 1e-3
    lr_schedule: Annotated[LrSchedule, BeforeValidator(_as_kind)] = LrSchedule()
    clip_grad_norm: PositiveFloat | None = None
    weight_decay: NonNegativeFloat = 0.0
    batch_size: PositiveInt = 1024
    eval_batch_size: PositiveInt = 65536
    epochs: PositiveInt = 10
    early_stopping: EarlyStopping | None = EarlyStopping()
    seed: int = 0
    threads: PositiveInt | Literal["auto"] = "auto"
    checkpoint_every: PositiveInt | None = None
    track_gradients: PositiveInt | None = None
    sparse_embeddings: Literal["auto"] | bool = "auto"
    # memory: the whole encoded split as tensors; stream: read in windows of shuffle_buffer rows
    # from its Parquet file, the next window on a background thread; auto: memory when the split
    # fits data.memory_budget
    loading: Literal["auto", "memory", "stream"] = "auto"
    shuffle_buffer: PositiveInt | Literal["auto"] = "auto"  # rows shuffled together when streaming
    # a streamed train split is dealt each epoch to this many shards, read side by side (a global
    # batch takes batch_size / shards rows of each); on N processes each reads shards / N of them.
    # auto: one per process (a resumed run keeps its count). In-memory splits ignore it
    shards: PositiveInt | Literal["auto"] = "auto"
    # where the model trains: cpu (the default, so figures do not change with the machine), cuda
    # (a clear error without a GPU), or auto (cuda when torch sees one, else cpu)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    # experiment trackers that receive the run's metrics (extras mtlcli[tensorboard], mtlcli[mlflow])
    loggers: list[Annotated[str, AfterValidator(_tracker)]] = []
    experiment: str | None = None  # the trackers' experiment name (default: the recipe file's name)


class ObjectiveSection(Strict):
    """``objective``: a training objective on top of the scheme's task losses. ``crossdistil``
    (docs/methods.md): teachers on augmented ranking tasks, calibrated and distilled into the
    task towers. ``partners`` names each task's partner (default: the most correlated task);
    ``warmup_steps`` the distillation ramp (default: one epoch); ``lr`` the teachers' learning
    rate (default: ``train.lr``); ``orient_partner``: a partner whose labels correlate negatively
    with the task's enters the augmented order as 1 − y (false: as is, the ablation)."""

    kind: Literal["crossdistil"]
    partners: dict[str, str] = {}
    distill_weight: NonNegativeFloat = 0.5
    warmup_steps: NonNegativeInt | None = None
    max_pairs: PositiveInt = 4096
    error_correction: bool = True
    orient_partner: bool = True
    lr: PositiveFloat | None = None


class Recipe(Strict):
    """A whole recipe. Build it with ``mtlcli.recipe.load_recipe``, which also validates the
    component parameters and the checks that span sections."""

    data: DataSection
    features: FeaturesSection = FeaturesSection()
    tasks: Annotated[dict[str, TaskSpec], Field(min_length=1)]
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainSection = TrainSection()
    objective: ObjectiveSection | None = None

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data, in the YAML layout (component params flattened)."""
        out = self.model_dump(mode="json", exclude={"model", "loss"})
        if not out["features"]["other_labels"]:  # left out while empty: earlier runs' recipes read the same
            del out["features"]["other_labels"]
        for history in out["features"]["sequences"].values():  # likewise DIN's default weights
            if history.get("weights") == "din":
                del history["weights"]
        out["model"] = {"scheme": self.model.scheme, **_dump(self.model.params)}
        out["loss"] = {"weighting": self.loss.weighting, **_dump(self.loss.params)}
        keys = ("data", "features", "tasks", "model", "loss", "train")
        resolved = {key: out[key] for key in keys}
        if self.objective is not None:  # absent otherwise: older runs' recipe hashes stay the same
            resolved["objective"] = out["objective"]
        return resolved


def _dump(params: Any) -> dict[str, Any]:
    if isinstance(params, BaseModel):
        return params.model_dump(mode="json")
    return dict(params)
