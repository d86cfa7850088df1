"""Every registered sharing scheme exports to ONNX and the export verifies itself (the kernel bound)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mtlcli.export.bundle import export_onnx
from mtlcli.models import SCHEMES, build_model
from mtlcli.numerics import EPS32, K_OUTPUTS
from tests.models.test_models import INPUTS

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytestmark = pytest.mark.numerics  # onnxruntime's kernels against torch's


# what export_onnx reads of a run's schema, for the contract tests' inputs
SCHEMA = SimpleNamespace(
    cardinalities=INPUTS.cardinalities,
    categorical=INPUTS.cardinalities,
    numeric=[None] * INPUTS.n_numeric,
    tasks=INPUTS.tasks,
    sequences=[],
)


@pytest.mark.parametrize("scheme", SCHEMES.names())
def test_every_scheme_exports_to_onnx_within_tolerance(scheme: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(scheme, SCHEMES.get(scheme).params(), INPUTS).eval()
    with torch.no_grad():  # move off the initial weights so that every part contributes
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    report = export_onnx(model, SCHEMA, tmp_path / "model.onnx", check_rows=512)
    assert 0.0 < report["tolerance"] <= K_OUTPUTS * EPS32 * 100  # logits of these models stay below 100
    assert report["max_abs_diff"] <= report["tolerance"]
    assert (tmp_path / "model.onnx").stat().st_size > 0


class Unexportable(torch.nn.Module):
    """A model using an operator the ONNX exporter (opset 17) lacks."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, batch: object) -> torch.Tensor:
        return torch.expm1(batch.numeric[:, : len(INPUTS.tasks)] * self.scale)  # type: ignore[attr-defined]


def test_an_operator_onnx_lacks_is_a_clear_error(tmp_path: Path) -> None:
    from mtlcli.errors import ArtifactError

    with pytest.raises(ArtifactError, match=r"cannot export this model to ONNX: .*expm1"):
        export_onnx(Unexportable(), SCHEMA, tmp_path / "model.onnx")
