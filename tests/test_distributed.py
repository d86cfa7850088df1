"""Training on several processes: a run on 2 ranks (each taking its slice of every global batch,
so that the ranks see different rows) reproduces the 1-process run with the same global batch,
for every weighting strategy — per-step losses and final weights — for a table that trains
row-wise and for csrec's own step (alternate and joint). Taking out any exchange (DDP's summing hook for the plain backward passes, the
gradient sum, global counts, the per-task gradient sum of a gradient strategy, the union of rows,
csrec's global negatives' losses, per-task gradient sum, global row counts or common generator)
makes the ranks' steps differ from the one-process step; a gradient strategy that did not declare
``task_gradients`` would stop in DDP."""

from __future__ import annotations

import tempfile
from typing import Any, Literal

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mtlcli import distributed
from mtlcli.data.batch import SplitTensors
from mtlcli.models import SCHEMES, InputSpec, build_model
from mtlcli.models.base import scheme as scheme_of
from mtlcli.models.blocks import use_sparse_rows
from mtlcli.objectives.training import CrossDistil
from mtlcli.recipe.schema import ObjectiveSection, TrainSection
from mtlcli.train.exchange import Exchange
from mtlcli.train.loop import FitResult, LoopState, NullObserver, build_parts, fit, make_step, train_loop
from mtlcli.weighting import WEIGHTINGS, build_weighting
from mtlcli.weighting.base import StrategyCapabilities, WeightingStrategy
from tests.helpers import click_buy_split

TASKS = ["click", "buy"]
INPUTS = InputSpec(
    cardinalities=[50, 8], n_numeric=2, tasks=TASKS, task_types=["binary", "binary"], categorical_names=["user", "item"]
)
# (name, scheme, weighting, its params, row-wise table)
CASES: list[tuple[str, str, str, dict[str, Any], bool]] = [
    *[(w, "mmoe", w, {}, False) for w in WEIGHTINGS.names()],
    ("mgda-ub", "mmoe", "mgda", {"upper_bound": True, "normalize": "l2"}, False),
    ("rows-equal", "mmoe", "equal", {}, True),
    ("rows-pcgrad", "shared_bottom", "pcgrad", {}, True),
    ("gradvac-parameter", "mmoe", "gradvac", {"granularity": "parameter"}, True),  # one rule per tensor
    # gate control: λ from the global batch's gates and labels (summed over the ranks)
    ("gate-control", "mmoe", "equal", {}, False),
    ("gate-control-pcgrad", "mmoe", "pcgrad", {}, False),
    ("gate-control-cgc", "cgc", "equal", {}, False),
    # csrec's own step: global losses of the subnets and negatives, per-task gradients summed
    ("csrec-alternate", "csrec", "equal", {}, False),
    ("csrec-joint", "csrec", "uncertainty", {}, True),
    # CrossDistil: pairs over the gathered global batch, global means, the teachers' gradients summed
    ("crossdistil", "mmoe", "equal", {}, False),
    ("crossdistil-no-correction", "mmoe", "uncertainty", {}, False),
    ("crossdistil-rows", "mmoe", "equal", {}, True),  # row-wise tables: the ranks' rows taken together
    # under Adam a parameter whose true gradient is 0 moves by its rounding noise, scaled to full
    # steps: a teacher's score bias (the ranking loss sees only differences) made the ranks drift
    ("crossdistil-adam", "mmoe", "equal", {}, False),
    # over gate control: λ from the student pass's global batch, reused by the teacher pass
    ("crossdistil-gate-control", "mmoe", "equal", {}, False),
    # AITM's calibrator: a loss term of the scheme's, exchanged with the task losses
    ("aitm", "aitm", "equal", {}, False),
    ("aitm-rows-pcgrad", "aitm", "pcgrad", {}, True),
    # PEPNet: gates on the prior (user) and domain (item) embeddings, stop-gradients
    ("pepnet", "pepnet", "equal", {}, False),
    ("pepnet-mgda-ub", "pepnet", "mgda", {"upper_bound": True, "normalize": "l2"}, False),
    # AdaTT: task-to-task fusion, its shared representation on the last level
    ("adatt", "adatt", "uncertainty", {}, True),
    ("adatt-mgda-ub", "adatt", "mgda", {"upper_bound": True, "normalize": "l2"}, False),
    # STEM: one row-wise table per task and a shared one, each task's gradient to its own
    ("stem", "stem", "equal", {}, False),
    ("stem-rows-pcgrad", "stem", "pcgrad", {}, True),
    # HoME: per-row expert normalisation (no batch statistics to exchange), feature and self gates
    ("home", "home", "equal", {}, False),
    ("home-cagrad", "home", "cagrad", {}, True),
]
# a short mask search (one round of pruning) so that the masks differ and the negatives swap entries
CSREC: dict[str, Any] = {"bottom_units": [16, 8], "density": 0.5, "prune_rate": 0.5, "warmup_steps": 4}
# the scheme's own parameters, by case name (defaults otherwise)
SCHEME_PARAMS: dict[str, dict[str, Any]] = {
    "gate-control": {"gate_control": True, "n_experts": 4, "expert_kinds": ["mlp", "mlp", "fm", "cross"]},
    "gate-control-pcgrad": {"gate_control": True},
    "gate-control-cgc": {"gate_control": {"kappa": 2.0}},
    "crossdistil-gate-control": {"gate_control": True},
    "csrec-alternate": CSREC,
    "csrec-joint": {**CSREC, "update": "joint"},
    "pepnet": {"prior": ["user"], "domain": ["item"]},
    "pepnet-mgda-ub": {"prior": ["user"]},
}
# the training objective, by case name (none otherwise); 64-row batches have more than
# max_pairs pairs per level pair, so the pairs are drawn
OBJECTIVES: dict[str, ObjectiveSection] = {
    "crossdistil": ObjectiveSection(kind="crossdistil", warmup_steps=3, max_pairs=64),
    "crossdistil-no-correction": ObjectiveSection(
        kind="crossdistil", warmup_steps=3, max_pairs=64, error_correction=False
    ),
    "crossdistil-rows": ObjectiveSection(kind="crossdistil", warmup_steps=3, max_pairs=64),
    "crossdistil-gate-control": ObjectiveSection(kind="crossdistil", warmup_steps=3, max_pairs=64),
    "crossdistil-adam": ObjectiveSection(kind="crossdistil", warmup_steps=3, max_pairs=64, error_correction=False),
}
# the optimizer and its learning rate, by case name (SGD at 0.1 otherwise)
OPTIMIZERS: dict[str, tuple[Literal["adam"], float]] = {"crossdistil-adam": ("adam", 0.01)}


