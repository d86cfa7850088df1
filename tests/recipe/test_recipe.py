"""Recipe validation: every problem reported at once, each with its YAML path, line and a
'did you mean' where a name is misspelt; --set overrides; YAML round trip; shipped recipes."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from mtlcli.errors import RecipeError, RecipeIssue
from mtlcli.recipe import Recipe, load_recipe, recipe_from_text, recipe_to_yaml
from mtlcli.recipe.load import apply_overrides
from mtlcli.recipe.schema import ModuloSplit

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))

VALID = """\
data:
  source: data.csv
  split: {by: modulo, modulus: 5, test: [0], valid: [1]}
features:
  numeric:
    price: {transform: [log1p, standardize]}
  categorical: [user, item]
tasks:
  click:
    label: click
  buy:
    label: {column: purchase, positive: ["1"]}
model:
  scheme: mmoe
  n_experts: 4
  expert_units: [8]
loss:
  weighting: static
  weights: {click: 1.0, buy: 2.0}
train:
  lr: 0.01
  epochs: 3
  batch_size: 32
  early_stopping: {metric: auc, task: click, patience: 1}
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def replaced(old: str, new: str) -> str:
    assert old in VALID, old
    return VALID.replace(old, new)


def issues_of(text: str, overrides: list[str] | None = None) -> list[RecipeIssue]:
    with pytest.raises(RecipeError) as caught:
        recipe_from_text(text, "r.yaml", overrides or [])
    return caught.value.issues


def only_issue(text: str) -> RecipeIssue:
    found = issues_of(text)
    assert len(found) == 1, found
    return found[0]


def line_of(text: str, needle: str) -> int:
    """1-based number of the first line of ``text`` that contains ``needle``."""
    return next(i for i, line in enumerate(text.splitlines(), start=1) if needle in line)


def test_valid_recipe_loads(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, VALID))
    assert recipe.task_names == ["click", "buy"]
    assert recipe.tasks["click"].label.column == "click"
    assert recipe.tasks["buy"].label.positive == ["1"]
    assert isinstance(recipe.data.split, ModuloSplit)
    assert recipe.data.split.test == [0]
    assert recipe.model.scheme == "mmoe"
    assert recipe.model.params.n_experts == 4
    assert recipe.model.params.expert_units == [8]
    assert recipe.loss.weighting == "static"
    assert recipe.loss.params.weights == {"click": 1.0, "buy": 2.0}
    assert recipe.train.lr == 0.01
    assert recipe.train.early_stopping is not None
    assert recipe.train.early_stopping.task == "click"
    assert isinstance(recipe.features.numeric, dict)
    assert recipe.features.numeric["price"] is not None
    assert recipe.features.numeric["price"].transform == ["log1p", "standardize"]


def test_defaults_are_filled_in() -> None:
    recipe = recipe_from_text("data: {source: d.csv}\ntasks: {y: {label: y}}\n")
    assert recipe.model.scheme == "mmoe"
    assert recipe.loss.weighting == "equal"
    assert recipe.train.batch_size == 1024
    assert recipe.train.early_stopping is not None
    assert recipe.train.early_stopping.task == "mean"


