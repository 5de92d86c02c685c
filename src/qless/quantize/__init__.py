"""Quantization of projected gradients and bit packing (QLESS section 3.1).

One object per method behind the :class:`Quantizer` protocol, in the :data:`QUANTIZERS` dict:

=========  =================  ==============================================================
method     bits               stored per row
=========  =================  ==============================================================
float      16, 32             ``g / ||g||`` as float16 (LESS's baseline) or float32
absmax     8, 4, 2            ``q = clamp(round(alpha g / max|g|), -alpha, alpha)`` packed
absmean    8, 4, 2            the same with ``mean|g|``
sign       1                  ``+1`` if ``g > 0`` else ``-1``, one bit
=========  =================  ==============================================================

with ``alpha = 2^(b-1) - 1``, plus one float32 scale per row. A :class:`QuantizerSpec`
(method, bits, scale mode) names a storage format, written short as ``fp16``, ``absmax8``,
``absmean4``, ``sign1`` (``-global`` for one scale per store, as the QLESS reference code).
The global mode needs every row before it can quantize any, so it is applied by
:func:`qless.store.derive.requantize` from a float store; the functions here take that scale as
an argument. :mod:`qless.quantize.reference` holds the slow float64 references.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

from qless.config import option
from qless.errors import ConfigError
from qless.quantize.floating import FloatQuantizer
from qless.quantize.reference import pack_reference, quantize_reference
from qless.quantize.scaled import AbsmaxQuantizer, AbsmeanQuantizer
from qless.quantize.sign import SignQuantizer


class Quantizer(Protocol):
    """What a storage method provides. Tensors: rows ``[B, k]``, scales ``[B]`` float64."""

    name: str
    bits: tuple[int, ...]
    lossless_source: bool

    def tag(self, bits: int) -> str: ...
    def row_bytes(self, k: int, bits: int) -> int: ...
    def scale(self, x: torch.Tensor) -> torch.Tensor: ...
    def combine(self, row_scales: torch.Tensor) -> float: ...
    def encode(self, x: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor: ...
    def decode(self, codes: torch.Tensor, bits: int, k: int) -> torch.Tensor: ...
    def reconstruct_factor(self, scales: torch.Tensor, bits: int) -> torch.Tensor: ...


QUANTIZERS: dict[str, Quantizer] = {q.name: q for q in (FloatQuantizer(), AbsmaxQuantizer(), AbsmeanQuantizer(),
                                                        SignQuantizer())}
Method = Literal["float", "absmax", "absmean", "sign"]


@dataclass(frozen=True)
class QuantizerSpec:
    """A storage format: ``method`` at ``bits`` per coordinate with a per-row or global scale.

    Written in short form as ``fp16``, ``fp32``, ``absmax8``, ``absmean4``, ``absmean2``,
    ``sign1`` (``-global`` appended for the global scale mode)."""

    method: Method = option("absmean", "quantizer: float, absmax, absmean or sign")
    bits: int = option(4, "bits per coordinate: 16/32 for float, 8/4/2 for absmax and absmean, 1 for sign")
    scale: Literal["row", "global"] = option("row", "one scale per vector (the paper) or one for the whole store (the QLESS code)")

    def __post_init__(self) -> None:
        if self.method not in QUANTIZERS:
            raise ConfigError(
                f"quantizer: unknown method {self.method!r}; use one of {', '.join(QUANTIZERS)} "
                f"(short forms: fp16, fp32, absmax8, absmean4, absmean2, sign1)"
            )
        allowed = QUANTIZERS[self.method].bits
        if self.bits not in allowed:
            bits = [str(b) for b in allowed]
            listed = ", ".join(bits[:-1]) + " or " + bits[-1] if len(bits) > 1 else bits[0]
            raise ConfigError(f"quantizer {self.method}: {self.bits} bits is not supported; use {listed} bits")
        if self.scale not in ("row", "global"):
            raise ConfigError(f"quantizer scale must be 'row' or 'global', got {self.scale!r}")

    @classmethod
    def parse(cls, text: str) -> QuantizerSpec:
        """Parse ``fp16``, ``absmean4``, ``absmax-8``, ``sign1``, ``absmean2-global``..."""
        m = re.fullmatch(r"\s*([a-z]+)[-:_]?(\d+)(?:-(row|global))?\s*", str(text).lower())
        if not m:
            raise ConfigError(
                f"cannot read quantizer {text!r}; write it as fp16, fp32, absmax8, absmean4, absmean2 or sign1 "
                f"(optionally with -global)"
            )
        name, bits, scale = m.group(1), int(m.group(2)), m.group(3) or "row"
        method = {"fp": "float", "float": "float"}.get(name, name)
        return cls(method=method, bits=bits, scale=scale)  # type: ignore[arg-type]

    @property
    def impl(self) -> Quantizer:
        """The method's implementation."""
        return QUANTIZERS[self.method]

    @property
    def tag(self) -> str:
        return self.impl.tag(self.bits) + ("-global" if self.scale == "global" else "")

    @property
    def alpha(self) -> int:
        """Largest code magnitude ``2^(b-1) - 1`` (1 for sign; integer methods only)."""
        return self.impl.alpha(self.bits)  # type: ignore[attr-defined]

    def row_bytes(self, k: int) -> int:
        """Bytes of one packed row of ``k`` coordinates."""
        per_byte = 8 // self.bits if self.bits < 8 else 1
        if k % per_byte:
            raise ConfigError(f"{self.tag} packs {per_byte} coordinates per byte: the projection dim {k} must be a multiple of {per_byte}")
        return self.impl.row_bytes(k, self.bits)


