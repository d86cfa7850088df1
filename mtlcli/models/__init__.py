"""Sharing schemes. Each module registers itself in SCHEMES; importing this package loads them all."""

from mtlcli.models import mmoe, shared_bottom  # noqa: F401  (registration)
from mtlcli.models.base import SCHEMES, InputSpec, ModelParams, MultiTaskModel, build_model

__all__ = ["SCHEMES", "InputSpec", "ModelParams", "MultiTaskModel", "build_model"]
