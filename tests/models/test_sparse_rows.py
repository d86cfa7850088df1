"""Embedding tables that train row-wise (``train.sparse_embeddings``): lazy Adam on exactly the rows
a batch touches, the same gradients as the dense table for every scheme and weighting, and
checkpoints that carry the row optimizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mtlcli.data.batch import Batch
from mtlcli.models import SCHEMES, InputSpec, build_model
from mtlcli.models.blocks import FeatureEmbedding, sparse_embeddings, use_sparse_rows
from mtlcli.recipe.schema import TrainSection
from mtlcli.train.loop import NullObserver, fit, task_losses
from mtlcli.weighting import WEIGHTINGS, build_weighting
from tests.models.test_models import BINARY, INPUTS, TASKS, make_batch
from tests.numerics import assert_kernel_close
from tests.weighting.test_weighting import tiny_split

pytestmark = pytest.mark.numerics  # row-wise vs dense kernels


def test_a_row_step_is_lazy_adam_as_torch_sparse_adam() -> None:
    """The same updates as torch.optim.SparseAdam on a sparse nn.Embedding, over steps that repeat
    some ids and leave others out; rows never seen do not move."""
    torch.manual_seed(0)
    ours = FeatureEmbedding([50], 0, 4)
    ours.use_sparse_rows()
    reference = nn.Embedding(50, 4, sparse=True)
    with torch.no_grad():
        reference.weight.copy_(ours.table.weight)
    adam = torch.optim.SparseAdam(reference.parameters(), lr=0.01)
    start = ours.table.weight.detach().clone()
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        ids = torch.randint(0, 30, (16, 1), generator=generator)  # ids 30..49 are never drawn
        target = torch.randn(16, 4, generator=generator)
        batch = Batch(ids, torch.zeros(16, 0), torch.zeros(16, 1), torch.ones(16, 1, dtype=torch.bool))
        ((ours(batch) - target) ** 2).sum().backward()
        ours.update_rows(0.01)
        adam.zero_grad()
        ((reference(ids).flatten(1) - target) ** 2).sum().backward()
        adam.step()
    assert_kernel_close(ours.table.weight, reference.weight, what="row-wise vs SparseAdam")
    assert torch.equal(ours.table.weight[30:], start[30:])
    assert not torch.equal(ours.table.weight[:30], start[:30])


def gradient_pair(scheme: str, weighting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The table's gradient from the dense path, and the rows' gradient from the row-wise path,
    for one backward of ``weighting`` on the same model and batch: [rows, dim] each."""
    batch = make_batch(96)
    out = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = build_model(scheme, SCHEMES.get(scheme).params(), INPUTS)
        if sparse:
            use_sparse_rows(model)
        model.train()
        strategy = build_weighting(weighting, WEIGHTINGS.get(weighting).params(), TASKS)
        if strategy.capabilities.needs_representation:
            from mtlcli.models.base import enable_representation

            enable_representation(model)
        strategy.backward(task_losses(model(batch), batch, BINARY), model)
        embeddings = [m for m in model.modules() if isinstance(m, FeatureEmbedding)]
        if sparse:
            grads = []
            for m in embeddings:
                assert m.rows is not None and m.rows.grad is not None and m.row_ids is not None
                full = torch.zeros_like(m.table.weight)
                grads.append(full.index_copy(0, m.row_ids, m.rows.grad))
        else:
            grads = [m.table.weight.grad for m in embeddings]
        out.append(torch.cat(grads))
    return out[0], out[1]


@pytest.mark.parametrize("weighting", ["equal", "uncertainty", "pcgrad", "mgda", "cagrad", "metabalance"])
@pytest.mark.parametrize("scheme", SCHEMES.names())
def test_rows_get_the_gradient_the_dense_table_gets(scheme: str, weighting: str) -> None:
    """Gradient strategies combine the shared rows' gradients exactly as the dense table's."""
    dense, rows = gradient_pair(scheme, weighting)
    assert_kernel_close(rows, dense, what=f"{scheme}/{weighting}: rows vs table gradient")