def split(n: int, seed: int) -> SplitTensors:
    return click_buy_split(INPUTS, n, seed, every=3, buy_space=True)  # the ranks' buy counts differ


class Recording:
    """A strategy that records the losses of every step, then does what ``inner`` does."""

    def __init__(self, inner: WeightingStrategy) -> None:
        self.inner, self.steps = inner, []  # type: ignore[var-annotated]

    @property
    def capabilities(self) -> StrategyCapabilities:
        return self.inner.capabilities

    def backward(self, losses: Tensor, model: nn.Module) -> Tensor:
        self.steps.append(losses.detach().clone())
        return self.inner.backward(losses, model)


def train(case: tuple[str, str, str, dict[str, Any], bool]) -> dict[str, Tensor]:
    name, scheme, weighting, params, rows = case
    torch.manual_seed(0)
    model = build_model(scheme, SCHEMES.get(scheme).params(**SCHEME_PARAMS.get(name, {})), INPUTS)
    if rows:
        use_sparse_rows(model)
    search = scheme_of(model).capabilities.search
    if search is not None:  # every rank searches the whole training split alike, as a run does
        search(split(449, 1), 64, 0.1, 3)
    strategy = Recording(build_weighting(weighting, WEIGHTINGS.get(weighting).params(**params), TASKS))
    # 449 rows: each epoch ends on a batch of one row, and rank 1's slice of it is empty.
    # SGD: Adam's steps do not change when a gradient is scaled, and would hide an exchange that
    # gets a gradient's size wrong (e.g. GradNorm's norms from one rank's rows)
    optimizer, lr = OPTIMIZERS.get(name, ("sgd", 0.1))
    settings = TrainSection(epochs=2, batch_size=64, early_stopping=None, lr=lr, seed=3, optimizer=optimizer)
    if name in OBJECTIVES:
        result, teachers = with_objective(model, strategy, OBJECTIVES[name], settings)
    else:
        result, teachers = (
            fit(model, strategy, split(449, 1), split(100, 2), settings, TASKS, ["binary"] * 2, NullObserver()),
            {},
        )
    out = {f"param.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    out.update({f"param.teachers.{k}": v.detach().clone() for k, v in teachers.items()})
    out["losses"] = torch.stack(strategy.steps)
    out["valid_auc"] = torch.tensor([result.history[-1]["valid"][t]["auc"] for t in TASKS])
    return out


def with_objective(
    model: nn.Module, strategy: WeightingStrategy, section: ObjectiveSection, settings: TrainSection
) -> tuple[FitResult, dict[str, Tensor]]:
    """``fit`` with CrossDistil over ``model``; returns the result and the teachers' state."""
    towers = scheme_of(model).capabilities.task_towers
    assert towers is not None
    objective = CrossDistil(section, towers, TASKS, {"click": "buy", "buy": "click"}, {}, 3, 5, torch.device("cpu"))
    train_data = split(449, 1)
    steps = train_data.steps(settings.batch_size)
    parts = build_parts(model, strategy, settings, TASKS, ["binary"] * 2, steps, objective=objective)
    result = train_loop(parts, make_step(parts), train_data, split(100, 2), ["binary"] * 2, NullObserver(), LoopState())
    return result, objective.teachers.state_dict()


def rank_main(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    distributed.join("gloo", f"file://{store}", rank, world)
    try:
        for case in CASES:
            result = train(case)
            if rank == 0:
                save_file({k: v.contiguous() for k, v in result.items()}, f"{out}/{case[0]}.safetensors")
    finally:
        distributed.leave()


@pytest.fixture(scope="module")
def two_ranks() -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(rank_main, args=(2, f"{tmp}/store", tmp), nprocs=2, join=True)
        yield {case[0]: load_file(f"{tmp}/{case[0]}.safetensors") for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_two_ranks_reproduce_one_process(case: tuple[str, str, str, dict[str, Any], bool], two_ranks: Any) -> None:
    torch.set_num_threads(1)
    alone, shared = train(case), two_ranks[case[0]]
    assert alone["losses"].shape == shared["losses"].shape == (16, 2)
    assert torch.allclose(shared["losses"], alone["losses"], rtol=1e-5, atol=1e-7), case[0]
    for name, value in alone.items():
        if name.startswith("param."):
            assert torch.allclose(shared[name], value, rtol=1e-4, atol=1e-5), (case[0], name)
    assert torch.allclose(shared["valid_auc"], alone["valid_auc"], atol=1e-6)


def test_alone_every_exchange_is_the_identity() -> None:
    ranks = distributed.current()
    x = torch.arange(6.0).view(3, 2)
    assert not ranks.active and ranks.sum(x) is x and ranks.gather(x) is x and ranks.any(True)
    assert torch.equal(distributed.global_losses(x[0], torch.tensor([2.0, 0.0]), ranks), torch.tensor([0.0, 1.0]))
    assert Exchange(ranks, ddp=False).batch_rows(x) is x


def rows_main(rank: int, world: int, store: str, out: str) -> None:
    distributed.join("gloo", f"file://{store}", rank, world)
    try:
        exchange = Exchange(distributed.current(), ddp=False)
        own = torch.arange(3.0 * rank, 3.0 * rank + 3 - 2 * rank).requires_grad_()  # 3 rows, then 1
        rows = exchange.batch_rows(own)
        (rows * torch.arange(1.0, 5.0)).sum().backward()  # every rank: the whole batch's loss
        flags = exchange.batch_rows(own.detach() > 1.5)
        assert own.grad is not None
        save_file(
            {"rows": rows.detach(), "grad": own.grad, "flags": flags.to(torch.uint8)}, f"{out}/{rank}.safetensors"
        )
    finally:
        distributed.leave()


def test_a_rank_gets_the_global_batch_in_rank_order_its_own_rows_alone_keeping_their_graph() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(rows_main, args=(2, f"{tmp}/store", tmp), nprocs=2, join=True)
        first, second = (load_file(f"{tmp}/{rank}.safetensors") for rank in range(2))
    for got in (first, second):
        assert torch.equal(got["rows"], torch.tensor([0.0, 1.0, 2.0, 3.0]))
        assert torch.equal(got["flags"], torch.tensor([0, 0, 1, 1], dtype=torch.uint8))
    assert torch.equal(first["grad"], torch.tensor([1.0, 2.0, 3.0])) and torch.equal(
        second["grad"], torch.tensor([4.0])
    )


def unused_main(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    distributed.join("gloo", f"file://{store}", rank, world)
    try:
        torch.manual_seed(0)
        model = build_model("mmoe", SCHEMES.get("mmoe").params(), INPUTS)
        model.register_parameter("stray", nn.Parameter(torch.zeros(3)))  # read by no forward pass
        settings = TrainSection(epochs=1, batch_size=64, early_stopping=None)
        strategy = build_weighting("equal", WEIGHTINGS.get("equal").params(), TASKS)
        try:
            fit(model, strategy, split(128, 1), split(64, 2), settings, TASKS, ["binary"] * 2, NullObserver())
        except distributed.SameOnEveryRank as exc:
            with open(f"{out}/{rank}.txt", "w") as handle:
                handle.write(exc.message)
    finally:
        distributed.leave()


def test_a_parameter_no_step_reads_is_named_before_any_update() -> None:
    """DDP would leave a bucket unsummed and stop at the next step with its own message."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(unused_main, args=(2, f"{tmp}/store", tmp), nprocs=2, join=True)
        for rank in (0, 1):
            with open(f"{tmp}/{rank}.txt") as handle:
                assert "parameter stray took no part in the step's loss" in handle.read()