@pytest.mark.parametrize(
    ("old", "new", "path", "suggestion"),
    [
        ("train:\n", "trian:\n", "trian", "train"),
        ("train:\n", "zzz: 1\ntrain:\n", "zzz", None),
        ("train:\n  lr: 0.01\n", "train:\n  lr: 0.01\n  epoch: 3\n", "train.epoch", "epochs"),
        ("n_experts: 4", "n_expert: 4", "model.n_expert", "n_experts"),
        ("  categorical: [user, item]\n", "  categoricals: [user, item]\n", "features.categoricals", "categorical"),
        ("batch_size: 32", "batch_sise: 32", "train.batch_sise", "batch_size"),
        ("{transform: [log1p, standardize]}", "{transfrom: log1p}", "features.numeric.price.transfrom", "transform"),
        ("split: {by: modulo,", "split: {by: modulo, modulos: 5, ", "data.split.modulos", "modulus"),
        ("{column: purchase,", "{colum: purchase,", "tasks.buy.label.colum", "column"),
        ("weights: {", "weigths: {", "loss.weigths", "weights"),
    ],
)
def test_misspelt_key_is_reported_with_path_line_and_suggestion(
    old: str, new: str, path: str, suggestion: str | None
) -> None:
    text = replaced(old, new)
    found = issues_of(text)
    issue = next((i for i in found if i.path == path), None)
    assert issue is not None, f"no issue at {path}: {found}"
    assert issue.message.startswith("unknown key")
    key = path.split(".")[-1]
    assert issue.line == line_of(text, f"{key}:")
    if suggestion is not None:
        assert f"did you mean {suggestion!r}" in issue.message
    else:
        assert "did you mean" not in issue.message
        assert "allowed here: data, features, loss, model, objective, tasks, train" in issue.message


ONE_ISSUE_END = "  early_stopping: {metric: auc, task: click, patience: 1}\n"


@pytest.mark.parametrize(
    ("old", "new", "path", "line_at", "says"),
    [
        pytest.param(
            ONE_ISSUE_END, ONE_ISSUE_END + "bogus: 1\n", "bogus", "bogus", ["unknown key"], id="top-level key"
        ),
        pytest.param(
            "scheme: mmoe",
            "scheme: mmoee",
            "model.scheme",
            "scheme:",
            ["unknown sharing scheme 'mmoee'", "did you mean 'mmoe'?", "shared_bottom"],  # the known names listed
            id="misspelt scheme",
        ),
        pytest.param(
            "weighting: static",
            "weighting: statik",
            "loss.weighting",
            "weighting:",
            ["did you mean 'static'?"],
            id="misspelt weighting",
        ),
        pytest.param(
            "by: modulo,", "by: modullo,", "data.split", "split:", ["did you mean 'modulo'?"], id="misspelt split"
        ),
        pytest.param(
            "split: {by: modulo, modulus: 5, test: [0], valid: [1]}",
            "split: {by: stratified}",
            "data.split",
            None,
            ["'stratified'", "modulo, random, column, files"],
            id="unknown split",
        ),
        pytest.param("lr: 0.01", "lr: fast", "train.lr", "lr: fast", ["valid number", "'fast'"], id="wrong type"),
        pytest.param(
            "lr: 0.01", "lr: true", "train.lr", "lr: true", ["a number", "boolean"], id="boolean for a number"
        ),
        pytest.param(
            "batch_size: 32", "batch_size: 0", "train.batch_size", "batch_size", ["greater than 0"], id="bad value"
        ),
        pytest.param(
            "lr: 0.01",
            "lr: 0.01\n  optimizer: adamm",
            "train.optimizer",
            None,
            ["adam, adamw, sgd, adagrad", "did you mean 'adam'?"],
            id="optimizer choices",
        ),
        pytest.param(  # and no noise from the union's 'auto' branch
            "[log1p, standardize]",
            "[standardize, minmax]",
            "features.numeric.price",
            "price:",
            ["standardize and minmax"],
            id="standardize and minmax",
        ),
        pytest.param(
            "[log1p, standardize]",
            "[standardize, log1p]",
            "features.numeric.price",
            None,
            ["log1p must come before"],
            id="log1p after scaling",
        ),
        pytest.param(
            'positive: ["1"]',
            'positive: ["1"], threshold: 0.5',
            "tasks.buy.label",
            "threshold",
            ["'positive' or 'threshold', not both"],
            id="positive and threshold",
        ),
        pytest.param(
            "  buy:\n", "  buy:\n    type: regression\n", "tasks.buy", None, ["regression"], id="regression positive"
        ),
        pytest.param(
            "test: [0]",
            "test: [7]",
            "data.split",
            None,
            ["residue 7 is not below modulus 5"],
            id="residue out of range",
        ),
        pytest.param(
            "task: click",
            "task: clik",
            "train.early_stopping.task",
            "early_stopping",
            ["unknown task 'clik'", "did you mean 'click'?"],
            id="early stopping task",
        ),
        pytest.param(
            "metric: auc",
            "metric: rmse",
            "train.early_stopping.metric",
            None,
            ["regression"],
            id="early stopping metric",
        ),
        pytest.param(
            "source: data.csv",
            "source: data.csv\n  header: false",
            "data.columns",
            None,
            [],
            id="no header, no columns",
        ),
    ],
)
def test_one_mistake_is_one_issue_at_its_path_and_line(
    old: str, new: str, path: str, line_at: str | None, says: list[str]
) -> None:
    text = replaced(old, new)
    issue = only_issue(text)
    assert issue.path == path
    if line_at is not None:
        assert issue.line == line_of(text, line_at)
    for fragment in says:
        assert fragment in issue.message


