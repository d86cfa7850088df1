"""CrossDistil wired into training: live on census (distillation non-zero, teachers order the
augmented levels better than chance), students-only bundles, exact resume, recipe errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from safetensors.torch import load_file

from mtlcli.data.batch import Batch
from mtlcli.errors import MtlError
from mtlcli.models import InputSpec, build_model
from mtlcli.models.base import SCHEMES
from mtlcli.objectives.training import CrossDistil, refuse_objective
from mtlcli.recipe import load_recipe
from mtlcli.recipe.schema import ObjectiveSection, TrainSection
from mtlcli.train.loop import build_parts
from mtlcli.train.run import train_run
from mtlcli.train.step import StepAt
from mtlcli.weighting import WEIGHTINGS, build_weighting
from tests.helpers import gradient_weighting, invoke

RECIPE = "recipes/census-crossdistil.yaml"
SHORT = ["train.epochs=2", "train.early_stopping=null", "train.threads=1"]


def census_recipe(cache: Path, extra: list[str] | None = None) -> Any:
    return load_recipe(RECIPE, [*SHORT, f"data.cache_dir={cache}", *(extra or [])])


def epochs(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def census_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tests.conftest import CENSUS

    if not CENSUS.is_file():
        pytest.skip(f"census data not found at {CENSUS}")
    base = tmp_path_factory.mktemp("crossdistil")
    train_run(census_recipe(base / "cache"), base / "run")
    return base / "run", base / "cache"


@pytest.mark.slow
def test_census_distillation_is_live_and_teachers_order_the_levels(census_run: tuple[Path, Path]) -> None:
    """Every epoch logs a non-zero distillation term per task and the teachers order the level
    pairs of both augmented orders better than chance (0.5) on average; by the last epoch every
    level pair clearly so. (In the first epoch, the ramp's, the marital teacher's 10>01 pair, where
    the two labels disagree, sits at chance: 0.49 to 0.51.)"""
    run, _ = census_run
    history = epochs(run)
    for record in history:
        objective = record["objective"]
        assert objective["partners"] == {"income": "marital", "marital": "income"}
        # high income and never married correlate negatively: each partner's label enters flipped
        assert objective["partner_flipped"] == {"income": True, "marital": True}
        assert all(value > 0.01 for value in objective["distill_loss"].values())
        for task in ("income", "marital"):
            shares = objective["pairwise_accuracy"][task]
            assert len(shares) == 6, shares
            assert sum(shares.values()) / len(shares) > 0.6, (task, shares)
            assert record is not history[-1] or all(share > 0.6 for share in shares.values()), (task, shares)


@pytest.mark.slow
def test_census_bundle_carries_students_only_and_predicts(census_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = census_run
    checkpoint = load_file(str(run / "checkpoint.safetensors"))
    assert any(k.startswith("objective.teachers.") for k in checkpoint)  # training keeps them
    assert any(k.startswith("optim.objective.") for k in checkpoint)
    assert invoke("export", run, "--out", tmp_path / "bundle").exit_code == 0
    for model_file in (run / "model.safetensors", tmp_path / "bundle" / "model.safetensors"):
        names = list(load_file(str(model_file)))
        assert names and not [n for n in names if "teacher" in n or "calibrat" in n or n.startswith("objective")]
    from tests.conftest import CENSUS

    with gzip.open(CENSUS, "rt") as rows:
        (tmp_path / "rows.csv").write_text("".join(next(rows) for _ in range(20)))
    result = invoke("predict", tmp_path / "bundle", tmp_path / "rows.csv")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "income,marital" and len(lines) == 21


@pytest.mark.slow
def test_census_run_interrupted_mid_epoch_resumes_exactly(census_run: tuple[Path, Path], tmp_path: Path) -> None:
    """Stopped inside the second epoch (the pair sampler, the teachers' moments and the epoch's
    sums in the checkpoint), then resumed: the same epochs and the same weights as the
    uninterrupted run."""
    from mtlcli.train.loop import TrainingInterrupted

    done, cache = census_run
    steps = {"n": 0}

    def stop() -> bool:
        steps["n"] += 1
        return steps["n"] == 80  # epoch 2 has begun (59 steps an epoch)

    with pytest.raises(TrainingInterrupted):
        train_run(census_recipe(cache), tmp_path / "run", stop_requested=stop)
    train_run(census_recipe(cache), tmp_path / "run", resume=True)
    keys = ("epoch", "train_loss", "valid", "objective")
    assert [{k: r[k] for k in keys} for r in epochs(tmp_path / "run")] == [
        {k: r[k] for k in keys} for r in epochs(done)
    ]
    resumed, reference = (
        load_file(str(tmp_path / "run" / "model.safetensors")),
        load_file(str(done / "model.safetensors")),
    )
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


# --- the step on a toy model -------------------------------------------------------------------


def toy(scheme: str = "mmoe") -> tuple[torch.nn.Module, Batch]:
    torch.manual_seed(0)
    inputs = InputSpec([5, 4], 2, ["a", "b"], ["binary", "binary"])
    model = build_model(scheme, SCHEMES.get(scheme).params(), inputs)
    n = 64
    generator = torch.Generator().manual_seed(1)
    labels = (torch.rand(n, 2, generator=generator) < 0.5).float()
    batch = Batch(
        torch.stack([torch.randint(5, (n,), generator=generator), torch.randint(4, (n,), generator=generator)], 1),
        torch.randn(n, 2, generator=generator) + labels,
        labels,
        torch.ones(n, 2, dtype=torch.bool),
    )
    return model, batch


def toy_objective(model: torch.nn.Module, error_correction: bool = True) -> CrossDistil:
    from mtlcli.models.base import scheme

    towers = scheme(model).capabilities.task_towers
    assert towers is not None
    section = ObjectiveSection(kind="crossdistil", warmup_steps=0, error_correction=error_correction)
    return CrossDistil(section, towers, ["a", "b"], {"a": "b", "b": "a"}, {}, 0, 0, torch.device("cpu"))


@pytest.mark.parametrize("scheme", ["mmoe", "cgc", "ple", "shared_bottom"])
def test_task_towers_compute_what_the_scheme_computes(scheme: str) -> None:
    """h_k through task k's tower is the scheme's output column k (the students are the towers)."""
    from mtlcli.models.base import scheme as as_scheme

    model, batch = toy(scheme)
    model.eval()
    towers = as_scheme(model).capabilities.task_towers
    assert towers is not None
    inputs = towers.inputs(batch)
    logits = torch.cat([towers.towers[t](inputs[k]) for k, t in enumerate(["a", "b"])], 1)
    torch.testing.assert_close(logits, model(batch), rtol=1e-5, atol=1e-6)


def snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


Snapshots = list[tuple[list[torch.Tensor], list[torch.Tensor]]]


def one_step(correction: bool) -> Snapshots:
    """(students, teachers) before and after each optimizer step of one CrossDistil step on the
    toy model, from the start."""
    model, batch = toy()
    objective = toy_objective(model, correction)
    strategy = build_weighting("equal", None, ["a", "b"])
    parts = build_parts(
        model, strategy, TrainSection(lr=0.01), ["a", "b"], ["binary", "binary"], 10, objective=objective
    )
    students, teachers = list(objective.towers.towers.parameters()), objective.parameters()
    calls: Snapshots = [(snapshot(students), snapshot(teachers))]
    optimizer_step = parts.optimizer.step

    def spy(number: int) -> None:
        calls.append((snapshot(students), snapshot(teachers)))
        optimizer_step(number)
        calls.append((snapshot(students), snapshot(teachers)))

    parts.optimizer.step = spy  # type: ignore[method-assign]
    objective.make_step(parts)(batch, StepAt(1, 1, 1))
    return calls


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_each_update_moves_its_own_group_and_the_feedback_reaches_the_teachers() -> None:
    """The student update leaves the teachers alone; the teacher update leaves the task towers
    alone; with error correction off the teachers end elsewhere (the feedback is live)."""
    (s, t), (s0, t0), (s1, t1), (s2, t2), (s3, t3) = one_step(True)
    assert same(s, s0) and same(t, t0)
    assert same(t0, t1) and not same(s0, s1)  # students first, teachers frozen
    assert same(s2, s3) and not same(t2, t3)  # then teachers, students frozen
    assert not same(t3, one_step(False)[-1][1])


# --- refusals ------------------------------------------------------------------------------------


def test_gradient_combining_weightings_are_refused_by_their_declaration() -> None:
    """A weighting is refused for what it declares (``task_gradients``), and the message lists
    the registry's weightings of each kind: a new one named nowhere else is refused and listed."""
    tasks = ["a", "b"]
    with gradient_weighting("toy_combining"):
        for name in ("toy_combining", "pcgrad"):
            with pytest.raises(MtlError) as caught:
                refuse_objective(name, build_weighting(name, WEIGHTINGS.get(name).params(), tasks), tasks)
            refused, hint = str(caught.value).split("hint:")
            assert f"'{name}' combines" in refused and "toy_combining" in refused and "mgda" in refused
            assert "loss-based weighting" in hint and "uncertainty" in hint and "toy_combining" not in hint
    refuse_objective("equal", build_weighting("equal", None, tasks), tasks)


