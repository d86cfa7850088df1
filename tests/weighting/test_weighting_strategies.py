"""Each loss-weighting strategy against a small case computed by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from mtlcli.data.batch import Batch, SplitTensors
from mtlcli.models import SCHEMES, InputSpec, build_model
from mtlcli.models.base import Capabilities, enable_representation
from mtlcli.models.views import SharedRepresentation
from mtlcli.recipe import recipe_from_text
from mtlcli.recipe.schema import EarlyStopping, TrainSection
from mtlcli.train.checkpoint import load_checkpoint, save_checkpoint
from mtlcli.train.loop import LoopState, NullObserver, fit, make_optimizer, task_losses
from mtlcli.weighting import WEIGHTINGS, build_weighting
from mtlcli.weighting.cagrad import cagrad_coefficients
from mtlcli.weighting.gradients import backward_with_shared
from mtlcli.weighting.gradnorm import gradnorm_weight_gradient
from mtlcli.weighting.mgda import min_norm_weights
from tests.helpers import two_regressions

TASKS = ["click", "buy"]


class Linear(nn.Module):
    """L_k = g_k · θ: task k's gradient on the (shared) θ is exactly g_k."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(dim))

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        return {"shared": {"theta": self.theta}}


def step(name: str, grads: list[list[float]], losses_at: list[float] | None = None, **params: object) -> tuple:
    """One backward of strategy ``name`` on L_k = g_k·θ (+ a constant); returns (weights, θ.grad)."""
    strategy = build_weighting(name, WEIGHTINGS.get(name).params(**params), [f"t{k}" for k in range(len(grads))])
    model = Linear(len(grads[0]))
    offsets = torch.tensor(losses_at or [1.0] * len(grads))
    losses = torch.stack([torch.tensor(g) @ model.theta for g in grads]) + offsets
    weights = strategy.backward(losses, model)
    assert model.theta.grad is not None
    return weights, model.theta.grad


def build(name: str, tasks: list[str] = TASKS, **params: object):  # type: ignore[no-untyped-def]
    return build_weighting(name, WEIGHTINGS.get(name).params(**params), tasks)


# --- the shared-gradient helper ------------------------------------------------------------


