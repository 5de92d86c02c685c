"""Quantization of projected gradients and bit packing (QLESS section 3.1).

For a vector ``g`` and ``b`` in {8, 4, 2}: ``S = max|g|`` (absmax) or ``S = mean|g|``
(absmean), ``alpha = 2^(b-1) - 1`` and ``q = clamp(round(alpha * g / S), -alpha, alpha)``.
``b = 1`` is sign quantization (``+1`` if ``g > 0`` else ``-1``, scale ``mean|g|``). The
unquantized formats store ``g / S`` with ``S = ||g||_2`` in float16 (LESS's baseline) or
float32.

Codes are bit-packed row by row at exactly ``b`` bits per coordinate: the unsigned value
``q + alpha`` (or the sign bit) of coordinate ``m`` sits at bit ``(m % (8/b)) * b`` of byte
``m // (8/b)``. Each row decodes alone; ``scale`` holds one float32 per row. Scale mode
``global`` (one ``S`` for the whole store, as the QLESS reference code does) needs every row
before it can quantize any, so it is applied by :func:`qless.datastore.requantize` from a
float store; the functions here take that ``S`` as an argument.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from qless.config import option
from qless.errors import ConfigError

Method = Literal["float", "absmax", "absmean", "sign"]
_BITS = {"float": (16, 32), "absmax": (8, 4, 2), "absmean": (8, 4, 2), "sign": (1,)}


@dataclass(frozen=True)
class QuantizerSpec:
    """A storage format: ``method`` at ``bits`` per coordinate with a per-row or global scale.

    Written in short form as ``fp16``, ``fp32``, ``absmax8``, ``absmean4``, ``absmean2``,
    ``sign1`` (``-global`` appended for the global scale mode)."""

    method: Method = option("absmean", "quantizer: float, absmax, absmean or sign")
    bits: int = option(4, "bits per coordinate: 16/32 for float, 8/4/2 for absmax and absmean, 1 for sign")
    scale: Literal["row", "global"] = option("row", "one scale per vector (the paper) or one for the whole store (the QLESS code)")

    def __post_init__(self) -> None:
        if self.method not in _BITS:
            raise ConfigError(
                f"quantizer: unknown method {self.method!r}; use one of float, absmax, absmean, sign "
                f"(short forms: fp16, fp32, absmax8, absmean4, absmean2, sign1)"
            )
        if self.bits not in _BITS[self.method]:
            bits = [str(b) for b in _BITS[self.method]]
            allowed = ", ".join(bits[:-1]) + " or " + bits[-1] if len(bits) > 1 else bits[0]
            raise ConfigError(f"quantizer {self.method}: {self.bits} bits is not supported; use {allowed} bits")
        if self.scale not in ("row", "global"):
            raise ConfigError(f"quantizer scale must be 'row' or 'global', got {self.scale!r}")

    @classmethod
    def parse(cls, text: str) -> "QuantizerSpec":
        """Parse ``fp16``, ``absmean4``, ``absmax-8``, ``sign1``, ``absmean2-global``..."""
        m = re.fullmatch(r"\s*([a-z]+)[-:_]?(\d+)(?:-(row|global))?\s*", text.lower())
        if not m:
            raise ConfigError(
                f"cannot read quantizer {text!r}; write it as fp16, fp32, absmax8, absmean4, absmean2 or sign1 "
                f"(optionally with -global)"
            )
        name, bits, scale = m.group(1), int(m.group(2)), m.group(3) or "row"
        method = {"fp": "float", "float": "float"}.get(name, name)
        return cls(method=method, bits=bits, scale=scale)  # type: ignore[arg-type]

    @property
    def tag(self) -> str:
        base = f"fp{self.bits}" if self.method == "float" else f"{self.method}{self.bits}"
        return base + ("-global" if self.scale == "global" else "")

    @property
    def alpha(self) -> int:
        """Largest code magnitude ``2^(b-1) - 1`` (1 for sign)."""
        return 1 if self.method == "sign" else (1 << (self.bits - 1)) - 1

    def row_bytes(self, k: int) -> int:
        """Bytes of one packed row of ``k`` coordinates."""
        if self.method == "float":
            return k * self.bits // 8
        per_byte = 8 // self.bits
        if k % per_byte:
            raise ConfigError(f"{self.tag} packs {per_byte} coordinates per byte: the projection dim {k} must be a multiple of {per_byte}")
        return k // per_byte


def compute_scale(x: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    """The per-row scale ``S`` (float64, shape ``[B]``) of ``x`` for ``spec``'s method."""
    x = x.to(torch.float64)
    if spec.method == "float":
        return torch.linalg.vector_norm(x, dim=1)
    if spec.method == "absmax":
        return x.abs().amax(dim=1)
    return x.abs().mean(dim=1)  # absmean and sign


def global_scale(row_scales: torch.Tensor, spec: QuantizerSpec, k: int) -> float:
    """Combine per-row statistics into the store-wide ``S`` of the global mode.

    ``row_scales`` are :func:`compute_scale` of every row: absmax takes their max, absmean
    their mean (every row has ``k`` coordinates, so the mean of row means is the global
    mean), float the largest norm."""
    if spec.method in ("absmax", "float"):
        return float(row_scales.max())
    return float(row_scales.mean())


def integer_codes(x: torch.Tensor, spec: QuantizerSpec, scale: torch.Tensor) -> torch.Tensor:
    """Signed integer codes ``[B, k]`` (int8) of ``x`` given per-row ``scale`` ``[B]``."""
    if spec.method == "sign":
        return torch.where(x > 0, 1, -1).to(torch.int8)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float64)
    q = torch.round(spec.alpha * x.to(torch.float64) / safe[:, None])
    return q.clamp_(-spec.alpha, spec.alpha).to(torch.int8)


