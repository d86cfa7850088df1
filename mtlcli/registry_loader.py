"""Importing every module of a plugin package, so that each registers itself by decorator."""

from __future__ import annotations

import importlib
import pkgutil


def import_submodules(package: str, path: list[str], skip: tuple[str, ...] = ("base", "blocks")) -> None:
    """Import each module in ``package`` (except the shared ``skip`` ones): adding a scheme or a
    weighting strategy is adding one file, with no list to edit."""
    for module in pkgutil.iter_modules(path):
        if module.name not in skip and not module.name.startswith("_"):
            importlib.import_module(f"{package}.{module.name}")
