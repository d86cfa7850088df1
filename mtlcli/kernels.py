"""Two loops that NumPy and PyTorch can only run as several passes through memory, written in C.

- ``gather_runs``: the values of some runs of an array, run after run (a batch's packed
  history ids from a split's, a row's window of a history's events): one copy per run, where
  NumPy builds an index over every item (``repeat``, ``arange``, an add, a ``take``).
- ``bag_sums_backward``: the gradient of a table whose rows were summed into bags, bag by bag
  into the rows (``out[ids[j]] += grads[k]`` for each item j of bag k), where PyTorch sorts
  the ids or scatters one float at a time.

They are compiled once per machine, on first use, by the machine's C compiler (``$CC`` or
``cc``) into the user's cache (``$XDG_CACHE_HOME/mtlcli``, else ``~/.cache/mtlcli``), and loaded
with ctypes. Without a compiler, or with ``MTL_KERNELS=0``, each has a NumPy/PyTorch
fallback. Both ways give the same result bit for bit: the same values copied, the same floats
added in the same order (each row's gradient in item order, from 0).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mtlcli.fileio import scratch_dir

SOURCE = r"""
#include <stdint.h>
#include <string.h>

void gather_runs(const char* values, const int64_t* begin, const int64_t* size, int64_t runs,
                 int64_t item, char* out) {
    for (int64_t r = 0; r < runs; ++r) {
        int64_t bytes = size[r] * item;
        memcpy(out, values + begin[r] * item, (size_t)bytes);
        out += bytes;
    }
}

void bag_sums_backward(const int64_t* ids, const int64_t* bounds, int64_t bags, const float* grads,
                       int64_t dim, float* out) {
    for (int64_t k = 0; k < bags; ++k) {
        const float* g = grads + k * dim;
        for (int64_t j = bounds[k]; j < bounds[k + 1]; ++j) {
            float* o = out + ids[j] * dim;
            for (int64_t c = 0; c < dim; ++c) o[c] += g[c];
        }
    }
}
"""


def _cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mtlcli"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or None: ``MTL_KERNELS=0``, or no C compiler."""
    if os.environ.get("MTL_KERNELS", "1") == "0":
        return None
    tag = hashlib.sha256(f"{SOURCE}{platform.machine()}{platform.system()}".encode()).hexdigest()[:16]
    path = _cache() / f"kernels-{tag}.so"
    try:
        if not path.is_file():
            with scratch_dir(path.parent, "kernels") as build:
                (build / "kernels.c").write_text(SOURCE)
                compiler = os.environ.get("CC", "cc")
                subprocess.run(
                    [compiler, "-O3", "-shared", "-fPIC", "-o", str(build / "kernels.so"), str(build / "kernels.c")],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
                os.replace(build / "kernels.so", path)  # whole or not at all, also when processes race
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError):
        return None
    pointer, n = ctypes.c_void_p, ctypes.c_int64
    lib.gather_runs.argtypes = [pointer, pointer, pointer, n, n, pointer]
    lib.gather_runs.restype = None
    lib.bag_sums_backward.argtypes = [pointer, pointer, n, pointer, n, pointer]
    lib.bag_sums_backward.restype = None
    return lib


def gather_runs(values: np.ndarray, begin: np.ndarray, size: np.ndarray) -> np.ndarray:
    """``values[begin[r]:begin[r] + size[r]]`` for every run r, one after the other (1-D
    ``values``, any dtype; ``begin`` and ``size`` int64, the runs inside ``values``)."""
    total = int(size.sum())
    if len(size) and (int(begin.min()) < 0 or int(size.min()) < 0 or int((begin + size).max()) > len(values)):
        raise IndexError("a run lies outside the values")
    lib = library()
    if lib is None or total == 0:
        ends = np.cumsum(size)
        at = np.repeat(begin - (ends - size), size)
        at += np.arange(at.shape[0], dtype=np.int64)
        return values.take(at)
    values = np.ascontiguousarray(values)
    begin = np.ascontiguousarray(begin, dtype=np.int64)
    size = np.ascontiguousarray(size, dtype=np.int64)
    out = np.empty(total, values.dtype)
    lib.gather_runs(
        values.ctypes.data, begin.ctypes.data, size.ctypes.data, len(size), values.itemsize, out.ctypes.data
    )
    return out


def bag_sums_backward(ids: Tensor, bounds: Tensor, grads: Tensor, rows: int) -> Tensor | None:
    """The gradient [rows, d] of a table whose rows ``ids`` [N] (int64) were summed into bags
    (bag k: items ``bounds[k]:bounds[k + 1]``) with the bags' gradient ``grads`` [K, d] (float32,
    on the CPU); None where the kernel is not there (the caller has its own way)."""
    lib = library()
    if lib is None or ids.device.type != "cpu" or grads.dtype != torch.float32:
        return None
    if ids.dtype != torch.int64 or bounds.dtype != torch.int64:
        return None
    ids, bounds, grads = ids.contiguous(), bounds.contiguous(), grads.contiguous()
    out = grads.new_zeros(rows, grads.shape[1])
    lib.bag_sums_backward(
        ids.data_ptr(), bounds.data_ptr(), bounds.shape[0] - 1, grads.data_ptr(), grads.shape[1], out.data_ptr()
    )
    return out
