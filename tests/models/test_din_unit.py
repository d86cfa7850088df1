"""DIN's unit over packed histories (``AttentionPooling.packed``, hand-written backward) against
the padded layout's plain modules, with a negative PReLU slope and empty rows."""

from __future__ import annotations

import warnings
from typing import cast

import pytest
import torch

from mtlcli.models import blocks
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


def test_compiled_unit_falls_back_with_a_warning_when_compilation_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """``train.compile_attention`` where torch.compile cannot build the unit: one warning saying
    so, the same outputs and gradients as the uncompiled unit (no compiler is run here)."""

    def broken(fn: object, **_: object) -> object:
        def call(*args: object) -> object:
            raise RuntimeError("no C++ compiler found\ndetails")

        return call

    monkeypatch.setattr(blocks, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken)
    torch.manual_seed(0)
    lengths = torch.tensor([2, 0, 3])
    history = packed_layout(torch.zeros(5, dtype=torch.long), lengths)
    model = torch.nn.ModuleDict({"din": AttentionPooling(4)})
    assert blocks.compile_attention(model) == ["din"]
    unit = cast(AttentionPooling, model["din"])
    keys, queries = torch.randn(5, 4, requires_grad=True), torch.randn(3, 4)
    results = []
    for compiled in (True, False):
        unit.compiled, keys.grad = compiled, None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = unit.packed(keys, history, queries)
            out.sum().backward()
        results.append((out.detach(), keys.grad, [str(w.message) for w in caught]))
    (out, grad, messages), (expected, expected_grad, none) = results
    assert len(messages) == 2 and all("compile_attention" in m and "no C++ compiler found" in m for m in messages)
    assert not none
    assert torch.equal(out, expected) and torch.equal(grad, expected_grad)
