"""Loss-weighting strategies. Each module in this package registers itself in WEIGHTINGS when imported."""

from mtlcli.registry_loader import import_submodules
from mtlcli.weighting.base import WEIGHTINGS, WeightingStrategy, build_weighting

import_submodules(__name__, __path__)

__all__ = ["WEIGHTINGS", "WeightingStrategy", "build_weighting"]
