"""PEPNet (Chang et al., KDD 2023): EPNet's field scales and PPNet's per-task layer scales."""

from __future__ import annotations

import pytest
import torch

from mtlcli.errors import MtlError
from mtlcli.models import InputSpec
from mtlcli.models.pepnet import PEPNet
from tests.models.test_models import TASKS, TYPES, make_batch
from tests.numerics import assert_kernel_close

NAMES = ["user", "item", "scene"]
INPUTS = InputSpec([6, 9, 4], 3, TASKS, TYPES, categorical_names=NAMES)


def model(prior: list[str] | None = None, domain: list[str] | None = None) -> PEPNet:
    torch.manual_seed(0)
    return PEPNet(INPUTS, 4, prior or ["user", "item"], domain or ["scene"], 6, 2.0, [5], 0.0)


def gate(first: torch.nn.Linear, second: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return 2.0 * torch.sigmoid(second(torch.relu(first(x))))


def test_embedding_and_every_tower_layer_are_scaled_by_gates_on_the_prior() -> None:
    m, batch = model(), make_batch(20)
    e = m.embedding(batch)  # [B, 3 * 4 + 3]: user, item, scene embeddings, then 3 numbers
    user, item, scene = e[:, 0:4], e[:, 4:8], e[:, 8:12]
    field = gate(m.epnet.first, m.epnet.second, torch.cat([scene, e], 1))  # [B, 6]: 3 fields + 3 numbers
    assert field.shape == (20, 6) and bool(((field > 0) & (field < 2)).all())
    o_ep = torch.cat([e[:, :12] * field[:, :3].repeat_interleave(4, 1), e[:, 12:] * field[:, 3:]], 1)
    prior = torch.cat([user, item, o_ep], 1)
    for k, task in enumerate(TASKS):
        first, out = m.towers[task]
        scale0 = 2.0 * torch.sigmoid(m.scales[task][0](torch.relu(m.ppnet[0](prior))))
        scale1 = 2.0 * torch.sigmoid(m.scales[task][1](torch.relu(m.ppnet[1](prior))))
        expected = out(scale1 * torch.relu(first(scale0 * o_ep))).squeeze(1)
        assert_kernel_close(m(batch)[:, k], expected, floor=1.0, what=task)
    records = m.gate_scales(batch)
    assert [(r.group, r.row) for r in records] == [("embedding", "shared")] + [
        (f"layer{j}", t) for t in TASKS for j in (1, 2)
    ]
    assert_kernel_close(records[0].scales, field)


def test_gates_read_the_embedding_and_o_ep_without_training_them() -> None:
    m, batch = model(), make_batch(64)
    _, field, _ = m.run(batch)
    field.sum().backward()  # EPNet's gate: the domain feature's rows only; the rest is stop-gradient
    touched = m.embedding.table.weight.grad.abs().sum(1) > 0
    assert touched[15:19].all() and not touched[:15].any()  # scene's rows are 6 + 9 .. 6 + 9 + 4
    m.zero_grad()
    _, _, scales = m.run(batch)
    sum(g.sum() for gates in scales for g in gates).backward()  # PPNet's gates: the prior's rows only
    touched = m.embedding.table.weight.grad.abs().sum(1) > 0
    assert touched[:15].all() and not touched[15:].any()  # user and item rows
    assert m.epnet.first.weight.grad is None  # they read O_ep without a gradient to EPNet


def test_the_prior_must_name_categorical_features() -> None:
    with pytest.raises(MtlError, match=r"model.prior: 'usr' is not a categorical feature.*did you mean 'user'"):
        model(prior=["usr"])
    with pytest.raises(MtlError, match=r"model\.domain: 'page'"):
        model(domain=["page"])


def test_explain_gives_each_gates_mean_scale_per_unit_named_by_the_schema() -> None:
    from mtlcli.data.batch import SplitTensors
    from mtlcli.explain.report import ExplainOptions, explain_model

    m, batch = model(), make_batch(100)
    data = SplitTensors(batch.categorical, batch.numeric, batch.labels, batch.label_mask)
    inputs = (NAMES, [], ["price", "age", "hour"])
    report = explain_model(m, data, TASKS, TYPES, ExplainOptions(grad_batches=1, grad_batch_size=50), inputs=inputs)
    embedding = report["gate_scales"]["embedding"]
    assert embedding["units"] == [*NAMES, "price", "age", "hour"] and embedding["bound"] == 2.0
    with torch.no_grad():
        field = m.run(batch)[1]
    assert embedding["rows"]["shared"]["mean"] == pytest.approx(field.double().mean(0).tolist(), abs=1e-6)
    assert embedding["rows"]["shared"]["spread"] == pytest.approx(
        field.double().std(0, unbiased=False).tolist(), abs=1e-6
    )
    assert set(report["gate_scales"]) == {"embedding", "layer1", "layer2"}
    assert list(report["gate_scales"]["layer2"]["rows"]) == TASKS
    assert report["readings"]["gate_scales"][0].startswith("embedding gate scales (of 0..2): shared scales by")
