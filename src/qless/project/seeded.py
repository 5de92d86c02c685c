"""Random projection of gradients: R^d -> R^k, generated from a seed, never materialised whole.

The matrix is defined entry by entry as a pure function of ``(seed, kind, i, j)`` through a
counter-based hash, so every process, device, batch size, chunk size and thread count sees the
same matrix, and any block of rows can be generated on its own. ``d`` can be 10^9: the
projector walks the input coordinates in chunks of ``chunk_size`` rows of R, generates each
chunk, multiplies, and accumulates in float32.

The hash is MurmurHash3's 32-bit finaliser (``fmix32``), a bijection with full avalanche,
computed in 32-bit integer arithmetic that wraps identically on CPU and CUDA:

* seed key ``s = fmix32(fmix32(seed_lo ^ 0x243F6A88) ^ seed_hi ^ tag(kind))``
* row key ``r_i = fmix32(fmix32(i_lo ^ s) + i_hi)`` for input coordinate ``i`` (64-bit)
* word ``h(i, w) = fmix32(r_i + w * 0x9E3779B9)``, all sums modulo 2^32.

Rademacher: entry ``(i, j)`` is +1 if bit ``j % 32`` of ``h(i, j // 32)`` is set, else -1 (LoGra's
side matrices, kind ``logra``, are the same with their own kind tag).
Gaussian: entries ``(i, 2p)`` and ``(i, 2p + 1)`` are the Box-Muller pair of
``u1 = (h(i, 2p) + 0.5) / 2^32`` and ``u2 = h(i, 2p + 1) / 2^32`` computed in float64 and
rounded to float32 (equal across devices up to float64 rounding of log/cos/sin).
Outputs are scaled by ``1/sqrt(k)`` so that ``E[<Rx, Ry>] = <x, y>``.

Sparse (``nnz = s`` non-zeros per row of R, ``m = k / s`` outputs per block): for block
``b < s``, input coordinate ``i`` goes to output ``b m + floor(h(i, b) m / 2^32)`` with sign +1 if
the top bit of ``h(i, s + b)`` is set, else -1, and weight ``1/sqrt(s)``. The matrix is never
formed: a block of coordinates is scattered into the outputs with ``index_add``.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

import torch

from qless.errors import ConfigError

if TYPE_CHECKING:
    from qless.project import ProjectionConfig

_M32 = 0xFFFFFFFF
_C1 = 0x85EBCA6B
_C2 = 0xC2B2AE35
_GOLDEN = 0x9E3779B9
_SEED_SALT = 0x243F6A88
KIND_TAG = {"rademacher": 0x52414445, "gaussian": 0x47415553, "sparse": 0x53504152, "logra": 0x4C4F4752}
SPARSE_CHUNK = 1 << 16
"""Input coordinates hashed at a time by the sparse projection (memory only: 12 bytes each)."""

if sys.byteorder != "little":  # the Rademacher fast path reads hash words byte by byte
    raise ImportError("qless.project assumes a little-endian machine")


# ---------------------------------------------------------------------------------------------
# Hash in torch int32 (wrapping multiply, masked shifts emulate logical shifts)


def _i32(v: int) -> int:
    """The int32 with the same bits as the uint32 ``v``."""
    v &= _M32
    return v - (1 << 32) if v >= 1 << 31 else v


def _fmix32_t(h: torch.Tensor) -> torch.Tensor:
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _i32(_C1)
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * _i32(_C2)
    return h ^ ((h >> 16) & 0xFFFF)


def _fmix32_int(h: int) -> int:
    h &= _M32
    h ^= h >> 16
    h = (h * _C1) & _M32
    h ^= h >> 13
    h = (h * _C2) & _M32
    return h ^ (h >> 16)


def seed_key(seed: int, kind: str) -> int:
    """32-bit key derived from the seed and the kind (so the two kinds draw unrelated streams)."""
    return _fmix32_int(_fmix32_int((seed & _M32) ^ _SEED_SALT) ^ ((seed >> 32) & _M32) ^ KIND_TAG[kind])


def _row_keys(i0: int, i1: int, key: int, device: torch.device) -> torch.Tensor:
    idx = torch.arange(i0, i1, dtype=torch.int64, device=device)
    lo = (idx & _M32).to(torch.int64)
    lo = torch.where(lo >= 1 << 31, lo - (1 << 32), lo).to(torch.int32)
    hi = (idx >> 32).to(torch.int32)
    return _fmix32_t(_fmix32_t(lo ^ _i32(key)) + hi)


def _words(i0: int, i1: int, n_words: int, key: int, device: torch.device) -> torch.Tensor:
    """int32 hash words ``h(i, w)`` for rows ``i0 <= i < i1`` and ``0 <= w < n_words``."""
    rows = _row_keys(i0, i1, key, device)
    w = torch.arange(n_words, dtype=torch.int64, device=device) * _GOLDEN
    w = (w & _M32)
    w = torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)
    return _fmix32_t(rows[:, None] + w[None, :])


_SIGN_LUT_CACHE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _sign_lut(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8] table: bit b of byte v -> +1 or -1."""
    key = (device, dtype)
    if key not in _SIGN_LUT_CACHE:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)[None, :]) & 1
        _SIGN_LUT_CACHE[key] = (bits * 2 - 1).to(device=device, dtype=dtype)
    return _SIGN_LUT_CACHE[key]