def test_suggestion_follows_the_split_method_given() -> None:
    """'seed' belongs to random splits: under 'by: files' it is unknown, and it must not
    be suggested as a correction of itself."""
    text = replaced("split: {by: modulo, modulus: 5, test: [0], valid: [1]}", "split: {by: random, modulus: 5}")
    issue = only_issue(text)
    assert issue.path == "data.split.modulus"
    assert "did you mean" not in issue.message
    assert "allowed here: by, seed, test, valid" in issue.message


def test_static_weights_must_name_tasks() -> None:
    text = replaced("buy: 2.0}", "biy: 2.0, nope: 1.0}")
    found = issues_of(text)
    assert [i.path for i in found] == ["loss.weights.biy", "loss.weights.nope"]
    assert all(i.line == line_of(text, "weights:") for i in found)
    assert "did you mean 'buy'?" in found[0].message
    assert "did you mean" not in found[1].message
    assert "tasks: click, buy" in found[1].message


@pytest.mark.parametrize("section", ["numeric", "categorical"])
def test_label_column_listed_as_a_feature(section: str) -> None:
    if section == "categorical":
        text = replaced("categorical: [user, item]", "categorical: [user, item, purchase]")
    else:
        text = replaced("  categorical:", "    click: {}\n  categorical:")
    issue = only_issue(text)
    column = "purchase" if section == "categorical" else "click"
    assert issue.path == f"features.{section}.{column}"
    assert "label column" in issue.message


@pytest.mark.parametrize("section", ["numeric", "categorical"])
def test_a_history_named_like_a_listed_feature_is_refused(section: str) -> None:
    other = "numeric" if section == "categorical" else "categorical"
    text = VALID.replace(f"  {other}:", f"  sequences: {{user: {{column: history}}}}\n  {other}:", 1)
    if section == "numeric":
        text = text.replace("price: {transform: [log1p, standardize]}", "user: null")
        text = text.replace("categorical: [user, item]", "categorical: [item]")
    (issue,) = issues_of(text)
    assert issue.path == "features.sequences.user"
    assert f"also a {section} feature" in issue.message


def test_synthetic_data_needs_two_dimensions() -> None:
    issue = only_issue(
        "data: {synthetic: {rows: 50, dim: 1}}\ntasks: {y1: {type: regression, label: y1}}\n"
        "train: {early_stopping: {metric: rmse}}\n"
    )
    assert issue.path == "data.synthetic.dim"
    assert issue.line == 1
    assert "greater than or equal to 2" in issue.message


def test_missing_sections_are_reported() -> None:
    found = issues_of("train: {lr: 0.1}\n")
    assert {i.path for i in found} == {"data", "tasks"}
    assert all(i.message == "missing required key" for i in found)