@pytest.mark.parametrize(
    ("sets", "words"),
    [
        (["tasks.marital.type=regression", "tasks.marital.label=age"], "is a regression task"),
        (["objective.distil_weight=0.5"], "distil_weight"),
        (["objective.partners={income: salary}"], "'salary' is not a task"),
        (["objective.partners={income: income}"], "its own partner"),
    ],
)
def test_recipe_errors_are_named(sets: list[str], words: str, tmp_path: Path) -> None:
    args = [part for item in sets for part in ("--set", item)]
    result = invoke("recipe", "check", RECIPE, *args)
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output


def test_a_scheme_without_task_towers_and_a_gradient_weighting_are_refused(census_file: Path, tmp_path: Path) -> None:
    common = [*SHORT, "train.epochs=1", f"data.cache_dir={tmp_path / 'cache'}"]
    for extra, words, options in (
        (["model={scheme: cross_stitch}"], "does not declare", []),
        (["loss.weighting=pcgrad"], "loss-based weighting", []),
    ):
        args = [part for item in [*common, *extra] for part in ("--set", item)]
        result = invoke("train", RECIPE, "--out", tmp_path / "run", "--force", "--quiet", *options, *args)
        assert result.exit_code == 2, result.output
        assert words in result.output and "Traceback" not in result.output


