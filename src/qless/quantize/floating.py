"""Unquantized storage: the unit vector ``g / ||g||_2`` in float16 (LESS's baseline) or float32."""

from __future__ import annotations

import numpy as np
import torch

_DTYPES = {16: torch.float16, 32: torch.float32}
_NUMPY = {16: "<f2", 32: "<f4"}


class FloatQuantizer:
    """``fp16`` / ``fp32``: rows stored as little-endian floats of ``g / S`` with ``S = ||g||_2``.

    The division happens in float64 before the cast, so gradients of order 1e-7 never become
    float16 subnormals."""

    name = "float"
    bits = (16, 32)
    lossless_source = True  # other formats can be derived from it (qless.store.derive)

    def tag(self, bits: int) -> str:
        return f"fp{bits}"

    def row_bytes(self, k: int, bits: int) -> int:
        return k * bits // 8

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(x.to(torch.float64), dim=1)

    def combine(self, row_scales: torch.Tensor) -> float:
        return float(row_scales.max())

    def encode(self, x: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor:
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        unit = (x.to(torch.float64) / safe[:, None]).to(_DTYPES[bits]).contiguous()
        return unit.view(torch.uint8).reshape(x.shape[0], self.row_bytes(x.shape[1], bits))

    def decode(self, codes: torch.Tensor, bits: int, k: int) -> torch.Tensor:
        return codes.contiguous().view(_DTYPES[bits]).reshape(codes.shape[0], k).to(torch.float32)

    def reconstruct_factor(self, scales: torch.Tensor, bits: int) -> torch.Tensor:
        return scales.to(torch.float32)

    def decode_reference(self, codes: np.ndarray, bits: int, k: int) -> np.ndarray:
        return np.ascontiguousarray(codes).view(_NUMPY[bits]).reshape(len(codes), k).astype(np.float64)
