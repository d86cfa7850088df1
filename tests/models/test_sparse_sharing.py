"""Sparse sharing (Sun et al., AAAI 2020): per-task masks found by iterative magnitude pruning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtlcli.data.batch import SplitTensors
from mtlcli.models import InputSpec
from mtlcli.models.sparse_sharing import SparseSharing
from mtlcli.train.loop import task_losses
from tests.numerics import assert_kernel_close

INPUTS = InputSpec(cardinalities=[6, 5], n_numeric=3, tasks=["a", "b"], task_types=["binary", "regression"])


def data(n: int = 256) -> SplitTensors:
    gen = torch.Generator().manual_seed(0)
    cats = torch.stack([torch.randint(0, 6, (n,), generator=gen), torch.randint(0, 5, (n,), generator=gen)], 1)
    numeric = torch.randn(n, 3, generator=gen)
    labels = torch.stack([(cats[:, 0] % 2 == 0).float(), numeric[:, 1] * 2.0], 1)
    return SplitTensors(cats, numeric, labels, torch.ones(n, 2, dtype=torch.bool))


def searched(density: float = 0.5) -> tuple[SparseSharing, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = SparseSharing(INPUTS, 3, [16, 8], [4], density, 0.3, 20, 0.0)
    initial = {k: v.clone() for k, v in model.state_dict().items() if "mask_" not in k}
    model.search_masks(data(), batch_size=32, lr=0.01, seed=0)
    return model, initial


def test_masks_reach_the_target_density_and_weights_are_rewound() -> None:
    model, initial = searched(0.5)
    for task, layers in model.masks().items():
        for layer, mask in enumerate(layers):
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
            density = float(mask.mean())
            assert 0.5 <= density <= 0.5 + 0.02, (task, layer, density)
    for name, value in model.state_dict().items():
        if "mask_" not in name:
            assert torch.equal(value, initial[name]), f"{name} not rewound"


def test_tasks_get_different_overlapping_masks() -> None:
    model, _ = searched(0.5)
    a, b = model.masks()["a"][0], model.masks()["b"][0]
    overlap = float((a * b).sum() / ((a + b) > 0).sum())
    assert 0.0 < overlap < 1.0


def test_a_task_never_moves_weights_outside_its_mask() -> None:
    model, _ = searched(0.5)
    batch = data(64).all()
    losses = task_losses(model(batch), batch, torch.tensor([True, False]))
    losses[0].backward()
    for layer, linear in enumerate(model.linears()):
        assert linear.weight.grad is not None
        outside = model.mask(0, layer) == 0
        assert torch.all(linear.weight.grad[outside] == 0)
        assert linear.weight.grad[~outside].abs().sum() > 0


@pytest.mark.numerics
def test_pruned_weights_are_zero_in_each_tasks_network() -> None:
    model, _ = searched(0.25)
    x = model.embedding(data(8).all())
    for k in range(2):
        first = model.linears()[0]
        effective = first.weight * model.mask(k, 0)
        kept = int(model.mask(k, 0).sum())
        assert 0 < kept < model.mask(k, 0).numel()  # the search pruned some weights and kept others
        # W ⊙ M keeps exactly the mask's weights (initial weights are never exactly 0) ...
        assert int((effective != 0).sum()) == kept
        # ... and the task's network computes with W ⊙ M, not W (another path: the kernel bound)
        assert_kernel_close(
            model.task_output(x, k),
            model.towers[INPUTS.tasks[k]](
                torch.relu(
                    torch.relu(x @ effective.T + first.bias) @ (model.linears()[1].weight * model.mask(k, 1)).T
                    + model.linears()[1].bias
                )
            ).squeeze(1),
            floor=1.0,
        )


def test_masks_are_saved_with_the_model(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model, _ = searched(0.5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    restored = SparseSharing(INPUTS, 3, [16, 8], [4], 0.5, 0.3, 20, 0.0)
    restored.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    for task in INPUTS.tasks:
        for saved, loaded in zip(model.masks()[task], restored.masks()[task], strict=True):
            assert torch.equal(saved, loaded)


@pytest.mark.parametrize("density", [1.0])
def test_density_one_prunes_nothing(density: float) -> None:
    model, _ = searched(density)
    assert all(float(m.mean()) == 1.0 for layers in model.masks().values() for m in layers)


def test_explain_reports_mask_density_and_overlap() -> None:
    from mtlcli.explain.masks import mask_report

    model, _ = searched(0.5)
    report = mask_report(model)
    assert report is not None
    a, b = model.masks()["a"], model.masks()["b"]
    kept = sum(float(m.sum()) for m in a) / sum(m.numel() for m in a)
    assert report["density"]["a"] == pytest.approx(kept)
    inter = sum(float((x * y).sum()) for x, y in zip(a, b, strict=True))
    union = sum(float(((x + y) > 0).sum()) for x, y in zip(a, b, strict=True))
    assert report["overlap"]["a"]["b"] == pytest.approx(inter / union)
    assert report["overlap"]["a"]["a"] == 1.0
