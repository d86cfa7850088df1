"""Progressive Layered Extraction (PLE): stacked CGC layers with shared gates on the inner levels.

Tang, Liu, Zhao, Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL)
Model for Personalized Recommendations", RecSys 2020, section 4.2. At level j task k's gate reads
task k's previous output and mixes task k's and the shared experts of level j:
g^{k,j}(x) = w^{k,j}(g^{k,j-1}(x)) S^{k,j}(x). In every level but the last, a shared gate reads the
shared previous output and mixes all experts of the level (every task's and the shared ones) into
the next shared input. Towers read the last level's task outputs.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from mtlcli.models.base import InputSpec, register_scheme
from mtlcli.models.cgc import CGCParams, ExtractionNetwork, build_extraction, check


class PLEParams(CGCParams):
    levels: Annotated[int, Field(ge=1)] = 2


@register_scheme("ple", PLEParams, "expert sharing: stacked CGC levels with shared gates (RecSys 2020)", check)
def build(params: PLEParams, inputs: InputSpec) -> ExtractionNetwork:
    return build_extraction(params, inputs, levels=params.levels)
