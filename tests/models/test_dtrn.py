"""DTRN (Liu et al., CIKM 2023): conditional layer norms from hypernetworks, per-task interests,
SENet-like refinement; each checked against its definition on hand-made inputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import Tensor

from mtlcli.data.batch import Batch
from mtlcli.models import SCHEMES, InputSpec, build_model
from mtlcli.models.blocks import SequenceInput
from mtlcli.models.dtrn import DTRN, TaskInterest
from mtlcli.numerics import kernel_scale, kernel_tolerance

INPUTS = InputSpec(
    cardinalities=[7, 5],
    n_numeric=2,
    tasks=["click", "buy"],
    task_types=["binary", "binary"],
    sequences=[SequenceInput(7, "mean", shares=0), SequenceInput(7, "mean", shares=0)],  # two behaviour types
)


def model(**params: object) -> DTRN:
    torch.manual_seed(0)
    built = build_model("dtrn", SCHEMES.get("dtrn").params(embedding_dim=4, **params), INPUTS)
    assert isinstance(built, DTRN)
    with torch.no_grad():  # move off the initial values so that every part matters
        for p in built.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return built


def batch(n: int = 6, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 5, (n, 2), generator=g)
    lengths[0] = 0  # a row with empty histories
    return Batch(
        torch.stack([torch.randint(0, 7, (n,), generator=g), torch.randint(0, 5, (n,), generator=g)], 1),
        torch.randn(n, 2, generator=g),
        torch.zeros(n, 2),
        torch.ones(n, 2, dtype=torch.bool),
        sequences=torch.randint(0, 7, (n, 2, 4), generator=g),
        sequence_lengths=lengths,
    )


def reference_interest(tim: TaskInterest, keys: Tensor, mask: Tensor, candidates: Tensor) -> Tensor:
    """TIM as the paper defines it, one (task, type) pair at a time over the padded histories:
    self-attention over the real items, CLN(X) = γ_{t,b} · γ · (X − μ)/σ + β_{t,b} + β after the
    attention and after the feed-forward network, then the candidate's target attention -> [B, T, S, d]."""
    batch, types, _, dim = keys.shape
    out = torch.zeros(batch, tim.tasks, types, dim)
    for t in range(tim.tasks):
        for s in range(types):
            if tim.conditional:
                pair = torch.cat([tim.task_embedding.weight[t], tim.type_embedding.weight[s]])
                g, b = 1 + tim.hyper_gamma(pair).view(2, dim), tim.hyper_beta(pair).view(2, dim)
            else:
                g, b = torch.ones(2, dim), torch.zeros(2, dim)

            def cln(z: Tensor, j: int, g: Tensor = g, b: Tensor = b) -> Tensor:
                mu, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
                return g[j] * tim.gamma[j] * (z - mu) / (var + 1e-5).sqrt() + b[j] + tim.beta[j]

            x, real = keys[:, s], mask[:, s] > 0  # [B, L, d], [B, L]
            empty = ~real.any(-1)
            allowed = real.clone()
            allowed[empty, 0] = True  # an empty history attends to its first (padded) position
            scores = tim.query(x) @ tim.key(x).transpose(1, 2) / dim**0.5
            attended = scores.masked_fill(~allowed.unsqueeze(1), float("-inf")).softmax(-1) @ tim.value(x)
            h1 = cln(x + attended, 0)
            h = cln(h1 + tim.ffn(h1), 1)
            c = candidates[:, s].unsqueeze(1).expand_as(h)
            if tim.target is not None:  # DIN's unit on [k, c, k − c, k ⊙ c], no softmax
                weights = tim.target.score(torch.cat([h, c, h - c, h * c], -1)).squeeze(-1) * real
            else:
                weights = ((h * c).sum(-1) / dim**0.5).masked_fill(~allowed, float("-inf")).softmax(-1)
            out[:, t, s] = (weights.unsqueeze(-1) * h).sum(1) * ~empty.unsqueeze(-1)
    return out


def tim_inputs(seed: int, full_type: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Histories [7, 3, 6, 4] with every length from empty to full; type 1 is empty in every
    row, and with ``full_type`` type 2 is full in every row (no padding to mask)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 7, (7, 3), generator=g)
    lengths[0, 0], lengths[1, 0], lengths[:, 1] = 0, 6, 0
    if full_type:
        lengths[:, 2] = 6
    mask = (torch.arange(6).view(1, 1, -1) < lengths.unsqueeze(-1)).float()
    keys = torch.randn(7, 3, 6, 4, generator=g)
    return keys, mask, torch.randn(7, 3, 4, generator=g)


