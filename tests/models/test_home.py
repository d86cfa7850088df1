"""HoME (Wang et al., 2024): normalised Swish experts, the category hierarchy with meta experts,
feature gates on the meta experts' inputs and the self gate past the second level."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from mtlcli.models.home import HoME, HoMEParams, check
from tests.models.test_models import INPUTS, TASKS, make_batch
from tests.numerics import assert_kernel_close

CATEGORIES = {"a": ["click", "like"], "b": ["watch"]}


def model() -> HoME:
    torch.manual_seed(0)
    m = HoME(INPUTS, 4, CATEGORIES, 1, 2, 1, [6], 3, [4], 0.0)
    with torch.no_grad():  # gains, shifts and feature gates off their initial values
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def expert(m_experts: torch.nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of a one-layer NormExperts on x [B, in]: Linear -> normalise -> gain, shift -> Swish."""
    h = x @ m_experts.weights[0][e] + m_experts.biases[0][e]
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    h = h * m_experts.gains[0][e] + m_experts.shifts[0][e]
    return h * torch.sigmoid(h)


def test_the_two_levels_computed_by_hand() -> None:
    m, batch = model(), make_batch(16)
    x = m.embedding(batch)
    n_meta = 1 + 2 * 2  # the global one, then category a's two and b's two
    meta = []
    for e in range(n_meta):
        scale = 2.0 * torch.sigmoid(x @ m.feature_gates.down[e] @ m.feature_gates.up[e])  # [B, D]
        meta.append(expert(m.meta_experts, e, x * scale))
    v = {}
    for j, c in enumerate(["a", "b"]):
        gate = torch.softmax(m.meta_gates[c](x), -1)  # over the category's 2, then the global 1
        v[c] = sum(
            g.unsqueeze(1) * o for g, o in zip(gate.unbind(1), [meta[1 + 2 * j], meta[2 + 2 * j], meta[0]], strict=True)
        )
    gate = torch.softmax(m.global_gate(x), -1)
    v_s = sum(g.unsqueeze(1) * o for g, o in zip(gate.unbind(1), meta, strict=True))
    out = m(batch)
    for k, task in enumerate(TASKS):
        c = "a" if task != "watch" else "b"
        experts = [
            expert(m.task_experts[task], 0, v[c]),
            expert(m.category_experts[c], 0, v[c]),
            expert(m.category_experts[c], 1, v[c]),
            expert(m.shared_experts, 0, v_s),
        ]
        gate = torch.softmax(m.task_gates[task](v[c]), -1)
        mix = sum(g.unsqueeze(1) * o for g, o in zip(gate.unbind(1), experts, strict=True))
        h = mix + torch.sigmoid(m.self_gates[task](v[c])) * v[c]  # the self gate
        assert_kernel_close(out[:, k], m.towers.nets[task](h).squeeze(1), floor=1.0, what=task)


def test_the_hierarchy_masks_other_categories_experts() -> None:
    m, batch = model(), make_batch(16)
    before = m(batch)
    with torch.no_grad():
        for p in m.category_experts["b"].parameters():
            p.add_(torch.randn_like(p))
    after = m(batch)
    assert torch.equal(after[:, :2], before[:, :2])  # click and like (category a): same kernels, bitwise
    assert not torch.allclose(after[:, 2], before[:, 2])
    gates = {(g.group, g.row): g.experts for g in m.introspect(batch).gates}
    assert gates[("task.gate", "watch")] == ["watch.0", "category b.0", "category b.1", "shared.0"]
    scales = m.capabilities.gate_scales(batch)
    assert [s.row for s in scales if s.group == "feature"] == [
        "shared.0",
        "category a.0",
        "category a.1",
        "category b.0",
        "category b.1",
    ]


def test_categories_must_hold_every_task_once() -> None:
    recipe = SimpleNamespace(tasks={t: None for t in TASKS})
    assert check(HoMEParams(categories=CATEGORIES), recipe) == []
    issues = check(HoMEParams(categories={"a": ["click", "clik"], "b": ["click"]}), recipe)
    assert [path for path, _ in issues] == ["categories.a", "categories.b", "categories"]
    assert "did you mean 'click'" in issues[0][1] and "already in category 'a'" in issues[1][1]
    assert issues[2][1].endswith("missing: like, watch")
