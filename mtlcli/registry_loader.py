"""Importing every module of a plugin package, so that each registers itself by decorator."""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil

# Entry-point groups through which installed packages add components: a plugin's pyproject says
# [project.entry-points."mtlcli.schemes"] my_scheme = "my_package.my_scheme" (a module that
# registers itself with @register_scheme when imported), likewise "mtlcli.weightings".
SCHEME_PLUGINS, WEIGHTING_PLUGINS = "mtlcli.schemes", "mtlcli.weightings"


def import_submodules(package: str, path: list[str], skip: tuple[str, ...] = ("base", "blocks")) -> None:
    """Import each module in ``package`` (except the shared ``skip`` ones): adding a scheme or a
    weighting strategy is adding one file, with no list to edit."""
    for module in pkgutil.iter_modules(path):
        if module.name not in skip and not module.name.startswith("_"):
            importlib.import_module(f"{package}.{module.name}")


def load_plugins(group: str) -> list[str]:
    """Import the module of every installed entry point in ``group`` (each registers its components
    when imported); returns the entry points' names. A plugin that fails to import raises, naming it."""
    loaded = []
    for entry in importlib.metadata.entry_points(group=group):
        try:
            entry.load()
        except Exception as exc:  # a third party's bug: say whose
            raise ImportError(
                f"mtl plugin {entry.name!r} ({entry.value}, group {group}) failed to load: {exc}"
            ) from exc
        loaded.append(entry.name)
    return loaded
