"""Entire Space Multi-task Model (ESMM).

Ma, Zhao, Huang, Wang, Hu, Zhu, Gai, "Entire Space Multi-Task Model: An Effective Approach for
Estimating Post-Click Conversion Rate", SIGIR 2018. A conversion is only observed after a click,
so training a CVR model on clicked impressions alone is biased (sample selection bias) and starved
of data. ESMM predicts pCTR and pCVR from shared embeddings with two towers, and trains over the
entire impression space on CTR and CTCVR = pCTR x pCVR; pCVR itself is never trained directly.

In mtl the click task's output is logit(pCTR) and the conversion task's output is
logit(pCTR x pCVR): its label must be the conversion over all impressions (1 only when clicked
and converted, as Ali-CCP's ``purchase``), so the task has no sample space. pCVR stays available
from ``pcvr(batch)`` (= pCTCVR / pCTR). Further tasks, if any, get ordinary towers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from mtlcli.data.batch import Batch
from mtlcli.models.base import Capabilities, Dropout, InputSpec, ModelParams, group_by_prefix, register_scheme
from mtlcli.models.blocks import FeatureEmbedding, last_linear, mlp
from mtlcli.models.views import Introspection, SharedRepresentation
from mtlcli.registry import did_you_mean


class ESMMParams(ModelParams):
    click_task: str | None = None  # default: the first task
    conversion_task: str | None = None  # default: the second task
    tower_units: list[PositiveInt] = Field(default=[64, 32], min_length=1)
    dropout: Dropout = 0.0


def check(params: ESMMParams, recipe: Any) -> list[tuple[str, str]]:
    tasks = list(recipe.tasks)
    out = []
    for key in ("click_task", "conversion_task"):
        name = getattr(params, key)
        if name is not None and name not in tasks:
            out.append((key, f"unknown task {name!r}{did_you_mean(name, tasks)}; tasks: {', '.join(tasks)}"))
    if len(tasks) < 2:
        out.append(("scheme", "ESMM needs a click task and a conversion task"))
        return out
    click = params.click_task or tasks[0]
    conversion = params.conversion_task or tasks[1]
    if click == conversion:
        out.append(("conversion_task", "the click and conversion tasks must differ"))
    for key, name in (("click_task", click), ("conversion_task", conversion)):
        if name in recipe.tasks and recipe.tasks[name].type != "binary":
            out.append((key, f"task {name!r} must be binary"))
    if conversion in recipe.tasks and recipe.tasks[conversion].space is not None:
        out.append(
            (
                "conversion_task",
                f"task {conversion!r} has a sample space, but ESMM trains CTCVR over all impressions: remove its 'space'",
            )
        )
    return out


def _log_sigmoid_pair(a: Tensor, b: Tensor) -> Tensor:
    """logit(sigmoid(a) * sigmoid(b)), in log space: log p − log(1 − p) with p = σ(a)σ(b) and
    1 − p = σ(−a) + σ(a)σ(−b), so neither term loses precision near 0 or 1 (and every operation
    exports to ONNX)."""
    log_p = F.logsigmoid(a) + F.logsigmoid(b)  # log(pCTR * pCVR)
    log_q = torch.logsumexp(torch.stack([F.logsigmoid(-a), F.logsigmoid(a) + F.logsigmoid(-b)]), dim=0)
    return log_p - log_q


class ESMM(nn.Module):
    """Shared embedding -> CTR tower and CVR tower; outputs logit(pCTR) and logit(pCTR * pCVR).

    Shared representation: the embedded input as the task-specific towers read it, and the CTR
    logit (the CTR tower is shared: both the CTR and the CTCVR loss reach it)."""

    def __init__(
        self, inputs: InputSpec, embedding_dim: int, click: str, conversion: str, tower_units: list[int], dropout: float
    ) -> None:
        super().__init__()
        self.tasks = list(inputs.tasks)
        self.click, self.conversion = click, conversion
        self.embedding = FeatureEmbedding.for_inputs(inputs, embedding_dim)
        width = self.embedding.out_dim
        self.ctr = mlp(width, tower_units, dropout, out_dim=1)
        self.cvr = mlp(width, tower_units, dropout, out_dim=1)
        others = [t for t in self.tasks if t not in (click, conversion)]
        self.others = nn.ModuleDict({t: mlp(width, tower_units, dropout, out_dim=1) for t in others})
        self.z = SharedRepresentation()

    def _heads(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        x = self.embedding(batch)
        ctr = self.ctr(x).squeeze(1)
        x_own = self.z.alias(x)  # what the task-specific towers read
        self.z.keep(x_own, ctr)
        return x_own, ctr, self.cvr(x_own).squeeze(1)

    def forward(self, batch: Batch) -> Tensor:
        x, ctr, cvr = self._heads(batch)
        columns = []
        for task in self.tasks:
            if task == self.click:
                columns.append(ctr)
            elif task == self.conversion:
                columns.append(_log_sigmoid_pair(ctr, cvr))
            else:
                columns.append(self.others[task](x).squeeze(1))
        return torch.stack(columns, dim=1)

    def pcvr(self, batch: Batch) -> Tensor:
        """pCVR = P(conversion | click) per row [B]: the CVR tower's probability."""
        return torch.sigmoid(self._heads(batch)[2])

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(shared_representation=self.z)

    def introspect(self, batch: Batch) -> Introspection:
        """ESMM has no gates or mixing matrices: nothing to report (pCVR: ``pcvr``)."""
        return Introspection()

    def last_shared_layer(self) -> list[Tensor]:
        """With only the click and conversion tasks, the CTR tower's output layer: both CTR and
        CTCVR = pCTR × pCVR read its logit. With further tasks only the embedding table reaches
        every task's head, so it is W."""
        if set(self.tasks) == {self.click, self.conversion}:
            return [last_linear(self.ctr).weight]
        return [self.embedding.table.weight]

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        # the CTR tower feeds both the CTR and the CTCVR loss, so it is shared
        prefixes = {t: [f"others.{t}."] for t in self.tasks}
        prefixes[self.conversion] = ["cvr."]
        prefixes[self.click] = []
        return group_by_prefix(self, prefixes)


@register_scheme("esmm", ESMMParams, "entire-space CTR/CVR: trains CTR and CTCVR = pCTR x pCVR (SIGIR 2018)", check)
def build(params: ESMMParams, inputs: InputSpec) -> ESMM:
    if len(inputs.tasks) < 2:
        raise ValueError("ESMM needs a click task and a conversion task")
    click = params.click_task or inputs.tasks[0]
    conversion = params.conversion_task or inputs.tasks[1]
    return ESMM(inputs, params.embedding_dim, click, conversion, params.tower_units, params.dropout)
