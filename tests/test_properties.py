"""Property-based tests: whatever the input, the recipe loader and the CSV reader either succeed or
raise the typed error the CLI renders (exit code 2) — never anything else."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtlcli.errors import DataError, MtlError, RecipeError
from mtlcli.recipe import recipe_from_dict, recipe_from_text
from mtlcli.recipe.load import apply_overrides

SECTION_KEYS = {
    "data": ["source", "split", "header", "columns", "separator", "missing", "synthetic", "format", "bogus"],
    "features": ["numeric", "categorical", "exclude", "defaults", "bogus"],
    "tasks": ["click", "buy", "y1"],
    "model": ["scheme", "n_experts", "expert_units", "tower_units", "embedding_dim", "dropout", "bogus"],
    "loss": ["weighting", "weights", "bogus"],
    "train": ["lr", "epochs", "batch_size", "early_stopping", "seed", "threads", "bogus"],
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 10),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.sampled_from(["mmoe", "shared_bottom", "equal", "static", "modulo", "random", "auto", "y1", "binary"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
sections = st.fixed_dictionaries(
    {},
    optional={
        name: st.dictionaries(st.sampled_from(keys), values, max_size=4) | values for name, keys in SECTION_KEYS.items()
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sections)
def test_any_recipe_data_validates_or_raises_recipe_error(data: dict[str, Any]) -> None:
    try:
        recipe_from_dict(data)
    except RecipeError as exc:
        assert exc.issues, "a RecipeError names at least one problem"
        assert all(issue.message for issue in exc.issues)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_parses_or_raises_recipe_error(text: str) -> None:
    with contextlib.suppress(RecipeError):
        recipe_from_text(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="abc.=0129[]{}: ,", max_size=20), max_size=4))
def test_any_overrides_apply_or_raise_recipe_error(overrides: list[str]) -> None:
    data: dict[str, Any] = {"data": {"synthetic": {}}, "tasks": {"y1": {"type": "regression", "label": "y1"}}}
    with contextlib.suppress(RecipeError):
        apply_overrides(data, overrides)


cells = st.text(alphabet='ab1.,"\n\r -?é\t', max_size=6)
csv_rows = st.lists(st.lists(cells, min_size=1, max_size=5), max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(csv_rows, st.booleans())
def test_any_csv_preprocesses_or_raises_data_error(table: list[list[str]], header: bool) -> None:
    from mtlcli.data.store import prepare

    text = "\n".join(",".join(row) for row in table)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "data.csv"
        source.write_text(("x,label\n" if header else "") + text, encoding="utf-8")
        recipe_yaml = f"""
data: {{source: {source}, header: {str(header).lower()}, columns: {"null" if header else "[x, label]"},
        split: {{by: random, valid: 0.3, test: 0.3, seed: 0}}, cache_dir: {Path(tmp) / "cache"}}}
tasks: {{t: {{label: label}}}}
"""
        try:
            recipe = recipe_from_text(recipe_yaml)
            prepare(recipe)
        except DataError:
            pass
        except MtlError as exc:  # pragma: no cover - a failure shows the message
            raise AssertionError(f"unexpected error type {type(exc).__name__}: {exc}") from exc
