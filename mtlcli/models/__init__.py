"""Sharing schemes. Each module in this package registers itself in SCHEMES when imported."""

from mtlcli.models.base import SCHEMES, InputSpec, ModelParams, MultiTaskModel, build_model
from mtlcli.registry_loader import import_submodules

import_submodules(__name__, __path__)

__all__ = ["SCHEMES", "InputSpec", "ModelParams", "MultiTaskModel", "build_model"]
