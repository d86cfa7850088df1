"""Per-task sample spaces (PLE paper; ESMM): masked rows count for neither loss nor metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlcli.data.batch import Batch
from mtlcli.errors import DataError, RecipeError
from mtlcli.models import SCHEMES
from mtlcli.recipe import load_recipe, recipe_from_text
from mtlcli.train.loop import task_losses
from mtlcli.train.run import evaluate_run, train_run
from tests.conftest import SHARED_DATA


def write_data(path: Path, buy_outside: str, n: int = 400, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    lines = ["user,item,price,click,buy"]
    for _ in range(n):
        user, item, price = f"u{rng.integers(20)}", f"i{rng.integers(15)}", rng.gamma(2.0, 10.0)
        click = int(rng.random() < 0.4 + 0.3 * (user in ("u1", "u2", "u3")))
        buy = int(rng.random() < 0.3) if click else {"zero": "0", "one": "1", "empty": ""}[buy_outside]
        lines.append(f"{user},{item},{price:.2f},{click},{buy}")
    path.write_text("\n".join(lines) + "\n")


def recipe_text(data: Path, cache: Path) -> str:
    return f"""
data: {{source: {data}, split: {{by: modulo, modulus: 4, test: [0], valid: [1]}}, cache_dir: {cache}}}
features: {{numeric: [price]}}
tasks:
  click: {{label: click}}
  buy: {{label: buy, space: click}}
