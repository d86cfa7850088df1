"""AdaTT (Li et al., KDD 2023): per level, each task fuses its own experts linearly (the residual)
and every expert through its gate; the shared unit fuses every expert for the next level."""

from __future__ import annotations

import torch

from mtlcli.models.adatt import AdaTT
from tests.models.test_models import INPUTS, TASKS, make_batch
from tests.numerics import assert_kernel_close


def model(levels: int) -> AdaTT:
    torch.manual_seed(0)
    m = AdaTT(INPUTS, 4, levels, n_task_experts=2, n_shared_experts=1, expert_units=[6], tower_units=[4], dropout=0.0)
    with torch.no_grad():  # native weights off their initial ones, so that each counts
        for level in m.levels:
            for weights in level.native.values():
                weights.uniform_(-1.0, 2.0)
    return m


def test_each_task_adds_its_own_experts_linearly_to_a_gated_fusion_of_every_expert() -> None:
    m, batch = model(levels=1), make_batch(24)
    level = m.levels[0]
    x = m.embedding(batch)
    own = {t: level.task_experts[t](x) for t in TASKS}  # [B, 2, H] each
    every = torch.cat([*own.values(), level.shared_experts(x)], dim=1)  # [B, 3 * 2 + 1, H]
    out = m(batch)
    for k, task in enumerate(TASKS):
        gate = torch.softmax(level.gates[task](x), dim=-1)
        native = level.native[task][0] * own[task][:, 0] + level.native[task][1] * own[task][:, 1]
        fused = native + (gate.unsqueeze(-1) * every).sum(1)
        assert_kernel_close(out[:, k], m.towers.nets[task](fused).squeeze(1), floor=1.0, what=task)
    names = [g.experts for g in m.introspect(batch).gates]
    assert names[0] == ["click.0", "click.1", "like.0", "like.1", "watch.0", "watch.1", "shared.0"]


def test_the_shared_unit_fuses_every_expert_into_the_next_levels_shared_input() -> None:
    m, batch = model(levels=2), make_batch(24)
    first, second = m.levels
    x = m.embedding(batch)
    every = first.experts([x] * len(TASKS), x)
    outputs, shared, gates = first([x] * len(TASKS), x)
    assert_kernel_close(shared, (torch.softmax(first.shared_gate(x), -1).unsqueeze(-1) * every).sum(1))
    assert set(gates) == {*TASKS, "shared"} and second.shared_gate is None  # none on the last level
    assert_kernel_close(second.shared_experts(shared), second.experts(outputs, shared)[:, -1:])


def test_a_tasks_experts_reach_every_task_and_the_last_levels_units_are_its_own() -> None:
    m, batch = model(levels=2), make_batch(24)
    before = m(batch)
    with torch.no_grad():
        for p in m.levels[1].task_experts["like"].parameters():
            p.add_(torch.randn_like(p))
    after = m(batch)
    assert all(not torch.allclose(after[:, k], before[:, k]) for k in range(len(TASKS)))
    mine = set(m.parameter_groups()["click"])
    assert "levels.1.native.click" in mine and "levels.1.gates.click.weight" in mine
    assert "levels.0.gates.click.weight" not in mine  # feeds level 2's click experts, which all tasks mix
