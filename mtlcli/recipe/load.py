"""Reading, overriding and validating recipes; every problem is reported at once with its path."""

from __future__ import annotations

import re
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from mtlcli.errors import RecipeError, RecipeIssue
from mtlcli.recipe.schema import COMPONENTS, Recipe, component_parts
from mtlcli.registry import Component, Registry, did_you_mean

Loc = tuple[str | int, ...]


def read_recipe_text(path: str | Path) -> tuple[str, str]:
    """The recipe's text and a display name for messages; ``-`` reads standard input."""
    if str(path) == "-":
        return sys.stdin.read(), "<stdin>"
    file = Path(path)
    if not file.is_file():
        raise RecipeError(str(path), [RecipeIssue("", "file not found" if not file.exists() else "not a file")])
    try:
        return file.read_text(encoding="utf-8"), str(path)
    except UnicodeDecodeError as exc:
        raise RecipeError(str(path), [RecipeIssue("", f"not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false are booleans, so ``positive: [yes, no]``
    or a category called ``on`` stays the string it reads as (YAML 1.1 would turn them into booleans)."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


MAX_DEPTH = 100  # mappings and lists inside each other; a recipe uses about six
MAX_VALUES = 100_000  # values once every alias is expanded; a recipe has a few hundred


def yaml_shape_problem(text: str) -> tuple[str, int] | None:
    """What makes ``text`` too deep or too large to read safely, and its line; None when it is
    fine. Reads the parser's events, so nothing is built: an alias counts the values of what its
    anchor holds, which a 'billion laughs' document multiplies to billions (raises YAMLError on
    bad syntax)."""
    sizes: dict[str, int] = {}
    open_: list[tuple[str | None, int]] = []  # (anchor, values so far) of each unclosed collection
    total = 0
    for event in yaml.parse(text, Loader=RecipeLoader):
        line = event.start_mark.line + 1
        if isinstance(event, yaml.CollectionStartEvent):
            if len(open_) >= MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels of mappings and lists; a recipe needs a few", line
            open_.append((event.anchor, 1))
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, size = open_.pop()
        elif isinstance(event, yaml.ScalarEvent):
            anchor, size = event.anchor, 1
        elif isinstance(event, yaml.AliasEvent):
            anchor, size = None, sizes.get(event.anchor or "", 1)
        else:
            continue
        if anchor:
            sizes[anchor] = size
        if open_:
            open_[-1] = (open_[-1][0], open_[-1][1] + size)
        else:
            total += size
        if (open_[-1][1] if open_ else total) > MAX_VALUES:
            return (
                f"more than {MAX_VALUES:,} values once its aliases (*name) are expanded; a recipe has far"
                " fewer: repeat less through anchors and aliases",
                line,
            )
    return None


def load_yaml(text: str, source: str = "<yaml>", path: str = "") -> Any:
    """Plain data from YAML text, with the recipe's booleans (``RecipeLoader``). Raises
    RecipeError (``source``, ``path``) for text too deep or too large (``yaml_shape_problem``),
    YAMLError for bad syntax."""
    problem = yaml_shape_problem(text)
    if problem is not None:  # a value (with a path) is one line: no line number then
        raise RecipeError(source, [RecipeIssue(path, f"the YAML is {problem[0]}", None if path else problem[1])])
    return yaml.load(text, Loader=RecipeLoader)  # a SafeLoader subclass: plain data only


def parse_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[Loc, int]]:
    """Parse YAML into plain data plus a map from key path to 1-based line number."""
    try:
        data = load_yaml(text, source)
        node = yaml.compose(text, Loader=RecipeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        line = mark.line + 1 if mark is not None else None
        raise RecipeError(source, [RecipeIssue("", f"YAML syntax error: {problem}", line)]) from None
    if data is None:
        raise RecipeError(source, [RecipeIssue("", "the recipe is empty")])
    if not isinstance(data, dict):
        raise RecipeError(source, [RecipeIssue("", f"a recipe is a mapping of sections, got {type(data).__name__}")])
    lines: dict[Loc, int] = {}
    _index_lines(node, (), lines, source)
    return data, lines


def _index_lines(node: Any, path: Loc, lines: dict[Loc, int], source: str = "<recipe>") -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key, value in node.value:
            child = (*path, key.value)
            if key.value in seen:
                issue = RecipeIssue(_render_loc(child), "key given twice in one mapping", key.start_mark.line + 1)
                raise RecipeError(source, [issue])
            seen.add(key.value)
            lines[child] = key.start_mark.line + 1
            _index_lines(value, child, lines, source)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*path, index)] = item.start_mark.line + 1
            _index_lines(item, (*path, index), lines, source)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> list[Loc]:
    """Apply ``key.path=value`` overrides in place (value parsed as YAML); returns the paths set."""
    paths: list[Loc] = []
    for item in overrides:
        key, sep, value_text = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError("--set", [RecipeIssue(item, "expected KEY.PATH=VALUE, e.g. train.lr=0.01")])
        parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
        try:
            value = load_yaml(value_text, "--set", key.strip()) if value_text.strip() else ""
        except yaml.YAMLError:
            value = value_text
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            nxt = _child(node, part)
            where = ".".join(map(str, parts[: depth + 1]))
            if nxt is None and isinstance(node, dict) and node.get(part) is not None:
                raise RecipeError(
                    "--set",
                    [
                        RecipeIssue(
                            key,
                            f"cannot set inside {where!r}: it holds {node[part]!r}, not a mapping; set {where} itself",
                        )
                    ],
                )
            if nxt is None:
                if not isinstance(node, dict):
                    raise RecipeError("--set", [RecipeIssue(key, f"cannot set inside {where!r}: it is not a mapping")])
                nxt = node[part] = {}
            node = nxt
        last = parts[-1]
        if isinstance(node, list) and isinstance(last, int) and last < len(node):
            node[last] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise RecipeError("--set", [RecipeIssue(key, "this path does not lead to a mapping or list item")])
        paths.append(tuple(parts))
    return paths


def _child(node: Any, part: str | int) -> Any:
    if isinstance(node, dict):
        return node.get(part) if isinstance(node.get(part), dict | list) else None
    if isinstance(node, list) and isinstance(part, int) and part < len(node):
        return node[part]
    return None


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe file (``-`` for stdin). Raises RecipeError."""
    return load_recipe_noted(path, overrides)[0]


def load_recipe_noted(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Recipe, list[str]]:
    """``load_recipe``, and notes on what the overrides changed beyond the values they set (the
    keys of a scheme or strategy that --set replaced, dropped with it)."""
    text, source = read_recipe_text(path)
    base_dir = Path.cwd() if str(path) == "-" else Path(path).parent
    return recipe_from_text_noted(text, source, overrides, base_dir)


def recipe_from_text(
    text: str, source: str = "<recipe>", overrides: Sequence[str] = (), base_dir: Path | None = None
) -> Recipe:
    return recipe_from_text_noted(text, source, overrides, base_dir)[0]


def recipe_from_text_noted(
    text: str, source: str = "<recipe>", overrides: Sequence[str] = (), base_dir: Path | None = None
) -> tuple[Recipe, list[str]]:
    data, lines = parse_yaml(text, source)
    named = _task_columns(data)
    data = _resolve_extends(data, source, base_dir or Path.cwd(), [source], named)
    named |= _task_columns(data)
    before = _component_names(data)
    set_paths = apply_overrides(data, overrides)
    notes = _drop_replaced_component_keys(data, before, set_paths)
    _record_other_labels(data, named)
    return validate_recipe(data, source, lines, set_paths), notes


def _component_names(data: dict[str, Any]) -> dict[str, Any]:
    """The scheme and the weighting strategy the raw recipe names (the defaults when it names none)."""
    return {section: component_parts(section, data.get(section))[0] for section in COMPONENTS}


def _drop_replaced_component_keys(data: dict[str, Any], before: dict[str, Any], set_paths: Sequence[Loc]) -> list[str]:
    """When --set names another scheme (``model.scheme=dtrn``) or weighting strategy, drop the
    keys of the section that the new component does not take and that no --set gave: they were
    the old component's own (``n_experts``); the keys both take (``embedding_dim``) stay. One note
    per section that lost keys."""
    from mtlcli.models import SCHEMES
    from mtlcli.weighting import WEIGHTINGS

    registries: dict[str, Registry[Any]] = {"model": SCHEMES, "loss": WEIGHTINGS}
    notes = []
    for section, (key, _) in COMPONENTS.items():
        raw, name = data.get(section), _component_names(data)[section]
        if (section, key) not in set_paths or not isinstance(raw, dict) or name == before[section]:
            continue
        if not isinstance(name, str) or name not in registries[section]:
            continue  # an unknown name: validation says so
        taken = registries[section].get(name).params.model_fields
        given = {path[1] for path in set_paths if len(path) > 1 and path[0] == section}
        dropped = [k for k in raw if k != key and k not in taken and k not in given]
        for k in dropped:
            del raw[k]
        if dropped:
            kept = [k for k in raw if k != key]
            notes.append(
                f"{section}.{key} {before[section]} -> {name} (--set): dropped {before[section]}'s own keys"
                f" {', '.join(dropped)}" + (f"; kept {', '.join(kept)}" if kept else "")
            )
    return notes


def _task_columns(data: dict[str, Any]) -> set[str]:
    """The label and space columns the raw ``tasks`` section names (in any of their forms)."""
    tasks = data.get("tasks")
    found: set[str] = set()
    for spec in tasks.values() if isinstance(tasks, dict) else ():
        label = spec.get("label") if isinstance(spec, dict) else None
        space = spec.get("space") if isinstance(spec, dict) else None
        for column in (label.get("column") if isinstance(label, dict) else label, _column_of(space)):
            if isinstance(column, str):
                found.add(column)
    return found


def _column_of(space: Any) -> Any:
    """The column of a space given as ``{column: ...}`` (a bare name is a task, not a column)."""
    return space.get("column") if isinstance(space, dict) else None


def _record_other_labels(data: dict[str, Any], named: set[str]) -> None:
    """Add to ``features.other_labels`` the label and space columns that ``named`` (every task
    of the file, its parents and the data before --set) holds and the tasks now do not: without
    their task they would otherwise become inputs of ``auto`` features."""
    gone = named - _task_columns(data)
    if not gone:
        return
    features = data.setdefault("features", {})
    given = features.get("other_labels", []) if isinstance(features, dict) else None
    given = [given] if isinstance(given, str) else given
    if isinstance(given, list):
        features["other_labels"] = [*given, *sorted(gone - set(given))]


MAX_EXTENDS = 32  # recipes in one extends chain
TASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")  # module keys, output columns, --score terms


def _resolve_extends(
    data: dict[str, Any], source: str, base_dir: Path, chain: list[str], named: set[str]
) -> dict[str, Any]:
    """``extends: other.yaml`` (relative to this recipe's directory): start from that recipe and
    overlay this one. Mappings merge key by key; lists and scalars replace; the ``model`` and
    ``loss`` sections merge too, but when this recipe names another scheme or weighting strategy,
    the parent's keys that the new component does not take are dropped first (``_inherited``).
    Adds to ``named`` the label and space columns of every parent's tasks."""
    parent_ref = data.pop("extends", None)
    if parent_ref is None:
        return data
    if not isinstance(parent_ref, str):
        raise RecipeError(source, [RecipeIssue("extends", "expected the path of another recipe file")])
    parent_path = (base_dir / parent_ref).resolve()
    if len(chain) > MAX_EXTENDS:
        raise RecipeError(
            source, [RecipeIssue("extends", f"recipes extend each other more than {MAX_EXTENDS} deep; a few levels do")]
        )
    if str(parent_path) in chain:
        raise RecipeError(source, [RecipeIssue("extends", f"recipes extend each other in a loop: {parent_ref}")])
    if parent_path.is_dir():
        raise RecipeError(source, [RecipeIssue("extends", f"{parent_ref} is a directory; name a recipe file in it")])
    if not parent_path.is_file():
        raise RecipeError(source, [RecipeIssue("extends", f"recipe not found: {parent_ref} (relative to {base_dir})")])
    parent_text, parent_source = read_recipe_text(parent_path)
    parent, _ = parse_yaml(parent_text, parent_source)
    named |= _task_columns(parent)
    parent = _resolve_extends(parent, parent_source, parent_path.parent, [*chain, str(parent_path)], named)
    for section, (key, _) in COMPONENTS.items():
        if section in data:
            if isinstance(data[section], str):  # ``model: cgc`` is ``model: {scheme: cgc}``
                data[section] = {key: data[section]}
            parent[section] = _inherited(section, parent.get(section), data[section])
    return _merge(parent, data)


def _inherited(section: str, parent: Any, child: Any) -> Any:
    """What a ``model`` / ``loss`` section of a recipe keeps of its parent's before the child's keys
    are laid on top: all of it when the child names the parent's component or none (a child that
    adds ``gate_control`` keeps the parent's experts); when it names another one, the parent's keys
    that the new component takes too (``embedding_dim``), as ``--set model.scheme=...`` keeps them;
    nothing when the new name is unknown (validation names it) or the parent has no such section."""
    key = COMPONENTS[section][0]
    if not isinstance(parent, dict | str):
        return None
    parent_name, parent_keys = component_parts(section, parent)
    if not isinstance(child, dict):
        return None  # a section that is not a mapping: validation says so
    name = child.get(key, parent_name)
    if name == parent_name:
        return {key: parent_name, **parent_keys}
    taken = _params_taken(section, name)
    return {k: v for k, v in parent_keys.items() if k in taken}


def _params_taken(section: str, name: Any) -> set[str]:
    """The parameter keys a scheme (``model``) or weighting strategy (``loss``) takes; none for an
    unknown name."""
    from mtlcli.models import SCHEMES
    from mtlcli.weighting import WEIGHTINGS

    registry: Registry[Any] = {"model": SCHEMES, "loss": WEIGHTINGS}[section]
    if not isinstance(name, str) or name not in registry:
        return set()
    return set(registry.get(name).params.model_fields)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def recipe_from_dict(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate plain data (for example a run directory's resolved recipe)."""
    return validate_recipe(data, source, {}, [])


def validate_recipe(data: dict[str, Any], source: str, lines: dict[Loc, int], set_paths: Sequence[Loc] = ()) -> Recipe:
    """Validate the whole recipe: sections, then component parameters, then cross-section rules."""
    from mtlcli.models import SCHEMES
    from mtlcli.weighting import WEIGHTINGS

    issues: list[RecipeIssue] = []

    def issue(loc: Loc, message: str) -> None:
        line = _line_for(loc, lines)
        if any(loc[: len(p)] == p or p[: len(loc)] == loc for p in set_paths):
            message += " (set with --set)"
            line = None
        issues.append(RecipeIssue(_render_loc(loc), message, line))

    recipe: Recipe | None = None
    failed: set[str] = set()
    try:
        recipe = Recipe.model_validate(data)
        for loc in _booleans_read_as_numbers(data, recipe.model_dump()):
            issue(loc, BOOLEAN_NOT_NUMBER)
    except ValidationError as exc:
        for err in _useful_errors(exc):
            loc, message = _explain(err, data, Recipe)
            issue(loc, message)
        failed = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}

    model_params = _component_params("model", data.get("model"), SCHEMES, issue)
    loss_params = _component_params("loss", data.get("loss"), WEIGHTINGS, issue)

    for loc, message in _cross_checks(data):
        issue(loc, message)
    # The components' own checks need a whole recipe. When a section failed (already reported),
    # check against the recipe with that section at its defaults, so that every error still
    # comes at once; not possible when data or tasks, which have no defaults, failed.
    checked = recipe
    if checked is None and not failed & {"data", "tasks", "__root__"}:
        try:
            checked = Recipe.model_validate({k: v for k, v in data.items() if k not in failed})
        except ValidationError:
            checked = None
    if checked is not None and model_params is not None and loss_params is not None:
        checked = checked.model_copy(
            update={
                "model": checked.model.model_copy(update={"params": model_params}),
                "loss": checked.loss.model_copy(update={"params": loss_params}),
            }
        )
        for section, entry, params in (
            ("model", SCHEMES.get(checked.model.scheme), model_params),
            ("loss", WEIGHTINGS.get(checked.loss.weighting), loss_params),
        ):
            if entry.check is not None and section not in failed:
                for key, message in entry.check(params, checked):
                    issue((section, *key.split(".")), message)
        if recipe is not None:
            recipe = checked
    if issues:
        issues.sort(key=lambda i: (i.line is None, i.line or 0))
        raise RecipeError(source, issues)
    assert recipe is not None
    return recipe


def _component_params(section: str, value: Any, registry: Registry[Component], issue: Any) -> BaseModel | None:
    """The named component's validated parameters (``component_parts`` splits the section)."""
    name, rest = component_parts(section, value)
    if not isinstance(name, str) or name not in registry:
        known = ", ".join(registry.names())
        hint = did_you_mean(str(name), registry.names())
        issue((section, COMPONENTS[section][0]), f"unknown {registry.kind} {name!r}{hint}; known: {known}")
        return None
    try:
        params = registry.get(name).params.model_validate(rest)
    except ValidationError as exc:
        for err in _useful_errors(exc):
            loc, message = _explain(err, rest, registry.get(name).params)
            issue((section, *loc), message)
        return None
    wrong = _booleans_read_as_numbers(rest, params.model_dump())
    for loc in wrong:
        issue((section, *loc), BOOLEAN_NOT_NUMBER)
    return None if wrong else params


BOOLEAN_NOT_NUMBER = "expected a number, got a boolean (true/false); write the number itself"
NUMBER_ERRORS = {
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "int_type",
    "float_type",
    "int_parsing",
    "float_parsing",
    "multiple_of",
}


def _booleans_read_as_numbers(given: Any, validated: Any, loc: Loc = ()) -> list[Loc]:
    """Where ``given`` (the raw recipe data) holds true/false and the validated values (dumped
    to plain data) hold a number there: pydantic reads a boolean as 1 or 0, the user meant
    something else. Parts whose layout validation changed (a bare name for a mapping) are
    skipped."""
    if isinstance(given, bool):
        return [loc] if isinstance(validated, int | float) and not isinstance(validated, bool) else []
    if isinstance(given, dict) and isinstance(validated, dict):
        pairs = [(key, value, validated[key]) for key, value in given.items() if key in validated]
    elif isinstance(given, list) and isinstance(validated, list | tuple) and len(given) == len(validated):
        pairs = list(zip(range(len(given)), given, validated, strict=True))
    else:
        return []
    return [found for key, value, other in pairs for found in _booleans_read_as_numbers(value, other, (*loc, key))]


def _cross_checks(data: dict[str, Any]) -> list[tuple[Loc, str]]:
    """Rules that span sections, checked on the raw data so that they are reported even when
    other parts of the recipe are invalid (each rule skips what it cannot read)."""

    def section(name: str) -> dict[str, Any]:
        value = data.get(name)
        return value if isinstance(value, dict) else {}

    out: list[tuple[Loc, str]] = []
    for name in section("tasks"):
        if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
            suggestion = re.sub(r"[^A-Za-z0-9_-]+", "_", str(name)).strip("_") or "task"
            if not suggestion[0].isalpha():
                suggestion = f"t_{suggestion}"
            out.append(
                (
                    ("tasks", str(name)),
                    f"the task name {name!r} cannot be used: task names are ASCII letters, digits, '_' and '-',"
                    f" starting with a letter or '_' (they name model modules, output columns and --score terms);"
                    f" e.g. {suggestion!r}",
                )
            )
    tasks = {name: spec for name, spec in section("tasks").items() if isinstance(spec, dict)}
    label_columns = set()
    for spec in tasks.values():
        label = spec.get("label")
        column = label.get("column") if isinstance(label, dict) else label
        if isinstance(column, str):
            label_columns.add(column)
    features = section("features")
    for where in ("numeric", "categorical"):
        listed = features.get(where)
        names = list(listed) if isinstance(listed, dict | list) else []
        for name in names:
            if isinstance(name, str) and name in label_columns:
                out.append((("features", where, name), "is a task's label column; labels are never model inputs"))
            histories = features.get("sequences")
            if isinstance(name, str) and isinstance(histories, dict) and name in histories:
                out.append(
                    (
                        ("features", "sequences", name),
                        f"the history's name {name!r} is also a {where} feature; inputs need distinct names:"
                        " rename the history (its 'column' says which column it reads)",
                    )
                )
    for name, spec in tasks.items():
        space = spec.get("space")
        parent = space if isinstance(space, str) else space.get("task") if isinstance(space, dict) else None
        if not isinstance(parent, str):
            continue
        if parent == name:
            out.append((("tasks", name, "space"), "a task cannot live in its own sample space"))
        elif parent not in tasks:
            hint = did_you_mean(parent, list(tasks))
            out.append(
                (("tasks", name, "space"), f"unknown task {parent!r}{hint}; name a binary task or use {{column: ...}}")
            )
        elif tasks[parent].get("type", "binary") != "binary":
            out.append(
                (("tasks", name, "space"), f"task {parent!r} is not binary; a space is where a binary task is positive")
            )
    stop = section("train").get("early_stopping")
    if isinstance(stop, dict):
        task, metric = stop.get("task", "mean"), stop.get("metric", "auc")
        if isinstance(task, str) and task != "mean" and task not in tasks:
            hint = did_you_mean(task, list(tasks))
            out.append((("train", "early_stopping", "task"), f"unknown task {task!r}{hint}; use a task name or 'mean'"))
        chosen = [tasks[task]] if task in tasks else list(tasks.values())
        kinds = [spec.get("type", "binary") for spec in chosen]
        if metric in ("auc", "gauc", "logloss") and "regression" in kinds:
            out.append((("train", "early_stopping", "metric"), f"{metric} needs binary tasks; use rmse, mae or loss"))
        if metric == "gauc" and not section("data").get("group"):
            out.append(
                (
                    ("train", "early_stopping", "metric"),
                    "gauc needs data.group (the column to group rows by, e.g. a user id)",
                )
            )
        if metric in ("rmse", "mae") and "binary" in kinds:
            out.append(
                (("train", "early_stopping", "metric"), f"{metric} needs regression tasks; use auc, logloss or loss")
            )
    raw = section("data")
    sources = raw.get("source", [])
    sources = [sources] if isinstance(sources, str) else sources if isinstance(sources, list) else []
    csv_only = bool(sources) and not any(str(s).endswith((".parquet", ".pq")) for s in sources)
    if csv_only and raw.get("format", "auto") != "parquet" and raw.get("header") is False and not raw.get("columns"):
        out.append((("data", "columns"), "the CSV has no header (header: false): list its column names in 'columns'"))
    return out + _objective_checks(section("objective"), tasks)


def _objective_checks(objective: dict[str, Any], tasks: dict[str, dict[str, Any]]) -> list[tuple[Loc, str]]:
    """CrossDistil's rules: every task binary, two tasks or more, partners that are other tasks."""
    if objective.get("kind") != "crossdistil":
        return []
    out: list[tuple[Loc, str]] = [
        (("tasks", name, "type"), "is a regression task, and objective crossdistil orders rows by binary labels; "
         "drop the objective section or this task")
        for name, spec in tasks.items() if spec.get("type", "binary") != "binary"
    ]  # fmt: skip
    if len(tasks) < 2:
        out.append((("objective",), "crossdistil needs two binary tasks or more"))
    partners = objective.get("partners")
    for task, partner in partners.items() if isinstance(partners, dict) else []:
        for name in (task, partner):
            if name not in tasks:
                hint = did_you_mean(str(name), list(tasks))
                out.append((("objective", "partners", str(task)), f"{name!r} is not a task{hint}"))
        if task == partner:
            out.append((("objective", "partners", str(task)), "a task cannot be its own partner"))
    return out


def _render_loc(loc: Loc) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = str(part)
            name = name if re.fullmatch(r"[\w-]+", name) else repr(name)
            text += f".{name}" if text else name
    return text


def _line_for(loc: Loc, lines: dict[Loc, int]) -> int | None:
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _clean_loc(data: Any, loc: Loc, missing: bool = False) -> Loc:
    """Drop the parts of a pydantic error location that are not in the YAML (union tags such as
    ``modulo`` in ``data.split.modulo``); only a ``missing`` error keeps a last part that is absent."""
    out: list[str | int] = []
    node = data
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        if (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        ):
            out.append(part)
            node = node[part]  # type: ignore[index]
        elif last and missing and isinstance(node, dict | type(None)):
            out.append(part)
        elif isinstance(part, str) and (part in ("function-after", "function-before") or "[" in part or part.islower()):
            continue
        else:
            out.append(part)
    return tuple(out)


def _useful_errors(exc: ValidationError) -> list[Any]:
    """The errors worth reporting: drop a union's ``Literal`` branch (for example ``'auto'``) when
    the value given is a mapping or list and another branch of the same union explains the problem."""
    errors = exc.errors()
    keep = []
    for err in errors:
        loc = tuple(err["loc"])
        tag = next((i for i, p in enumerate(loc) if isinstance(p, str) and p.startswith("literal[")), None)
        if (
            tag is not None
            and isinstance(err.get("input"), dict | list)
            and any(
                other is not err and tuple(other["loc"])[:tag] == loc[:tag] and tuple(other["loc"])[tag:] != loc[tag:]
                for other in errors
            )
        ):
            continue
        keep.append(err)
    return keep


def _explain(err: Any, data: Any, root: type[BaseModel]) -> tuple[Loc, str]:
    loc = _clean_loc(data, tuple(err["loc"]), err["type"] == "missing")
    kind = err["type"]
    ctx = err.get("ctx") or {}
    got = err.get("input")
    if kind == "extra_forbidden":
        allowed = _keys_at(root, loc[:-1], data)
        hint = did_you_mean(str(loc[-1]), allowed)
        listing = f"; allowed here: {', '.join(allowed)}" if allowed and not hint else ""
        return loc, f"unknown key{hint}{listing}"
    if kind == "missing":
        return loc, "missing required key"
    if kind == "literal_error":
        expected = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return loc, f"{got!r} is not one of: {', '.join(expected)}{did_you_mean(str(got), expected)}"
    if kind == "union_tag_invalid":
        tags = re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))
        return (
            loc,
            f"unknown {ctx.get('discriminator', 'kind')} {ctx.get('tag')!r}{did_you_mean(str(ctx.get('tag')), tags)}; choose one of: {', '.join(tags)}",
        )
    if kind == "union_tag_not_found":
        return (*loc, "by"), "missing required key (the split method: modulo, random, column or files)"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return loc, f"expected a mapping of keys (got {got!r})"
    if isinstance(got, bool) and kind in NUMBER_ERRORS:
        return loc, BOOLEAN_NOT_NUMBER
    message = str(err["msg"])
    message = message.removeprefix("Value error, ")
    if kind != "value_error" and not isinstance(got, dict):
        message += f" (got {got!r})"
    return loc, message


def _keys_at(root: type[BaseModel], loc: Loc, data: Any = None) -> list[str]:
    """The keys allowed at ``loc`` under the pydantic model ``root`` (for 'did you mean').

    Where ``loc`` leads to a union of models (the split methods), only the members whose
    ``Literal`` fields accept the values given in ``data`` there (``by: random``) count."""
    types_: list[Any] = [root]
    for part in loc:
        nxt: list[Any] = []
        for tp in types_:
            for inner in _expand(tp):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    if isinstance(part, str) and part in inner.model_fields:
                        nxt.append(inner.model_fields[part].annotation)
                elif typing.get_origin(inner) is dict:
                    nxt.append(typing.get_args(inner)[1])
                elif typing.get_origin(inner) is list and isinstance(part, int):
                    nxt.append(typing.get_args(inner)[0])
        types_ = nxt
    node = data
    for part in loc:
        node = node.get(part) if isinstance(node, dict) else None
    models = [
        inner for tp in types_ for inner in _expand(tp) if isinstance(inner, type) and issubclass(inner, BaseModel)
    ]
    chosen = [model for model in models if _tags_match(model, node)]
    keys: set[str] = set()
    for model in chosen or models:
        keys.update(model.model_fields)
    return sorted(keys)


def _tags_match(model: type[BaseModel], node: Any) -> bool:
    """False when ``node`` gives a value that one of ``model``'s ``Literal`` fields refuses."""
    if not isinstance(node, dict):
        return True
    return all(
        node[name] in typing.get_args(field.annotation)
        for name, field in model.model_fields.items()
        if name in node and typing.get_origin(field.annotation) is typing.Literal
    )


def _expand(tp: Any) -> list[Any]:
    """Unwrap Annotated / Optional / unions into their member types."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _expand(typing.get_args(tp)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [t for arg in typing.get_args(tp) for t in _expand(arg)]
    return [tp]


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe (every default filled in) as YAML."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True, default_flow_style=None, width=100)