LOSS_BASED = [
    name
    for name in sorted(WEIGHTINGS.names())
    if not build_weighting(name, WEIGHTINGS.get(name).params(), ["a", "b"]).capabilities.task_gradients
]


@pytest.mark.parametrize("weighting", LOSS_BASED)
def test_every_loss_based_weighting_trains_with_crossdistil(weighting: str) -> None:
    """Three steps of every weighting that does not combine gradients itself: finite losses, and
    the teachers move."""
    model, batch = toy()
    objective = toy_objective(model)
    strategy = build_weighting(weighting, WEIGHTINGS.get(weighting).params(), ["a", "b"])
    parts = build_parts(
        model, strategy, TrainSection(lr=0.01), ["a", "b"], ["binary", "binary"], 3, objective=objective
    )
    step = objective.make_step(parts)
    before = snapshot(objective.parameters())
    for number in (1, 2, 3):
        done = step(batch, StepAt(1, number, number))
        assert bool(torch.isfinite(done.losses).all()) and bool(torch.isfinite(done.weights).all())
    assert not same(before, snapshot(objective.parameters()))
    assert objective.end_epoch()["distill_loss"]["a"] > 0


def test_tracked_steps_report_the_task_gradients_on_the_shared_parameters() -> None:
    model, batch = toy()
    objective = toy_objective(model)
    strategy = build_weighting("equal", None, ["a", "b"])
    settings = TrainSection(lr=0.01, track_gradients=2)
    parts = build_parts(model, strategy, settings, ["a", "b"], ["binary", "binary"], 3, objective=objective)
    step = objective.make_step(parts)
    assert step(batch, StepAt(1, 1, 1)).gradients is None
    grads = step(batch, StepAt(1, 2, 2)).gradients
    assert grads is not None and grads.shape[0] == 2 and bool(grads.abs().sum() > 0)


