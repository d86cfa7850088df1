"""Nothing lost: interrupted census trainings resume to exactly the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtlcli.data.batch import SplitTensors
from mtlcli.models import SCHEMES, InputSpec, build_model
from mtlcli.models.blocks import use_sparse_rows
from mtlcli.recipe.schema import EarlyStopping, TrainSection
from mtlcli.train.loop import FitResult, NullObserver, TrainingDiverged, fit
from mtlcli.weighting import WEIGHTINGS, build_weighting
from tests.helpers import mtl, three_opposed_tasks

SETTINGS = ["train.epochs=4", "train.early_stopping=null", "train.threads=1"]


# streamed in windows of 8,192 rows (the census train split has 59,856), checkpointed mid-epoch
STREAMED = ["train.loading=stream", "train.shuffle_buffer=8192", "train.checkpoint_every=20"]


def train_args(run: Path, cache: Path, extra: list[str] | None = None) -> list[str | Path]:
    sets = [part for item in [*SETTINGS, *(extra or []), f"data.cache_dir={cache}"] for part in ("--set", item)]
    return ["train", "recipes/census-mmoe.yaml", "--out", run, "--quiet", *sets]


def wait_for_epochs(run: Path, count: int, process: subprocess.Popen[str]) -> None:
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= count:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError("training made no progress")


def records(run: Path) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("epoch", "train_loss", "weights", "valid", "best_epoch")} for r in lines]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tests.conftest import CENSUS, REPO

    if not CENSUS.is_file():
        pytest.skip(f"census data not found at {CENSUS}")
    base = tmp_path_factory.mktemp("reference")
    process = mtl(*train_args(base / "run", base / "cache"), cwd=REPO)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    return base / "run", base / "cache"


@pytest.fixture(scope="module")
def streamed_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tests.conftest import CENSUS, REPO

    if not CENSUS.is_file():
        pytest.skip(f"census data not found at {CENSUS}")
    base = tmp_path_factory.mktemp("streamed")
    process = mtl(*train_args(base / "run", base / "cache", STREAMED), cwd=REPO)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    return base / "run", base / "cache"


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_census_run_resumes_to_the_same_result(
    how: int, reference: tuple[Path, Path], tmp_path: Path
) -> None:
    interrupted_run_resumes(how, reference, [], tmp_path)


@pytest.mark.slow
def test_a_streamed_run_killed_mid_epoch_resumes_to_the_same_result(
    streamed_reference: tuple[Path, Path], tmp_path: Path
) -> None:
    """kill -9 inside an epoch of a run streamed in windows: the resumed run starts reading at the
    window of its checkpoint's batch and ends exactly where the uninterrupted one does."""
    interrupted_run_resumes(signal.SIGKILL, streamed_reference, STREAMED, tmp_path, mid_epoch=True)


def checkpoint_position(run: Path) -> tuple[int, int]:
    """(epoch in progress, batches of it done) of the run's checkpoint; (0, 0) before the first."""
    from safetensors import safe_open

    try:
        with safe_open(str(run / "checkpoint.safetensors"), "pt") as handle:
            loop = json.loads(handle.metadata()["loop"])
    except (OSError, KeyError, ValueError):
        return 0, 0
    return int(loop["epoch"]), int(loop["step"])


