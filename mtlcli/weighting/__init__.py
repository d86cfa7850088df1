"""Loss-weighting strategies. Each module registers itself in WEIGHTINGS."""

from mtlcli.weighting import equal, static  # noqa: F401  (registration)
from mtlcli.weighting.base import WEIGHTINGS, WeightingStrategy, build_weighting

__all__ = ["WEIGHTINGS", "WeightingStrategy", "build_weighting"]
