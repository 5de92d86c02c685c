"""absmax and absmean quantization at 8, 4 or 2 bits (QLESS section 3.1).

``alpha = 2^(b-1) - 1`` and ``q = clamp(round(alpha * g / S), -alpha, alpha)`` with
``S = max|g|`` (absmax) or ``S = mean|g|`` (absmean); codes are stored as ``q + alpha``.
absmax never clips but puts most Gaussian coordinates in the zero bin at 2 and 4 bits;
absmean spreads them out and clips the tails (the paper's Figure 3).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from qless.quantize.packing import pack_bits, per_byte, unpack_table, unpack_through


class _ScaledIntegerQuantizer(ABC):
    """Shared code of absmax and absmean; subclasses give the scale statistic."""

    name = ""
    bits = (8, 4, 2)
    lossless_source = False

    def tag(self, bits: int) -> str:
        return f"{self.name}{bits}"

    @staticmethod
    def alpha(bits: int) -> int:
        """Largest code magnitude ``2^(b-1) - 1``."""
        return (1 << (bits - 1)) - 1

    def row_bytes(self, k: int, bits: int) -> int:
        return k // per_byte(bits)

    @abstractmethod
    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row scale ``S`` ``[B]`` (float64) of rows ``x [B, k]``."""

    @abstractmethod
    def combine(self, row_scales: torch.Tensor) -> float:
        """The store-wide ``S`` of the global scale mode from every row's :meth:`scale`."""

    def integer_codes(self, x: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor:
        """Signed codes ``[B, k]`` (int8) of ``x`` given per-row ``scale`` ``[B]``."""
        alpha = self.alpha(bits)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float64)
        q = torch.round(alpha * x.to(torch.float64) / safe[:, None])
        return q.clamp_(-alpha, alpha).to(torch.int8)

    def encode(self, x: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor:
        q = self.integer_codes(x, bits, scale)
        return pack_bits((q.to(torch.int16) + self.alpha(bits)).to(torch.uint8), bits)

    def decode(self, codes: torch.Tensor, bits: int, k: int) -> torch.Tensor:
        codes = codes.reshape(codes.shape[0], -1)
        if bits == 8:  # one code per byte: a cast beats a table lookup (2x in benchmarks/bench_score.py)
            return codes.to(torch.float32).sub_(self.alpha(bits))
        table = (unpack_table(bits, codes.device) - self.alpha(bits)).to(torch.float32)
        return unpack_through(codes, table, k)

    def reconstruct_factor(self, scales: torch.Tensor, bits: int) -> torch.Tensor:
        return scales.to(torch.float32) / self.alpha(bits)

    def reference(self, x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
        """Signed codes and float64 scales straight from the formula (tests)."""
        x = np.asarray(x, dtype=np.float64)
        s = self._reference_scale(x)
        alpha = self.alpha(bits)
        q = np.clip(np.round(alpha * x / np.where(s > 0, s, 1.0)[:, None]), -alpha, alpha)
        return q.astype(np.int64), s

    @abstractmethod
    def _reference_scale(self, x: np.ndarray) -> np.ndarray:
        """The scale of float64 rows, in numpy (the slow reference)."""

    def unsigned(self, q: np.ndarray, bits: int) -> np.ndarray:
        """The stored unsigned value of signed codes."""
        return q + self.alpha(bits)

    def signed(self, u: np.ndarray, bits: int) -> np.ndarray:
        """The signed code of stored unsigned values."""
        return u - self.alpha(bits)


class AbsmaxQuantizer(_ScaledIntegerQuantizer):
    """``S = max_m |g_m|``: no clipping; fine steps need many bits (best at 8)."""

    name = "absmax"

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float64).abs().amax(dim=1)

    def combine(self, row_scales: torch.Tensor) -> float:
        return float(row_scales.max())

    def _reference_scale(self, x: np.ndarray) -> np.ndarray:
        return np.abs(x).max(axis=1)


class AbsmeanQuantizer(_ScaledIntegerQuantizer):
    """``S = mean_m |g_m|``: the tails clip at ``+-alpha``; better spread at 2 and 4 bits."""

    name = "absmean"

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float64).abs().mean(dim=1)

    def combine(self, row_scales: torch.Tensor) -> float:
        # every row has k coordinates, so the mean of row means is the mean over the store
        return float(row_scales.mean())

    def _reference_scale(self, x: np.ndarray) -> np.ndarray:
        return np.abs(x).mean(axis=1)
