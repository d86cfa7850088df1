"""Single-task baseline: one independent network per task (its own embeddings, bottom and tower).

Nothing is shared, so each task trains exactly as if alone; with the same ``bottom_units`` and
``tower_units`` each task gets the budget of one shared_bottom path. It is the single-task (STL)
baseline against which multi-task gain is measured, e.g. in Caruana, "Multitask Learning",
Machine Learning 28, 1997, and in the MMoE and PLE papers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtlcli.data.batch import Batch
from mtlcli.models.base import BottomParams, Capabilities, InputSpec, group_by_prefix, register_scheme
from mtlcli.models.blocks import FeatureEmbedding, mlp
from mtlcli.models.views import Introspection, SharedRepresentation


class SingleTaskParams(BottomParams):
    pass


class SingleTask(nn.Module):
    """Per task: embedding -> bottom MLP -> tower MLP -> logit. Output [B, T].

    Shared representation: empty (nothing is shared)."""

    def __init__(
        self, inputs: InputSpec, embedding_dim: int, bottom_units: list[int], tower_units: list[int], dropout: float
    ) -> None:
        super().__init__()
        self.tasks = list(inputs.tasks)
        embeddings = {t: FeatureEmbedding.for_inputs(inputs, embedding_dim) for t in self.tasks}
        in_dim = embeddings[self.tasks[0]].out_dim
        self.embeddings = nn.ModuleDict(embeddings)
        self.nets = nn.ModuleDict(
            {t: mlp(in_dim, [*bottom_units, *tower_units], dropout, out_dim=1) for t in self.tasks}
        )
        self.z = SharedRepresentation()

    @property
    def capabilities(self) -> Capabilities:
        """Nothing shared: the STL baseline of MTL gain (its shared representation is empty)."""
        return Capabilities(baseline=True, shared_representation=self.z)

    def introspect(self, batch: Batch) -> Introspection:
        """Nothing to show: no gates, no mixing."""
        return Introspection()

    def forward(self, batch: Batch) -> Tensor:
        self.z.keep()  # nothing is shared
        return torch.cat([self.nets[t](self.embeddings[t](batch)) for t in self.tasks], dim=1)

    def last_shared_layer(self) -> list[Tensor]:
        """Nothing is shared."""
        return []

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        return group_by_prefix(self, {t: [f"embeddings.{t}.", f"nets.{t}."] for t in self.tasks})


@register_scheme("single_task", SingleTaskParams, "no sharing: one independent network per task (the STL baseline)")
def build(params: SingleTaskParams, inputs: InputSpec) -> SingleTask:
    return SingleTask(inputs, **params.model_dump())
