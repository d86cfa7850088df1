"""ESMM (Ma et al., SIGIR 2018): CTR and CTCVR = pCTR x pCVR over the entire impression space."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mtlcli.data.batch import Batch
from mtlcli.errors import RecipeError
from mtlcli.models import InputSpec
from mtlcli.models.esmm import ESMM
from mtlcli.recipe import load_recipe, recipe_from_text
from mtlcli.train.loop import task_losses
from mtlcli.train.run import evaluate_run, train_run
from tests.conftest import REPO, SHARED_DATA

INPUTS = InputSpec(cardinalities=[5, 7], n_numeric=2, tasks=["ctr", "buy", "like"], task_types=["binary"] * 3)


def batch(n: int = 32) -> Batch:
    gen = torch.Generator().manual_seed(0)
    cats = torch.stack([torch.randint(0, 5, (n,), generator=gen), torch.randint(0, 7, (n,), generator=gen)], 1)
    click = (torch.rand(n, generator=gen) < 0.4).float()
    buy = click * (torch.rand(n, generator=gen) < 0.5).float()
    labels = torch.stack([click, buy, (torch.rand(n, generator=gen) < 0.3).float()], 1)
    return Batch(cats, torch.randn(n, 2, generator=gen), labels, torch.ones(n, 3, dtype=torch.bool))


def model() -> ESMM:
    torch.manual_seed(0)
    return ESMM(INPUTS, 4, "ctr", "buy", [8], 0.0)


def test_conversion_output_is_ctr_times_cvr() -> None:
    m, b = model(), batch()
    out = torch.sigmoid(m(b))
    assert torch.allclose(out[:, 1], out[:, 0] * m.pcvr(b), atol=1e-6)


def test_conversion_loss_is_bce_of_the_product_over_all_impressions() -> None:
    m, b = model(), batch()
    losses = task_losses(m(b), b, torch.tensor([True, True, True]))
    p = torch.sigmoid(m(b)[:, 0]) * m.pcvr(b)
    expected = torch.nn.functional.binary_cross_entropy(p, b.labels[:, 1])
    assert losses[1].item() == pytest.approx(expected.item(), rel=1e-5)


def test_cvr_tower_learns_only_through_ctcvr() -> None:
    m, b = model(), batch()
    losses = task_losses(m(b), b, torch.tensor([True, True, True]))
    (losses[0] + losses[2]).backward()  # CTR and the other task: no path to the CVR tower
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.cvr.parameters())
    groups = m.parameter_groups()
    assert set(groups["buy"]) == {f"cvr.{n}" for n, _ in m.cvr.named_parameters()}
    assert any(name.startswith("ctr.") for name in groups["shared"])  # CTR tower feeds both losses


def test_extreme_logits_stay_finite() -> None:
    from mtlcli.models.esmm import _log_sigmoid_pair

    a = torch.tensor([40.0, -40.0, 0.0, 40.0])
    b = torch.tensor([40.0, -40.0, 0.0, -40.0])
    out = _log_sigmoid_pair(a, b)
    assert torch.isfinite(out).all()
    assert torch.sigmoid(out[2]).item() == pytest.approx(0.25)
    # p = σ(40)² = 1 − 2e⁻⁴⁰ (logit 40 − log 2); σ(−40)² = e⁻⁸⁰; σ(40)σ(−40) = e⁻⁴⁰: no clamping
    assert out[[0, 1, 3]].tolist() == pytest.approx([40 - math.log(2), -80.0, -40.0], abs=1e-4)


@pytest.mark.parametrize(
    ("model_yaml", "message"),
    [
        ("{scheme: esmm, conversion_task: byu}", "unknown task 'byu' (did you mean 'buy'?)"),
        ("{scheme: esmm, click_task: buy, conversion_task: buy}", "the click and conversion tasks must differ"),
    ],
)
def test_recipe_checks(model_yaml: str, message: str) -> None:
    text = f"""
data: {{synthetic: {{rows: 100}}}}
tasks: {{ctr: {{label: {{column: y1, threshold: 0}}}}, buy: {{label: {{column: y2, threshold: 1}}}}}}
model: {model_yaml}
"""
    with pytest.raises(RecipeError) as caught:
        recipe_from_text(text)
    assert message in str(caught.value)


def test_a_conversion_task_with_a_space_is_refused() -> None:
    text = """
data: {synthetic: {rows: 100}}
tasks: {ctr: {label: {column: y1, threshold: 0}}, buy: {label: {column: y2, threshold: 1}, space: ctr}}
model: {scheme: esmm}
"""
    with pytest.raises(RecipeError, match="ESMM trains CTCVR over all impressions"):
        recipe_from_text(text)


def test_esmm_trains_on_the_ali_ccp_sample(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"sample data not found at {SHARED_DATA}")
    monkeypatch.chdir(REPO)
    recipe = load_recipe("recipes/aliccp-esmm.yaml", [f"data.cache_dir={tmp_path / 'cache'}"])
    train_run(recipe, tmp_path / "run")
    result = evaluate_run(tmp_path / "run", "test")
    assert set(result["tasks"]) == {"click", "purchase"}
    assert result["tasks"]["purchase"]["n"] == 50  # CTCVR: every impression counts
