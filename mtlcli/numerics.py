"""How far apart two float32 results may be when they come from different kernels.

The same model on the same inputs gives results that differ in the last bits when the arithmetic
runs through other kernels: another batch size or chunking, a fused instead of a generic path,
ONNX Runtime instead of PyTorch, or another CPU (MKL and oneDNN pick their GEMM kernels by the
instruction set, so an AMD EPYC and an Intel Xeon sum in different orders). Such results are
compared with one bound, ``k · eps32 · scale``:

- ``eps32`` = 2⁻²³ ≈ 1.19e-7, the spacing of float32 numbers at 1;
- ``scale`` is the magnitude of the quantities involved: by default the largest |value| of the
  reference result (a norm-wise bound, as in the error analysis of dot products and GEMM), and
  at least 1 for network outputs, whose intermediate activations are of order 1 even where an
  output is near 0;
- ``k`` = ``K_OUTPUTS`` = 64 is empirical. A reordered dot product of length n is off by at most
  about n·eps of the sum of |terms|, and in practice by √n·eps; our models chain 3–5 such layers
  of inner width up to ~256, with cancellation between them. Measured with ``MTL_NUMERICS_LOG``
  (see tests/numerics.py) over every test marked ``numerics``, each run under six kernel choices
  (this CPU's own; MKL_ENABLE_INSTRUCTIONS=AVX512, AVX2, SSE4_2; and AVX2 / SSE4_2 combined with
  ONEDNN_MAX_CPU_ISA and ATEN_CPU_CAPABILITY) on an Intel Xeon with AVX-512, the largest
  difference was 7.7 eps·scale (census predictions in chunks of 3 vs one chunk); on an AMD EPYC
  the same comparison was 1.07e-6 = 9.0 eps. 64 leaves 7× headroom over the worst seen, and is
  still tight: a real fault (a shifted row, a wrong mask, a dropped feature) moves results by
  1e-3 or more, over a thousand times the bound (7.6e-6 at scale 1).

Where the same kernels run on the same inputs (resume on one machine, CSV vs Parquet output at
the same chunking, two runs differing only in labels that a mask hides) results are compared
bitwise instead, and the test says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23
K_OUTPUTS = 64.0  # see the module docstring: 7× the largest difference measured across kernels


def as_float64(values: Any) -> np.ndarray:
    """A numpy float64 array of a tensor, an array, a polars frame or a number."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    elif hasattr(values, "to_numpy"):
        values = values.to_numpy()
    return np.asarray(values, dtype=np.float64)


def kernel_scale(expected: Any, floor: float = 0.0) -> float:
    """The default ``scale``: max |expected|, at least ``floor``."""
    reference = as_float64(expected)
    top = float(np.abs(reference).max()) if reference.size else 0.0
    return max(top, floor)


def kernel_tolerance(scale: float, k: float = K_OUTPUTS) -> float:
    """The largest difference accepted between two float32 results of magnitude ``scale``: k·eps32·scale."""
    return k * EPS32 * scale


def kernel_error(actual: Any, expected: Any, scale: float) -> float:
    """max |actual − expected| in units of eps32·scale (compare with k); 0 for equal results."""
    diff = np.abs(as_float64(actual) - as_float64(expected))
    worst = float(diff.max()) if diff.size else 0.0
    if worst == 0.0:
        return 0.0
    return worst / (EPS32 * scale) if scale > 0 else float("inf")