def test_several_errors_are_all_reported_at_once(tmp_path: Path) -> None:
    text = (
        VALID.replace("lr: 0.01", "lr: fast")
        .replace("batch_size: 32", "batch_size: 0")
        .replace("n_experts: 4", "n_expert: 4")
        .replace("modulus: 5", "modulus: 1")
        .replace("weighting: static", "weighting: statik")
        .replace("task: click", "task: clik")
        .replace("categorical: [user, item]", "categorical: [user, item, purchase]")
        + "bogus: 1\n"
    )
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    error = caught.value
    assert {i.path for i in error.issues} == {
        "train.lr",
        "train.batch_size",
        "model.n_expert",
        "data.split.modulus",
        "loss.weighting",
        "bogus",
        "train.early_stopping.task",  # checks that span sections run too
        "features.categorical.purchase",
    }
    assert error.source == str(path)
    assert f"({len(error.issues)} problems)" in error.message
    for issue in error.issues:
        assert issue.line is not None
        assert f"{path}:{issue.line}: {issue.path}: " in error.message


def test_yaml_syntax_error_reports_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "data:\n  source: d.csv\ntasks: {y: {label: y}\ntrain: {lr: 1}\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    (issue,) = caught.value.issues
    assert issue.message.startswith("YAML syntax error")
    assert issue.line == 4
    assert f"{path}:4:" in caught.value.message


def test_bad_indentation_reports_its_line() -> None:
    issue = only_issue("data:\n  source: d.csv\n split: {by: modulo}\ntasks: {y: {label: y}}\n")
    assert issue.message.startswith("YAML syntax error")
    assert issue.line == 3


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, content))
    (issue,) = caught.value.issues
    assert issue.message == "the recipe is empty"


@pytest.mark.parametrize(("content", "kind"), [("- data\n- tasks\n", "list"), ("just words\n", "str"), ("42\n", "int")])
def test_non_mapping_document(tmp_path: Path, content: str, kind: str) -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, content))
    (issue,) = caught.value.issues
    assert "mapping" in issue.message
    assert f"got {kind}" in issue.message


def test_missing_file_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "nope.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"data: \xff\xfe\n")
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(binary)


# --- hostile YAML: expansion, depth, booleans for numbers ---------------------------------------