def test_mgda_upper_bound_gives_the_rows_the_dense_gradient() -> None:
    batch = make_batch(96)
    grads = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = build_model("mmoe", SCHEMES.get("mmoe").params(), INPUTS)
        if sparse:
            use_sparse_rows(model)
        from mtlcli.models.base import enable_representation

        enable_representation(model)
        model.train()
        strategy = build_weighting("mgda", WEIGHTINGS.get("mgda").params(upper_bound=True), TASKS)
        strategy.backward(task_losses(model(batch), batch, BINARY), model)
        (embedding,) = [m for _, m in sparse_embeddings(model)] or [model.embedding]  # type: ignore[list-item]
        if sparse:
            grads.append(torch.zeros_like(embedding.table.weight).index_copy(0, embedding.row_ids, embedding.rows.grad))
        else:
            grads.append(embedding.table.weight.grad)
    assert_kernel_close(grads[1], grads[0])


@pytest.mark.parametrize("weighting", ["equal", "pcgrad", "uncertainty", "gradnorm"])
@pytest.mark.parametrize("scheme", SCHEMES.names())
def test_every_scheme_trains_with_row_wise_tables(scheme: str, weighting: str) -> None:
    from tests.weighting.test_weighting import INPUTS as TWO
    from tests.weighting.test_weighting import TASKS as BOTH
    from tests.weighting.test_weighting import assert_every_task_learns

    torch.manual_seed(0)
    model = build_model(scheme, SCHEMES.get(scheme).params(), TWO)
    assert use_sparse_rows(model)
    tables = {name: m.table.weight.detach().clone() for name, m in sparse_embeddings(model)}
    strategy = build_weighting(weighting, WEIGHTINGS.get(weighting).params(), BOTH)
    settings = TrainSection(epochs=3, batch_size=64, early_stopping=None, lr=0.01)
    result = fit(
        model, strategy, tiny_split(1024, 1), tiny_split(128, 2), settings, BOTH, ["binary"] * 2, NullObserver()
    )
    assert_every_task_learns(result.history, f"{scheme} + {weighting}, row-wise tables")
    for name, m in sparse_embeddings(model):
        assert not torch.equal(m.table.weight, tables[name]), f"{name} never moved"


def test_a_row_wise_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    from tests.train.test_resume import resumes_to_the_same_weights

    settings = TrainSection(epochs=3, batch_size=32, early_stopping=None, lr=0.01, sparse_embeddings=True)
    resumes_to_the_same_weights("pcgrad", settings, tmp_path, sparse=True)


def test_sparse_embeddings_in_a_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.sparse_embeddings: true trains the census-like toy row-wise; export and predict work."""
    import yaml
    from typer.testing import CliRunner

    from mtlcli.cli.app import app
    from tests.test_bad_inputs import GOOD, good_data

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text(good_data())
    recipe = {**GOOD, "train": {**GOOD["train"], "sparse_embeddings": True, "epochs": 2}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    runner = CliRunner()
    assert runner.invoke(app, ["train", "recipe.yaml", "--out", "run", "--quiet"]).exit_code == 0
    assert runner.invoke(app, ["export", "run", "--out", "bundle"]).exit_code == 0
    scored = runner.invoke(app, ["predict", "bundle", "--input", "data.csv"])
    assert scored.exit_code == 0, scored.output
    assert len(scored.stdout.splitlines()) == 81


def test_threads_auto_counts_the_dense_parameters_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large table that trains row-wise costs a step only its batch's rows: it does not make a
    model "large" for threads: auto (a dense table of the same size does)."""
    import os

    from mtlcli.train.run import SMALL_MODEL, choose_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    inputs = InputSpec(cardinalities=[SMALL_MODEL // 4], n_numeric=1, tasks=["a"], task_types=["binary"])
    model = build_model("shared_bottom", SCHEMES.get("shared_bottom").params(embedding_dim=8), inputs)
    assert choose_threads("auto", model) == 8  # 2M dense embedding parameters
    use_sparse_rows(model)
    assert choose_threads("auto", model) == 1
    assert choose_threads(3, model) == 3
