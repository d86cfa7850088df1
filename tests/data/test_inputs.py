"""A column that is a label (or a sample space) of a task in the recipe's file, its ``extends``
parents or before ``--set``, is never taken as an input by ``auto`` once its task is gone: the
recipe records it in ``features.other_labels`` and preprocessing leaves it out with a warning
naming it, unless the user lists it as a feature by name."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mtlcli.data.store import prepare
from mtlcli.recipe import load_recipe, recipe_from_dict, recipe_from_text

ROWS = 40

TWO_TASKS = """\
data:
  source: {source}
  split: {{by: modulo}}
  cache_dir: {cache}
features:
  categorical: auto
tasks:
  like: {{label: like}}
  dislike: {{label: {{column: dislike, positive: ["1"]}}, space: {{column: shown}}}}
"""


def write_data(tmp_path: Path) -> Path:
    lines = ["user,item,shown,like,dislike"]
    lines += [f"u{i % 7},i{i % 5},{i % 2},{i % 3 == 0:d},{i % 4 == 0:d}" for i in range(ROWS)]
    path = tmp_path / "data.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def recipe_file(tmp_path: Path, text: str = TWO_TASKS, name: str = "two.yaml") -> Path:
    path = tmp_path / name
    body = textwrap.dedent(text).format(source=write_data(tmp_path), cache=tmp_path / "cache")
    path.write_text(body, encoding="utf-8")
    return path


def inputs(recipe_path: Path, overrides: list[str]) -> tuple[list[str], list[str]]:
    schema = prepare(load_recipe(recipe_path, overrides)).schema
    return [f.name for f in schema.categorical] + [f.name for f in schema.numeric], schema.warnings


def test_a_task_removed_with_set_leaves_its_label_and_space_out_of_auto_inputs(tmp_path: Path) -> None:
    names, warnings = inputs(recipe_file(tmp_path), ["tasks={like: {label: like}}"])
    assert sorted(names) == ["item", "user"]
    assert any("'dislike'" in w and "features.other_labels" in w for w in warnings), warnings
    assert any("'shown'" in w for w in warnings), warnings


def test_a_label_changed_with_set_is_left_out_too(tmp_path: Path) -> None:
    names, warnings = inputs(recipe_file(tmp_path), ["tasks.dislike.label=shown", "tasks.dislike.space=null"])
    assert sorted(names) == ["item", "user"]
    assert any("'dislike'" in w for w in warnings), warnings


def test_a_label_of_a_parent_recipe_is_left_out(tmp_path: Path) -> None:
    parent = recipe_file(tmp_path)
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {parent.name}\ntasks:\n  dislike: {{label: like, space: null}}\n", encoding="utf-8")
    recipe = load_recipe(child)
    assert recipe.features.other_labels == ["dislike", "shown"]
    names, _ = inputs(child, [])
    assert sorted(names) == ["item", "user"]


def test_listing_a_former_label_by_name_makes_it_an_input(tmp_path: Path) -> None:
    names, warnings = inputs(
        recipe_file(tmp_path), ["tasks={like: {label: like}}", "features.categorical=[user, item, dislike]"]
    )
    assert sorted(names) == ["dislike", "item", "user"]
    assert not any("'dislike'" in w for w in warnings), warnings


def test_other_labels_survive_the_resolved_recipe(tmp_path: Path) -> None:
    """A run keeps its resolved recipe: read back, it leaves the same columns out (and keeps the
    data cache key)."""
    from mtlcli.data.store import data_key

    recipe = load_recipe(recipe_file(tmp_path), ["tasks={like: {label: like}}"])
    again = recipe_from_dict(recipe.to_dict())
    assert again.features.other_labels == ["dislike", "shown"]
    assert data_key(again)[0] == data_key(recipe)[0]


def test_a_recipe_without_removed_tasks_has_no_other_labels(tmp_path: Path) -> None:
    recipe = recipe_from_text(recipe_file(tmp_path).read_text(encoding="utf-8"))
    assert recipe.features.other_labels == []
    assert "other_labels" not in recipe.to_dict()["features"]  # earlier runs' resolved recipes read the same


@pytest.mark.slow
def test_census_single_task_baseline_does_not_read_the_other_label(
    census_file: Path, in_repo: Path, tmp_path: Path
) -> None:
    """The census baseline for income alone: 'marital status' (the removed task's label) is not an
    input, and the warning names it."""
    overrides = [
        f"data.cache_dir={tmp_path / 'cache'}",
        'tasks={income: {label: {column: income, positive: ["50000+."]}}}',
    ]
    schema = prepare(load_recipe("recipes/census-mmoe.yaml", overrides)).schema
    assert "marital status" not in [f.name for f in schema.categorical]
    assert any("'marital status'" in w for w in schema.warnings), schema.warnings


def test_a_history_named_like_an_input_column_is_refused(tmp_path: Path) -> None:
    """Input names are unique: a history called 'item' (reading the column 'user') next to the
    categorical column 'item' that auto takes would give two inputs one name."""
    from mtlcli.errors import DataError

    recipe = load_recipe(recipe_file(tmp_path), ["features.sequences={item: {column: user}}"])
    with pytest.raises(DataError, match=r"features\.sequences\.item: .*'item' is also a categorical input"):
        prepare(recipe)