def laughs(levels: int, width: int = 10) -> str:
    """A 'billion laughs' document: each anchored list repeats the one before ``width`` times."""
    lines = ["a0: &a0 [lol]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_a_chain_of_extends_is_bounded(tmp_path: Path) -> None:
    """1,000 recipes each extending the next: a clear error, not a RecursionError."""
    for i in range(1000):
        (tmp_path / f"r{i}.yaml").write_text(f"extends: r{i + 1}.yaml\n", encoding="utf-8")
    (tmp_path / "r1000.yaml").write_text(VALID, encoding="utf-8")
    with pytest.raises(RecipeError) as caught:
        load_recipe(tmp_path / "r0.yaml")
    (issue,) = caught.value.issues
    assert issue.path == "extends" and "more than 32 deep" in issue.message
    assert load_recipe(tmp_path / "r990.yaml").task_names == ["click", "buy"]  # ten levels are fine


def test_extends_keeps_the_parents_model_keys_that_remain_valid(tmp_path: Path) -> None:
    """A child naming the parent's scheme (or none) adds to the parent's model section; one naming
    another scheme keeps the keys that scheme takes too (embedding_dim, tower_units) and drops the
    parent's own (n_experts); the loss section follows the same rule."""
    write(
        tmp_path,
        replaced("  n_experts: 4\n", "  n_experts: 4\n  embedding_dim: 6\n  tower_units: [5]\n"),
        "parent.yaml",
    )

    def child(model: str, loss: str = "") -> Recipe:
        return load_recipe(write(tmp_path, f"extends: parent.yaml\nmodel: {model}\n{loss}", "child.yaml"))

    for same in ("{scheme: mmoe, gate_control: true}", "{gate_control: true}"):
        model = child(same).to_dict()["model"]
        assert (model["n_experts"], model["expert_units"], model["embedding_dim"]) == (4, [8], 6), same
        assert model["gate_control"] is not None
    model = child("{scheme: shared_bottom, bottom_units: [7]}").to_dict()["model"]
    assert model == {**model, "scheme": "shared_bottom", "embedding_dim": 6, "tower_units": [5], "bottom_units": [7]}
    assert "n_experts" not in model
    assert child("shared_bottom").to_dict()["model"]["embedding_dim"] == 6  # a bare name is {scheme: name}
    loss = child("{gate_control: true}", "loss: {weighting: uncertainty}\n").to_dict()["loss"]
    assert loss["weighting"] == "uncertainty" and "weights" not in loss


METHOD_RECIPES = {  # method recipe: (its baseline recipe, the model keys and sections only the method has)
    "census-gate-control.yaml": ("census-hetero-mmoe.yaml", {"model.gate_control"}),
    "census-csrec.yaml": (
        "census-sparse-sharing.yaml",
        {"model.scheme", "model.update", "model.negatives", "model.swap", "model.contrastive_weight"}
        | {"model.temperature", "model.impact_decay"},
    ),
    "census-crossdistil.yaml": ("census-mmoe.yaml", {"objective"}),
}


@pytest.mark.parametrize("method", METHOD_RECIPES)
def test_a_method_recipe_is_its_baseline_plus_the_method(method: str) -> None:
    """Each method's census recipe resolves to its baseline's recipe with only the method's keys
    changed: the data, features, tasks, training and the network the method acts on are the
    baseline's (a gate-control recipe that silently lost the heterogeneous experts compared gate
    control on another network)."""
    base_name, method_keys = METHOD_RECIPES[method]
    root = RECIPES[0].parent

    def flat(recipe: Recipe) -> dict[str, object]:
        spec = recipe.to_dict()
        model = spec.pop("model")
        return {**spec, **{f"model.{k}": v for k, v in model.items()}}

    got, base = flat(load_recipe(root / method)), flat(load_recipe(root / base_name))
    differ = {k for k in got.keys() | base.keys() if got.get(k) != base.get(k)}
    assert differ == method_keys


@pytest.mark.parametrize("where", ["file", "set"])
def test_an_alias_bomb_is_refused_before_it_expands(where: str) -> None:
    import time

    bomb = laughs(10)  # 10**9 values once every alias is expanded
    started = time.perf_counter()
    if where == "file":
        found = issues_of(bomb + VALID)
    else:
        flow = "{" + ", ".join(line.replace(": ", ": ", 1) for line in bomb.splitlines()) + "}"
        found = issues_of(VALID, [f"data.synthetic={flow}"])
    assert time.perf_counter() - started < 5
    (issue,) = found
    assert "aliases" in issue.message and "100000" in issue.message.replace(",", "")


@pytest.mark.parametrize("shape", ["[", "{a: ", "- "])
def test_deep_nesting_is_refused_without_a_recursion_error(shape: str) -> None:
    if shape == "- ":
        deep = "".join("  " * i + "-\n" for i in range(5000)) + "  " * 5000 + "x\n"
    else:
        deep = "x: " + shape * 5000 + "1" + ("]" if shape == "[" else "}") * 5000 + "\n"
    (issue,) = issues_of(deep)
    assert "nested deeper than" in issue.message
    (issue,) = issues_of(VALID, ["train.lr=" + "[" * 5000 + "]" * 5000])
    assert "nested deeper than" in issue.message


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ("train.lr=true", "train.lr"),
        ("train.epochs=false", "train.epochs"),
        ("tasks.buy.pos_weight=true", "tasks.buy.pos_weight"),
        ("data.split.modulus=true", "data.split.modulus"),
        ("model.n_experts=true", "model.n_experts"),
        ("loss.weights.buy=true", "loss.weights.buy"),
    ],
)
def test_a_boolean_is_not_a_number(override: str, path: str) -> None:
    (issue,) = issues_of(VALID, [override])
    assert issue.path == path
    assert "a number" in issue.message and "boolean" in issue.message
    assert "(set with --set)" in issue.message


# --- --set overrides ------------------------------------------------------------------------------


