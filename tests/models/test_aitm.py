"""AITM (Xi et al., KDD 2021): the AIT chain and the behavioural expectation calibrator."""

from __future__ import annotations

import math

import torch

from mtlcli import distributed
from mtlcli.models import InputSpec
from mtlcli.models.aitm import AITM
from mtlcli.recipe.schema import TrainSection
from mtlcli.train.exchange import Exchange
from mtlcli.train.step import DefaultStep, StepParts
from mtlcli.weighting import WEIGHTINGS, build_weighting
from tests.models.test_models import make_batch
from tests.numerics import assert_kernel_close

TASKS = ["click", "like", "watch"]
INPUTS = InputSpec([6, 9, 4], 3, TASKS, ["binary", "binary", "regression"])


def model(alpha: float = 0.6, inputs: InputSpec = INPUTS) -> AITM:
    torch.manual_seed(0)
    return AITM(inputs, 4, [8, 5], [], alpha, 0.0)


def test_each_task_attends_over_what_the_previous_transfers_and_its_own_tower() -> None:
    m, batch = model(), make_batch(20)
    x = m.embedding(batch)
    z = m.towers["click"](x)  # z_1 = q_1
    expected = [m.heads["click"](z)]
    for task in TASKS[1:]:
        p = torch.relu(m.transfers[task][0](z))  # p_{t-1} = g_{t-1}(z_{t-1})
        q = m.towers[task](x)
        ait = m.ait[task]
        scores = [(ait.query(u) * ait.key(u)).sum(-1) / math.sqrt(5) for u in (p, q)]
        w = torch.softmax(torch.stack(scores, 1), dim=1)
        z = w[:, :1] * ait.value(p) + w[:, 1:] * ait.value(q)
        expected.append(m.heads[task](z))
    assert_kernel_close(m(batch), torch.cat(expected, 1), floor=1.0)
    gates = m.introspect(batch).gates
    assert [(g.row, g.experts) for g in gates] == [("like", ["from click", "own"]), ("watch", ["from like", "own"])]


def test_calibrator_penalises_a_later_step_likelier_than_the_earlier() -> None:
    m = model(alpha=0.5)
    logits = torch.tensor([[0.0, 1.0, 7.0], [2.0, -1.0, 3.0], [-1.0, 0.5, 0.0]])
    sums, counts = m.calibrator(logits, make_batch(3))
    p = torch.sigmoid(logits)
    excess = torch.relu(p[:, 1] - p[:, 0]).sum()  # rows 0 and 2 exceed; row 1 does not
    assert torch.allclose(sums, torch.stack([torch.tensor(0.0), 0.5 * excess, torch.tensor(0.0)]))
    assert counts.tolist() == [0.0, 3.0, 0.0]  # watch is a regression: no pair (like, watch)


def test_no_calibrator_on_a_task_in_the_previous_tasks_space() -> None:
    inputs = InputSpec([6, 9, 4], 3, TASKS, ["binary"] * 3, task_spaces=[None, "click", None])
    m = model(inputs=inputs)
    assert m.pairs == [2]  # like is P(like | click): bounded by 1 already; (like, watch) stays


def test_the_step_balances_each_task_loss_with_its_calibrator_term() -> None:
    m, batch = model(alpha=0.7), make_batch(32)
    strategy = build_weighting("equal", WEIGHTINGS.get("equal").params(), TASKS)
    settings = TrainSection(epochs=1, batch_size=32, early_stopping=None)
    binary = torch.tensor([True, True, False])
    exchange = Exchange(distributed.current(), ddp=False)
    # no optimizer: the losses come before the update (and torch.optim's first import is slow)
    parts = StepParts(m, strategy, None, exchange, settings, TASKS, binary, None, torch.device("cpu"))  # type: ignore[arg-type]
    losses, balanced = DefaultStep(parts).global_losses(batch)
    sums, counts = m.calibrator(m(batch), batch)
    assert float(sums[1].detach()) > 0
    assert torch.allclose(balanced - losses, sums / counts.clamp_min(1.0))


def test_task_parameters_are_the_heads_and_the_last_tasks_chain() -> None:
    groups = model().parameter_groups()
    assert {n.split(".")[0] for n in groups["click"]} == {"heads"}
    assert {n.split(".")[0] for n in groups["watch"]} == {"heads", "towers", "ait", "transfers"}
    assert any(n.startswith("towers.click.") for n in groups["shared"])  # read by every later task
