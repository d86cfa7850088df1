"""Loss-weighting strategies. Each module in this package registers itself in WEIGHTINGS when imported."""

from mtlcli.registry_loader import WEIGHTING_PLUGINS, import_submodules, load_plugins
from mtlcli.weighting.base import WEIGHTINGS, WeightingStrategy, build_weighting

import_submodules(__name__, __path__)
load_plugins(WEIGHTING_PLUGINS)

__all__ = ["WEIGHTINGS", "WeightingStrategy", "build_weighting"]
