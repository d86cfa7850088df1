"""Contract tests over every registered sharing scheme, plus checks of each scheme's definition."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlcli.data.batch import Batch
from mtlcli.models import SCHEMES, InputSpec, build_model
from mtlcli.models.base import enable_representation
from mtlcli.models.base import scheme as scheme_of
from mtlcli.models.blocks import ExpertPool, FeatureEmbedding, use_sparse_rows
from mtlcli.models.mmoe import MMoE
from mtlcli.train.loop import task_loss_sums, task_losses
from mtlcli.weighting.gradients import split_parameters
from tests.numerics import assert_kernel_close

pytestmark = pytest.mark.numerics  # compares results of different code paths: run under other kernels too

TASKS = ["click", "like", "watch"]
TYPES = ["binary", "binary", "regression"]
INPUTS = InputSpec(cardinalities=[6, 9, 4], n_numeric=3, tasks=TASKS, task_types=TYPES)


def make_batch(n: int = 64, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    cats = torch.stack([torch.randint(0, c, (n,), generator=gen) for c in INPUTS.cardinalities], dim=1)
    numeric = torch.randn(n, INPUTS.n_numeric, generator=gen)
    labels = torch.stack(
        [
            (torch.rand(n, generator=gen) < 0.4).float(),
            (torch.rand(n, generator=gen) < 0.2).float(),
            torch.randn(n, generator=gen),
        ],
        dim=1,
    )
    return Batch(cats, numeric, labels, torch.ones_like(labels, dtype=torch.bool))


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    params = SCHEMES.get(name).params()
    return build_model(name, params, INPUTS)


BINARY = torch.tensor([t == "binary" for t in TYPES])


@pytest.mark.parametrize("scheme", SCHEMES.names())
def test_one_output_per_task(scheme: str) -> None:
    model = build(scheme)
    out = model(make_batch(17))
    assert out.shape == (17, len(TASKS))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("scheme", SCHEMES.names())
def test_parameter_groups_cover_every_parameter_once(scheme: str) -> None:
    model = build(scheme)
    groups = model.parameter_groups()  # type: ignore[operator]
    assert set(groups) == {"shared", *TASKS}
    named = [name for group in groups.values() for name in group]
    assert sorted(named) == sorted(name for name, _ in model.named_parameters())
    # only the declared single-task baseline shares nothing; every multi-task scheme shares something
    assert bool(groups["shared"]) != scheme_of(model).capabilities.baseline


@pytest.mark.parametrize("scheme", SCHEMES.names())
def test_introspection_gives_gates_that_sum_to_one_and_square_alphas(scheme: str) -> None:
    model = build(scheme)
    shown = scheme_of(model).introspect(make_batch(11))
    for gate in shown.gates:
        name = f"{gate.group}.{gate.row}"
        assert torch.isfinite(gate.weights).all(), name
        assert gate.weights.shape == (11, len(gate.experts)), name
        assert torch.allclose(gate.weights.sum(-1), torch.ones(11)), name
        assert gate.row in [*TASKS, "shared"], name
    for alpha in shown.alphas:
        assert torch.isfinite(alpha.matrix).all() and alpha.matrix.shape == (len(TASKS), len(TASKS)), alpha.layer


@pytest.mark.parametrize("scheme", SCHEMES.names())
def test_gradients_reach_every_parameter(scheme: str) -> None:
    model = build(scheme)
    losses = task_losses(model(make_batch(256)), make_batch(256), BINARY)
    losses.sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} gets no gradient"
        assert param.grad.abs().sum() > 0, f"{name} gets an all-zero gradient"


@pytest.mark.parametrize("scheme", SCHEMES.names())
def test_numbers_only_every_trainable_parameter_takes_part(scheme: str) -> None:
    """Without categorical features too, every trainable parameter gets a gradient: DDP (several
    processes) stops when one takes no part in a step."""
    torch.manual_seed(0)
    inputs = InputSpec(cardinalities=[], n_numeric=3, tasks=TASKS, task_types=TYPES)
    model = build_model(scheme, SCHEMES.get(scheme).params(), inputs)
    full = make_batch(32)
    batch = Batch(full.categorical[:, :0], full.numeric, full.labels, full.label_mask)
    task_losses(model(batch), batch, BINARY).sum().backward()
    unused = [name for name, param in model.named_parameters() if param.requires_grad and param.grad is None]
    assert not unused


@pytest.mark.parametrize("sparse", [False, True], ids=["table", "row-wise"])
@pytest.mark.parametrize("scheme", SCHEMES.names())
def test_an_empty_batch_gives_no_output_and_zero_gradients(scheme: str, sparse: bool) -> None:
    """On several processes a rank's slice of a short last batch (or of a streamed epoch's tail)
    can hold no rows: it must still take part in the step, with zero gradients."""
    model = build(scheme)
    if sparse:
        use_sparse_rows(model)
    batch = make_batch(0)
    logits = model(batch)
    assert logits.shape == (0, len(TASKS))
    task_loss_sums(logits, batch, BINARY)[0].sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is None or not param.grad.any(), name


@pytest.mark.parametrize("scheme", SCHEMES.names())
def test_task_parameters_get_no_gradient_from_other_tasks(scheme: str) -> None:
    model = build(scheme)
    groups = model.parameter_groups()  # type: ignore[operator]
    batch = make_batch(128)
    for k, task in enumerate(TASKS):
        model.zero_grad(set_to_none=True)
        losses = task_losses(model(batch), batch, BINARY)
        (losses.sum() - losses[k]).backward()  # every loss but task k's
        for name, param in groups[task].items():
            assert param.grad is None or param.grad.abs().sum() == 0, f"{name} ({task}) moved by other tasks"


@pytest.mark.parametrize("scheme", SCHEMES.names())
def test_same_seed_same_model(scheme: str) -> None:
    batch = make_batch(8)
    assert torch.equal(build(scheme)(batch), build(scheme)(batch))  # same kernels, same inputs: bitwise


def test_embedding_matches_plain_lookup_and_its_gradient() -> None:
    torch.manual_seed(0)
    emb = FeatureEmbedding([6, 9, 4], 3, dim=5)
    batch = make_batch(32)
    out = emb(batch)
    ids = batch.categorical + torch.tensor([0, 6, 15])
    expected = torch.cat([nn.functional.embedding(ids, emb.table.weight).flatten(1), batch.numeric], 1)
    assert torch.equal(out, expected)  # both gather the same rows, no arithmetic: bitwise
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    fast_grad = emb.table.weight.grad.clone()
    emb.table.weight.grad = None
    (expected * weights).sum().backward()
    assert_kernel_close(fast_grad, emb.table.weight.grad, what="index_add vs embedding backward")


def test_expert_pool_equals_separate_mlps() -> None:
    torch.manual_seed(0)
    pool = ExpertPool(in_dim=7, n=4, units=[5, 3])
    x = torch.randn(10, 7)
    out = pool(x)
    assert out.shape == (10, 4, 3)
    for e in range(4):
        w1 = pool.first.weight[e * 5 : (e + 1) * 5]
        b1 = pool.first.bias[e * 5 : (e + 1) * 5]
        h = torch.relu(x @ w1.T + b1)
        h = torch.relu(h @ pool.weights[0][e] + pool.biases[0][e])
        assert_kernel_close(out[:, e], h, what=f"expert {e}")


def test_mmoe_is_a_per_task_softmax_mixture_of_experts() -> None:
    torch.manual_seed(0)
    model = MMoE(INPUTS, embedding_dim=4, n_experts=3, expert_units=[6], tower_units=[4], dropout=0.0)
    batch = make_batch(20)
    x = model.embedding(batch)
    gates = model.gate_weights(x)
    assert gates.shape == (20, len(TASKS), 3)
    assert torch.allclose(gates.sum(-1), torch.ones(20, len(TASKS)))
    experts = model.experts(x)
    for k, task in enumerate(TASKS):
        mixture = sum(gates[:, k, e : e + 1] * experts[:, e] for e in range(3))
        assert_kernel_close(model(batch)[:, k], model.towers.nets[task](mixture).squeeze(1), floor=1.0, what=task)


def representation_models() -> list[tuple[str, nn.Module]]:
    """Every registered scheme with its defaults, plus PLE with three levels (a level with
    nothing task-specific below the cut)."""
    models = [(name, build(name)) for name in SCHEMES.names()]
    models = [(name, m) for name, m in models if scheme_of(m).capabilities.shared_representation is not None]
    torch.manual_seed(0)
    models.append(("ple-3", build_model("ple", SCHEMES.get("ple").params(levels=3), INPUTS)))
    return models


def test_only_dtrn_lacks_a_shared_representation_and_says_so() -> None:
    from mtlcli.errors import MtlError

    lacking = [name for name in SCHEMES.names() if scheme_of(build(name)).capabilities.shared_representation is None]
    assert lacking == ["dtrn"]
    with pytest.raises(MtlError, match="the scheme DTRN has none"):
        enable_representation(build("dtrn"))


@pytest.mark.parametrize(("scheme", "model"), representation_models(), ids=lambda v: v if isinstance(v, str) else "")
def test_shared_representation_cuts_shared_from_task_parameters(scheme: str, model: nn.Module) -> None:
    """MGDA-UB's premise, for every scheme: each task's gradient on the shared parameters equals
    the backward pass of its gradient on the representation z (the shared parameters reach the
    losses only through z), and no task-specific parameter lies upstream of z."""
    batch = make_batch(96)
    model.eval()
    plain = model(batch)
    enable_representation(model)
    model.train()
    out = model(batch)
    # keeping z may take another path (MMoE's fused matmul is skipped): other kernels, same values
    assert_kernel_close(out, plain, floor=1.0, what="outputs with and without the representation kept")
    kept = scheme_of(model).capabilities.shared_representation
    assert kept is not None
    z = kept.tensors
    shared, own = split_parameters(model)
    assert bool(z) == bool(shared)
    if not shared:
        return  # the single-task baseline: nothing shared, nothing to cut
    losses = task_losses(out, batch, BINARY)
    for k in range(len(TASKS)):
        direct = torch.autograd.grad(losses[k], shared, retain_graph=True, allow_unused=True)
        dz = torch.autograd.grad(losses[k], z, retain_graph=True, allow_unused=True)
        dz = [g if g is not None else torch.zeros_like(t) for g, t in zip(dz, z, strict=True)]
        via = torch.autograd.grad(z, shared, grad_outputs=dz, retain_graph=True, allow_unused=True)
        for d, v, p in zip(direct, via, shared, strict=True):
            d = d if d is not None else torch.zeros_like(p)
            v = v if v is not None else torch.zeros_like(p)
            assert_kernel_close(v, d, what=f"task {k}: gradient via z vs direct")
    if z and own:
        upstream = torch.autograd.grad(z, own, grad_outputs=[torch.ones_like(t) for t in z], allow_unused=True)
        names = {id(p): n for n, p in model.named_parameters()}
        for g, p in zip(upstream, own, strict=True):
            assert g is None or g.abs().sum() == 0, f"{names[id(p)]} is task-specific but lies upstream of z"


def gradnorm_layer_models() -> list[tuple[str, nn.Module]]:
    """Every scheme, PLE with three levels, heterogeneous experts, and ESMM with only its two tasks."""
    models = representation_models()
    torch.manual_seed(0)
    hetero = SCHEMES.get("mmoe").params(n_experts=3, expert_kinds=["mlp", "fm", "cross"])
    models.append(("mmoe-hetero", build_model("mmoe", hetero, INPUTS)))
    two = InputSpec(INPUTS.cardinalities, INPUTS.n_numeric, TASKS[:2], TYPES[:2])
    models.append(("esmm-2", build_model("esmm", SCHEMES.get("esmm").params(), two)))
    return models


@pytest.mark.parametrize(("scheme", "model"), gradnorm_layer_models(), ids=lambda v: v if isinstance(v, str) else "")
def test_last_shared_layer_is_shared_and_every_task_reaches_it(scheme: str, model: nn.Module) -> None:
    """GradNorm's W, as each scheme declares it: shared parameters, and every task's loss has a
    gradient on them (else that task's G_k would be 0 and its weight would only grow)."""
    layer = model.last_shared_layer()  # type: ignore[operator]
    shared = {id(p) for p in model.parameter_groups()["shared"].values()}  # type: ignore[operator]
    if not shared:
        assert layer == []  # the single-task baseline: nothing to balance on
        return
    assert layer, f"{scheme} declares no last shared layer"
    assert all(id(p) in shared and p.dim() >= 2 for p in layer), "W must be shared weight matrices"
    tasks = model.tasks  # type: ignore[attr-defined]
    full = make_batch(128)
    batch = Batch(full.categorical, full.numeric, full.labels[:, : len(tasks)], full.label_mask[:, : len(tasks)])
    losses = task_losses(model(batch), batch, BINARY[: len(tasks)])
    for k, task in enumerate(tasks):
        grads = torch.autograd.grad(losses[k], layer, retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{task}'s loss does not reach W"
