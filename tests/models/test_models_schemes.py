"""Each sharing scheme checked against its paper's definition on small hand-made inputs."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from mtlcli.models import SCHEMES, build_model
from mtlcli.models.blocks import CrossExpert, Experts, FieldLayout, FMExpert
from mtlcli.models.cgc import CGCParams, ExtractionNetwork
from mtlcli.models.cross_stitch import CrossStitch, initial_alpha
from mtlcli.models.mmoe import MMoEParams
from mtlcli.models.omoe import OMoE
from mtlcli.models.single_task import SingleTask
from mtlcli.train.loop import task_losses
from tests.models.test_models import BINARY, INPUTS, TASKS, make_batch
from tests.numerics import assert_kernel_close

pytestmark = pytest.mark.numerics  # compares each scheme with its definition computed another way

T = len(TASKS)


def perturb(module: nn.Module) -> None:
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param))


def extraction(levels: int, n_shared: int = 3, n_task: int = 2) -> ExtractionNetwork:
    torch.manual_seed(0)
    return ExtractionNetwork(INPUTS, 4, levels, n_shared, n_task, [8], [8], dropout=0.0)


def test_omoe_is_one_softmax_mixture_read_by_every_tower() -> None:
    torch.manual_seed(0)
    model = OMoE(INPUTS, embedding_dim=4, n_experts=3, expert_units=[5], tower_units=[4], dropout=0.0)
    batch = make_batch(20)
    (shown,) = model.introspect(batch).gates
    assert (shown.group, shown.row, shown.experts) == ("gate", "shared", ["0", "1", "2"])
    gate = shown.weights
    assert gate.shape == (20, 3)
    assert torch.allclose(gate.sum(-1), torch.ones(20))
    experts = model.experts(model.embedding(batch))
    mixture = sum(gate[:, e : e + 1] * experts[:, e] for e in range(3))
    for k, task in enumerate(TASKS):
        assert_kernel_close(model(batch)[:, k], model.towers.nets[task](mixture).squeeze(1), floor=1.0)


def test_cgc_task_gate_mixes_exactly_its_own_and_the_shared_experts() -> None:
    model = extraction(levels=1)
    batch = make_batch(16)
    shown = model.introspect(batch).gates
    gates = {f"{g.group}.{g.row}": g.weights for g in shown}
    assert set(gates) == {f"level1.gate.{t}" for t in TASKS}  # no shared gate in CGC
    assert shown[0].experts == ["click.0", "click.1", "shared.0", "shared.1", "shared.2"]
    layer = model.levels[0]
    x = model.embedding(batch)
    shared = layer.shared_experts(x)
    out = model(batch)
    for k, task in enumerate(TASKS):
        gate = gates[f"level1.gate.{task}"]
        assert gate.shape == (16, 2 + 3)
        assert torch.allclose(gate.sum(-1), torch.ones(16))
        experts = torch.cat([layer.task_experts[task](x), shared], dim=1)
        mixture = (gate.unsqueeze(-1) * experts).sum(1)
        assert_kernel_close(out[:, k], model.towers.nets[task](mixture).squeeze(1), floor=1.0)
    # Another task's experts are outside task k's gate: changing them leaves task k alone.
    perturb(layer.task_experts[TASKS[1]])
    after = model(batch)
    assert torch.equal(after[:, 0], out[:, 0]) and torch.equal(after[:, 2], out[:, 2])  # same kernels: bitwise
    assert not torch.allclose(after[:, 1], out[:, 1])


def test_ple_shared_gate_mixes_every_expert_of_its_level() -> None:
    model = extraction(levels=2)
    batch = make_batch(16)
    shown = model.introspect(batch).gates
    gates = {f"{g.group}.{g.row}": g.weights for g in shown}
    assert set(gates) == {f"level{j}.gate.{t}" for j in (1, 2) for t in TASKS} | {"level1.gate.shared"}
    every_expert = [f"{t}.{i}" for t in TASKS for i in range(2)] + [f"shared.{i}" for i in range(3)]
    assert next(g.experts for g in shown if g.row == "shared") == every_expert
    shared_gate = gates["level1.gate.shared"]
    assert shared_gate.shape == (16, T * 2 + 3)
    assert torch.allclose(shared_gate.sum(-1), torch.ones(16))
    layer = model.levels[0]
    x = model.embedding(batch)
    every = torch.cat([*(layer.task_experts[t](x) for t in TASKS), layer.shared_experts(x)], dim=1)
    _, shared_out, _ = layer([x] * T, x)
    assert_kernel_close(shared_out, (shared_gate.unsqueeze(-1) * every).sum(1))
    # Through the shared gate, task 1's level-1 experts reach every task (unlike in CGC).
    out = model(batch)
    perturb(layer.task_experts[TASKS[1]])
    after = model(batch)
    assert all(not torch.allclose(after[:, k], out[:, k]) for k in range(T))


def test_ple_task_parameters_are_those_only_their_task_reaches() -> None:
    groups = extraction(levels=3).parameter_groups()
    mine = {name.split(".weight")[0].split(".bias")[0] for name in groups[TASKS[0]]}
    assert "levels.2.task_experts.click.pool.first" in mine  # last level: the task's own
    assert "levels.1.task_gates.click" in mine and "levels.2.task_gates.click" in mine
    assert "levels.0.task_gates.click" not in mine  # feeds level 2's experts, which the shared gate mixes
    assert not any(name.startswith("levels.1.task_experts.") for name in groups[TASKS[0]])


def test_cross_stitch_alpha_starts_near_identity_with_rows_summing_to_one() -> None:
    alpha = initial_alpha(3, 0.1)
    assert torch.allclose(alpha.diagonal(), torch.full((3,), 0.9))
    assert torch.allclose(alpha.sum(1), torch.ones(3))
    assert torch.allclose(alpha[0, 1:], torch.full((2,), 0.05))
    assert torch.equal(initial_alpha(1, 0.3), torch.ones(1, 1))


def test_cross_stitch_with_identity_alpha_is_independent_columns() -> None:
    torch.manual_seed(0)
    model = CrossStitch(INPUTS, 4, [6, 5], [4], dropout=0.0, alpha_init_offdiag=0.0)
    batch = make_batch(12)
    shown = model.introspect(batch)
    assert not shown.gates and [a.layer for a in shown.alphas] == ["layer1", "layer2"]
    assert all(torch.equal(a.matrix, torch.eye(T)) for a in shown.alphas)
    x = model.embedding(batch)
    out = model(batch)
    for k, task in enumerate(TASKS):
        h = x
        for layer in model.columns[task]:
            h = torch.relu(layer(h))
        assert_kernel_close(out[:, k], model.towers.nets[task](h).squeeze(1), floor=1.0)


def test_cross_stitch_mixes_columns_by_alpha() -> None:
    torch.manual_seed(0)
    model = CrossStitch(INPUTS, 4, [6], [], dropout=0.0, alpha_init_offdiag=0.2)
    with torch.no_grad():  # a non-symmetric alpha: row k mixes into column k, not column k into row k
        model.alphas[0].copy_(torch.rand(T, T, generator=torch.Generator().manual_seed(1)))
    batch = make_batch(12)
    x = model.embedding(batch)
    h = torch.stack([torch.relu(model.columns[t][0](x)) for t in TASKS], dim=1)  # [B, T, D]
    alpha = model.alphas[0]
    out = model(batch)
    for k, task in enumerate(TASKS):
        mixed = sum(alpha[k, j] * h[:, j] for j in range(T))
        assert_kernel_close(out[:, k], model.towers.nets[task](mixed).squeeze(1), floor=1.0)


def test_single_task_networks_are_independent() -> None:
    torch.manual_seed(0)
    model = SingleTask(INPUTS, 4, [8], [4], dropout=0.0)
    batch = make_batch(10)
    out = model(batch)
    assert model.parameter_groups()["shared"] == {}
    perturb(model.embeddings[TASKS[0]])
    perturb(model.nets[TASKS[0]])
    after = model(batch)
    assert torch.equal(after[:, 1:], out[:, 1:])  # same kernels: bitwise
    assert not torch.allclose(after[:, 0], out[:, 0])


FIELDS = FieldLayout(n_categorical=3, dim=4, n_numeric=2)


def test_fm_expert_projects_the_pairwise_inner_products_of_the_fields() -> None:
    torch.manual_seed(0)
    expert = FMExpert(FIELDS, out_dim=5)
    x = torch.randn(7, 3 * 4 + 2)
    assert expert.numeric_vectors is not None
    vectors = [x[:, 4 * i : 4 * i + 4] for i in range(3)] + [
        x[:, 12 + j : 13 + j] * expert.numeric_vectors[j] for j in range(2)
    ]
    pairs = torch.stack([(vectors[i] * vectors[j]).sum(1) for i in range(5) for j in range(i + 1, 5)], dim=1)
    assert_kernel_close(expert(x), torch.relu(expert.project(pairs)))


def test_cross_expert_follows_the_dcn_recursion() -> None:
    torch.manual_seed(0)
    expert = CrossExpert(in_dim=6, layers=2, out_dim=3)
    x0 = torch.randn(5, 6)
    x = x0
    for layer in range(2):
        x = x0 * (x @ expert.w[layer]).unsqueeze(1) + expert.b[layer] + x
    assert_kernel_close(expert(x0), torch.relu(expert.project(x)))


def test_heterogeneous_experts_keep_the_order_of_their_kinds() -> None:
    torch.manual_seed(0)
    experts = Experts(14, ["cross", "mlp", "fm", "mlp"], [5], fields=FIELDS)
    x = torch.randn(4, 14)
    out = experts(x)
    assert out.shape == (4, 4, 5)
    assert experts.pool is not None
    pool = experts.pool(x)
    # the same pool on the same input inside and outside: bitwise
    assert torch.equal(out[:, 1], pool[:, 0]) and torch.equal(out[:, 3], pool[:, 1])
    assert torch.equal(out[:, 0], experts.others[0](x)) and torch.equal(out[:, 2], experts.others[1](x))


HETERO = {
    "mmoe": {"n_experts": 3, "expert_kinds": ["mlp", "fm", "cross"]},
    "omoe": {"n_experts": 3, "expert_kinds": ["fm", "cross", "mlp"]},
    "cgc": {"shared_expert_kinds": ["fm", "cross", "mlp", "mlp"], "task_expert_kinds": ["cross", "fm"]},
    "ple": {"shared_expert_kinds": ["fm", "cross", "mlp", "mlp"], "task_expert_kinds": ["mlp", "fm"]},
}


@pytest.mark.parametrize("scheme", sorted(HETERO))
def test_heterogeneous_expert_schemes_keep_the_contract(scheme: str) -> None:
    torch.manual_seed(0)
    model = build_model(scheme, SCHEMES.get(scheme).params(**HETERO[scheme]), INPUTS)
    batch = make_batch(128)
    groups = model.parameter_groups()  # type: ignore[operator]
    assert sorted(n for g in groups.values() for n in g) == sorted(n for n, _ in model.named_parameters())
    task_losses(model(batch), batch, BINARY).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for k, task in enumerate(TASKS):
        model.zero_grad(set_to_none=True)
        losses = task_losses(model(batch), batch, BINARY)
        (losses.sum() - losses[k]).backward()
        for name, param in groups[task].items():
            assert param.grad is None or param.grad.abs().sum() == 0, name


def test_mmoe_generic_path_equals_the_fused_one() -> None:
    torch.manual_seed(0)
    model = build_model("mmoe", MMoEParams(n_experts=3), INPUTS)
    batch = make_batch(9)
    fused = model(batch)
    model.experts.all_mlp = False  # force the heterogeneous path on all-MLP experts
    assert_kernel_close(model(batch), fused, floor=1.0)


def test_expert_kinds_need_one_kind_per_expert() -> None:
    with pytest.raises(ValidationError, match="3 kinds for 2 experts"):
        MMoEParams(n_experts=2, expert_kinds=["mlp", "fm", "cross"])
    with pytest.raises(ValidationError, match="n_task_experts"):
        CGCParams(n_task_experts=2, task_expert_kinds=["fm"])
    with pytest.raises(ValidationError):
        MMoEParams(n_experts=1, expert_kinds=["attention"])  # type: ignore[list-item]