def pack(q: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    """Pack signed codes ``[B, k]`` into bytes ``[B, row_bytes]`` (uint8)."""
    if spec.method == "sign":
        u = (q > 0).to(torch.uint8)
    else:
        u = (q.to(torch.int16) + spec.alpha).to(torch.uint8)
    if spec.bits == 8:
        return u.contiguous()
    per_byte = 8 // spec.bits
    b, k = u.shape
    spec.row_bytes(k)  # validates divisibility
    u = u.reshape(b, k // per_byte, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, device=u.device, dtype=torch.int32) * spec.bits
    return (u << shifts).sum(dim=2).to(torch.uint8)


def quantize(x: torch.Tensor, spec: QuantizerSpec, scale: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float rows ``x [B, k]`` into packed codes ``[B, row_bytes]`` uint8 and scales ``[B]`` float32.

    ``scale`` overrides the per-row scale (a number for the global mode). Rows must be finite:
    callers filter non-finite gradients before storing them.
    """
    if x.dim() != 2:
        raise ValueError(f"expected [B, k] rows, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantize non-finite values; filter NaN/inf rows first")
    if scale is None:
        s = compute_scale(x, spec)
    elif isinstance(scale, (int, float)):
        s = torch.full((x.shape[0],), float(scale), dtype=torch.float64, device=x.device)
    else:
        s = scale.to(device=x.device, dtype=torch.float64)
    if spec.method == "float":
        safe = torch.where(s > 0, s, torch.ones_like(s))
        dtype = torch.float16 if spec.bits == 16 else torch.float32
        unit = (x.to(torch.float64) / safe[:, None]).to(dtype).contiguous()
        codes = unit.view(torch.uint8).reshape(x.shape[0], spec.row_bytes(x.shape[1]))
        return codes, s.to(torch.float32)
    return pack(integer_codes(x, spec, s), spec), s.to(torch.float32)


_LUT_CACHE: dict[tuple[str, int, torch.device], torch.Tensor] = {}


def _decode_lut(spec: QuantizerSpec, device: torch.device) -> torch.Tensor:
    """``[256, 8 / bits]`` table: byte value -> the signed codes it holds, as float32."""
    key = (spec.method, spec.bits, device)
    if key not in _LUT_CACHE:
        per_byte = 8 // spec.bits
        v = torch.arange(256, dtype=torch.int32)[:, None]
        u = (v >> (torch.arange(per_byte, dtype=torch.int32) * spec.bits)[None, :]) & ((1 << spec.bits) - 1)
        signed = (u * 2 - 1) if spec.method == "sign" else (u - spec.alpha)
        _LUT_CACHE[key] = signed.to(device=device, dtype=torch.float32)
    return _LUT_CACHE[key]


def decode_codes(codes: torch.Tensor, spec: QuantizerSpec, k: int) -> torch.Tensor:
    """Packed bytes ``[B, row_bytes]`` -> float32 ``[B, k]`` holding the signed integer codes
    (or, for float formats, the stored unit vectors). Scale not applied: cosines do not need it."""
    codes = codes.reshape(codes.shape[0], -1)
    if spec.method == "float":
        dtype = torch.float16 if spec.bits == 16 else torch.float32
        return codes.contiguous().view(dtype).reshape(codes.shape[0], k).to(torch.float32)
    if spec.bits == 8:  # one code per byte: a cast beats a table lookup (2x in benchmarks/bench_score.py)
        return codes.to(torch.float32).sub_(spec.alpha)
    lut = _decode_lut(spec, codes.device)
    return torch.nn.functional.embedding(codes.to(torch.int32), lut).reshape(codes.shape[0], k)


def unpack(codes: torch.Tensor, spec: QuantizerSpec, k: int) -> torch.Tensor:
    """Packed bytes -> signed integer codes ``[B, k]`` (int8); inverse of :func:`pack`."""
    if spec.method == "float":
        raise ValueError("float formats hold no integer codes")
    return decode_codes(codes, spec, k).to(torch.int8)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, spec: QuantizerSpec, k: int) -> torch.Tensor:
    """Approximate reconstruction of the original rows: ``code * S / alpha`` (``code * S`` for
    float formats and sign)."""
    x = decode_codes(codes, spec, k)
    factor = scales.to(torch.float32)
    if spec.method in ("absmax", "absmean"):
        factor = factor / spec.alpha
    return x * factor[:, None]


# ---------------------------------------------------------------------------------------------
# Slow, obvious reference (numpy float64, per coordinate), for tests


def quantize_reference(x: np.ndarray, spec: QuantizerSpec) -> tuple[np.ndarray, np.ndarray]:
    """Signed integer codes ``[B, k]`` and float64 scales, straight from the formulas."""
    x = np.asarray(x, dtype=np.float64)
    if spec.method == "sign":
        return np.where(x > 0, 1, -1).astype(np.int64), np.abs(x).mean(axis=1)
    s = np.abs(x).max(axis=1) if spec.method == "absmax" else np.abs(x).mean(axis=1)
    q = np.clip(np.round(spec.alpha * x / np.where(s > 0, s, 1.0)[:, None]), -spec.alpha, spec.alpha)
    return q.astype(np.int64), s


def pack_reference(q: np.ndarray, spec: QuantizerSpec) -> np.ndarray:
    """Bit-by-bit packing of signed codes, one coordinate at a time."""
    b, k = q.shape
    out = np.zeros((b, spec.row_bytes(k)), dtype=np.uint8)
    per_byte = 8 // spec.bits
    for r in range(b):
        for m in range(k):
            u = int(q[r, m] > 0) if spec.method == "sign" else int(q[r, m]) + spec.alpha
            out[r, m // per_byte] |= u << ((m % per_byte) * spec.bits)
    return out
