"""Packed low-bit scoring: cosine scores straight from the packed codes, no float decode.

Decode-then-multiply (:func:`qless.scoring.cosine.block_scores` after
:func:`qless.quantize.decode_codes`) writes ``4 k`` bytes of float32 per row, then multiplies in
float32. The kernels here (sign1, absmax/absmean at 2, 4 and 8 bits) keep the codes as 8-bit
integers and do the arithmetic in int8 x int8 -> int32 (``torch._int_mm``; VNNI dot products
on x86), several times as fast per element as float32, so that even three int8 digits per
query entry cost less than one float32 product:

* **unpack**: the ``8 / b`` codes of each byte are split into planes by shifts and masks on
  64-bit words, ``k`` bytes per row: position ``i * row_bytes + j`` holds coordinate
  ``j * 8 / b + i`` (*plane order*). 8-bit codes are only re-centred (``u ^ 0x80``).
* **query**: the subtask matrix ``q [k, S]`` (float64, already weighted by the checkpoint's eta)
  is written once per checkpoint (:meth:`IntegerCodes.prepare`) as :data:`DIGITS` int8 digits
  per column, ``q ~ sum_d s_d Q_d`` with ``s_1 = max|q_c| / 127`` and ``s_{d+1} = s_d / 254``,
  its rows permuted into plane order.
* **product**: one ``torch._int_mm`` of the unpacked codes with the ``DIGITS * S`` digit
  columns, exact in int32; the digits are combined in float64 and the code offset (the stored
  value ``u`` is ``(x + zero) / step``) is added back through the columns' sums.
* **norm**: ``||x||^2`` is an integer computed exactly (``k`` for sign; the squares summed by an
  int8 matmul with a column of ones at 2 and 4 bits; an int16 pass at 8 bits), then ``sqrt`` in
  float64. Few, large torch ops per block: on a CPU shared with other work every parallel op
  can wait a scheduler tick for its threads, so op count matters as much as arithmetic.

The only approximation is the query's residual ``r = q - sum_d s_d Q_d``: a score moves by
``<x, r_c> / ||x||``, at most ``||r_c|| <= sqrt(k) max|q_c| / (2 * 127 * 254^2)`` (Cauchy-Schwarz),
about ``6e-8 sqrt(k) max|q_c|``: float32's own rounding of the largest entries.
:attr:`PackedQuery.residual` holds ``||r_c||``. Alternatives measured on this project's 2-core
CPU (``benchmarks/bench_score.py --kernels``): a byte lookup table summed with
``embedding_bag`` (the partial sums of 8 sign bits per query), bfloat16 matmuls and
decode-then-multiply are all slower than the int8 digits (see BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

DIGITS = 3  # int8 digits per query entry: 3 x 8 bits leave a residual at float32 precision (module docstring)
_DIGIT_MAX = 127
CHUNK_ROWS = 128  # rows squared at a time in int16 (8 bits): the temporaries stay in the CPU caches
_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


@dataclass(frozen=True)
class PackedQuery:
    """A subtask matrix ``[k, S]`` prepared for one packed format (built once per checkpoint).

    ``digits [k, DIGITS * S]`` int8 (rows in plane order, digit ``d`` in columns
    ``d S .. (d + 1) S``); ``scales [DIGITS, S]`` the digits' scales times the format's code step;
    ``offset [S]`` (the code shift times the columns' sums) and ``residual [S]``
    (``||q_c - sum_d s_d Q_d||``, the bound on each score's error), float64."""

    digits: torch.Tensor
    scales: torch.Tensor
    offset: torch.Tensor
    residual: torch.Tensor


class PackedKernel(Protocol):
    """Scores of packed rows against a prepared subtask matrix, without decoding them to float."""

    bits: int
    max_dim: int  # the largest k whose int32 products cannot overflow

    def prepare(self, subtasks: torch.Tensor) -> PackedQuery:
        """``subtasks [k, S]`` (weighted subtask vectors) -> the query the kernel multiplies by."""
        ...

    def scores(self, codes: torch.Tensor, query: PackedQuery) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed rows ``codes [m, row_bytes]`` (uint8) -> cosine-weighted scores ``[m, S]``
        float64, and the rows whose code vector is zero (``[m]`` bool; their scores are 0)."""
        ...


def _words(codes: torch.Tensor) -> torch.Tensor:
    """The rows of ``codes [m, R]`` viewed as the widest integer words that divide ``R``."""
    for size, dtype in _WORDS:
        if codes.shape[1] % size == 0:
            return codes.view(dtype)
    raise AssertionError("unreachable: uint8 divides every width")


def _repeat_byte(byte: int, words: torch.Tensor) -> int:
    """``byte`` repeated over every byte of one word of ``words``' dtype (a mask)."""
    return int.from_bytes(bytes([byte]) * words.element_size(), "little")


def unpack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed rows ``[m, R]`` uint8 at ``bits`` < 8 -> the unsigned codes ``[m, R * 8 / bits]``
    uint8 in plane order (position ``i R + j`` holds coordinate ``j * 8 / bits + i``): one shift
    and one mask over every plane at once (two parallel ops per block, not two per plane)."""
    m, r = codes.shape
    n = 8 // bits
    words = _words(codes)
    shifts = (torch.arange(n, dtype=words.dtype, device=codes.device) * bits)[:, None]
    planes = torch.empty(m, n, words.shape[1], dtype=words.dtype, device=codes.device)
    torch.bitwise_right_shift(words[:, None, :], shifts, out=planes)
    planes.bitwise_and_(_repeat_byte((1 << bits) - 1, words))
    return planes.view(torch.uint8).view(m, n * r)


def plane_order(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Rows of ``q [k, S]`` permuted into the plane order of :func:`unpack_planes`."""
    if bits == 8:
        return q
    n = 8 // bits
    return q.reshape(q.shape[0] // n, n, q.shape[1]).transpose(0, 1).reshape(q.shape)


def split_digits(q: torch.Tensor, n_digits: int = DIGITS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q [k, S]`` float64 -> int8 digits ``[n_digits, k, S]``, their scales ``[n_digits, S]`` and
    the residual ``q - sum_d s_d Q_d``: round to nearest at ``s_1 = max|q_c| / 127``, then each
    digit rounds the previous residual (at most ``s_d / 2``) at ``s_{d+1} = s_d / 254``."""
    scale = q.abs().amax(dim=0) / _DIGIT_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    digits, scales, rest = [], [], q
    for _ in range(n_digits):
        d = torch.round(rest / scale).clamp_(-_DIGIT_MAX, _DIGIT_MAX)
        digits.append(d.to(torch.int8))
        scales.append(scale)
        rest = rest - d * scale
        scale = scale / (2 * _DIGIT_MAX)
    return torch.stack(digits), torch.stack(scales), rest


class IntegerCodes:
    """A packed integer format whose code of coordinate value ``x`` is ``u = (x + zero) / step``:
    sign1 (``step 2, zero 1``), absmax/absmean (``step 1, zero alpha``)."""

    def __init__(self, bits: int, step: int, zero: int) -> None:
        self.bits, self.step, self.zero = bits, step, zero
        # 8-bit codes (0..254) enter the int8 product re-centred as v = u - 128; narrower ones as u
        self.shift = 128 if bits == 8 else 0
        self.max_dim = (2**31 - 1) // (max(self.shift, (1 << bits) - 1 - self.shift) * _DIGIT_MAX)

    def prepare(self, subtasks: torch.Tensor) -> PackedQuery:
        q = subtasks.detach().to(device="cpu", dtype=torch.float64)
        k, s = q.shape
        if k > self.max_dim or k % (8 // self.bits):
            raise ValueError(f"packed {self.bits}-bit scoring needs k <= {self.max_dim}, a multiple of {8 // self.bits}; got {k}")
        digits, scales, rest = split_digits(q)
        approx = q - rest
        # x = step * v + (step * shift - zero) on every coordinate
        offset = (self.step * self.shift - self.zero) * approx.sum(dim=0)
        planes = plane_order(digits.permute(1, 0, 2).reshape(k, -1), self.bits)
        return PackedQuery(planes.contiguous(), scales * self.step, offset, torch.linalg.vector_norm(rest, dim=0))

    def _codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Packed bytes -> the int8 matrix ``v`` of the product (plane order)."""
        if self.bits == 8:
            return torch.bitwise_xor(codes, 0x80).view(torch.int8)
        return unpack_planes(codes, self.bits).view(torch.int8)

    def _square_sums(self, v: torch.Tensor) -> torch.Tensor:
        """``||x||^2`` of every row (int64 ``[m]``), exact: the decoded row's squared norm."""
        m, k = v.shape
        if self.bits == 1:  # every coordinate is +-1
            return torch.full((m,), k, dtype=torch.int64)
        if self.bits < 8:  # x = u - alpha and x^2 <= 64 fit int8: one more int8 matmul sums the squares
            x = v.sub(self.zero)
            return torch._int_mm(x.mul_(x), torch.ones(k, 1, dtype=torch.int8)).view(m).to(torch.int64)
        sq = torch.empty(m, dtype=torch.int64)
        for a in range(0, m, CHUNK_ROWS):  # x = v + 1 (|x| <= 128), squared in int16
            x = v[a:a + CHUNK_ROWS].to(torch.int16).add_(self.shift - self.zero)
            sq[a:a + CHUNK_ROWS] = x.mul_(x).sum(dim=1, dtype=torch.int64)
        return sq

    def scores(self, codes: torch.Tensor, query: PackedQuery) -> tuple[torch.Tensor, torch.Tensor]:
        codes = codes.reshape(codes.shape[0], -1).contiguous()
        v = self._codes(codes)
        n_digits, s = query.scales.shape
        acc = torch._int_mm(v, query.digits).view(-1, n_digits, s).to(torch.float64)
        dots = acc.mul_(query.scales).sum(dim=1).add_(query.offset)
        sq = self._square_sums(v)
        zero = sq == 0
        dots /= torch.where(zero, 1, sq).to(torch.float64).sqrt_()[:, None]
        dots[zero] = 0.0
        return dots, zero


def _scaled(bits: int) -> IntegerCodes:
    return IntegerCodes(bits, step=1, zero=(1 << (bits - 1)) - 1)


PACKED_KERNELS: dict[str, PackedKernel] = {
    "sign1": IntegerCodes(1, step=2, zero=1),
    **{f"{method}{bits}": _scaled(bits) for method in ("absmax", "absmean") for bits in (2, 4, 8)},
}
"""Format (``QuantizerSpec.impl.tag``, the scale mode aside: cosines do not see scales) -> kernel."""
