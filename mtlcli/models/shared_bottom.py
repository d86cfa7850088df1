"""Hard parameter sharing (shared-bottom): one bottom network for all tasks, one tower per task.

Caruana, "Multitask Learning", Machine Learning 28, 1997; the MMoE paper's Shared-Bottom baseline.
"""

from __future__ import annotations

from torch import Tensor, nn

from mtlcli.data.batch import Batch
from mtlcli.models.base import BottomParams, Capabilities, InputSpec, group_by_prefix, register_scheme
from mtlcli.models.blocks import FeatureEmbedding, Towers, last_linear, mlp
from mtlcli.models.views import Introspection, SharedRepresentation, TaskTowers


class SharedBottomParams(BottomParams):
    pass


class SharedBottom(nn.Module):
    """embedding -> bottom MLP (shared) -> per-task tower -> logit. Output [B, T].

    Shared representation: the bottom's output."""

    def __init__(
        self, inputs: InputSpec, embedding_dim: int, bottom_units: list[int], tower_units: list[int], dropout: float
    ) -> None:
        super().__init__()
        self.tasks = list(inputs.tasks)
        self.embedding = FeatureEmbedding.for_inputs(inputs, embedding_dim)
        self.bottom = mlp(self.embedding.out_dim, bottom_units, dropout)
        self.towers = Towers(self.tasks, bottom_units[-1], tower_units, dropout)
        self.z = SharedRepresentation()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(shared_representation=self.z, task_towers=TaskTowers(self.task_inputs, self.towers.nets))

    def task_inputs(self, batch: Batch) -> list[Tensor]:
        """What every tower reads: the bottom's output [B, H], once per task."""
        return [self.bottom(self.embedding(batch))] * len(self.tasks)

    def introspect(self, batch: Batch) -> Introspection:
        """Nothing to show: no gates, no mixing."""
        return Introspection()

    def forward(self, batch: Batch) -> Tensor:
        h = self.bottom(self.embedding(batch))
        self.z.keep(h)
        return self.towers(h)

    def last_shared_layer(self) -> list[Tensor]:
        """The bottom's last Linear: every tower reads its output."""
        return [last_linear(self.bottom).weight]

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        return group_by_prefix(self, {t: [f"towers.nets.{t}."] for t in self.tasks})


@register_scheme("shared_bottom", SharedBottomParams, "hard sharing: one bottom MLP, one tower per task")
def build(params: SharedBottomParams, inputs: InputSpec) -> SharedBottom:
    return SharedBottom(inputs, **params.model_dump())