@pytest.mark.numerics  # the batched pass against the loop: other kernels, other rounding
@pytest.mark.parametrize("variant", [{}, {"conditional_norm": False}, {"interest": "softmax"}], ids=str)
@pytest.mark.parametrize("full_type", [False, True])
def test_all_pairs_at_once_match_the_pair_by_pair_definition(variant: dict[str, object], full_type: bool) -> None:
    """The batched TIM (every (task, type) pair in one pass, each type cut to its longest history)
    gives the reference loop's interests and gradients, within float32 rounding."""
    torch.manual_seed(0)
    inputs = dataclasses.replace(INPUTS, sequences=[SequenceInput(7, "mean", shares=0)] * 3)
    built = build_model("dtrn", SCHEMES.get("dtrn").params(embedding_dim=4, **variant), inputs)
    tim = built.interest  # type: ignore[union-attr]
    assert isinstance(tim, TaskInterest)
    with torch.no_grad():
        for p in tim.parameters():
            p.add_(0.3 * torch.randn_like(p))
    keys, mask, candidates = tim_inputs(1, full_type)
    keys.requires_grad_(True)
    candidates.requires_grad_(True)
    probe = torch.randn(7, 2, 3, 4)  # a loss that weighs every output differently
    results = []
    for run in (tim, lambda k, m, c: reference_interest(tim, k, m, c)):
        tim.zero_grad()
        keys.grad = candidates.grad = None
        out = run(keys, mask, candidates)
        (out * probe).sum().backward()
        grads = [keys.grad, candidates.grad] + [p.grad for p in tim.parameters()]
        results.append([out.detach()] + [g.clone() for g in grads])  # type: ignore[union-attr]
    names = ["interests", "keys", "candidates"] + [name for name, _ in tim.named_parameters()]
    scales = {name: kernel_scale(expected, floor=1.0) for name, expected in zip(names, results[1], strict=True)}
    # A bias on the keys adds q·b to every score of a row: the softmax ignores it, so its exact
    # gradient is 0 and both results are the rounding of a sum that cancels, of terms the size of
    # the key weights' gradient; that sets its scale.
    scales["key.bias"] = scales["key.weight"]
    for name, got, expected in zip(names, *results, strict=True):
        assert (got - expected).abs().max() <= kernel_tolerance(scales[name]), name
    assert results[1][0][:, :, 1].abs().max() == 0  # the empty type gives no interest


def test_the_hypernetworks_give_each_task_and_behaviour_type_its_own_norm() -> None:
    tim = model().interest
    assert tim is not None
    gamma_c, beta_c = tim.condition()
    pair = torch.cat([tim.task_embedding.weight[1], tim.type_embedding.weight[0]])
    assert torch.allclose(gamma_c[1, 0], 1 + tim.hyper_gamma(pair).view(2, 4), atol=1e-6)
    assert torch.allclose(beta_c[1, 0], tim.hyper_beta(pair).view(2, 4), atol=1e-6)
    assert not torch.allclose(gamma_c[0, 0], gamma_c[1, 0]) and not torch.allclose(gamma_c[0, 0], gamma_c[0, 1])
    plain = model(conditional_norm=False).interest
    assert plain is not None
    ones, zeros = plain.condition()
    assert torch.equal(ones, torch.ones_like(ones)) and torch.equal(zeros, torch.zeros_like(zeros))


def test_tasks_get_different_interests_only_with_conditional_norms() -> None:
    b = batch()
    conditional, plain = model(), model(conditional_norm=False)
    conditional(b)
    plain(b)
    a, p = conditional.interest.last_interest, plain.interest.last_interest  # type: ignore[union-attr]
    assert a is not None and p is not None and a.shape == (6, 2, 2, 4)
    has_items = b.sequence_lengths[:, 0] > 0  # type: ignore[index]
    assert not torch.allclose(a[has_items, 0, 0], a[has_items, 1, 0]), "each task reads the history its own way"
    assert torch.allclose(p[:, 0], p[:, 1]), "without the task condition every task's interest is the same"
    assert torch.equal(a[0], torch.zeros_like(a[0])), "an empty history gives no interest"
    assert torch.isfinite(a).all()


@pytest.mark.parametrize(
    "ablation", [{}, {"conditional_norm": False}, {"refine": False}, {"interest": "softmax"}], ids=str
)
def test_every_parameter_of_each_variant_takes_part(ablation: dict[str, object]) -> None:
    """A parameter that no step reads would stop DDP on several processes (and is dead weight)."""
    built, b = model(**ablation), batch()
    built(b).sum().backward()
    assert [n for n, p in built.named_parameters() if p.requires_grad and p.grad is None] == []


def test_refinement_is_raw_times_a_sigmoid_mlp_of_raw() -> None:
    m, b = model(), batch()
    out = m(b)
    raws = m.representations(b)
    for k, task in enumerate(m.tasks):
        weights = torch.sigmoid(m.refiners[task](raws[k]))
        assert torch.allclose(out[:, k : k + 1], m.towers[task](raws[k] * weights), atol=1e-6)
        assert weights.shape == raws[k].shape  # one weight per element of raw_t
    flat = model(refine=False)
    raws = flat.representations(b)
    assert torch.allclose(flat(b)[:, :1], flat.towers["click"](raws[0]), atol=1e-6)


def test_shared_and_task_parts() -> None:
    m = model()
    groups = m.parameter_groups()
    shared = set(groups["shared"])
    assert {"embedding.table.weight", "interest.gamma", "interest.task_embedding.weight"} <= shared
    assert any(n.startswith("interest.hyper_gamma") for n in shared)
    assert all(n.startswith(("refiners.click.", "towers.click.")) for n in groups["click"])
    every = {n for g in groups.values() for n in g}
    assert every == {n for n, _ in m.named_parameters()}


