"""Sign quantization at 1 bit: ``+1`` if ``g > 0`` else ``-1``; the scale kept is ``mean|g|``.

For a random projection, two rows' signs differ at a coordinate with probability
``angle / pi`` (the sign law), so the 1-bit cosine estimates ``1 - 2 * angle / pi``.
"""

from __future__ import annotations

import numpy as np
import torch

from qless.quantize.packing import pack_bits, unpack_table, unpack_through


class SignQuantizer:
    name = "sign"
    bits = (1,)
    lossless_source = False

    def tag(self, bits: int) -> str:
        return f"sign{bits}"

    @staticmethod
    def alpha(bits: int) -> int:
        return 1

    def row_bytes(self, k: int, bits: int) -> int:
        return k // 8

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float64).abs().mean(dim=1)

    def combine(self, row_scales: torch.Tensor) -> float:
        return float(row_scales.mean())

    def integer_codes(self, x: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, 1, -1).to(torch.int8)

    def encode(self, x: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor:
        return pack_bits((x > 0).to(torch.uint8), 1)

    def decode(self, codes: torch.Tensor, bits: int, k: int) -> torch.Tensor:
        codes = codes.reshape(codes.shape[0], -1)
        table = (unpack_table(1, codes.device) * 2 - 1).to(torch.float32)
        return unpack_through(codes, table, k)

    def reconstruct_factor(self, scales: torch.Tensor, bits: int) -> torch.Tensor:
        return scales.to(torch.float32)

    def reference(self, x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.float64)
        return np.where(x > 0, 1, -1).astype(np.int64), np.abs(x).mean(axis=1)

    def unsigned(self, q: np.ndarray, bits: int) -> np.ndarray:
        return (q > 0).astype(np.int64)

    def signed(self, u: np.ndarray, bits: int) -> np.ndarray:
        return 2 * u - 1
