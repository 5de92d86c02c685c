"""The projection matrix built densely in float64 from its definition (tests only: ``8 d k`` bytes)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from qless.project.seeded import _C1, _C2, _GOLDEN, _M32, seed_key

if TYPE_CHECKING:
    from qless.project import ProjectionConfig


def _fmix32_np(h: np.ndarray) -> np.ndarray:
    h = h.astype(np.uint64) & _M32
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(_C1)) & np.uint64(_M32)
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(_C2)) & np.uint64(_M32)
    return h ^ (h >> np.uint64(16))


def dense_reference(cfg: ProjectionConfig, input_dim: int, first_row: int = 0) -> np.ndarray:
    """Rows ``first_row .. first_row + input_dim`` of the unscaled matrix R as a float64
    ``[input_dim, k]`` array, computed entry by entry from the definition in this module's
    docstring. Memory ``8 d k`` bytes: tests only."""
    if cfg.kind == "none":
        raise ValueError("projection kind none has no matrix: the rows are the input itself")
    key = np.uint64(seed_key(cfg.seed, cfg.kind))
    i = np.arange(first_row, first_row + input_dim, dtype=np.uint64)
    r = _fmix32_np((_fmix32_np((i & np.uint64(_M32)) ^ key) + (i >> np.uint64(32))) & np.uint64(_M32))
    j = np.arange(cfg.dim, dtype=np.uint64)
    if cfg.kind == "sparse":
        s, m = cfg.nnz, cfg.dim // cfg.nnz
        out = np.zeros((input_dim, cfg.dim))
        for b in range(s):
            h_col = _fmix32_np((r + np.uint64(b) * np.uint64(_GOLDEN)) & np.uint64(_M32))
            h_sign = _fmix32_np((r + np.uint64(s + b) * np.uint64(_GOLDEN)) & np.uint64(_M32))
            col = b * m + ((h_col * np.uint64(m)) >> np.uint64(32)).astype(np.int64)
            sign = np.where(h_sign >= np.uint64(1 << 31), 1.0, -1.0)
            np.add.at(out, (np.arange(input_dim), col), sign * math.sqrt(cfg.dim / s))
        return out
    if cfg.kind in ("rademacher", "logra"):
        w = j // np.uint64(32)
        h = _fmix32_np((r[:, None] + w[None, :] * np.uint64(_GOLDEN)) & np.uint64(_M32))
        bit = (h >> (j % np.uint64(32))[None, :]) & np.uint64(1)
        return np.where(bit == 1, 1.0, -1.0)
    p = j // np.uint64(2)
    h1 = _fmix32_np((r[:, None] + (2 * p)[None, :] * np.uint64(_GOLDEN)) & np.uint64(_M32))
    h2 = _fmix32_np((r[:, None] + (2 * p + 1)[None, :] * np.uint64(_GOLDEN)) & np.uint64(_M32))
    u1 = (h1.astype(np.float64) + 0.5) / 2.0**32
    u2 = h2.astype(np.float64) / 2.0**32
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    out = np.where((j % np.uint64(2) == 0)[None, :], radius * np.cos(angle), radius * np.sin(angle))
    return out.astype(np.float32).astype(np.float64)


def project_reference(cfg: ProjectionConfig, x: np.ndarray) -> np.ndarray:
    """float64 ``x @ R / sqrt(k)`` with the dense reference matrix (``x`` itself for kind none)."""
    x = np.asarray(x, dtype=np.float64)
    if cfg.kind == "none":
        return x.copy()
    return x @ dense_reference(cfg, x.shape[1]) / math.sqrt(cfg.dim)
