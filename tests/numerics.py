"""``assert_kernel_close``: the one comparison for float32 results that may come from different kernels.

The bound and its justification live in ``mtlcli.numerics``. With ``MTL_NUMERICS_LOG=FILE`` set,
every comparison appends one JSON line (what, k, the error in eps·scale) to FILE, which is how the
k of ``mtlcli.numerics`` was measured:

    MTL_NUMERICS_LOG=/tmp/n.jsonl MKL_ENABLE_INSTRUCTIONS=SSE4_2 pytest -m numerics
    jq -s 'group_by(.k) | map(max_by(.error))' /tmp/n.jsonl
"""

from __future__ import annotations

import json
import os
from typing import Any

from mtlcli.numerics import K_OUTPUTS, kernel_error, kernel_scale


def assert_kernel_close(
    actual: Any, expected: Any, *, k: float = K_OUTPUTS, scale: float | None = None, floor: float = 0.0, what: str = ""
) -> float:
    """Assert max |actual − expected| ≤ k · eps32 · scale (scale: max |expected|, at least ``floor``,
    unless given). Returns the error in eps32·scale units."""
    scale = kernel_scale(expected, floor) if scale is None else scale
    error = kernel_error(actual, expected, scale)
    log = os.environ.get("MTL_NUMERICS_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"test": test, "what": what, "k": k, "error": error, "scale": scale}) + "\n")
    assert error <= k, (
        f"{what or 'results'} differ by {error:.3g} eps32·scale (scale {scale:.3g}), over the bound k = {k:g}"
    )
    return error