def test_apply_overrides_sets_parsed_yaml_values() -> None:
    data = yaml.safe_load(VALID)
    paths = apply_overrides(
        data,
        ["train.lr=0.5", "model.expert_units=[4, 2]", "train.early_stopping=null", "data.split.test.0=2", "new.k=v"],
    )
    assert paths == [
        ("train", "lr"),
        ("model", "expert_units"),
        ("train", "early_stopping"),
        ("data", "split", "test", 0),
        ("new", "k"),
    ]
    assert data["train"]["lr"] == 0.5
    assert data["model"]["expert_units"] == [4, 2]
    assert data["train"]["early_stopping"] is None
    assert data["data"]["split"]["test"] == [2]
    assert data["new"] == {"k": "v"}


def test_load_recipe_with_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    recipe = load_recipe(path, ["train.lr=0.25", "model.n_experts=2", "loss.weights.buy=5"])
    assert recipe.train.lr == 0.25
    assert recipe.model.params.n_experts == 2
    assert recipe.loss.params.weights == {"click": 1.0, "buy": 5.0}
    assert load_recipe(path).train.lr == 0.01  # the file is untouched


def test_override_can_fix_an_invalid_value() -> None:
    recipe = recipe_from_text(replaced("lr: 0.01", "lr: fast"), "r.yaml", ["train.lr=0.1"])
    assert recipe.train.lr == 0.1


@pytest.mark.parametrize(
    ("override", "path", "suggestion"),
    [("train.epoch=3", "train.epoch", "epochs"), ("nosuch.key=1", "nosuch", None)],
)
def test_unknown_set_key_says_it_came_from_set(
    tmp_path: Path, override: str, path: str, suggestion: str | None
) -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, VALID), [override])
    (issue,) = caught.value.issues
    assert issue.path == path
    assert issue.line is None  # not a line of the file
    assert "(set with --set)" in issue.message
    if suggestion:
        assert f"did you mean {suggestion!r}" in issue.message


def test_bad_value_from_set_says_so() -> None:
    issue = issues_of(VALID, ["train.batch_size=-1"])[0]
    assert issue.path == "train.batch_size"
    assert "(set with --set)" in issue.message


@pytest.mark.parametrize("override", ["train.lr", "=3", "  =x"])
def test_malformed_set(override: str) -> None:
    with pytest.raises(RecipeError) as caught:
        recipe_from_text(VALID, "r.yaml", [override])
    assert caught.value.source == "--set"
    assert "KEY.PATH=VALUE" in caught.value.issues[0].message


def test_set_inside_a_list_item_out_of_range() -> None:
    with pytest.raises(RecipeError) as caught:
        recipe_from_text(VALID, "r.yaml", ["data.split.test.5=1"])
    assert caught.value.source == "--set"


def test_switching_the_scheme_with_set_drops_the_old_schemes_own_keys() -> None:
    from mtlcli.recipe.load import recipe_from_text_noted

    text = replaced("  n_experts: 4\n", "  n_experts: 4\n  embedding_dim: 6\n")
    recipe, notes = recipe_from_text_noted(text, "r.yaml", ["model.scheme=dtrn", "model.tower_units=[4]"])
    assert recipe.model.scheme == "dtrn"
    assert recipe.model.params.embedding_dim == 6 and recipe.model.params.tower_units == [4]
    (note,) = notes
    assert "mmoe -> dtrn" in note and "n_experts, expert_units" in note and "kept embedding_dim, tower_units" in note


def test_a_key_set_for_the_new_scheme_is_still_checked() -> None:
    (issue,) = issues_of(VALID, ["model.scheme=dtrn", "model.n_experts=3"])
    assert issue.path == "model.n_experts" and "unknown key" in issue.message