def test_dtrn_with_histories_exports_to_onnx(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from types import SimpleNamespace

    from mtlcli.data.schema import SequenceFeature
    from mtlcli.export.bundle import export_onnx

    m = model().eval()
    schema = SimpleNamespace(
        cardinalities=INPUTS.cardinalities,
        categorical=[SimpleNamespace(name="item"), SimpleNamespace(name="other")],
        numeric=[None, None],
        tasks=INPUTS.tasks,
        sequences=[SequenceFeature("a", "a", 4, "mean", "item"), SequenceFeature("b", "b", 4, "mean", "item")],
    )
    report = export_onnx(m, schema, tmp_path / "model.onnx", check_rows=256)
    assert report["max_abs_diff"] <= report["tolerance"]


def test_explain_averages_the_refinement_per_input_and_compares_interests() -> None:
    from mtlcli.data.batch import SplitTensors
    from mtlcli.explain.representations import representation_report

    b = batch(40, seed=3)
    data = SplitTensors(
        b.categorical, b.numeric, b.labels, b.label_mask, sequences=b.sequences, sequence_lengths=b.sequence_lengths
    )
    names = (["item", "other"], ["clicks", "buys"], ["n1", "n2"])
    m = model()
    report = representation_report(m, data, 16, *names)
    assert report is not None
    refine = m.refinements(b)[1].refine
    assert refine is not None
    weights = refine.double().mean(0)  # buy's: [2*4 + 2*4 + 2]
    assert report["refine"]["buy"]["other"] == pytest.approx(float(weights[4:8].mean()), abs=1e-6)
    assert report["refine"]["buy"]["buys"] == pytest.approx(float(weights[12:16].mean()), abs=1e-6)
    assert report["refine"]["buy"]["n2"] == pytest.approx(float(weights[17]), abs=1e-6)
    assert report["interest_cosine"]["clicks"]["click"]["click"] == pytest.approx(1.0)
    assert report["interest_cosine"]["clicks"]["click"]["buy"] < 0.999
    plain = representation_report(model(conditional_norm=False), data, 16, *names)
    assert plain is not None and plain["interest_cosine"]["buys"]["click"]["buy"] == pytest.approx(1.0)
    assert representation_report(build_model("mmoe", SCHEMES.get("mmoe").params(), INPUTS), data, 16, *names) is None


def test_the_interest_is_dins_target_attention_of_each_historys_candidate() -> None:
    """interest_{t,b} = Σ_l unit([h, c_b, h − c_b, h ⊙ c_b]) · h_l over real items, where c_b is
    the embedding of the feature history b shares: here history 0 shares feature 0 and history 1
    feature 1, so changing feature 1 moves only history 1's interests."""
    inputs = InputSpec([7, 5], 2, ["click", "buy"], ["binary", "binary"],
                       [SequenceInput(7, "mean", shares=0), SequenceInput(5, "mean", shares=1)])  # fmt: skip
    torch.manual_seed(0)
    m = build_model("dtrn", SCHEMES.get("dtrn").params(embedding_dim=4), inputs)
    assert isinstance(m, DTRN) and m.interest is not None and m.interest.target is not None
    b = batch()
    assert b.sequences is not None
    b.sequences[:, 1] %= 5
    fields, keys, mask = m.embedding.lookup(b)
    assert keys is not None and mask is not None
    got = m.interest(keys, mask, fields[:, [0, 1]])
    expected = reference_interest(m.interest, keys, mask, fields[:, [0, 1]])
    assert (got - expected).abs().max() <= kernel_tolerance(kernel_scale(expected, floor=1.0))
    other = b.categorical.clone()
    other[:, 1] = (other[:, 1] + 1) % 5
    moved = dataclasses.replace(b, categorical=other)
    m(b)
    before = m.interest.last_interest
    m(moved)
    after = m.interest.last_interest
    assert before is not None and after is not None
    assert torch.allclose(before[:, :, 0], after[:, :, 0]), "history 0 is queried by feature 0 only"
    rows = b.sequence_lengths[:, 1] > 0  # type: ignore[index]
    assert not torch.allclose(before[rows, :, 1], after[rows, :, 1]), "history 1 is queried by feature 1"


def test_softmax_interest_weights_sum_to_one() -> None:
    m, b = model(interest="softmax"), batch()
    assert m.interest is not None and m.interest.target is None
    fields, keys, mask = m.embedding.lookup(b)
    assert keys is not None and mask is not None
    layout = m.interest.layout(mask)
    ones = torch.ones(len(b), int(layout.types.numel()), 2, 4)  # [B, P, T, d]
    pooled = m.interest.pool(ones, layout, fields[:, [0, 0]])  # weights that sum to 1 give the ones back
    assert b.sequence_lengths is not None
    has = (b.sequence_lengths > 0).view(len(b), 1, 2, 1).expand_as(pooled)
    assert torch.allclose(pooled[has], torch.ones_like(pooled[has]), atol=1e-6)
    assert torch.equal(pooled[~has], torch.zeros_like(pooled[~has]))
