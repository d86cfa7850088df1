"""DIN's unit over packed histories (``AttentionPooling.packed``, hand-written backward) against
the padded layout's plain modules, with a negative PReLU slope and empty rows."""

from __future__ import annotations

import pytest
import torch

from mtlcli.models.blocks import AttentionPooling, packed_layout
from tests.numerics import assert_kernel_close


@pytest.mark.numerics
@pytest.mark.parametrize("normalise", [False, True])
@pytest.mark.parametrize("slope", [0.25, -0.6])
def test_packed_unit_matches_the_padded_modules(normalise: bool, slope: float) -> None:
    torch.manual_seed(3)
    dim, lengths = 5, torch.tensor([0, 3, 1, 6, 2, 0, 4])
    rows, longest = lengths.shape[0], int(lengths.max())
    history = packed_layout(torch.zeros(int(lengths.sum()), dtype=torch.long), lengths)
    unit = AttentionPooling(dim, normalise)
    with torch.no_grad():
        unit.score[1].weight.fill_(slope)  # type: ignore[operator]
    keys = torch.randn(int(lengths.sum()), dim, requires_grad=True)
    queries = torch.randn(rows, dim, requires_grad=True)
    probe = torch.randn(rows, dim)
    results = []
    for packed in (True, False):
        for tensor in (*unit.parameters(), keys, queries):
            tensor.grad = None
        if packed:
            out = unit.packed(keys, history, queries)
        else:
            padded = keys.new_zeros(rows * longest, dim).index_copy(0, history.positions, keys)
            mask = (torch.arange(longest) < lengths.unsqueeze(1)).float()
            out = unit(padded.view(rows, longest, dim), mask, queries)
        (out * probe).sum().backward()
        results.append((out.detach(), [t.grad.clone() for t in (*unit.parameters(), keys, queries)]))  # type: ignore[union-attr]
    (out, grads), (expected, expected_grads) = results
    assert not out[0].any() and not out[5].any()  # empty histories pool to 0
    assert_kernel_close(out, expected, what="pooled")
    names = [name for name, _ in unit.named_parameters()] + ["keys", "queries"]
    for name, grad, want in zip(names, grads, expected_grads, strict=True):
        assert_kernel_close(grad, want, floor=1.0, what=name)


@pytest.mark.parametrize("normalise", [False, True])
def test_a_batch_without_rows_pools_and_reports_nothing(normalise: bool) -> None:
    """A rank's share of a last batch smaller than the processes can hold no rows."""
    lengths = torch.zeros(0, dtype=torch.long)
    history = packed_layout(torch.zeros(0, dtype=torch.long), lengths)
    unit = AttentionPooling(4, normalise)
    keys, queries = torch.randn(0, 4, requires_grad=True), torch.randn(0, 4, requires_grad=True)
    out = unit.packed(keys, history, queries)
    out.sum().backward()
    assert out.shape == (0, 4)
    assert unit.last_weights is not None and unit.last_weights.shape[0] == 0