class TwoHeads(nn.Module):
    """Shared θ; head a belongs to click, head b to buy."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.a = nn.Parameter(torch.tensor(3.0))
        self.b = nn.Parameter(torch.tensor(5.0))

    def losses(self) -> Tensor:
        return torch.stack([self.a * self.theta[0], self.b * self.theta[1]])

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        return {"shared": {"theta": self.theta}, "click": {"a": self.a}, "buy": {"b": self.b}}


def test_shared_parameters_get_the_combination_and_task_parameters_the_plain_sum() -> None:
    model = TwoHeads()
    coef = backward_with_shared(model.losses(), model, lambda grads, losses: torch.tensor([2.0, 10.0]))
    assert coef.tolist() == [2.0, 10.0]
    assert model.theta.grad is not None and model.a.grad is not None and model.b.grad is not None
    assert model.theta.grad.tolist() == [2.0 * 3.0, 10.0 * 5.0]
    assert model.a.grad.item() == 1.0 and model.b.grad.item() == 2.0


# --- uncertainty ----------------------------------------------------------------------------


def test_uncertainty_loss_and_gradient_on_log_variances() -> None:
    strategy = build("uncertainty")
    (s,) = list(strategy.capabilities.parameters)
    with torch.no_grad():
        s.copy_(torch.tensor([0.0, math.log(2.0)]))
    model = Linear(1)
    losses = torch.stack([3.0 + model.theta[0], 4.0 + 2 * model.theta[0]])
    weights = strategy.backward(losses, model)
    assert weights.tolist() == pytest.approx([1.0, 0.5])
    # d/ds_k [exp(-s_k) L_k + s_k] = 1 - exp(-s_k) L_k
    assert s.grad is not None
    assert s.grad.tolist() == pytest.approx([1 - 3.0, 1 - 0.5 * 4.0])
    assert model.theta.grad is not None
    assert model.theta.grad.item() == pytest.approx(1.0 * 1 + 0.5 * 2)


# --- dwa ------------------------------------------------------------------------------------


def test_dwa_weights_from_loss_history() -> None:
    strategy = build("dwa", temperature=2.0)
    assert step_weights(strategy) == pytest.approx([1.0, 1.0])
    strategy.capabilities.end_epoch(1, torch.tensor([1.0, 2.0]))
    assert step_weights(strategy) == pytest.approx([1.0, 1.0])
    strategy.capabilities.end_epoch(2, torch.tensor([0.5, 2.0]))  # r = [0.5, 1.0]
    e1, e2 = math.exp(0.5 / 2), math.exp(1.0 / 2)
    assert step_weights(strategy) == pytest.approx([2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)])
    strategy.capabilities.end_epoch(3, torch.tensor([0.5, 1.0]))  # r = [1.0, 0.5]
    assert step_weights(strategy) == pytest.approx([2 * e2 / (e1 + e2), 2 * e1 / (e1 + e2)])


def step_weights(strategy) -> list[float]:  # type: ignore[no-untyped-def]
    model = Linear(1)
    return strategy.backward(torch.stack([model.theta[0], model.theta[0]]), model).tolist()  # type: ignore[no-any-return]


# --- ple_decay ------------------------------------------------------------------------------


def test_ple_decay_per_epoch() -> None:
    strategy = build("ple_decay", initial={"click": 2.0}, rate={"click": 0.5, "buy": 0.9})
    seen = []
    for epoch in (1, 2, 3):
        seen.append(step_weights(strategy))
        seen.append(step_weights(strategy))  # no change within an epoch
        strategy.capabilities.end_epoch(epoch, torch.ones(2))
    expected = [[2.0, 1.0], [2.0, 1.0], [1.0, 0.9], [1.0, 0.9], [0.5, 0.81], [0.5, 0.81]]
    for got, want in zip(seen, expected, strict=True):
        assert got == pytest.approx(want)


def test_ple_decay_per_step() -> None:
    strategy = build("ple_decay", initial={"buy": 4.0}, rate={"buy": 0.5}, per="step")
    seen = [step_weights(strategy)[1] for _ in range(3)]
    strategy.capabilities.end_epoch(1, torch.ones(2))
    seen.append(step_weights(strategy)[1])
    assert seen == pytest.approx([4.0, 2.0, 1.0, 0.5])


def test_ple_decay_names_unknown_tasks() -> None:
    with pytest.raises(Exception, match=r"loss\.rate\.y3: unknown task 'y3'"):
        recipe_from_text(two_regressions("{weighting: ple_decay, rate: {y3: 0.9}}"))


# --- rlw ------------------------------------------------------------------------------------


def test_rlw_is_reproducible_and_on_the_simplex() -> None:
    draws = [step_weights_of(build("rlw", seed=seed)) for seed in (0, 0, 1)]
    assert draws[0] == draws[1]
    assert draws[0] != draws[2]
    strategy = build("rlw", tasks=["a", "b", "c"], seed=3)
    for _ in range(20):
        model = Linear(1)
        w = strategy.backward(torch.stack([model.theta[0]] * 3), model)
        assert (w > 0).all()
        assert float(w.sum()) == pytest.approx(1.0)


def step_weights_of(strategy) -> list[float]:  # type: ignore[no-untyped-def]
    return [x for _ in range(3) for x in step_weights(strategy)]


# --- pcgrad ---------------------------------------------------------------------------------


def test_pcgrad_projects_two_conflicting_gradients() -> None:
    # g1·g2 = -1 < 0: g1' = g1 - (-1/2) g2 = (0.5, 0.5); g2' = g2 - (-1/1) g1 = (0, 1).
    weights, grad = step("pcgrad", [[1.0, 0.0], [-1.0, 1.0]])
    assert grad.tolist() == pytest.approx([0.5, 1.5])
    assert weights.tolist() == pytest.approx([2.0, 1.5])  # 2·g1 + 1.5·g2 = (0.5, 1.5)


def test_pcgrad_leaves_agreeing_gradients_alone() -> None:
    weights, grad = step("pcgrad", [[1.0, 0.0], [1.0, 1.0]])
    assert grad.tolist() == pytest.approx([2.0, 1.0])
    assert weights.tolist() == pytest.approx([1.0, 1.0])


# --- mgda -----------------------------------------------------------------------------------


def test_mgda_min_norm_for_two_gradients() -> None:
    # α1 = (g2 - g1)·g2 / ||g1 - g2||² = 4 / 5.
    weights, grad = step("mgda", [[1.0, 0.0], [0.0, 2.0]])
    assert weights.tolist() == pytest.approx([0.8, 0.2])
    assert grad.tolist() == pytest.approx([0.8, 0.4])


def test_mgda_picks_the_shorter_gradient_when_it_is_the_min_norm_point() -> None:
    weights, _ = step("mgda", [[1.0, 0.0], [3.0, 0.0]])
    assert weights.tolist() == pytest.approx([1.0, 0.0])


class Represented(nn.Module):
    """z = c ⊙ θ (θ shared); L_click = a·z, L_buy = b·z with a, b task-specific."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([1.0, -1.0]))
        self.a = nn.Parameter(torch.tensor([1.0, 0.0]))
        self.b = nn.Parameter(torch.tensor([0.0, 2.0]))
        self.c = torch.tensor([3.0, 0.5])
        self.z = SharedRepresentation()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(shared_representation=self.z)

    def losses(self) -> Tensor:
        z = self.c * self.theta
        self.z.keep(z)
        return torch.stack([self.a @ z, self.b @ z])

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        return {"shared": {"theta": self.theta}, "click": {"a": self.a}, "buy": {"b": self.b}}


