"""Packed low-bit scoring (qless.scoring.packed) against the float64 reference and the decoding path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import write_store
from qless.quantize import QuantizerSpec, pack_reference
from qless.quantize.reference import decode_reference
from qless.scoring import ScoreConfig, score
from qless.scoring.packed import CHUNK_ROWS, DIGITS, PACKED_KERNELS, split_digits
from qless.store import Datastore
from utils import PACKED_SCORE_ATOL, SCORE_ATOL


def _query(k: int, s: int, seed: int) -> torch.Tensor:
    """``[k, s]`` float64 columns as the driver gives them: eta-weighted means of unit vectors
    (norm <= 1), plus a zero column, a basis vector and a column of 1e-7-sized entries."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(k, s, generator=g, dtype=torch.float64)
    q = q / torch.linalg.vector_norm(q, dim=0) * torch.rand(s, generator=g, dtype=torch.float64)
    q[:, 0] = 0.0
    q[:, 1] = 0.0
    q[3, 1] = 0.6
    q[:, 2] *= 1e-7
    return q


def _reference_scores(codes: np.ndarray, spec: QuantizerSpec, k: int, q: torch.Tensor) -> np.ndarray:
    """float64: decode every coordinate one at a time, ``<x, q_c> / ||x||`` (0 for a zero row)."""
    x = decode_reference(codes, spec, k)
    norms = np.linalg.norm(x, axis=1)
    return (x @ q.numpy()) / np.where(norms > 0, norms, 1.0)[:, None]


@pytest.mark.parametrize("tag", sorted(PACKED_KERNELS))
@pytest.mark.parametrize("k", [8192, 64, 24, 40, 48])
def test_packed_scores_equal_float64_reference(tag, k):
    """Every byte value (random bytes include codes no quantizer writes, e.g. 3 at 2 bits), a row
    of zero codes, rows at the largest codes, more rows than one chunk, and row widths whose words
    are 8, 4, 2 and 1 bytes wide. The packed scores and zero flags equal the float64 reference
    within PACKED_SCORE_ATOL and within each column's residual bound."""
    spec = QuantizerSpec.parse(tag)
    if k % (8 // spec.bits):
        pytest.skip("k is not a whole number of bytes at this width")
    n = 5 if k == 8192 else CHUNK_ROWS + 3
    rng = np.random.default_rng(k)
    codes = rng.integers(0, 256, (n, spec.row_bytes(k)), dtype=np.uint8)
    codes[1] = pack_reference(np.zeros((1, k)), spec)[0]  # sign has no zero code: all -1 instead
    codes[2] = pack_reference(np.full((1, k), spec.alpha), spec)[0]
    codes[3] = pack_reference(np.full((1, k), -spec.alpha), spec)[0]
    q = _query(k, 7, seed=k)
    kernel = PACKED_KERNELS[tag]
    query = kernel.prepare(q)
    got, zero = kernel.scores(torch.from_numpy(codes), query)
    ref = _reference_scores(codes, spec, k, q)
    assert zero.tolist() == (np.abs(decode_reference(codes, spec, k)).sum(axis=1) == 0).tolist()
    assert bool(zero[1]) == (spec.method != "sign")
    err = np.abs(got.numpy() - ref)
    assert err.max() <= PACKED_SCORE_ATOL
    assert np.all(err <= query.residual.numpy()[None, :] + 1e-12)


def test_digits_leave_the_stated_residual():
    """Each entry of ``q - sum_d s_d Q_d`` is at most ``max|q_c| / (2 * 127 * 254^(D-1))`` (the module's
    error bound), the digits are int8 in [-127, 127], and the digits times their scales plus the
    residual give back ``q``."""
    q = _query(1024, 9, seed=3)
    digits, scales, rest = split_digits(q)
    assert digits.dtype == torch.int8 and digits.abs().max() <= 127 and digits.shape == (DIGITS, 1024, 9)
    bound = q.abs().amax(dim=0) / (2 * 127 * 254 ** (DIGITS - 1))
    assert torch.all(rest.abs() <= bound * (1 + 1e-9))
    recon = (digits.to(torch.float64) * scales[:, None, :]).sum(dim=0)
    torch.testing.assert_close(recon + rest, q, rtol=0, atol=1e-15)
    assert torch.all(rest[:, 0] == 0) and torch.all(digits[:, :, 0] == 0)  # a zero column stays exactly zero


class _Counting:
    """A kernel wrapper counting the rows it scored."""

    def __init__(self, kernel) -> None:
        self.kernel, self.bits, self.max_dim, self.rows = kernel, kernel.bits, kernel.max_dim, 0

    def prepare(self, subtasks):
        return self.kernel.prepare(subtasks)

    def scores(self, codes, query):
        self.rows += codes.shape[0]
        return self.kernel.scores(codes, query)


@pytest.mark.parametrize("tag", ["sign1", "absmean2", "absmax4", "absmean8"])
def test_score_uses_the_packed_kernel_and_agrees_with_decoding(tmp_path, tag):
    """score() sends every pool row of a packed format through its kernel (two checkpoints, blocks
    of 17), and the scores equal those of the decode-then-multiply path (``kernels={}``) within
    the float32 path's SCORE_ATOL."""
    g = torch.Generator().manual_seed(4)
    trows = [{"source": "t", "id": str(i), "subtask": f"s{i % 2}"} for i in range(4)]
    pool, targets = [], []
    for c, lr in (("A", 2e-5), ("B", 1e-5)):
        pool.append(Datastore.open(write_store(tmp_path / f"p{c}", torch.randn(50, 128, generator=g), tag, checkpoint=c, lr=lr)))
        targets.append(Datastore.open(write_store(tmp_path / f"t{c}", torch.randn(4, 128, generator=g), tag, checkpoint=c,
                                                  lr=lr, rows=trows)))
    spy = _Counting(PACKED_KERNELS[tag])
    cfg = ScoreConfig(block_rows=17)
    packed = score(pool, targets, cfg, progress=False, kernels={tag: spy}).values
    assert spy.rows == 2 * 50
    decoded = score(pool, targets, cfg, progress=False, kernels={}).values
    np.testing.assert_allclose(packed, decoded, rtol=0, atol=SCORE_ATOL)

