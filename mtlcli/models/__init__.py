"""Sharing schemes. Each module in this package registers itself in SCHEMES when imported."""

from mtlcli.models.base import SCHEMES, InputSpec, ModelParams, MultiTaskModel, build_model
from mtlcli.registry_loader import SCHEME_PLUGINS, import_submodules, load_plugins

import_submodules(__name__, __path__)
load_plugins(SCHEME_PLUGINS)

__all__ = ["SCHEMES", "InputSpec", "ModelParams", "MultiTaskModel", "build_model"]
