"""Components declare what they can do (``Capabilities``, ``StrategyCapabilities``): generic code
never probes a model or strategy for attributes or classes and never compares a scheme's or
strategy's name. This test walks the package's syntax trees so that it stays that way; the
allow-list below names every ``getattr``/``hasattr`` that remains and why it is not a probe of a
component."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mtlcli.models import SCHEMES
from mtlcli.weighting import WEIGHTINGS

PACKAGE = Path(__file__).resolve().parents[1] / "mtlcli"

# (file, first argument, attribute): why it is allowed
ALLOWED_ATTRIBUTE_CALLS = {
    ("export/predict.py", "stdin", "'peek'"): "a file object: can it be peeked without buffering it again",
    ("export/predict.py", "stream", "'peek'"): "a file object: sniff Parquet's magic bytes",
    ("export/predict.py", "stream", "'raw'"): "a file object: the file under a buffered stream",
    ("export/predict.py", "raw", "'name'"): "a file object: its path, to read Parquet from it",
    ("numerics.py", "values", "'detach'"): "any array-like result (tensor, array, frame) for a comparison",
    ("numerics.py", "values", "'to_numpy'"): "any array-like result (tensor, array, frame) for a comparison",
    ("models/sparse_sharing.py", "self", "f'mask_{k}_{layer}'"): "the scheme's own mask buffers, in its own file",
    ("models/esmm.py", "params", "key"): "the scheme's own parameters, in its own file",
    ("data/scan.py", "split", "name"): "the split section of a recipe (train/valid/test lists)",
    ("data/batch.py", "rows", "f.name"): "the fields of the Batch/SplitTensors dataclasses, by their own fields()",
    ("train/checkpoint.py", "state", "name"): "the fields of the loop's own LoopState dataclass",
    ("train/checkpoint.py", "state", "k"): "the fields of the loop's own LoopState dataclass",
    ("recipe/load.py", "exc", "'problem_mark'"): "a YAML parser error: where in the file it happened",
    ("recipe/load.py", "exc", "'problem'"): "a YAML parser error: what went wrong",
}


def python_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def attribute_calls() -> list[tuple[str, str, str, int]]:
    """Every getattr/hasattr call in the package: (file, first argument, attribute, line)."""
    found = []
    for path in python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
            ):
                first = ast.unparse(node.args[0]) if node.args else ""
                attribute = ast.unparse(node.args[1]) if len(node.args) > 1 else ""
                found.append((str(path.relative_to(PACKAGE)), first, attribute, node.lineno))
    return found


def test_no_attribute_probes_outside_the_allow_list() -> None:
    unexpected = [
        f"mtlcli/{file}:{line}: {first}, {attribute}"
        for file, first, attribute, line in attribute_calls()
        if (file, first, attribute) not in ALLOWED_ATTRIBUTE_CALLS
    ]
    assert not unexpected, "declare a capability instead of probing:\n" + "\n".join(unexpected)


def test_the_allow_list_has_no_stale_entries() -> None:
    present = {(file, first, attribute) for file, first, attribute, _ in attribute_calls()}
    assert set(ALLOWED_ATTRIBUTE_CALLS) <= present, set(ALLOWED_ATTRIBUTE_CALLS) - present


def test_no_runtime_checkable_protocols() -> None:
    """``isinstance`` against a runtime-checkable Protocol is a probe by another name."""
    for path in python_files():
        assert "runtime_checkable" not in path.read_text(encoding="utf-8"), path


COMPONENT_FOLDERS = ("models", "weighting")  # schemes and their blocks, strategies


def component_classes() -> dict[str, str]:
    """Every class defined in a component folder: {class name: the file that defines it}."""
    classes = {}
    for path in python_files():
        file = str(path.relative_to(PACKAGE))
        if file.split("/")[0] in COMPONENT_FOLDERS:
            for node in ast.parse(path.read_text(encoding="utf-8")).body:
                if isinstance(node, ast.ClassDef):
                    classes[node.name] = file
    return classes


def test_no_class_probes_of_components_outside_their_file() -> None:
    """``isinstance``/``issubclass`` against a scheme's, block's or strategy's class is a probe:
    only the file that defines the class may ask (a block looking for its own kind)."""
    classes = component_classes()
    offending = []
    for path in python_files():
        file = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            probe = isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            if not probe or node.func.id not in ("isinstance", "issubclass") or len(node.args) < 2:  # type: ignore[attr-defined]
                continue
            for name in ast.walk(node.args[1]):  # type: ignore[attr-defined]
                named = (
                    name.id if isinstance(name, ast.Name) else name.attr if isinstance(name, ast.Attribute) else None
                )
                if named in classes and classes[named] != file:
                    offending.append(f"mtlcli/{file}:{node.lineno}: {ast.unparse(node)}")
    assert not offending, "declare a capability instead of probing:\n" + "\n".join(offending)


def component_file(name: str, registry: str) -> str:
    """The file a registered component lives in (its builder's module)."""
    component = (SCHEMES if registry == "models" else WEIGHTINGS).get(name)
    module = component.build.__module__
    return module.removeprefix("mtlcli.").replace(".", "/") + ".py"


@pytest.mark.parametrize("registry", ["models", "weighting"])
def test_no_comparison_with_a_component_name_outside_its_file(registry: str) -> None:
    names = set(SCHEMES.names() if registry == "models" else WEIGHTINGS.names())
    offending = []
    for path in python_files():
        file = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare):
                continue
            for constant in [node.left, *node.comparators]:
                named = isinstance(constant, ast.Constant) and constant.value in names
                if named and file != component_file(constant.value, registry):  # type: ignore[attr-defined]
                    offending.append(f"mtlcli/{file}:{node.lineno}: compares with {constant.value!r}")
    assert not offending, "ask the component's capabilities instead:\n" + "\n".join(offending)


IMPORT_EACH_FIRST = """
import importlib, pkgutil, sys
import mtlcli
names = sorted(m.name for m in pkgutil.walk_packages(mtlcli.__path__, "mtlcli."))
for name in names:
    for key in [k for k in sys.modules if k == "mtlcli" or k.startswith("mtlcli.")]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except ImportError as exc:
        print(f"{name}: {exc}")
"""


def test_every_module_can_be_imported_first() -> None:
    """A user's plugin or script may import any module first (``mtlcli.weighting``, say): no
    import cycle may depend on which module comes first. Each is imported in a fresh mtlcli."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", IMPORT_EACH_FIRST], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "", done.stdout