model: {{scheme: mmoe, embedding_dim: 4, n_experts: 2, expert_units: [8], tower_units: [4]}}
train: {{batch_size: 64, epochs: 3, early_stopping: null, threads: 1}}
"""


def train_on(tmp_path: Path, name: str, buy_outside: str) -> tuple[Path, dict[str, object]]:
    data = tmp_path / f"{name}.csv"
    write_data(data, buy_outside)
    recipe = recipe_from_text(recipe_text(data, tmp_path / f"cache-{name}"))
    run = tmp_path / f"run-{name}"
    train_run(recipe, run)
    return run, evaluate_run(run, "test")


def test_labels_outside_the_space_change_nothing(tmp_path: Path) -> None:
    run_a, eval_a = train_on(tmp_path, "zeros", "zero")
    run_b, eval_b = train_on(tmp_path, "ones", "one")
    run_c, eval_c = train_on(tmp_path, "empty", "empty")
    history = [
        [
            {k: r[k] for k in ("train_loss", "valid")}
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        ]
        for run in (run_a, run_b, run_c)
    ]
    assert history[0] == history[1] == history[2]
    assert eval_a["tasks"] == eval_b["tasks"] == eval_c["tasks"]
    buy = eval_a["tasks"]["buy"]
    assert buy["space"] == "click = 1"
    assert buy["n"] < eval_a["tasks"]["click"]["n"]
    assert buy["auc"] is not None


def test_an_empty_label_inside_the_space_is_an_error(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("user,price,click,buy\nu1,1,1,\nu2,2,0,\nu3,3,1,1\nu4,4,0,\nu5,5,1,0\n")
    recipe = recipe_from_text(recipe_text(data, tmp_path / "cache"))
    with pytest.raises(DataError, match=r"tasks\.buy\.label: column 'buy' is empty in 1 rows inside its sample space"):
        train_run(recipe, tmp_path / "run")


def test_masked_loss_is_the_mean_over_the_rows_in_the_space() -> None:
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0], [0.5, 3.0]])
    labels = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    batch = Batch(torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 0), labels, mask)
    losses = task_losses(logits, batch, torch.tensor([True, True]))
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert losses[1].item() == pytest.approx(
        ((bce(torch.tensor(2.0), torch.tensor(1.0)) + bce(torch.tensor(3.0), torch.tensor(0.0))) / 2).item()
    )
    assert losses[0].item() == pytest.approx(bce(logits[:, 0], labels[:, 0]).item())


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("buy", "a task cannot live in its own sample space"),
        ("clik", "unknown task 'clik' (did you mean 'click'?)"),
        ("{task: click, column: x}", "give exactly one of 'task' and 'column'"),
    ],
)
def test_bad_spaces_are_recipe_errors(space: str, message: str, tmp_path: Path) -> None:
    text = recipe_text(tmp_path / "d.csv", tmp_path).replace("space: click", f"space: {space}")
    with pytest.raises(RecipeError) as caught:
        recipe_from_text(text)
    assert message in str(caught.value)


@pytest.mark.parametrize("recipe", ["aliccp-mmoe", "aliexpress-mmoe"])
def test_shipped_ecommerce_samples_train_with_conversion_in_the_click_space(
    recipe: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"sample data not found at {SHARED_DATA}")
    from tests.conftest import REPO

    monkeypatch.chdir(REPO)
    loaded = load_recipe(f"recipes/{recipe}.yaml", [f"data.cache_dir={tmp_path / 'cache'}"])
    train_run(loaded, tmp_path / "run")
    result = evaluate_run(tmp_path / "run", "test")
    click, conversion = loaded.task_names
    assert result["tasks"][conversion]["space"] == f"{click} = 1"
    assert result["tasks"][conversion]["n"] < result["tasks"][click]["n"]
    # The exported bundle, evaluated on the raw test file, counts the same rows for each task.
    from mtlcli.export.bundle import export_bundle
    from mtlcli.export.evaluate import evaluate_bundle

    export_bundle(tmp_path / "run", tmp_path / "bundle")
    split = loaded.data.split
    test_files = getattr(split, "test", None)
    assert test_files
    on_file = evaluate_bundle(tmp_path / "bundle", str(test_files[0]))["tasks"]
    assert on_file[conversion]["space"] == f"{click} = 1"
    for task in (click, conversion):
        assert on_file[task]["n"] == result["tasks"][task]["n"]
        assert on_file[task]["auc"] == pytest.approx(result["tasks"][task]["auc"], abs=1e-6)


@pytest.mark.parametrize("weighting", ["equal", "pcgrad", "uncertainty"])
@pytest.mark.parametrize("scheme", SCHEMES.names())
def test_every_scheme_and_strategy_ignores_labels_outside_the_space(scheme: str, weighting: str) -> None:
    """One update under each scheme and strategy: changing the labels of rows outside task 2's
    space changes neither the losses nor any gradient."""
    from mtlcli.models import InputSpec, build_model
    from mtlcli.weighting import WEIGHTINGS, build_weighting

    tasks = ["click", "like", "buy"]
    inputs = InputSpec(cardinalities=[5, 7], n_numeric=2, tasks=tasks, task_types=["binary"] * 3)
    gen = torch.Generator().manual_seed(0)
    n = 96
    cats = torch.stack([torch.randint(0, 5, (n,), generator=gen), torch.randint(0, 7, (n,), generator=gen)], 1)
    numeric = torch.randn(n, 2, generator=gen)
    click = (torch.rand(n, generator=gen) < 0.5).float()
    labels = torch.stack([click, (torch.rand(n, generator=gen) < 0.3).float(), click * (numeric[:, 0] > 0)], 1)
    mask = torch.ones(n, 3, dtype=torch.bool)
    mask[:, 2] = click.bool()  # buy lives where click = 1
    flipped = labels.clone()
    flipped[~mask[:, 2], 2] = 1.0 - flipped[~mask[:, 2], 2]
    params = {"click_task": "click", "conversion_task": "like"} if scheme == "esmm" else {}
    binary = torch.ones(3, dtype=torch.bool)
    results = []
    for y in (labels, flipped):
        torch.manual_seed(0)
        model = build_model(scheme, SCHEMES.get(scheme).params(**params), inputs)
        strategy = build_weighting(weighting, WEIGHTINGS.get(weighting).params(), tasks)
        losses = task_losses(model(Batch(cats, numeric, y, mask)), Batch(cats, numeric, y, mask), binary)
        strategy.backward(losses, model)
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((losses.detach(), grads))
    # the two passes differ only in labels the mask hides: same shapes, same kernels, so bitwise
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        assert torch.equal(grad, results[1][1][name]), f"{scheme}/{weighting}: {name} saw labels outside the space"
