"""Slow, obvious float64 references of LoRIF scoring and curvature (tests, benchmarks).

Everything is rebuilt densely: each example's projected gradient ``vec(U V^T)`` of every layer,
the explicit ``D x D`` damped curvature of each block, and a linear solve instead of Woodbury.
Only for small D.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from qless.lorif.curvature import Curvature, block_gradients
from qless.lorif.stores import all_factor_rows, store_layout
from qless.scoring.aggregate import checkpoint_weights
from qless.scoring.driver import pair_checkpoints
from qless.store import Datastore


def damped_solve(g_a: torch.Tensor, g_b: torch.Tensor, curvature: torch.Tensor | None, damping: float) -> torch.Tensor:
    """``[n, m]`` float64: ``g_a (A + damping I)^-1 g_b^T`` with the explicit ``A [D, D]`` (identity when None)."""
    g_a, g_b = g_a.to(torch.float64), g_b.to(torch.float64)
    if curvature is None:
        return g_a @ g_b.T
    h = curvature.to(torch.float64) + damping * torch.eye(len(curvature), dtype=torch.float64)
    return g_a @ torch.linalg.solve(h, g_b.T)


def influence_reference(pool_rows: torch.Tensor, target_rows: torch.Tensor, curv: Curvature | None,
                        damping: float | None, normalize: str) -> torch.Tensor:
    """float64 ``[n_pool, n_target]`` LoRIF influence of factor rows of one checkpoint, through dense
    gradients and each block's explicit ``V^T diag(lam) V + lambda I``."""
    def blocks():
        if curv is None:
            yield None, None, 1.0
            return
        for block, lam in zip(curv.blocks, curv.dampings(damping)):
            vec = block.eigenvectors.to(torch.float64)
            yield block.layers, vec.T @ torch.diag(block.eigenvalues.to(torch.float64)) @ vec, lam

    total = torch.zeros(len(pool_rows), len(target_rows), dtype=torch.float64)
    self_p = torch.zeros(len(pool_rows), dtype=torch.float64)
    self_t = torch.zeros(len(target_rows), dtype=torch.float64)
    for layers, a, lam in blocks():
        if layers is None:
            gp, gt = pool_rows.to(torch.float64), target_rows.to(torch.float64)
        else:
            gp = block_gradients(curv.layout, pool_rows.to(torch.float64), layers)
            gt = block_gradients(curv.layout, target_rows.to(torch.float64), layers)
        total += damped_solve(gp, gt, a, lam)
        self_p += torch.diagonal(damped_solve(gp, gp, a, lam))
        self_t += torch.diagonal(damped_solve(gt, gt, a, lam))
    if normalize == "cosine":
        total = total / self_p.sqrt()[:, None] / self_t.sqrt()[None, :]
    return total


def lorif_reference(pool: Sequence[Datastore], targets: Sequence[Datastore], curvatures: Mapping[str, Curvature] | None,
                    damping: float | None = None, normalize: str = "raw", weights: str = "lr") -> np.ndarray:
    """float64 ``[n_pool, n_target]`` matrix ``sum_i eta_i Inf_i(z, z')`` over checkpoints, from stores.
    Without curvature the rows are rebuilt to dense gradients first, so ``<g', g>`` is checked too."""
    pairs = pair_checkpoints(pool, targets)
    eta = checkpoint_weights([p.learning_rate for p, _ in pairs], weights)
    total = None
    for (p, t), w in zip(pairs, eta):
        layout = store_layout(p)
        pr, tr = all_factor_rows(p, dtype=torch.float64), all_factor_rows(t, dtype=torch.float64)
        curv = curvatures[p.checkpoint] if curvatures is not None else None
        if curv is None:
            pr, tr = layout.reconstruct(pr), layout.reconstruct(tr)
        part = w * influence_reference(pr, tr, curv, damping, normalize).numpy()
        total = part if total is None else total + part
    return total


def exact_curvature(g: torch.Tensor) -> torch.Tensor:
    """``G^T G / N`` in float64 (``g [N, D]``): the matrix the Nystrom fit approximates."""
    g = g.to(torch.float64)
    return g.T @ g / len(g)


__all__ = ["damped_solve", "exact_curvature", "influence_reference", "lorif_reference"]
