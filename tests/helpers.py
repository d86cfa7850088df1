"""Helpers several test files share: small data, recipes and the CLI, built one way."""

from __future__ import annotations

import gzip
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from typer.testing import CliRunner, Result

from mtlcli.cli.app import app
from mtlcli.data.batch import SplitTensors
from mtlcli.models import InputSpec

runner = CliRunner()


def invoke(*args: str | Path, input: str | bytes | None = None) -> Result:
    """``mtl ARGS`` in this process: its exit code, and its stdout and stderr apart."""
    return runner.invoke(app, [str(a) for a in args], input=input)


def mtl(
    *args: str | Path, cwd: Path, stdin: int | None = None, stdout: int | None = subprocess.PIPE
) -> subprocess.Popen[str]:
    """``mtl ARGS`` started as its own process in ``cwd`` (``python -m mtlcli``), stderr piped, text."""
    return subprocess.Popen(
        [sys.executable, "-m", "mtlcli", *map(str, args)],
        cwd=cwd,
        text=True,
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
    )


def click_buy_split(inputs: InputSpec, n: int, seed: int, every: int, buy_space: bool = False) -> SplitTensors:
    """``n`` seeded rows for two binary tasks: click where the first feature's id is a multiple of
    ``every`` (10% flipped), buy where clicked and the first number is positive; with ``buy_space``
    buy is labelled only where clicked."""
    gen = torch.Generator().manual_seed(seed)
    cats = torch.stack([torch.randint(0, c, (n,), generator=gen) for c in inputs.cardinalities], 1)
    numeric = torch.randn(n, inputs.n_numeric, generator=gen)
    click = ((cats[:, 0] % every == 0) ^ (torch.rand(n, generator=gen) < 0.1)).float()
    buy = (click * (numeric[:, 0] > 0).float()).float()
    labels = torch.stack([click, buy], 1)
    mask = torch.ones_like(labels, dtype=torch.bool)
    if buy_space:
        mask[:, 1] = click > 0
    return SplitTensors(cats, numeric, labels, mask)


def three_opposed_tasks(gen: torch.Generator, n: int = 300) -> tuple[InputSpec, SplitTensors]:
    """``n`` rows drawn from ``gen`` for three binary tasks on two features (4 and 6 ids) and two
    numbers: a where the first id is below 2, b where the first number is positive and c where it is
    below 0.3, so b and c mostly disagree; every label observed."""
    inputs = InputSpec(cardinalities=[4, 6], n_numeric=2, tasks=["a", "b", "c"], task_types=["binary"] * 3)
    cats = torch.stack([torch.randint(0, 4, (n,), generator=gen), torch.randint(0, 6, (n,), generator=gen)], 1)
    numeric = torch.randn(n, 2, generator=gen)
    labels = torch.stack([(cats[:, 0] < 2).float(), (numeric[:, 0] > 0).float(), (numeric[:, 0] < 0.3).float()], 1)
    return inputs, SplitTensors(cats, numeric, labels, torch.ones(n, 3, dtype=torch.bool))


def two_regressions(loss: str) -> str:
    """A recipe text: two regression tasks y1 and y2 on synthetic data, with ``loss`` (YAML flow)."""
    return f"""
data: {{synthetic: {{rows: 100}}}}
tasks: {{y1: {{type: regression, label: y1}}, y2: {{type: regression, label: y2}}}}
loss: {loss}
train: {{early_stopping: {{metric: rmse}}}}
"""


def census_bundle(run: Path, work: Path, census: Path) -> tuple[Path, Path]:
    """Export ``run`` into ``work/bundle`` (ONNX where onnxruntime is installed, else safetensors)
    and write the census recipes' test split (every fifth row) to ``work/test.csv``."""
    try:
        import onnxruntime  # noqa: F401

        fmt = "onnx"
    except ImportError:
        fmt = "safetensors"
    result = invoke("export", run, "--out", work / "bundle", "--format", fmt)
    assert result.exit_code == 0, result.output
    with gzip.open(census, "rt", encoding="utf-8") as handle:
        rows = [line for index, line in enumerate(handle) if index % 5 == 0]
    (work / "test.csv").write_text("".join(rows), encoding="utf-8")
    return work / "bundle", work / "test.csv"


@contextmanager
def gradient_weighting(name: str) -> Iterator[None]:
    """A weighting ``name`` registered for the block, which declares that it combines the tasks'
    gradients itself (``task_gradients``) and is named nowhere else: what refusals must catch from
    the declaration alone."""
    from torch import Tensor, nn

    from mtlcli.weighting import WEIGHTINGS
    from mtlcli.weighting.base import StrategyCapabilities, WeightingParams, register_weighting

    class Combining:
        capabilities = StrategyCapabilities(task_gradients=True)

        def backward(self, losses: Tensor, model: nn.Module) -> Tensor:
            losses.sum().backward()
            return torch.ones_like(losses)

    register_weighting(name, WeightingParams, "combines the tasks' gradients (a test's)")(lambda p, t: Combining())
    try:
        yield
    finally:
        WEIGHTINGS.remove(name)