def interrupted_run_resumes(
    how: int, reference: tuple[Path, Path], extra: list[str], tmp_path: Path, mid_epoch: bool = False
) -> None:
    from tests.conftest import REPO

    done, cache = reference
    run = tmp_path / "run"
    process = mtl(*train_args(run, cache, extra), cwd=REPO)
    wait_for_epochs(run, 1, process)
    if mid_epoch:  # kill once a checkpoint inside an epoch is on disk: the resume starts mid-window
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "no mid-epoch checkpoint"
            if checkpoint_position(run)[1] > 0:
                os.kill(process.pid, signal.SIGSTOP)  # hold it still, then look again: no newer checkpoint
                if checkpoint_position(run)[1] > 0:
                    break
                os.kill(process.pid, signal.SIGCONT)
            time.sleep(0.005)
    else:
        time.sleep(0.15)  # into the second epoch
    os.kill(process.pid, how)
    _, err = process.communicate(timeout=120)
    if how == signal.SIGINT:
        assert process.returncode == 130, err
        assert "--resume" in err and "Traceback" not in err
    else:
        assert process.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists()
    assert len(records(run)) < 4, "the run finished before it was interrupted"
    if mid_epoch:
        assert checkpoint_position(run)[1] > 0, "the checkpoint to resume from is inside an epoch"
    resumed = mtl(*train_args(run, cache, extra), "--resume", cwd=REPO)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert records(run) == records(done)
    ours, theirs = load_file(str(run / "model.safetensors")), load_file(str(done / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in ours:  # one machine, the same batches in the same order: the same kernels, so bitwise
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.slow
def test_resume_refuses_a_changed_recipe(reference: tuple[Path, Path], tmp_path: Path) -> None:
    from tests.conftest import REPO

    done, cache = reference
    process = mtl(*train_args(done, cache), "--resume", "--set", "train.lr=0.5", cwd=REPO)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 2
    assert "recipe differs" in err and "Traceback" not in err


def test_nan_loss_stops_with_the_task_epoch_and_step() -> None:
    inputs = InputSpec(cardinalities=[3], n_numeric=1, tasks=["ok", "huge"], task_types=["regression"] * 2)
    n = 64
    labels = torch.stack([torch.zeros(n), torch.full((n,), 1e30)], 1)
    data = SplitTensors(
        torch.zeros(n, 1, dtype=torch.long), torch.zeros(n, 1), labels, torch.ones(n, 2, dtype=torch.bool)
    )
    model = build_model("shared_bottom", SCHEMES.get("shared_bottom").params(), inputs)
    strategy = build_weighting("equal", WEIGHTINGS.get("equal").params(), inputs.tasks)
    settings = TrainSection(epochs=1, batch_size=32, early_stopping=None)
    with pytest.raises(TrainingDiverged, match=r"task huge became NaN or infinite at epoch 1, step 1"):
        fit(model, strategy, data, data, settings, inputs.tasks, inputs.task_types, NullObserver())


def test_a_locked_run_directory_is_refused_naming_the_owner(tmp_path: Path) -> None:
    from mtlcli.errors import ArtifactError
    from mtlcli.train.run import run_lock

    with (
        run_lock(tmp_path / "run"),
        pytest.raises(ArtifactError, match=rf"pid {os.getpid()}"),
        run_lock(tmp_path / "run"),
    ):
        pass


class CheckpointTo:
    """An observer that saves every checkpoint to one file, as the run directory does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_start(self, epochs: int, steps_per_epoch: int) -> None: ...

    def on_step(self, epoch: int, step: int) -> None: ...

    def on_epoch(self, record: dict[str, object], model: torch.nn.Module, improved: bool) -> None: ...

    def on_checkpoint(self, state: object, model: torch.nn.Module, optimizer: object, strategy: object) -> None:
        from mtlcli.train.checkpoint import save_checkpoint

        save_checkpoint(self.path, state, model, optimizer, strategy, {})  # type: ignore[arg-type]

    def on_gradients(self, record: dict[str, object]) -> None: ...


@pytest.mark.parametrize("weighting", WEIGHTINGS.names())
def test_every_strategy_resumes_mid_epoch_to_the_same_weights(weighting: str, tmp_path: Path) -> None:
    resumes_to_the_same_weights(
        weighting, TrainSection(epochs=3, batch_size=32, early_stopping=None, lr=0.01), tmp_path
    )


def test_a_scheduled_clipped_run_resumes_mid_epoch_to_the_same_weights(tmp_path: Path) -> None:
    settings = TrainSection.model_validate(
        {
            "epochs": 3,
            "batch_size": 32,
            "early_stopping": None,
            "lr": 0.01,
            "lr_schedule": {"kind": "cosine", "warmup_steps": 5, "min_ratio": 0.1},
            "clip_grad_norm": 0.05,
        }
    )
    resumes_to_the_same_weights("uncertainty", settings, tmp_path)


def test_the_best_weights_so_far_survive_a_resume(tmp_path: Path) -> None:
    """With early stopping the checkpoint carries the best weights so far: the run is interrupted
    in its last epoch, after an earlier best epoch, and must return that epoch's weights."""
    settings = TrainSection(epochs=4, batch_size=32, lr=0.01, early_stopping=EarlyStopping(patience=4))
    result = resumes_to_the_same_weights("equal", settings, tmp_path, stop_at=35, noisy_valid=True)
    assert result.best_epoch < 4, "precondition: the best epoch comes before the interruption"


def test_dropout_draws_continue_after_a_resume(tmp_path: Path) -> None:
    """Dropout draws from torch's global generator, whose state the checkpoint restores; without
    early stopping the final weights are the last step's, so every draw after the resume counts."""
    settings = TrainSection(epochs=3, batch_size=32, lr=0.01, early_stopping=None)
    resumes_to_the_same_weights("equal", settings, tmp_path, dropout=0.3)


# small settings per scheme (others: their defaults)
SMALL: dict[str, dict[str, object]] = {"mmoe": {"n_experts": 3, "expert_units": [8], "tower_units": [4]}}


# AITM: the scheme's own loss term goes through the step; STEM: an embedding table per task. The
# other new schemes keep nothing a checkpoint could miss beyond their parameters.
@pytest.mark.parametrize("scheme", ["aitm", "stem"])
def test_a_scheme_resumes_mid_epoch_to_the_same_weights(scheme: str, tmp_path: Path) -> None:
    settings = TrainSection(epochs=2, batch_size=32, early_stopping=None, lr=0.01)
    resumes_to_the_same_weights("equal", settings, tmp_path, scheme=scheme)


def resumes_to_the_same_weights(
    weighting: str,
    settings: TrainSection,
    tmp_path: Path,
    dropout: float = 0.0,
    stop_at: int = 14,
    noisy_valid: bool = False,
    sparse: bool = False,
    scheme: str = "mmoe",
) -> FitResult:
    """Train once uninterrupted, once interrupted after ``stop_at`` steps and resumed from the
    checkpoint; the final weights must be identical. Returns the uninterrupted run's result."""
    from mtlcli.train.checkpoint import load_checkpoint
    from mtlcli.train.loop import TrainingInterrupted, make_optimizer

    # three tasks, two of them opposed: PCGrad's random order and every balancing weight matter
    gen = torch.Generator().manual_seed(0)
    inputs, data = three_opposed_tasks(gen)
    valid = data
    if noisy_valid:  # labels of coin flips: the valid AUC wanders, so the best epoch is not the last
        noise = torch.rand(data.labels.shape, generator=gen).lt(0.5).float()
        valid = SplitTensors(data.categorical, data.numeric, noise, torch.ones_like(data.label_mask))

    def fresh() -> tuple[torch.nn.Module, object, torch.optim.Optimizer]:
        torch.manual_seed(0)
        params = SCHEMES.get(scheme).params(**SMALL.get(scheme, {}), dropout=dropout)
        model = build_model(scheme, params, inputs)
        if sparse:  # the embedding table trains row-wise: its optimizer state is in the checkpoint too
            use_sparse_rows(model)
        strategy = build_weighting(weighting, WEIGHTINGS.get(weighting).params(), inputs.tasks)
        return (
            model,
            strategy,
            make_optimizer(settings, list(model.parameters()), list(strategy.capabilities.parameters)),
        )  # type: ignore[attr-defined]

    model, strategy, optimizer = fresh()
    result = fit(model, strategy, data, valid, settings, inputs.tasks, inputs.task_types, NullObserver(), optimizer)  # type: ignore[arg-type]
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    path = tmp_path / "checkpoint.safetensors"
    steps = iter(range(10_000))
    model, strategy, optimizer = fresh()
    with pytest.raises(TrainingInterrupted):
        fit(
            model,
            strategy,
            data,
            valid,
            settings,
            inputs.tasks,
            inputs.task_types,
            CheckpointTo(path),
            optimizer,  # type: ignore[arg-type]
            stop_requested=lambda: next(steps) == stop_at,
        )  # 10 steps per epoch: 14 is mid second epoch
    model, strategy, optimizer = fresh()
    state = load_checkpoint(path, model, optimizer, strategy)  # type: ignore[arg-type]
    assert (state.epoch, state.step) == (stop_at // 10 + 1, stop_at % 10 + 1)
    resumed = fit(
        model, strategy, data, valid, settings, inputs.tasks, inputs.task_types, NullObserver(), optimizer, state
    )  # type: ignore[arg-type]
    assert resumed.best_epoch == result.best_epoch
    for name, value in model.state_dict().items():  # same machine, batches and kernels: bitwise
        assert torch.equal(value, reference[name]), f"{weighting}: {name} differs after resume"
    return result
