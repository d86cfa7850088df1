"""The compiled kernels (mtlcli/kernels.py) against their NumPy/PyTorch fallbacks and a brute
force: the same values, bit for bit, and a machine without a compiler still trains."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlcli import kernels
from mtlcli.data.batch import Batch
from mtlcli.models import blocks


@pytest.fixture
def no_kernels(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The fallbacks: as on a machine without a C compiler."""
    monkeypatch.setenv("MTL_KERNELS", "0")
    kernels.library.cache_clear()
    yield
    monkeypatch.delenv("MTL_KERNELS")
    kernels.library.cache_clear()


def runs(seed: int, count: int, longest: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, longest + 1, count).astype(np.int64)
    lengths[::5] = 0  # empty runs among them
    begin = rng.integers(0, size - longest, count).astype(np.int64)
    return begin, lengths


def test_the_kernels_are_built_where_a_compiler_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CI has a C compiler: the compiled path is the one the other tests exercise. A new cache
    gets the library (and nothing temporary); a compiler that fails leaves the fallbacks."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels.library.cache_clear()
    try:
        assert kernels.library() is not None
        assert [p.name for p in (tmp_path / "mtlcli").iterdir()] == [
            p.name for p in (tmp_path / "mtlcli").glob("kernels-*.so")
        ]
        kernels.library.cache_clear()
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other"))
        monkeypatch.setenv("CC", "false")
        assert kernels.library() is None
    finally:
        kernels.library.cache_clear()


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float32])
def test_gathered_runs_are_the_runs_in_order(dtype: type) -> None:
    values = np.random.default_rng(1).integers(0, 10**6, 5000).astype(dtype)
    begin, lengths = runs(2, 300, 40, len(values))
    want = np.concatenate([values[b : b + n] for b, n in zip(begin.tolist(), lengths.tolist(), strict=True)])
    got = kernels.gather_runs(values, begin, lengths)
    assert got.dtype == values.dtype and np.array_equal(got, want)
    assert kernels.gather_runs(values, begin[:0], lengths[:0]).shape == (0,)
    with pytest.raises(IndexError):
        kernels.gather_runs(values, np.array([4990], np.int64), np.array([11], np.int64))


def test_gathered_runs_without_the_kernel_are_the_same(no_kernels: None) -> None:
    values = np.random.default_rng(3).integers(0, 10**6, 5000).astype(np.int32)
    begin, lengths = runs(4, 300, 40, len(values))
    want = np.concatenate([values[b : b + n] for b, n in zip(begin.tolist(), lengths.tolist(), strict=True)])
    assert kernels.library() is None
    assert np.array_equal(kernels.gather_runs(values, begin, lengths), want)


@pytest.mark.parametrize("rows", [43, blocks.SORTED_ROWS + 1])
def test_the_bags_gradient_is_the_fallbacks_bit_for_bit(rows: int) -> None:
    """Each row's gradient adds its items' bag gradients in item order from 0, as the sorted
    fallback does (and the scatter of a table too large to sort): equal, not merely close."""
    generator = torch.Generator().manual_seed(5)
    lengths = torch.randint(0, 30, (64,), generator=generator)
    lengths[::7] = 0
    bounds = torch.zeros(65, dtype=torch.long)
    torch.cumsum(lengths, 0, out=bounds[1:])
    ids = torch.randint(0, 40, (int(bounds[-1]),), generator=generator)
    grads = torch.randn(64, 5, generator=generator)
    got = kernels.bag_sums_backward(ids, bounds, grads, rows)
    assert got is not None
    of_item = torch.arange(64).repeat_interleave(lengths)
    assert torch.equal(got, blocks.bag_gradient(ids, of_item, grads, rows))
    want = torch.zeros(rows, 5)
    for i, bag in zip(ids.tolist(), of_item.tolist(), strict=True):
        want[i] += grads[bag]
    assert torch.equal(got, want)
    assert not got[40:].any()


def test_without_the_kernel_the_bags_gradient_is_left_to_the_caller(no_kernels: None) -> None:
    ids, bounds = torch.tensor([0, 1]), torch.tensor([0, 2])
    assert kernels.bag_sums_backward(ids, bounds, torch.ones(1, 2), 3) is None


def test_pooled_histories_train_alike_with_and_without_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """An embedding with a mean and a sum history (vocabularies large enough to be bags), read
    packed: the output and every gradient are the same with the kernels and without them."""
    generator = torch.Generator().manual_seed(6)
    sequences = [blocks.SequenceInput(5000, "mean"), blocks.SequenceInput(3000, "sum")]
    lengths = torch.randint(0, 12, (64, 2), generator=generator)
    batch = Batch(
        categorical=torch.randint(0, 7, (64, 1), generator=generator),
        numeric=torch.zeros(64, 0),
        labels=torch.zeros(64, 1),
        label_mask=torch.ones(64, 1, dtype=torch.bool),
        sequence_lengths=lengths,
        history_ids=torch.cat(
            [torch.randint(2, n, (int(lengths[:, s].sum()),), generator=generator) for s, n in enumerate((5000, 3000))]
        ),
    )
    results = []
    for enabled in ("1", "0"):
        monkeypatch.setenv("MTL_KERNELS", enabled)
        kernels.library.cache_clear()
        torch.manual_seed(0)
        embedding = blocks.FeatureEmbedding([7], 0, 4, sequences)
        out = embedding(batch)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        assert embedding.table.weight.grad is not None
        results.append((out.detach(), embedding.table.weight.grad))
    kernels.library.cache_clear()
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert results[0][1][7:].abs().sum() > 0  # the histories' rows got their gradient