def test_mgda_upper_bound_takes_the_min_norm_weights_of_the_gradients_on_z() -> None:
    model = Represented()
    enable_representation(model)
    weights = build("mgda", upper_bound=True).backward(model.losses(), model)
    # ∂L/∂z: a = (1, 0), b = (0, 2): the min-norm weights are (0.8, 0.2), as in the case above
    # (on θ the gradients would be (3, 0) and (0, 1): weights 0.1 / 0.9).
    assert weights.tolist() == pytest.approx([0.8, 0.2])
    assert model.theta.grad.tolist() == pytest.approx([0.8 * 1 * 3.0, 0.2 * 2 * 0.5])
    z = (model.c * model.theta).tolist()
    assert model.a.grad.tolist() == pytest.approx(z)  # task parameters: the plain sum's gradient
    assert model.b.grad.tolist() == pytest.approx(z)
    theta_weights, _ = step("mgda", [[3.0, 0.0], [0.0, 1.0]])
    assert theta_weights.tolist() == pytest.approx([0.1, 0.9])


def test_mgda_frank_wolfe_matches_a_grid_search() -> None:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    alpha = min_norm_weights(g @ g.T, max_iter=5000)
    assert float(alpha.sum()) == pytest.approx(1.0)
    grid = np.linspace(0, 1, 401)
    best = min(
        float(np.linalg.norm(a * g[0].numpy() + b * g[1].numpy() + (1 - a - b) * g[2].numpy()))
        for a in grid
        for b in grid
        if a + b <= 1
    )
    assert float((alpha @ g).norm()) == pytest.approx(best, abs=2e-3)
    orthogonal = min_norm_weights(torch.eye(3, dtype=torch.float64))
    assert orthogonal.tolist() == pytest.approx([1 / 3] * 3, abs=1e-6)


# --- cagrad ---------------------------------------------------------------------------------


def test_cagrad_two_tasks_matches_a_direct_solution() -> None:
    g = np.array([[1.0, 0.0], [-0.5, 2.0]])
    c = 0.5
    g0 = g.mean(0)
    radius = c * np.linalg.norm(g0)
    # The dual over w = (x, 1 - x), by brute force on a fine grid.
    xs = np.linspace(0, 1, 200_001)
    gw = xs[:, None] * g[0] + (1 - xs[:, None]) * g[1]
    x = xs[np.argmin(gw @ g0 + radius * np.linalg.norm(gw, axis=1))]
    gw_star = x * g[0] + (1 - x) * g[1]
    direction = g0 + radius / np.linalg.norm(gw_star) * gw_star
    weights, grad = step("cagrad", g.tolist(), c=c)
    assert grad.tolist() == pytest.approx(direction.tolist(), abs=1e-4)
    # CAGrad's guarantee: the worst task improves at least as much as under the average gradient.
    assert min(g @ direction) >= min(g @ g0) - 1e-9
    coef = weights.double().numpy()
    assert (coef @ g).tolist() == pytest.approx(direction.tolist(), abs=1e-4)


def test_cagrad_with_c_zero_is_the_average_gradient() -> None:
    coef = cagrad_coefficients(torch.tensor([[1.0, -0.2], [-0.2, 3.0]], dtype=torch.float64), 0.0)
    assert coef.tolist() == pytest.approx([0.5, 0.5])


# --- gradnorm -------------------------------------------------------------------------------


def test_gradnorm_lowers_the_weight_of_the_task_with_the_larger_gradient() -> None:
    # G = [2, 1], mean 1.5, equal training rates: target 1.5 for both.
    grad = gradnorm_weight_gradient(torch.ones(2), torch.tensor([2.0, 1.0]), torch.ones(2), 1.5)
    assert grad.tolist() == [2.0, -1.0]  # gradient descent: w1 down, w2 up


def test_gradnorm_raises_the_weight_of_the_task_that_trains_slower() -> None:
    # Equal gradient norms; task 1's loss fell less (L(t)/L(0) = 1 vs 0.5): r = [4/3, 2/3].
    grad = gradnorm_weight_gradient(torch.ones(2), torch.ones(2), torch.tensor([1.0, 0.5]), 1.5)
    assert grad.tolist() == [-1.0, 1.0]


