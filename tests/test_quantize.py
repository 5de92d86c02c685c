"""Quantizers: formulas against a float64 reference, exact pack/unpack round trips, sizes, and the
lossy promises against theory: the absmax error bound, reconstruction cosines of Gaussian rows
from 1-D integrals of the normal density, and the sign law of 1-bit codes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qless.errors import ConfigError
from qless.project import ProjectionConfig, Projector
from qless.quantize import (
    QuantizerSpec,
    decode_codes,
    dequantize,
    integer_codes,
    pack,
    pack_reference,
    quantize,
    quantize_reference,
    unpack,
)
from utils import (
    ANGLE_ATOL,
    DEQUANT_RTOL,
    FAIL_PROB,
    FP16_REL_TOL,
    FP32_UNIT_REL_TOL,
    SCALE_RTOL,
    UNIFORM_ERROR_RTOL,
    angle,
    binomial_band,
    block_pairs,
    combination_sd,
    cosine,
    quantized_cosine,
    sd_band,
    zero_bin_probability,
)

INTEGER_SPECS = ["absmax8", "absmax4", "absmax2", "absmean8", "absmean4", "absmean2", "sign1"]
ALL_SPECS = INTEGER_SPECS + ["fp16", "fp32"]


def _rows(n=9, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g, dtype=torch.float64)
    x[0] *= 1e-7  # LoRA-gradient-sized values must quantize like any others
    x[1, :5] *= 40  # a few outliers
    return x.to(torch.float32)


@pytest.mark.parametrize("tag", INTEGER_SPECS)
def test_codes_match_float64_reference(tag):
    spec = QuantizerSpec.parse(tag)
    x = _rows()
    codes, scales = quantize(x, spec)
    q_ref, s_ref = quantize_reference(x.double().numpy(), spec)
    np.testing.assert_array_equal(unpack(codes, spec, 64).numpy(), q_ref)
    np.testing.assert_allclose(scales.numpy(), s_ref, rtol=SCALE_RTOL)
    np.testing.assert_array_equal(codes.numpy(), pack_reference(q_ref, spec))
    assert q_ref.min() >= -spec.alpha and q_ref.max() <= spec.alpha


@pytest.mark.parametrize("tag", INTEGER_SPECS)
def test_pack_unpack_round_trip_every_code(tag):
    spec = QuantizerSpec.parse(tag)
    k = 64
    values = np.array([-1, 1]) if spec.method == "sign" else np.arange(-spec.alpha, spec.alpha + 1)
    q = torch.tensor(np.random.default_rng(1).choice(values, size=(17, k)), dtype=torch.int8)
    packed = pack(q, spec)
    assert packed.dtype == torch.uint8 and packed.shape == (17, k * spec.bits // 8)
    torch.testing.assert_close(unpack(packed, spec, k), q, rtol=0, atol=0)
    # each row decodes alone
    torch.testing.assert_close(unpack(packed[5:6], spec, k), q[5:6], rtol=0, atol=0)


def test_alpha_ranges():
    assert [QuantizerSpec.parse(t).alpha for t in ("absmax8", "absmean4", "absmean2", "sign1")] == [127, 7, 1, 1]


def test_two_bit_zero_bin_matches_gaussian_theory():
    """The paper's Figure 3: at 2 bits absmax puts most Gaussian coordinates in the zero bin
    (``|g| < S / 2`` with ``S = max|g| ~ 4``: about 95%), absmean about a third (``|g| < 0.4``).

    Zero counts are binomial: for absmax, given a row's ``S`` its other ``k - 1`` coordinates are
    i.i.d. N(0, 1) conditioned on ``|g| < S``; for absmean at the fixed scale ``E|g| = sqrt(2/pi)``
    every coordinate is independent. A bin edge at ``S / alpha`` instead of ``S / (2 alpha)``, or
    floor instead of round, moves the counts by hundreds of standard deviations."""
    rows, k = 32, 8192
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    fail = FAIL_PROB / (rows + 1)
    s_max = x.double().abs().amax(1)
    zeros = (integer_codes(x, QuantizerSpec.parse("absmax2"), s_max) == 0).sum(1).numpy()
    p_rows = [zero_bin_probability(2, s, trunc=s) for s in s_max.tolist()]
    for count, p in zip(zeros, p_rows):
        lo, hi = binomial_band(k - 1, p, fail)
        assert lo <= count <= hi
    s_mean = math.sqrt(2 / math.pi)
    p_mean = zero_bin_probability(2, s_mean)
    zeros_mean = int((integer_codes(x, QuantizerSpec.parse("absmean2"), torch.full((rows,), s_mean, dtype=torch.float64)) == 0).sum())
    lo, hi = binomial_band(rows * k, p_mean, fail)
    assert lo <= zeros_mean <= hi
    assert np.mean(p_rows) > 0.9 and p_mean < 0.5  # the figure's claim, from theory


def test_global_scale_argument():
    spec = QuantizerSpec.parse("absmax2-global")
    x = _rows()
    s = float(x.abs().max())
    codes, scales = quantize(x, spec, s)
    assert torch.all(scales == torch.tensor(s, dtype=torch.float32))
    q_ref = np.clip(np.round(x.double().numpy() / s), -1, 1)
    np.testing.assert_array_equal(unpack(codes, spec, 64).numpy(), q_ref)
    assert (q_ref[0] == 0).all()  # the tiny row vanishes under one global scale, as in the QLESS code


@pytest.mark.parametrize("tag", ["fp16", "fp32"])
def test_float_formats_store_unit_vectors(tag):
    spec = QuantizerSpec.parse(tag)
    x = _rows()
    codes, scales = quantize(x, spec)
    assert codes.shape == (9, 64 * spec.bits // 8)
    unit = decode_codes(codes, spec, 64).double()
    np.testing.assert_allclose(torch.linalg.vector_norm(unit, dim=1).numpy(), 1.0, rtol=FP16_REL_TOL)
    # tiny gradients are rescaled before the cast: nothing subnormal is lost in fp16
    rec = dequantize(codes, scales, spec, 64).double()
    rel = torch.linalg.vector_norm(rec - x.double(), dim=1) / torch.linalg.vector_norm(x.double(), dim=1)
    assert rel.max() < (FP16_REL_TOL if tag == "fp16" else FP32_UNIT_REL_TOL)


@pytest.mark.parametrize("tag", ["absmax8", "absmax4", "absmax2"])
def test_absmax_error_at_most_half_a_step(tag):
    """absmax never clips (``|g| <= S``), so rounding moves every coordinate by at most half a step:
    ``|x - code * S / alpha| <= S / (2 alpha)``, exactly, on tiny, outlier and Gaussian rows.
    Hence ``||e|| <= sqrt(k) S / (2 alpha)`` and ``angle(x, x') <= arcsin(||e|| / ||x||)``.
    Clipping (a scale below max|g|), floor instead of round, or ``alpha = 2^b - 1`` break it."""
    spec = QuantizerSpec.parse(tag)
    x = _rows()
    codes, scales = quantize(x, spec)
    xd = x.double().numpy()
    s = np.abs(xd).max(axis=1)
    # in code units, exactly: the stored code is alpha x / S rounded to nearest, never clipped
    assert np.all(np.abs(spec.alpha * xd / s[:, None] - unpack(codes, spec, 64).double().numpy()) <= 0.5)
    rec = dequantize(codes, scales, spec, 64).double().numpy()
    half_step = s / (2 * spec.alpha)
    max_error = half_step + DEQUANT_RTOL * s  # float32 rounding of the reconstruction included
    assert np.all(np.abs(rec - xd) <= max_error[:, None])
    ratio = np.sqrt(64) * max_error / np.linalg.norm(xd, axis=1)
    bound = np.where(ratio < 1, np.arcsin(np.minimum(ratio, 1)), np.pi / 2)
    assert np.all(angle(xd, rec) <= bound + ANGLE_ATOL)


def _gaussian_rows(rows: int = 8, k: int = 8192) -> torch.Tensor:
    return torch.randn(rows, k, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float()


def _code_cosines(x: torch.Tensor, tag: str) -> np.ndarray:
    """float64 cosine between each row and its stored codes (the scale cancels)."""
    spec = QuantizerSpec.parse(tag)
    codes, _ = quantize(x, spec)
    return cosine(x.double().numpy(), decode_codes(codes, spec, x.shape[1]).double().numpy())


def test_gaussian_oracle_known_values():
    # sign keeps E|g| / sqrt(E g^2) = sqrt(2/pi) exactly; 8-bit absmax at S = 4 loses about step^2 / 12
    assert quantized_cosine("sign", 1, 8192).mean == pytest.approx(math.sqrt(2 / math.pi), abs=1e-12)
    step = 4 / 127
    assert 1 - quantized_cosine("absmax", 8, 8192, 4.0).mean == pytest.approx(step**2 / 24, rel=UNIFORM_ERROR_RTOL)


@pytest.mark.parametrize("tag", INTEGER_SPECS)
def test_reconstruction_cosine_matches_gaussian_theory(tag):
    """For rows of k = 8192 i.i.d. N(0, 1) coordinates, ``cos(x, q(x))`` concentrates on
    ``E[g c] / sqrt(E[g^2] E[c^2])``, ``c`` the code of one coordinate, integrated exactly over the
    normal density (tests/utils.quantized_cosine: absmax at the row's own ``S``, absmean at
    ``S = sqrt(2/pi)``, sign ``sqrt(2/pi)``). Every row must lie within ``sd_band`` standard
    deviations (delta method over the k coordinates), so a correct quantizer fails with
    probability below FAIL_PROB. At 8 bits the band is about 1e-5 wide: an off-by-one alpha, a
    shifted bin edge or the wrong scale statistic is far outside it."""
    spec = QuantizerSpec.parse(tag)
    x = _gaussian_rows()
    cos = _code_cosines(x, tag)
    s_rows = x.double().abs().amax(1).tolist()
    z = sd_band(FAIL_PROB / len(cos))
    for c, s in zip(cos, s_rows):
        oracle = quantized_cosine(spec.method, spec.bits, x.shape[1], s if spec.method == "absmax" else None)
        assert abs(c - oracle.mean) <= z * oracle.sd


@pytest.mark.parametrize("method", ["absmax", "absmean"])
def test_reconstruction_cosine_increases_with_bits(method):
    """Each Gaussian row's reconstruction cosine rises strictly from 2 to 4 to 8 bits. For absmean
    the 4 -> 8 bit gain is small (clipping at ``S = mean|g|`` dominates): the theory's gap is
    checked to exceed the band of the paired difference, so the claim holds for a correct
    quantizer with probability above 1 - FAIL_PROB. A quantizer that ignores ``bits`` fails."""
    x = _gaussian_rows()
    k = x.shape[1]
    cos = {b: _code_cosines(x, f"{method}{b}") for b in (2, 4, 8)}
    z = sd_band(FAIL_PROB / (2 * len(x)))
    for r, s in enumerate(x.double().abs().amax(1).tolist()):
        oracle = {b: quantized_cosine(method, b, k, s if method == "absmax" else None) for b in (2, 4, 8)}
        for lo, hi in ((2, 4), (4, 8)):
            gap = oracle[hi].mean - oracle[lo].mean
            assert gap > z * combination_sd([oracle[hi], oracle[lo]], [1.0, -1.0])  # the theory separates them
            assert cos[hi][r] > cos[lo][r]


def test_sign_disagreement_rate_is_angle_over_pi():
    """The sign law: for a Gaussian projection, two vectors at angle ``theta`` get different signs
    at each output coordinate with probability exactly ``theta / pi``, independently over
    coordinates. For each angle, 128 pairs at that angle in the plane of their own two input
    coordinates (d = 1024; disjoint rows of R, so all pairs are independent) give
    ``D ~ Binomial(128 k, theta / pi)`` disagreements among the sign1 codes (k = 4096), checked
    against the exact binomial band (FAIL_PROB over the four angles; about +-0.004 around the rate).
    Two-coordinate pairs make the law a test of the entries themselves: it holds because two i.i.d.
    N(0, 1) entries are rotation-invariant, so Rademacher or uniform entries, or a Box-Muller slip
    (angles over half the circle), miss it by many band widths; so do codes unpacked in a different
    order for different rows."""
    degrees, k, n = (10, 45, 90, 150), 4096, 128
    x, y = block_pairs([math.cos(math.radians(a)) for a in degrees for _ in range(n)], 2, seed=4)
    proj = Projector(ProjectionConfig(kind="gaussian", dim=k, seed=17, chunk_size=512), x.shape[1])
    spec = QuantizerSpec.parse("sign1")
    codes, _ = quantize(proj(torch.tensor(np.vstack([x, y]), dtype=torch.float32)), spec)
    signs = unpack(codes, spec, k)
    differ = (signs[: len(x)] != signs[len(x):]).reshape(len(degrees), n * k).sum(1)
    for a, count in zip(degrees, differ.tolist()):
        lo, hi = binomial_band(n * k, math.radians(a) / math.pi, FAIL_PROB / len(degrees))
        assert lo <= count <= hi


@pytest.mark.parametrize("tag", ALL_SPECS)
def test_row_bytes_are_k_bits_over_8(tag):
    spec = QuantizerSpec.parse(tag)
    assert spec.row_bytes(8192) == 8192 * spec.bits // 8
    # fp16 (the LESS baseline) is 16/b times larger than a b-bit store
    assert QuantizerSpec.parse("fp16").row_bytes(8192) * spec.bits == 16 * spec.row_bytes(8192)


def test_parse_and_validate():
    assert QuantizerSpec.parse("absmean-4") == QuantizerSpec("absmean", 4)
    assert QuantizerSpec.parse("FP16").tag == "fp16"
    assert QuantizerSpec.parse("sign1").tag == "sign1"
    assert QuantizerSpec.parse("absmax2-global").scale == "global"
    with pytest.raises(ConfigError, match="3 bits"):
        QuantizerSpec("absmax", 3)
    with pytest.raises(ConfigError, match="unknown method"):
        QuantizerSpec("lloyd", 4)
    with pytest.raises(ConfigError, match="sign: 4 bits"):
        QuantizerSpec.parse("sign4")
    with pytest.raises(ConfigError, match="cannot read"):
        QuantizerSpec.parse("four bits please")
    with pytest.raises(ConfigError, match="multiple of 4"):
        QuantizerSpec.parse("absmean2").row_bytes(10)


def test_non_finite_rows_refused():
    x = _rows()
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantize(x, QuantizerSpec.parse("absmean4"))