def test_switching_the_weighting_with_set_drops_its_weights() -> None:
    from mtlcli.recipe.load import recipe_from_text_noted

    recipe, notes = recipe_from_text_noted(VALID, "r.yaml", ["loss.weighting=equal"])
    assert recipe.loss.weighting == "equal"
    assert notes == ["loss.weighting static -> equal (--set): dropped static's own keys weights"]
    assert recipe_from_text_noted(VALID, "r.yaml", ["train.lr=0.5"])[1] == []


# --- round trip and shipped recipes -------------------------------------------------------------


def test_recipe_to_yaml_round_trips() -> None:
    recipe = recipe_from_text(VALID)
    text = recipe_to_yaml(recipe)
    again = recipe_from_text(text)
    assert again.to_dict() == recipe.to_dict()
    assert again == recipe
    assert yaml.safe_load(text) == recipe.to_dict()
    assert text.index("data:") < text.index("tasks:") < text.index("train:")


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_validates_and_round_trips(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.tasks
    assert recipe_from_text(recipe_to_yaml(recipe)).to_dict() == recipe.to_dict()


def test_the_shipped_dtrn_recipe_trains_on_generated_data(tmp_path: Path, in_repo: Path) -> None:
    """recipes/sequences-dtrn.yaml needs no files: one short epoch on fewer generated rows."""
    from mtlcli.train.run import train_run

    sets = ["train.epochs=1", "data.synthetic.rows=3000", f"data.cache_dir={tmp_path / 'cache'}"]
    summary = train_run(load_recipe("recipes/sequences-dtrn.yaml", sets), tmp_path / "run")
    assert summary["scheme"] == "dtrn" and summary["epochs_run"] == 1


def test_there_are_shipped_recipes() -> None:
    names = {p.name for p in RECIPES}
    assert {"census-mmoe.yaml", "quickstart.yaml"} <= names


def test_yes_no_on_off_are_text_not_booleans() -> None:
    """YAML 1.1 reads yes/no/on/off as booleans, which would silently turn `positive: [yes]` into
    'True' and match nothing; recipes use YAML 1.2 booleans (true/false only)."""
    recipe = recipe_from_text(
        replaced('positive: ["1"]', "positive: [yes, on]").replace("lr: 0.01", "lr: 0.01\n  seed: 3")
    )
    assert recipe.tasks["buy"].label.positive == ["yes", "on"]
    overridden = recipe_from_text(VALID, overrides=["tasks.buy.label.positive=[no]", "data.header=yes"])
    assert overridden.tasks["buy"].label.positive == ["no"]
    assert overridden.data.header is True  # a boolean field still takes yes/no
    again = recipe_from_text(recipe_to_yaml(recipe))
    assert again.tasks["buy"].label.positive == ["yes", "on"]


def test_a_component_check_runs_even_when_another_section_is_invalid() -> None:
    """Every error at once: a misspelt train key does not hide that static weights name a task
    the recipe does not have."""
    text = VALID.replace("weights: {click: 1.0, buy: 2.0}", "weights: {click: 1.0, bye: 2.0}").replace(
        "  lr: 0.01", "  lrr: 0.01"
    )
    paths = {issue.path for issue in issues_of(text)}
    assert paths == {"train.lrr", "loss.weights.bye"}


def test_pos_weight_is_for_binary_tasks_and_leaves_the_data_cache_alone(tmp_path: Path) -> None:
    from mtlcli.data.store import data_key

    issue = only_issue(
        replaced("  buy:\n", "  buy:\n    type: regression\n    pos_weight: 2\n").replace(', positive: ["1"]', "")
    )
    assert issue.path == "tasks.buy" and "pos_weight" in issue.message
    data = tmp_path / "data.csv"
    data.write_text("user,item,price,click,purchase\nu,i,1,0,1\n")
    base = recipe_from_text(VALID.replace("data.csv", str(data)))
    weighted = recipe_from_text(VALID.replace("data.csv", str(data)), overrides=["tasks.click.pos_weight=4"])
    assert weighted.tasks["click"].pos_weight == 4.0 and base.tasks["click"].pos_weight == 1.0
    assert data_key(weighted)[0] == data_key(base)[0]
