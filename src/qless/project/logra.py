"""LoGra: a factorised per-layer projection that never forms a per-example gradient.

One example's weight gradient of a Linear is ``G = sum_t g_t x_t^T`` ([out, in]; ``x_t`` the
layer's input at token t, ``g_t`` the gradient of the loss at its output). LoGra (Choe et al.
2024) projects each side of the layer instead of the flattened gradient:

    ``P_out G P_in^T = sum_t (P_out g_t) (P_in x_t)^T``,

which is ``(P_out ⊗ P_in) vec(G)`` for the row-major ``vec``. The inputs and output gradients
are projected first (``[B, T, in] -> [B, T, k_in]``), and one batched product over tokens gives
the ``[B, k_out, k_in]`` projected gradients, so ``G`` (``[B, out, in]``) is never built. With
``P = R^T / sqrt(s)`` and ``R`` of independent +-1 entries, ``E[P^T P] = I`` on each side and so
``E[(P_out ⊗ P_in)^T (P_out ⊗ P_in)] = I``: inner products are kept in expectation, as with the
dense projection, but with a Kronecker-structured (not independent) matrix.

Here each trainable LoRA factor (``lora_A``: in -> r, ``lora_B``: r -> out) is one layer: a side
longer than ``dim`` (= s) is projected to s, a side of at most s coordinates is kept exactly, so
the rank side r of a LoRA factor stays whole. The projected dimension is
``k = sum over factors of min(out, s) * min(in, s)`` (plus ``min(out, s)`` per trainable bias).

The side matrices are consecutive row blocks of one seeded +-1 matrix with s columns (the
counter-based hash of :mod:`qless.project.seeded`, kind tag ``logra``), taken in factor order,
output side before input side, projected sides only: any process or device regenerates them
from the seed and the factor shapes.

Preconditioning: the projection acts on ``G`` through the layer's two sides, so only gradients
that are themselves of the form ``sum_t g_t x_t^T`` can be projected. The plain (SGD) gradient
is; the Adam direction ``m / (sqrt(v) + eps)`` is elementwise on the whole gradient and is not,
so extraction refuses LoGra for Adam-direction pool gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from qless.errors import ConfigError
from qless.project.seeded import matrix_rows

if TYPE_CHECKING:
    from qless.project import ProjectionConfig


@dataclass(frozen=True)
class Factor:
    """One Linear's place in the projected row: its shape, where its side matrices start in the
    seeded ``[*, s]`` matrix (-1 when that side is kept) and its first output column."""

    name: str
    out_features: int
    in_features: int
    bias: bool
    out_row: int
    in_row: int
    offset: int
    side: int

    @property
    def k_out(self) -> int:
        return self.out_features if self.out_row < 0 else self.side

    @property
    def k_in(self) -> int:
        return self.in_features if self.in_row < 0 else self.side

    @property
    def size(self) -> int:
        """Output columns of this factor: the ``[k_out, k_in]`` weight block, then ``k_out`` for a bias."""
        return self.k_out * self.k_in + (self.k_out if self.bias else 0)


def plan_factors(shapes: Sequence[tuple[str, int, int, bool]], side: int) -> list[Factor]:
    """Factors for Linears ``(name, out_features, in_features, has_trainable_bias)`` in order."""
    if side < 1:
        raise ConfigError(f"projection.dim (the LoGra side size) must be positive, got {side}")
    factors, row, offset = [], 0, 0
    for name, out_f, in_f, bias in shapes:
        out_row = row if out_f > side else -1
        row += out_f if out_f > side else 0
        in_row = row if in_f > side else -1
        row += in_f if in_f > side else 0
        f = Factor(name, int(out_f), int(in_f), bool(bias), out_row, in_row, offset, side)
        factors.append(f)
        offset += f.size
    return factors


class LograProjection:
    """The side matrices of every factor, generated once per device and dtype and kept (their size
    is ``s`` times the sum of the projected side lengths: 4.7 MB in float32 for SmolLM2-135M's
    q/k/v/o LoRA at s = 16)."""

    def __init__(self, cfg: ProjectionConfig, shapes: Sequence[tuple[str, int, int, bool]], input_dim: int) -> None:
        if cfg.kind != "logra":
            raise ConfigError(f"LograProjection needs projection.kind logra, got {cfg.kind!r}")
        self.cfg = cfg
        self.factors = plan_factors(shapes, cfg.dim)
        self.input_dim = int(input_dim)
        self.out_dim = sum(f.size for f in self.factors)
        self.dtype = torch.bfloat16 if cfg.compute_dtype == "bfloat16" else torch.float32
        self._cache: dict[tuple[int, str, torch.device, torch.dtype], torch.Tensor] = {}

    def identity(self) -> dict:
        """The manifest's projection fields: k is the total projected width, ``side`` the s."""
        return {"kind": "logra", "dim": self.out_dim, "seed": self.cfg.seed, "input_dim": self.input_dim,
                "side": self.cfg.dim}

    def matrix(self, factor: Factor, which: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """``[n, s]`` (``R / sqrt(s)``, so that ``x @ matrix`` projects ``x [.., n]``) for the
        ``out`` or ``in`` side of ``factor``, in ``dtype``; None when the side is kept."""
        row = factor.out_row if which == "out" else factor.in_row
        if row < 0:
            return None
        key = (row, which, torch.device(device), dtype)
        if key not in self._cache:
            n = factor.out_features if which == "out" else factor.in_features
            exact = matrix_rows(self.cfg, row, row + n, device, torch.float64)  # +-1: exact in any dtype
            self._cache[key] = (exact / math.sqrt(self.cfg.dim)).to(dtype)
        return self._cache[key]

    def side(self, factor: Factor, which: str, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``t [..., n]`` projected on the ``which`` side of ``factor``, or kept as is; returned in
        ``dtype`` (float32 or float64). float32 operands use the compute dtype (bfloat16 if set)."""
        operand = self.dtype if dtype == torch.float32 else dtype
        m = self.matrix(factor, which, t.device, operand)
        if m is None:
            return t.to(dtype)
        return (t.to(operand) @ m).to(dtype)


def project_rows(proj: LograProjection, rows: torch.Tensor, weight_offsets: Sequence[int],
                 bias_offsets: Sequence[int]) -> torch.Tensor:
    """LoGra rows ``[B, k]`` (float32) of full per-example gradients ``rows [B, d]``: what the hooks
    compute, from gradients already formed (the fidelity probe holds such rows)."""
    out = torch.zeros(rows.shape[0], proj.out_dim, dtype=torch.float32, device=rows.device)
    for f, w0, b0 in zip(proj.factors, weight_offsets, bias_offsets):
        g = rows[:, w0:w0 + f.out_features * f.in_features].reshape(-1, f.out_features, f.in_features)
        g = proj.side(f, "in", g)  # [B, out, k_in]
        g = proj.side(f, "out", g.transpose(1, 2)).transpose(1, 2)  # [B, k_out, k_in]
        out[:, f.offset:f.offset + f.k_out * f.k_in] = g.reshape(len(rows), -1)
        if f.bias:
            start = f.offset + f.k_out * f.k_in
            out[:, start:start + f.k_out] = proj.side(f, "out", rows[:, b0:b0 + f.out_features])
    return out


def logra_reference(cfg: ProjectionConfig, factors: Sequence[Factor], grads: np.ndarray,
                    weight_offsets: Sequence[int], bias_offsets: Sequence[int]) -> np.ndarray:
    """float64 LoGra rows from full per-example gradients ``grads [B, d]``: for each factor,
    ``P_out G P_in^T`` with ``G`` the factor's ``[out, in]`` block at ``weight_offsets`` (and
    ``P_out b`` for a bias at ``bias_offsets``), the side matrices built from the hash definition
    (:func:`qless.project.reference.dense_reference`). Tests only."""
    from dataclasses import replace

    from qless.project.reference import dense_reference

    grads = np.asarray(grads, dtype=np.float64)
    out = np.zeros((grads.shape[0], sum(f.size for f in factors)))
    side_cfg = replace(cfg, compute_dtype="float32")

    def p(f: Factor, which: str) -> np.ndarray:
        row, n = (f.out_row, f.out_features) if which == "out" else (f.in_row, f.in_features)
        if row < 0:
            return np.eye(n)
        return dense_reference(side_cfg, n, first_row=row).T / math.sqrt(cfg.dim)  # [s, n]

    for f, w0, b0 in zip(factors, weight_offsets, bias_offsets):
        po, pi = p(f, "out"), p(f, "in")
        g = grads[:, w0:w0 + f.out_features * f.in_features].reshape(-1, f.out_features, f.in_features)
        out[:, f.offset:f.offset + f.k_out * f.k_in] = np.einsum("ao,bon,cn->bac", po, g, pi).reshape(len(grads), -1)
        if f.bias:
            start = f.offset + f.k_out * f.k_in
            out[:, start:start + f.k_out] = grads[:, b0:b0 + f.out_features] @ po.T
    return out