class OneLayer(nn.Linear):
    """A Linear layer that declares its weight as GradNorm's W."""

    def __init__(self) -> None:
        super().__init__(2, 1, bias=False)

    def last_shared_layer(self) -> list[Tensor]:
        return [self.weight]


def test_gradnorm_step_uses_the_last_shared_layer_and_renormalises() -> None:
    strategy = build("gradnorm")
    (w,) = list(strategy.capabilities.parameters)
    with torch.no_grad():
        w.copy_(torch.tensor([3.0, 1.0]))
    model = OneLayer()
    nn.init.constant_(model.weight, 0.5)
    x = torch.tensor([[1.0, 0.0]])
    losses = torch.stack([2 * model(x).sum() + 1, model(x).sum() + 1])
    weights = strategy.backward(losses, model)
    assert weights.tolist() == pytest.approx([1.5, 0.5])  # renormalised to sum to T = 2
    # ||∇_W L|| = [2, 1]; G = [3, 0.5], target 1.75 each: ∂L_grad/∂w = [+2, -1].
    assert w.grad is not None and w.grad.tolist() == pytest.approx([2.0, -1.0])
    assert model.weight.grad is not None
    assert model.weight.grad[0].tolist() == pytest.approx([1.5 * 2 + 0.5 * 1, 0.0])


# --- metabalance ----------------------------------------------------------------------------


def test_metabalance_rescales_auxiliary_norms_toward_the_target() -> None:
    # Target g1 (norm 5), auxiliary g2 (norm 1). First step: m = 0.1·[5, 1], ratio 5,
    # coefficient 5·0.7 + 0.3 = 3.8.
    weights, grad = step("metabalance", [[3.0, 4.0], [0.0, 1.0]])
    assert weights.tolist() == pytest.approx([1.0, 3.8])
    assert grad.tolist() == pytest.approx([3.0, 4.0 + 3.8])
    # relax 1 gives the auxiliary gradient the target's norm; a large one is shrunk.
    weights, _ = step("metabalance", [[3.0, 4.0], [0.0, 20.0]], relax=1.0)
    assert float(weights[1] * 20.0) == pytest.approx(5.0)


def test_metabalance_moving_averages_over_steps() -> None:
    strategy = build("metabalance", target="buy", beta=0.5, relax=0.5)
    model = Linear(2)
    coefs = []
    for aux_norm in (2.0, 4.0):
        model.theta.grad = None
        losses = torch.stack([aux_norm * model.theta[0], 1.0 * model.theta[1]])
        coefs.append(float(strategy.backward(losses, model)[0]))
    # step 1: m = [1, 0.5] -> ratio 0.5; step 2: m = [0.5 + 2, 0.25 + 0.5] -> ratio 0.3
    assert coefs == pytest.approx([0.5 * 0.5 + 0.5, 0.5 * 0.3 + 0.5])


def test_metabalance_target_must_be_a_task() -> None:
    with pytest.raises(Exception, match=r"loss\.target: unknown task 'y3'"):
        recipe_from_text(two_regressions("{weighting: metabalance, target: y3}"))


# --- state for checkpoints ------------------------------------------------------------------


THREE = ["a", "b", "c"]
# Settings under which a strategy's state changes its weights (with rate 1, ple_decay's step counter
# is irrelevant).
STATEFUL = {"ple_decay": {"rate": {"a": 0.9}, "per": "step"}}