@pytest.mark.parametrize("orient", [True, False])
def test_a_negatively_correlated_partner_enters_flipped_unless_told_not_to(orient: bool) -> None:
    """b's labels mostly the opposite of a's: with orient_partner each partner's label enters the
    order as 1 − y, so (a=1, b=0) rows are at the top of a's order; without, as is."""
    from mtlcli.data.batch import SplitTensors
    from mtlcli.objectives.training import build_crossdistil

    model, batch = toy()
    labels = batch.labels.clone()
    labels[:, 1] = 1.0 - labels[:, 0]
    labels[:8, 1] = labels[:8, 0]  # not perfectly
    split = SplitTensors(batch.categorical, batch.numeric, labels, batch.label_mask)
    section = ObjectiveSection(kind="crossdistil", orient_partner=orient)
    objective = build_crossdistil(
        section, model, "mmoe", ["a", "b"], ["binary", "binary"], split, 16, 0, torch.device("cpu")
    )
    assert objective.partners == {"a": "b", "b": "a"}
    assert objective.flipped == [orient, orient]
    assert objective.warmup_steps == 4  # one epoch of 64 rows in batches of 16


def test_the_teacher_update_also_trains_the_shared_layers() -> None:
    """The quadruplet loss reaches the layers below h_k (the experts), the student towers not."""
    model, batch = toy()
    objective = toy_objective(model)
    strategy = build_weighting("equal", None, ["a", "b"])
    parts = build_parts(
        model, strategy, TrainSection(lr=0.01), ["a", "b"], ["binary", "binary"], 3, objective=objective
    )
    step = objective.make_step(parts)
    experts = [p for name, p in model.named_parameters() if name.startswith("experts.")]
    seen: list[list[torch.Tensor]] = []
    optimizer_step = parts.optimizer.step

    def spy(number: int) -> None:
        seen.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in experts])
        optimizer_step(number)

    parts.optimizer.step = spy  # type: ignore[method-assign]
    step(batch, StepAt(1, 1, 1))
    assert any(bool(g.abs().sum() > 0) for g in seen[1])


def test_teacher_towers_have_no_biases_and_a_checkpoint_with_them_is_refused(tmp_path: Path) -> None:
    """A ranking loss gives a teacher's bias no signal, so the teachers have none; a checkpoint
    written while they had biases stops the resume with a message to train again."""
    from mtlcli.objectives.training import fresh_copy
    from mtlcli.train.checkpoint import load_checkpoint, save_checkpoint
    from mtlcli.train.loop import LoopState

    def parts_of(biased: bool) -> Any:
        model, _ = toy()
        objective = toy_objective(model)
        if biased:  # the teachers as an earlier version built them
            objective.teachers.towers = torch.nn.ModuleDict({t: fresh_copy(objective.towers.towers[t]) for t in "ab"})
        strategy = build_weighting("equal", None, ["a", "b"])
        return build_parts(model, strategy, TrainSection(), ["a", "b"], ["binary"] * 2, 10, objective=objective)

    parts = parts_of(False)
    assert not [n for n, _ in parts.objective.teachers.named_parameters() if n.endswith("bias")]
    old = parts_of(True)
    save_checkpoint(tmp_path / "c", LoopState(), old.model, old.optimizer, old.strategy, {}, old.objective)
    with pytest.raises(MtlError, match="teacher towers had biases; train again"):
        load_checkpoint(tmp_path / "c", parts.model, parts.optimizer, parts.strategy, parts.objective)


