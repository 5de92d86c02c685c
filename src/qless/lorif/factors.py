"""Rank-c factors of per-layer projected gradients, and the maths that never rebuilds them.

LoRIF (Li, Le, Xu, Salzmann 2026) stores, for each example and layer, rank-c factors of the
layer's two-sided projected gradient ``G = P_out (sum_t g_t x_t^T) P_in^T`` (``[k_out, k_in]``,
``D = k_out k_in`` numbers) instead of ``G`` itself: ``G ~ U V^T`` with ``U [k_out, c]`` and
``V [k_in, c]``, ``c (k_out + k_in)`` numbers. ``G`` is a sum of one outer product per token,
so its rank is at most the example's token count T: with ``T <= c`` the factors are exact.

Factors come from the SVD ``G = A S B^T``, truncated to the c largest singular values and
balanced, ``U = A_c sqrt(S_c)``, ``V = B_c sqrt(S_c)`` (equal norms on both sides, which suits one
quantization scale per stored row). The SVD is exact up to float rounding whenever
``rank(G) <= c``; beyond it, it is the best rank-c approximation in Frobenius norm (Eckart-Young).

A stored row is the concatenation over layers of ``vec(U_l)`` then ``vec(V_l)``, row-major
(:class:`FactorLayout`). Inner products of two examples' gradients come from the factors:
``<U V^T, U' V'^T>_F = sum_ij (U^T U')_ij (V^T V')_ij``, which costs ``O(c c' (k_out + k_in))``
per layer instead of ``O(k_out k_in)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerFactors:
    """One layer's place in a factor row: its name, projected sides, rank and first column."""

    name: str
    k_out: int
    k_in: int
    rank: int
    offset: int

    @property
    def width(self) -> int:
        return self.rank * (self.k_out + self.k_in)

    @property
    def dim(self) -> int:
        """D of this layer: the size of the projected gradient the factors stand for."""
        return self.k_out * self.k_in


class FactorLayout:
    """Where each layer's ``U [k_out, c]`` and ``V [k_in, c]`` sit in a stored row."""

    def __init__(self, layers: Sequence[tuple[str, int, int]], rank: int) -> None:
        if rank < 1:
            raise ValueError(f"factor rank c must be positive, got {rank}")
        self.rank = int(rank)
        self.layers: list[LayerFactors] = []
        offset = 0
        for name, k_out, k_in in layers:
            self.layers.append(LayerFactors(name, int(k_out), int(k_in), self.rank, offset))
            offset += self.layers[-1].width
        self.width = offset
        """Numbers per stored row (the store's k)."""
        self.dim = sum(lay.dim for lay in self.layers)
        """D: the width of the projected gradient the factors stand for (sum over layers)."""

    def split(self, rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``rows [B, width]`` -> per layer ``(U [B, k_out, c], V [B, k_in, c])`` views."""
        out = []
        for lay in self.layers:
            u = rows[:, lay.offset:lay.offset + lay.k_out * lay.rank].reshape(-1, lay.k_out, lay.rank)
            v = rows[:, lay.offset + lay.k_out * lay.rank:lay.offset + lay.width].reshape(-1, lay.k_in, lay.rank)
            out.append((u, v))
        return out

    def join(self, factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Per-layer ``(U [B, k_out, c], V [B, k_in, c])`` -> rows ``[B, width]``."""
        return torch.cat([torch.cat([u.reshape(len(u), -1), v.reshape(len(v), -1)], dim=1) for u, v in factors], dim=1)

    def reconstruct(self, rows: torch.Tensor) -> torch.Tensor:
        """``[B, D]``: each layer's ``U V^T`` flattened row-major, layers concatenated (tests, small D)."""
        return torch.cat([(u @ v.transpose(1, 2)).reshape(len(u), -1) for u, v in self.split(rows)], dim=1)


def factorize(g: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced rank-``rank`` factors of ``g [B, k_out, k_in]``: ``(U [B, k_out, c], V [B, k_in, c])``
    with ``U V^T`` the best rank-c approximation of each ``g[b]`` (exact when its rank is at most c).
    Computed in float64 (the SVD of a few-hundred-wide matrix costs little next to the gradients) and
    returned in the input dtype. Columns beyond ``min(k_out, k_in)`` are zero."""
    dtype = g.dtype
    a, s, bt = torch.linalg.svd(g.to(torch.float64), full_matrices=False)
    c = min(rank, s.shape[-1])
    # a sign convention per singular pair (largest-magnitude entry of U's column positive), so
    # that the stored factors do not depend on the LAPACK build's sign choice
    a, s, b = a[..., :c], s[..., :c], bt[..., :c, :].transpose(-1, -2)
    pivot = a.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(a, -2, pivot))
    sign = torch.where(sign == 0, 1.0, sign)
    root = s.sqrt()[..., None, :]
    u, v = a * (root * sign), b * (root * sign)
    if c < rank:
        u = torch.nn.functional.pad(u, (0, rank - c))
        v = torch.nn.functional.pad(v, (0, rank - c))
    return u.to(dtype), v.to(dtype)


def factor_inner(u: torch.Tensor, v: torch.Tensor, u2: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """``<U_i V_i^T, U2_j V2_j^T>_F`` for every pair: ``u [n, k_out, c]``, ``v [n, k_in, c]`` against
    ``u2 [m, k_out, c2]``, ``v2 [m, k_in, c2]`` -> ``[n, m]``, without forming any ``[k_out, k_in]`` matrix."""
    uu = torch.einsum("noc,mod->nmcd", u, u2)
    vv = torch.einsum("nic,mid->nmcd", v, v2)
    return (uu * vv).sum(dim=(-1, -2))


def factor_apply(u: torch.Tensor, v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``<U_i V_i^T, M_j>_F`` for matrices ``basis [r, k_out, k_in]``: ``[n, r]`` (the coordinates of
    each factored gradient along directions such as curvature eigenvectors), costing
    ``O(r c k_out k_in)`` per example rather than building ``U V^T``."""
    return torch.einsum("noc,roi,nic->nr", u, basis, v)
