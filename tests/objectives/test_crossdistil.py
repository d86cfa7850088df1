"""CrossDistil (mtlcli/objectives/crossdistil.py): each formula against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from mtlcli.errors import MtlError
from mtlcli.objectives import crossdistil as cd


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_augmented_levels_in_both_orders_on_the_common_rows_only() -> None:
    y_a = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    y_b = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    both = torch.tensor([True, True, True, True, True, False])
    a_plus = cd.level_masks(y_a, y_b, both)
    assert a_plus.shape == (4, 6)
    assert [row.nonzero().flatten().tolist() for row in a_plus] == [[0, 4], [1], [2], [3]]
    b_plus = cd.level_masks(y_b, y_a, both)  # B first: (1,1), (0,1), (1,0), (0,0) in (y_A, y_B)
    assert [row.nonzero().flatten().tolist() for row in b_plus] == [[0, 4], [2], [1], [3]]


def test_quadruplet_loss_is_the_mean_of_the_terms_present_with_an_empty_level() -> None:
    scores = torch.tensor([2.0, 1.0, 5.0, 0.0, -1.0], dtype=torch.float64, requires_grad=True)
    levels = torch.tensor(
        [
            [True, False, False, False, False],  # S1 = {0}
            [False, True, False, False, False],  # S2 = {1}
            [False, False, False, False, False],  # S3 empty (row 2 is in no level)
            [False, False, False, True, True],  # S4 = {3, 4}
        ]
    )
    terms = cd.quadruplet_terms(scores, levels)
    assert set(terms) == {(0, 1), (0, 3), (1, 3)}
    expected = {
        (0, 1): softplus(1.0 - 2.0),
        (0, 3): (softplus(0.0 - 2.0) + softplus(-1.0 - 2.0)) / 2,
        (1, 3): (softplus(0.0 - 1.0) + softplus(-1.0 - 1.0)) / 2,
    }
    for pair, value in expected.items():
        assert terms[pair].item() == pytest.approx(value, abs=1e-12)
    loss = cd.quadruplet_loss(scores, levels)
    assert loss.item() == pytest.approx(sum(expected.values()) / 3, abs=1e-12)
    loss.backward()
    assert scores.grad is not None and scores.grad[2].item() == 0.0
    nothing = torch.zeros(4, 5, dtype=torch.bool)
    empty = cd.quadruplet_loss(scores, nothing)
    assert empty.item() == 0.0 and empty.requires_grad


def test_pairs_beyond_max_pairs_are_drawn_uniformly_from_the_generator() -> None:
    scores = torch.tensor([3.0, 2.0, 1.0, 0.5, -1.0, -2.0])
    levels = torch.zeros(4, 6, dtype=torch.bool)
    levels[0, :3] = True
    levels[3, 3:] = True  # one level pair of 9 pairs
    generator = torch.Generator().manual_seed(7)
    state = generator.get_state()
    assert cd.quadruplet_loss(scores, levels, max_pairs=9, generator=generator).item() == pytest.approx(
        sum(softplus(float(scores[j] - scores[i])) for i in range(3) for j in range(3, 6)) / 9
    )
    assert torch.equal(generator.get_state(), state)  # all pairs: no draw
    sampled = cd.quadruplet_loss(scores, levels, max_pairs=4, generator=generator)
    replay = torch.Generator().manual_seed(7)
    i = torch.randint(3, (4,), generator=replay)
    j = torch.randint(3, (4,), generator=replay) + 3
    assert sampled.item() == pytest.approx(float(torch.nn.functional.softplus(scores[j] - scores[i]).mean()))
    again = cd.quadruplet_loss(scores, levels, max_pairs=4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(again, sampled)  # same generator state, same pairs: resume stays exact


def test_pairwise_accuracy_counts_correctly_ordered_pairs_per_level_pair() -> None:
    scores = torch.tensor([3.0, 1.0, 4.0, 0.0, 1.0])
    levels = torch.tensor(
        [
            [True, False, False, False, False],
            [False, True, True, False, False],
            [False, False, False, False, False],
            [False, False, False, True, True],
        ]
    )
    # (0,1): 3>1 yes, 3>4 no; (0,3): both; (1,3): 1>0, 1=1 (half), 4>0, 4>1
    assert cd.pairwise_accuracy(scores, levels) == {(0, 1): 0.5, (0, 3): 1.0, (1, 3): 0.875}


def test_calibration_keeps_the_order_and_trains_the_calibrator_only() -> None:
    calibrator = cd.Calibrator()
    scores = torch.tensor([0.3, -2.0, 1.5, 0.0, 7.0], requires_grad=True)
    assert torch.equal(calibrator(scores), scores)  # starts as the identity
    with torch.no_grad():
        calibrator.raw_scale.fill_(-4.0)  # a = softplus(-4) = 0.018 > 0
        calibrator.shift.fill_(3.0)
    probs = torch.sigmoid(calibrator(scores))
    assert torch.equal(torch.argsort(probs), torch.argsort(scores))
    with torch.no_grad():
        calibrator.raw_scale.fill_(0.0)  # a = log 2
        calibrator.shift.fill_(0.5)
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    rows = torch.tensor([True, True, False, False, False])
    loss = cd.calibration_loss(calibrator, scores, labels, rows)
    a = math.log(2.0)
    assert loss.item() == pytest.approx((softplus(-(a * 0.3 + 0.5)) + softplus(a * -2.0 + 0.5)) / 2, rel=1e-6)
    loss.backward()
    assert scores.grad is None  # the teacher's score is detached
    assert calibrator.raw_scale.grad is not None and calibrator.shift.grad is not None


def test_distillation_term_and_its_linear_ramp() -> None:
    assert [cd.distill_weight(step, 10) for step in (0, 5, 10, 20)] == [0.0, 0.25, 0.5, 0.5]
    assert cd.distill_weight(0, 0) == 0.5
    assert cd.distill_weight(3, 4, weight=2.0) == 1.5
    student = torch.tensor([0.0, 2.0, 9.0], requires_grad=True)
    teacher = torch.tensor([0.25, 0.9, 0.0], requires_grad=True)
    rows = torch.tensor([True, True, False])
    loss = cd.distillation_loss(student, teacher, rows, weight=0.4)

    def bce(z: float, p: float) -> float:
        return p * softplus(-z) + (1 - p) * softplus(z)

    assert loss.item() == pytest.approx(0.4 * (bce(0.0, 0.25) + bce(2.0, 0.9)) / 2, rel=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad is not None and student.grad[2].item() == 0.0


def test_default_partner_is_the_most_correlated_task_in_absolute_value() -> None:
    a = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    b = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])  # agrees with a on 4 of 6 rows
    c = 1.0 - a  # |ρ_ac| = 1
    labels = torch.stack([a, b, c], 1)
    mask = torch.ones(6, 3, dtype=torch.bool)
    tasks, types = ["a", "b", "c"], ["binary"] * 3
    assert cd.choose_partners(labels, mask, tasks, types) == {"a": "c", "b": "a", "c": "a"}
    assert cd.choose_partners(labels, mask, tasks, types, {"a": "b"})["a"] == "b"
    # c observed only where it is constant: a's partner is b, c has no defined correlation
    observed = mask.clone()
    observed[1::2, 2] = False
    with pytest.raises(MtlError, match="task 'c' has no partner"):
        cd.choose_partners(labels, observed, tasks, types)
    with pytest.raises(MtlError, match="task 'b' is a regression task"):
        cd.choose_partners(labels, mask, tasks, ["binary", "regression", "binary"])
    with pytest.raises(MtlError, match="'d', which is not a task"):
        cd.choose_partners(labels, mask, tasks, types, {"a": "d"})
    with pytest.raises(MtlError, match="'a' is given itself"):
        cd.choose_partners(labels, mask, tasks, types, {"a": "a"})


def lookahead_by_hand(
    teacher_w: Tensor, x: Tensor, h: Tensor, v: Tensor, c: Tensor, y: Tensor, rows: Tensor, lr: float, beta: float
) -> Tensor:
    """L_A after one step of the linear student z = h v + c on β·BCE(z, σ(x w_T)), written out:
    ∂/∂v = β · mean_rows((σ(z) − p) h), ∂/∂c = β · mean_rows(σ(z) − p)."""
    p = torch.sigmoid(x @ teacher_w)
    z = h @ v + c
    error = (torch.sigmoid(z) - p)[rows]
    v2 = v - lr * beta * (error.unsqueeze(1) * h[rows]).mean(0)
    c2 = c - lr * beta * error.mean()
    z2 = (h @ v2 + c2)[rows]
    return torch.nn.functional.binary_cross_entropy_with_logits(z2, y[rows])


def test_error_correction_gradient_matches_finite_differences() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    h = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    y = (torch.rand(8, generator=gen) > 0.5).double()
    rows = torch.tensor([True, True, False, True, True, True, False, True])
    teacher_w = torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()
    student = nn.Linear(3, 1).double()
    lr, beta = 0.8, 0.7

    loss = cd.error_correction_loss(
        student, dict(student.named_parameters()), h, torch.sigmoid(x @ teacher_w), y, rows, lr, beta
    )
    v, c = student.weight.detach()[0], student.bias.detach()[0]
    assert loss.item() == pytest.approx(lookahead_by_hand(teacher_w, x, h, v, c, y, rows, lr, beta).item(), abs=1e-12)
    (grad,) = torch.autograd.grad(loss, teacher_w)
    eps = 1e-6
    numeric = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for i in range(4):
            step = torch.zeros(4, dtype=torch.float64)
            step[i] = eps
            up = lookahead_by_hand(teacher_w + step, x, h, v, c, y, rows, lr, beta)
            down = lookahead_by_hand(teacher_w - step, x, h, v, c, y, rows, lr, beta)
            numeric[i] = (up - down) / (2 * eps)
    assert float(numeric.abs().max()) > 1e-3  # the feedback is not trivially zero
    assert torch.allclose(grad, numeric, rtol=1e-6, atol=1e-9)
    assert student.weight.grad is None  # the look-ahead does not touch the student's own parameters


def test_calibration_fits_the_teachers_scale_and_shift() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4000, generator=gen)
    labels = (torch.rand(4000, generator=gen) < torch.sigmoid(2.0 * scores - 1.0)).float()
    calibrator = cd.Calibrator()
    optimizer = torch.optim.LBFGS(calibrator.parameters(), max_iter=100, line_search_fn="strong_wolfe")
    rows = torch.ones(4000, dtype=torch.bool)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = cd.calibration_loss(calibrator, scores, labels, rows)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert calibrator.scale().item() == pytest.approx(2.0, abs=0.2)
    assert calibrator.shift.item() == pytest.approx(-1.0, abs=0.15)


def test_error_correction_through_a_nonlinear_tower_matches_finite_differences() -> None:
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    x = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    h = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    y = (torch.rand(10, generator=gen) > 0.5).double()
    rows = torch.rand(10, generator=gen) > 0.2
    teacher_w = torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()
    student = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    params = dict(student.named_parameters())

    def feedback(w: Tensor) -> Tensor:
        return cd.error_correction_loss(student, params, h, torch.sigmoid(x @ w), y, rows, lr=1.5, weight=1.0)

    (grad,) = torch.autograd.grad(feedback(teacher_w), teacher_w)
    eps = 1e-6
    numeric = torch.stack(
        [
            (feedback(teacher_w.detach() + eps * e) - feedback(teacher_w.detach() - eps * e)).detach() / (2 * eps)
            for e in torch.eye(4, dtype=torch.float64)
        ]
    )
    assert float(numeric.abs().max()) > 1e-4
    assert torch.allclose(grad, numeric, rtol=1e-5, atol=1e-9)


def test_newton_steps_fit_the_calibrator_so_its_mean_is_the_positive_rate() -> None:
    """A logistic fit with a free shift predicts, at its optimum, exactly the positive rate on
    average. Hand-made teacher scores of a rare label (about 5% positive, base-rate logit near −3):
    Newton steps from the identity reach scale 2 and shift −4 and the mean prediction matches the
    rate; the first step moves no parameter by more than ``CALIBRATION_STEP``."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4000, generator=gen)
    labels = (torch.rand(4000, generator=gen) < torch.sigmoid(2.0 * scores - 4.0)).float()
    rows = torch.ones(4000, dtype=torch.bool)
    calibrator = cd.Calibrator()
    cd.newton_update(calibrator, cd.calibration_moments(calibrator, scores, labels, rows))
    assert abs(calibrator.scale().item() - 1.0) <= cd.CALIBRATION_STEP + 1e-6
    assert abs(calibrator.shift.item()) <= cd.CALIBRATION_STEP + 1e-6
    for _ in range(7):  # Newton's quadratic convergence: eight steps in all, four of them shortened
        cd.newton_update(calibrator, cd.calibration_moments(calibrator, scores, labels, rows))
    mean = torch.sigmoid(calibrator(scores)).mean().item()
    assert mean == pytest.approx(labels.mean().item(), rel=1e-4)
    assert calibrator.scale().item() == pytest.approx(2.0, abs=0.2)
    assert calibrator.shift.item() == pytest.approx(-4.0, abs=0.3)
    # the order is kept even where the scores say the opposite of the labels: a stays positive
    cd.newton_update(calibrator, cd.calibration_moments(calibrator, -scores, labels, rows), max_change=100.0)
    assert calibrator.scale().item() >= cd.MIN_SCALE * (1 - 1e-6)