def test_over_gate_control_the_teacher_pass_reuses_the_steps_lambda() -> None:
    """CrossDistil's teacher pass runs the gates a second time on the step's batch: it carries
    the λ of the step's first pass and updates no statistic, so after each step λ is what one
    plain training forward pass of the model before the step computes, and one update per step
    is counted."""
    import copy

    from mtlcli.models.gate_control import GateControl

    torch.manual_seed(0)
    inputs = InputSpec([5, 4], 2, ["a", "b"], ["binary", "binary"])
    model = build_model("mmoe", SCHEMES.get("mmoe").params(gate_control=True), inputs)
    _, batch = toy()
    objective = toy_objective(model, error_correction=False)
    parts = build_parts(
        model, build_weighting("equal", None, ["a", "b"]), TrainSection(lr=0.05, optimizer="sgd"), ["a", "b"],
        ["binary"] * 2, 10, objective=objective,
    )  # fmt: skip
    step = objective.make_step(parts)
    control = model.control
    assert isinstance(control, GateControl)
    for number in range(1, 4):
        twin = copy.deepcopy(model)
        twin(batch)  # one training forward pass: the step's λ
        expected = cast(GateControl, twin.control).coefficients
        step(batch, StepAt(1, number, number))
        torch.testing.assert_close(control.coefficients, expected, rtol=1e-12, atol=0.0)
        assert int(control.steps) == number


def test_over_gate_control_a_run_interrupted_mid_epoch_resumes_exactly(tmp_path: Path) -> None:
    """CrossDistil over a gate-controlled MMoE, stopped inside its second epoch and resumed from
    the checkpoint (teachers, pair sampler, λ and the correlation's average with the model): the
    same weights, teachers and epoch records as the uninterrupted run."""
    from mtlcli.data.batch import SplitTensors
    from mtlcli.models.base import scheme
    from mtlcli.train.checkpoint import load_checkpoint, save_checkpoint
    from mtlcli.train.loop import LoopState, NullObserver, TrainingInterrupted, make_step, train_loop
    from tests.helpers import click_buy_split
    from tests.train.test_resume import CheckpointTo

    inputs = InputSpec([50, 8], 2, ["a", "b"], ["binary", "binary"])
    data: SplitTensors = click_buy_split(inputs, 150, 1, every=3, buy_space=True)
    settings = TrainSection(epochs=2, batch_size=32, early_stopping=None, lr=0.01)
    path = tmp_path / "checkpoint.safetensors"

    def fresh() -> Any:
        torch.manual_seed(0)
        model = build_model("mmoe", SCHEMES.get("mmoe").params(gate_control=True), inputs)
        towers = scheme(model).capabilities.task_towers
        assert towers is not None
        section = ObjectiveSection(kind="crossdistil", warmup_steps=3, max_pairs=32)
        objective = CrossDistil(section, towers, ["a", "b"], {"a": "b", "b": "a"}, {}, 3, 5, torch.device("cpu"))
        strategy = build_weighting("equal", None, ["a", "b"])
        return build_parts(model, strategy, settings, ["a", "b"], ["binary"] * 2, 5, objective=objective)

    class WithObjective(CheckpointTo):
        def on_checkpoint(self, state: object, model: torch.nn.Module, optimizer: object, strategy: object) -> None:
            save_checkpoint(self.path, state, model, optimizer, strategy, {}, stopped.objective)  # type: ignore[arg-type]

    def run(parts: Any, observer: Any, state: LoopState, stop: Any = lambda: False) -> Any:
        return train_loop(parts, make_step(parts), data, data, ["binary"] * 2, observer, state, stop)

    reference = fresh()
    whole = run(reference, NullObserver(), LoopState())
    stopped, steps = fresh(), iter(range(100))
    with pytest.raises(TrainingInterrupted):
        run(stopped, WithObjective(path), LoopState(), lambda: next(steps) == 7)  # epoch 2 has begun
    resumed = fresh()
    state = load_checkpoint(path, resumed.model, resumed.optimizer, resumed.strategy, resumed.objective)
    again = run(resumed, NullObserver(), state)
    for ours, theirs in ((resumed.model, reference.model), (resumed.objective.teachers, reference.objective.teachers)):
        expected = theirs.state_dict()
        assert all(torch.equal(value, expected[name]) for name, value in ours.state_dict().items())
    keys = ("train_loss", "objective", "gate_control")
    assert [{k: r[k] for k in keys} for r in again.history] == [{k: r[k] for k in keys} for r in whole.history]
