"""Bit packing of small unsigned codes, row by row, and the table that unpacks them.

At ``b`` bits per coordinate (b in 1, 2, 4, 8) coordinate ``m`` of a row sits at bit
``(m % (8/b)) * b`` of byte ``m // (8/b)``, so every row decodes alone.
"""

from __future__ import annotations

import torch

_LUT_CACHE: dict[tuple[int, torch.device], torch.Tensor] = {}


def per_byte(bits: int) -> int:
    """Coordinates held by one byte at ``bits`` bits each."""
    return 8 // bits


def pack_bits(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[B, k]`` (each below ``2^bits``) -> bytes ``[B, k * bits / 8]`` (uint8)."""
    u = u.to(torch.uint8)
    if bits == 8:
        return u.contiguous()
    n = per_byte(bits)
    b, k = u.shape
    u = u.reshape(b, k // n, n).to(torch.int32)
    shifts = torch.arange(n, device=u.device, dtype=torch.int32) * bits
    return (u << shifts).sum(dim=2).to(torch.uint8)


def unpack_table(bits: int, device: torch.device) -> torch.Tensor:
    """``[256, 8 / bits]`` int32 table: byte value -> the unsigned codes it holds, in order."""
    key = (bits, device)
    if key not in _LUT_CACHE:
        n = per_byte(bits)
        v = torch.arange(256, dtype=torch.int32)[:, None]
        _LUT_CACHE[key] = ((v >> (torch.arange(n, dtype=torch.int32) * bits)[None, :]) & ((1 << bits) - 1)).to(device)
    return _LUT_CACHE[key]


def unpack_through(codes: torch.Tensor, table: torch.Tensor, k: int) -> torch.Tensor:
    """Bytes ``[B, row_bytes]`` looked up in ``table [256, 8 / bits]`` -> ``[B, k]`` of the table's dtype."""
    return torch.nn.functional.embedding(codes.to(torch.int32), table).reshape(codes.shape[0], k)
