"""STEM-Net (Su et al., AAAI 2024): shared and per-task embedding tables; every task reads every
table forward, and its loss trains only its own table (and the shared one)."""

from __future__ import annotations

import torch

from mtlcli.models.stem import STEM
from mtlcli.train.loop import task_losses
from tests.models.test_models import BINARY, INPUTS, TASKS, make_batch
from tests.numerics import assert_kernel_close


def model() -> STEM:
    torch.manual_seed(0)
    return STEM(INPUTS, 4, n_shared_experts=2, n_task_experts=1, expert_units=[6], tower_units=[4], dropout=0.0)


def test_each_gate_reads_its_table_and_the_shared_one_and_mixes_every_expert() -> None:
    m, batch = model(), make_batch(24)
    e = {name: m.tables[name](batch) for name in [*TASKS, "shared"]}
    every = torch.cat([*(m.task_experts[t](e[t]) for t in TASKS), m.shared_experts(e["shared"])], dim=1)
    out = m(batch)
    for k, task in enumerate(TASKS):
        gate = torch.softmax(m.gates[task](e[task] + e["shared"]), dim=-1)  # [B, 3 * 1 + 2]
        expected = m.towers.nets[task]((gate.unsqueeze(-1) * every).sum(1)).squeeze(1)
        assert_kernel_close(out[:, k], expected, floor=1.0, what=task)
    shown = {(g.group, g.row): g for g in m.introspect(batch).gates}
    usage = shown[("table", "click")]
    assert usage.experts == [*TASKS, "shared"]
    weights = shown[("gate", "click")].weights  # click.0 like.0 watch.0 shared.0 shared.1
    assert_kernel_close(usage.weights, torch.cat([weights[:, :3], weights[:, 3:].sum(1, keepdim=True)], 1))


def test_all_tables_forward_each_tasks_loss_backward_to_its_own() -> None:
    m, batch = model(), make_batch(128)
    for k, task in enumerate(TASKS):
        m.zero_grad(set_to_none=True)
        task_losses(m(batch), batch, BINARY)[k].backward()
        for name in TASKS:
            grad = m.tables[name].table.weight.grad
            reached = grad is not None and bool(grad.abs().sum() > 0)
            assert reached == (name == task), (task, name)
        assert m.tables["shared"].table.weight.grad.abs().sum() > 0
    before = m(batch)
    with torch.no_grad():
        m.tables["like"].table.weight.add_(1.0)
    assert not torch.allclose(m(batch)[:, 0], before[:, 0])  # click reads like's table forward
