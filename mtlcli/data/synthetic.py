"""The synthetic two-task data of the MMoE paper (Ma et al., KDD 2018, section 3.2).

Two regression tasks whose correlation is controlled by ``correlation`` (p): with orthogonal unit
vectors u1, u2, the task weights are w1 = c*u1 and w2 = c*(p*u1 + sqrt(1-p^2)*u2); for x ~ N(0, I)
each label is y = w^T x + sum_i sin(alpha_i * w^T x + beta_i) + noise. The sine terms make the
tasks non-linear, so the label correlation falls as p does, as in the paper's Figure 4.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from mtlcli.recipe.schema import SyntheticSource


def generate(spec: SyntheticSource) -> pl.DataFrame:
    """``kind: mmoe``: a frame with numeric columns x0..x{dim-1} and the labels y1, y2 (float64);
    ``kind: sequences``: see ``mtlcli.data.sequential``."""
    if spec.kind == "sequences":
        from mtlcli.data.sequential import generate_sequences

        return generate_sequences(spec)
    if spec.dim < 2:
        raise ValueError("the synthetic generator needs dim >= 2")
    rng = np.random.default_rng(spec.seed)
    basis, _ = np.linalg.qr(rng.standard_normal((spec.dim, 2)))
    u1, u2 = basis[:, 0], basis[:, 1]
    p = spec.correlation
    w1 = spec.scale * u1
    w2 = spec.scale * (p * u1 + np.sqrt(1.0 - p * p) * u2)
    alpha = rng.standard_normal(spec.sin_terms)
    beta = rng.standard_normal(spec.sin_terms)
    x = rng.standard_normal((spec.rows, spec.dim))

    def label(w: np.ndarray) -> np.ndarray:
        z = x @ w
        waves = np.sin(np.outer(z, alpha) + beta).sum(axis=1) if spec.sin_terms else 0.0
        return z + waves + spec.noise * rng.standard_normal(spec.rows)

    columns = {f"x{i}": x[:, i] for i in range(spec.dim)}
    columns["y1"] = label(w1)
    columns["y2"] = label(w2)
    return pl.DataFrame(columns)