def compute_scale(x: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    """The per-row scale ``S`` (float64, shape ``[B]``) of ``x`` for ``spec``'s method."""
    return spec.impl.scale(x)


def global_scale(row_scales: torch.Tensor, spec: QuantizerSpec, k: int) -> float:
    """Combine per-row statistics (:func:`compute_scale` of every row) into the store-wide ``S``."""
    return spec.impl.combine(row_scales)


def integer_codes(x: torch.Tensor, spec: QuantizerSpec, scale: torch.Tensor) -> torch.Tensor:
    """Signed integer codes ``[B, k]`` (int8) of ``x`` given per-row ``scale`` ``[B]``."""
    if not hasattr(spec.impl, "integer_codes"):
        raise ValueError(f"{spec.tag} stores floats, not integer codes")
    return spec.impl.integer_codes(x, spec.bits, scale)  # type: ignore[attr-defined]


def pack(q: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    """Pack signed codes ``[B, k]`` into bytes ``[B, row_bytes]`` (uint8)."""
    from qless.quantize.packing import pack_bits

    spec.row_bytes(q.shape[1])  # validates divisibility
    u = torch.from_numpy(np.asarray(spec.impl.unsigned(q.to(torch.int64).numpy(), spec.bits)))  # type: ignore[attr-defined]
    return pack_bits(u, spec.bits)


def quantize(x: torch.Tensor, spec: QuantizerSpec, scale: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float rows ``x [B, k]`` into packed codes ``[B, row_bytes]`` uint8 and scales ``[B]`` float32.

    ``scale`` overrides the per-row scale (a number for the global mode). Rows must be finite:
    callers filter non-finite gradients before storing them.
    """
    if x.dim() != 2:
        raise ValueError(f"expected [B, k] rows, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantize non-finite values; filter NaN/inf rows first")
    spec.row_bytes(x.shape[1])  # validates divisibility
    if scale is None:
        s = spec.impl.scale(x)
    elif isinstance(scale, (int, float)):
        s = torch.full((x.shape[0],), float(scale), dtype=torch.float64, device=x.device)
    else:
        s = scale.to(device=x.device, dtype=torch.float64)
    return spec.impl.encode(x, spec.bits, s), s.to(torch.float32)


def decode_codes(codes: torch.Tensor, spec: QuantizerSpec, k: int) -> torch.Tensor:
    """Packed bytes ``[B, row_bytes]`` -> float32 ``[B, k]`` holding the signed integer codes
    (or, for float formats, the stored unit vectors). Scale not applied: cosines do not need it."""
    return spec.impl.decode(codes.reshape(codes.shape[0], -1), spec.bits, k)


def unpack(codes: torch.Tensor, spec: QuantizerSpec, k: int) -> torch.Tensor:
    """Packed bytes -> signed integer codes ``[B, k]`` (int8); inverse of :func:`pack`."""
    if spec.impl.lossless_source:
        raise ValueError("float formats hold no integer codes")
    return decode_codes(codes, spec, k).to(torch.int8)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, spec: QuantizerSpec, k: int) -> torch.Tensor:
    """Approximate reconstruction of the original rows: ``code * S / alpha`` (``code * S`` for
    float formats and sign)."""
    return decode_codes(codes, spec, k) * spec.impl.reconstruct_factor(scales, spec.bits)[:, None]


__all__ = ["QUANTIZERS", "Quantizer", "QuantizerSpec", "compute_scale", "decode_codes", "dequantize", "global_scale",
           "integer_codes", "pack", "pack_reference", "quantize", "quantize_reference", "unpack"]