def sparse_rows(cfg: ProjectionConfig, i0: int, i1: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``i0..i1`` of the sparse matrix: output columns ``[i1 - i0, nnz]`` (int64) and their
    signs (+-1 float32); every entry weighs ``1/sqrt(nnz)``."""
    device = torch.device(device)
    s = cfg.nnz
    m = cfg.dim // s
    words = _words(i0, i1, 2 * s, seed_key(cfg.seed, cfg.kind), device).to(torch.int64) & _M32
    cols = ((words[:, :s] * m) >> 32) + torch.arange(s, device=device) * m
    signs = torch.where(words[:, s:] >= 1 << 31, 1.0, -1.0)
    return cols, signs


def matrix_rows(cfg: ProjectionConfig, i0: int, i1: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unscaled rows ``i0..i1`` of R as a ``[i1 - i0, k]`` tensor (entries +-1 or N(0, 1) for the
    dense kinds; +-sqrt(k / nnz) at the hashed columns for sparse, so that ``R / sqrt(k)`` is the
    projection for every kind)."""
    device = torch.device(device)
    k = cfg.dim
    if cfg.kind == "sparse":
        cols, signs = sparse_rows(cfg, i0, i1, device)
        out = torch.zeros(i1 - i0, k, dtype=torch.float64, device=device)
        out.scatter_add_(1, cols, signs.to(torch.float64) * math.sqrt(k / cfg.nnz))
        return out.to(dtype)
    key = seed_key(cfg.seed, cfg.kind)
    if cfg.kind in ("rademacher", "logra"):  # LoGra's side matrices are +-1 (qless.project.logra)
        n_words = -(-k // 32)
        words = _words(i0, i1, n_words, key, device)
        signs = torch.nn.functional.embedding(words.view(torch.uint8).to(torch.int32), _sign_lut(device, dtype))
        return signs.reshape(i1 - i0, n_words * 32)[:, :k]
    words = _words(i0, i1, k, key, device).to(torch.int64) & _M32
    u1 = (words[:, 0::2].to(torch.float64) + 0.5) / 2.0**32
    u2 = words[:, 1::2].to(torch.float64) / 2.0**32
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = 2.0 * math.pi * u2
    out = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1).reshape(i1 - i0, k)
    return out.to(torch.float32).to(dtype)


class Projector:
    """Projects ``[B, d]`` float rows to ``[B, k]`` float32 with the matrix of ``cfg``.

    ``project(x, offset)`` takes the block of input coordinates ``offset .. offset + x.shape[1]``
    so that per-parameter gradient blocks can be projected without concatenating them; the
    sum of the blocks' projections is the projection of the whole row.
    """

    def __init__(self, cfg: ProjectionConfig, input_dim: int, device: torch.device | str = "cpu") -> None:
        if input_dim < 1:
            raise ConfigError(f"projection input dimension must be positive, got {input_dim}")
        if cfg.kind in ("logra", "lorif"):
            raise ConfigError(f"projection kind {cfg.kind} projects each layer's two sides inside the gradient hooks "
                              "(qless.project.logra.LograProjection), not whole rows")
        self.cfg = cfg
        self.input_dim = int(input_dim)
        self.device = torch.device(device)
        self._dtype = torch.bfloat16 if cfg.compute_dtype == "bfloat16" else torch.float32
        self._scale = 1.0 / math.sqrt(cfg.dim)
        self.out_dim = cfg.out_dim(self.input_dim)

    def project(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Projection of the coordinates ``[offset, offset + x.shape[1])`` of each row of ``x``."""
        if x.dim() != 2:
            raise ValueError(f"expected a [B, n] tensor, got shape {tuple(x.shape)}")
        n = x.shape[1]
        if offset < 0 or offset + n > self.input_dim:
            raise ValueError(f"block [{offset}, {offset + n}) lies outside the input dimension {self.input_dim}")
        x = x.to(self.device)
        if self.cfg.kind == "none":
            out = torch.zeros(x.shape[0], self.out_dim, dtype=torch.float32, device=self.device)
            out[:, offset:offset + n] = x
            return out
        if self.cfg.kind == "sparse":
            return self._sparse(x, offset)
        out = torch.zeros(x.shape[0], self.cfg.dim, dtype=torch.float32, device=self.device)
        step = self.cfg.chunk_size
        for start in range(0, n, step):
            stop = min(start + step, n)
            block = matrix_rows(self.cfg, offset + start, offset + stop, self.device, self._dtype)
            part = x[:, start:stop].to(self._dtype) @ block
            out += part.to(torch.float32)
        return out.mul_(self._scale)

    def _sparse(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        """Scatter-add each coordinate into its ``nnz`` signed buckets (float32 accumulation;
        ``compute_dtype`` does not apply: there is no matmul). On CPU the sums run in a fixed
        order; CUDA's ``index_add_`` uses atomic adds, so there rows can differ in the last bits
        from run to run (the dense kinds are bitwise reproducible on both)."""
        out = torch.zeros(x.shape[0], self.cfg.dim, dtype=torch.float32, device=self.device)
        for start in range(0, x.shape[1], SPARSE_CHUNK):
            stop = min(start + SPARSE_CHUNK, x.shape[1])
            cols, signs = sparse_rows(self.cfg, offset + start, offset + stop, self.device)
            block = x[:, start:stop].to(torch.float32)
            for b in range(self.cfg.nnz):
                out.index_add_(1, cols[:, b], block * signs[:, b])
        return out.mul_(1.0 / math.sqrt(self.cfg.nnz))

    __call__ = project