def conflicting_batches(n_batches: int, seed: int = 0) -> list[Batch]:
    """Three binary tasks whose gradients conflict (b is the opposite of a; c follows another input),
    so that the order of PCGrad's projections and every balancing weight matter."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        cats = torch.randint(0, 5, (48, 2), generator=gen)
        numeric = torch.randn(48, 2, generator=gen)
        labels = torch.stack([(numeric[:, 0] > 0), (numeric[:, 0] < 0.3), (numeric[:, 1] > 0)], 1).float()
        out.append(Batch(cats, numeric, labels, torch.ones_like(labels, dtype=torch.bool)))
    return out


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_checkpoint_round_trip_continues_identically(name: str, tmp_path: Path) -> None:
    """Train 6 real steps (3 tasks, an epoch end between), checkpoint, restore into a fresh model,
    strategy and optimizer, and continue both for 6 steps: the same weights, bitwise (one machine,
    the same kernels). Fails for any strategy whose state or parameters the checkpoint loses."""
    inputs = InputSpec(cardinalities=[5, 5], n_numeric=2, tasks=THREE, task_types=["binary"] * 3)
    settings = TrainSection(lr=0.05)
    binary = torch.ones(3, dtype=torch.bool)

    def fresh(seed: int):  # type: ignore[no-untyped-def]
        torch.manual_seed(seed)
        model = build_model(
            "shared_bottom", SCHEMES.get("shared_bottom").params(bottom_units=[8], tower_units=[4]), inputs
        )
        strategy = build_weighting(name, WEIGHTINGS.get(name).params(**STATEFUL.get(name, {})), THREE)
        optimizer = make_optimizer(settings, list(model.parameters()), list(strategy.capabilities.parameters))
        return model, strategy, optimizer

    def train(model, strategy, optimizer, batches: list[Batch], epoch_end: int) -> list[list[float]]:  # type: ignore[no-untyped-def]
        seen = []
        for i, batch in enumerate(batches, start=1):
            optimizer.zero_grad(set_to_none=True)
            losses = task_losses(model(batch), batch, binary)
            seen.append(strategy.backward(losses, model).tolist())
            optimizer.step()
            end_epoch = strategy.capabilities.end_epoch
            if i == epoch_end and end_epoch is not None:
                end_epoch(1, losses.detach())
        return seen

    batches = conflicting_batches(12)
    model, strategy, optimizer = fresh(0)
    train(model, strategy, optimizer, batches[:6], epoch_end=3)
    save_checkpoint(tmp_path / "c.safetensors", LoopState(), model, optimizer, strategy, {})
    again, restored, restored_optimizer = fresh(1)  # other initial weights: everything must come from the file
    load_checkpoint(tmp_path / "c.safetensors", again, restored_optimizer, restored)
    # The state itself comes back (GradNorm's L(0) only moves its weights when a sign flips, which
    # a few steps may not show), and so do the strategy's own parameters.
    mine, theirs = strategy.capabilities.state, restored.capabilities.state
    if mine is not None and theirs is not None:
        saved, loaded = mine.state_dict(), theirs.state_dict()
        assert saved.keys() == loaded.keys()
        for key, value in saved.items():
            assert torch.equal(value, loaded[key]), f"{name}: state {key} not restored"
    for ours, restored_param in zip(strategy.capabilities.parameters, restored.capabilities.parameters, strict=True):
        assert torch.equal(ours, restored_param), f"{name}: parameters not restored"
    expected = train(model, strategy, optimizer, batches[6:], epoch_end=2)
    got = train(again, restored, restored_optimizer, batches[6:], epoch_end=2)
    assert got == expected, f"{name}: the restored strategy weighs the tasks differently"
    for (key, value), other in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(value, other), f"{name}: {key} differs after the round trip"


# --- early stopping -------------------------------------------------------------------------


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_strategy_keeps_finite_weights_through_early_stopping(name: str) -> None:
    def split(n: int, seed: int) -> SplitTensors:
        gen = torch.Generator().manual_seed(seed)
        cats = torch.randint(0, 4, (n, 1), generator=gen)
        labels = torch.rand(n, 2, generator=gen).lt(0.5).float()  # noise: valid AUC soon stops improving
        return SplitTensors(cats, torch.randn(n, 1, generator=gen), labels, torch.ones_like(labels, dtype=torch.bool))

    torch.manual_seed(0)
    inputs = InputSpec(cardinalities=[4], n_numeric=1, tasks=TASKS, task_types=["binary", "binary"])
    model = build_model("mmoe", SCHEMES.get("mmoe").params(), inputs)
    strategy = build(name)
    settings = TrainSection(epochs=8, batch_size=32, early_stopping=EarlyStopping(patience=1), lr=0.05)
    result = fit(model, strategy, split(128, 1), split(64, 2), settings, TASKS, ["binary"] * 2, NullObserver())
    assert result.stopped_early
    for record in result.history:
        assert all(math.isfinite(v) for v in record["weights"].values())


def test_gradnorm_norm_spans_every_tensor_of_a_multi_tensor_layer() -> None:
    from mtlcli.weighting.gradnorm import gradient_norms

    a, b = nn.Parameter(torch.tensor([1.0, 2.0])), nn.Parameter(torch.tensor([[3.0]]))
    losses = torch.stack([(a * torch.tensor([3.0, 4.0])).sum(), (2 * a).sum() + 12 * b.sum()])
    # task 0: ∇a = (3, 4), ∇b = 0 -> 5; task 1: ∇a = (2, 2), ∇b = 12 -> √(4 + 4 + 144)
    assert gradient_norms(losses, [a, b]).tolist() == pytest.approx([5.0, math.sqrt(152.0)])
