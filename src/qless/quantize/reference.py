"""Slow, obvious references of the quantizers: numpy float64, one coordinate at a time (tests)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from qless.quantize import QuantizerSpec


def quantize_reference(x: np.ndarray, spec: QuantizerSpec) -> tuple[np.ndarray, np.ndarray]:
    """Signed integer codes ``[B, k]`` and float64 scales, straight from the formulas."""
    return spec.impl.reference(x, spec.bits)  # type: ignore[attr-defined]


def pack_reference(q: np.ndarray, spec: QuantizerSpec) -> np.ndarray:
    """Bit-by-bit packing of signed codes, one coordinate at a time."""
    b, k = q.shape
    out = np.zeros((b, spec.row_bytes(k)), dtype=np.uint8)
    per_byte = 8 // spec.bits
    u = spec.impl.unsigned(np.asarray(q, dtype=np.int64), spec.bits)  # type: ignore[attr-defined]
    for r in range(b):
        for m in range(k):
            out[r, m // per_byte] |= int(u[r, m]) << ((m % per_byte) * spec.bits)
    return out


def decode_reference(codes: np.ndarray, spec: QuantizerSpec, k: int) -> np.ndarray:
    """Every row's signed codes (or stored float values) as float64, one coordinate position at a time."""
    codes = np.asarray(codes)
    if spec.impl.lossless_source:
        return spec.impl.decode_reference(codes, spec.bits, k)  # type: ignore[attr-defined]
    per_byte = 8 // spec.bits
    out = np.zeros((len(codes), k), dtype=np.float64)
    for m in range(k):
        u = (codes[:, m // per_byte].astype(np.int64) >> ((m % per_byte) * spec.bits)) & ((1 << spec.bits) - 1)
        out[:, m] = spec.impl.signed(u, spec.bits)  # type: ignore[attr-defined]
    return out
