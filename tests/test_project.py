"""Random projection: exact agreement with the dense reference, invariances, JL guarantees."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from qless.errors import ConfigError
from qless.project import (
    ProjectionConfig,
    Projector,
    dense_reference,
    matrix_rows,
    project_reference,
)
from utils import (
    BF16_REL_TOL,
    FAIL_PROB,
    FP32_REL_TOL,
    PROJ_ATOL,
    block_pairs,
    chi2_upper,
    jl_epsilon,
    sd_band,
)

SPARSE = [("sparse", 1), ("sparse", 2), ("sparse", 4)]
KINDS = [("rademacher", 1), ("gaussian", 1), *SPARSE]  # (kind, nnz)
SIGN_KINDS = [("rademacher", 1), *SPARSE]  # cheap to generate: invariance tests of the summation path


@pytest.mark.parametrize("kind,nnz", KINDS)
@pytest.mark.parametrize("chunk", [1, 5, 64, 1000])
def test_chunked_entries_equal_dense_reference(kind, nnz, chunk):
    # sparse entries are +-sqrt(k / nnz): exact in float64, one float32 rounding in float32
    cfg = ProjectionConfig(kind=kind, dim=96, nnz=nnz, seed=12345, chunk_size=chunk)
    ref = dense_reference(cfg, 70)
    for dtype, want in [(torch.float32, ref.astype(np.float32)), (torch.float64, ref)]:
        got = torch.cat([matrix_rows(cfg, a, min(a + chunk, 70), dtype=dtype) for a in range(0, 70, chunk)]).numpy()
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind,nnz", KINDS)
def test_entries_at_large_row_indices_equal_reference(kind, nnz):
    # input coordinates beyond 2^32 use the high word of the index
    cfg = ProjectionConfig(kind=kind, dim=40, nnz=nnz, seed=2**40 + 3)
    first = 2**33 + 17
    got = matrix_rows(cfg, first, first + 9, dtype=torch.float64).numpy()
    np.testing.assert_array_equal(got, dense_reference(cfg, 9, first))
    assert not np.array_equal(dense_reference(cfg, 9, first), dense_reference(cfg, 9, 17))


def test_matrix_depends_on_seed_and_kind():
    a = matrix_rows(ProjectionConfig(seed=1, dim=256), 0, 64)
    b = matrix_rows(ProjectionConfig(seed=2, dim=256), 0, 64)
    assert (a != b).float().mean() > 0.4  # independent signs differ about half the time
    g = matrix_rows(ProjectionConfig(kind="gaussian", seed=1, dim=256), 0, 64)
    assert torch.unique(g).numel() > 1000


def test_entry_statistics():
    r = matrix_rows(ProjectionConfig(seed=7, dim=8192), 0, 256).double()
    n = r.numel()
    assert abs(r.mean().item()) < 5 / math.sqrt(n)  # +-1 balanced within 5 sigma
    g = matrix_rows(ProjectionConfig(kind="gaussian", seed=7, dim=8192), 0, 256).double()
    assert abs(g.mean().item()) < 5 / math.sqrt(n)
    assert abs(g.var().item() - 1) < 5 * math.sqrt(2 / n)
    # columns are uncorrelated: |corr| of two columns over 256 rows stays small
    c = torch.corrcoef(r[:, :64].T)
    off = c[~torch.eye(64, dtype=torch.bool)]
    assert off.abs().max() < 5 / math.sqrt(256)


@pytest.mark.parametrize("kind,nnz", KINDS)
@pytest.mark.parametrize("batch,chunk", [(1, 7), (3, 64), (16, 333), (5, 5000)])
def test_projection_matches_float64_reference(kind, nnz, batch, chunk):
    d = 300
    cfg = ProjectionConfig(kind=kind, dim=128, nnz=nnz, seed=3, chunk_size=chunk)
    x = np.random.default_rng(0).standard_normal((batch, d))
    got = Projector(cfg, d)(torch.tensor(x, dtype=torch.float32)).double().numpy()
    ref = project_reference(cfg, x)
    err = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert err.max() < FP32_REL_TOL


def test_bfloat16_projection_within_tolerance():
    d = 2000
    cfg = ProjectionConfig(dim=256, seed=3, chunk_size=128, compute_dtype="bfloat16")
    x = np.random.default_rng(1).standard_normal((8, d))
    got = Projector(cfg, d)(torch.tensor(x, dtype=torch.float32)).double().numpy()
    ref = project_reference(cfg, x)
    err = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert err.max() < BF16_REL_TOL


@pytest.mark.parametrize("kind,nnz", SIGN_KINDS)
def test_blocks_sum_to_whole_projection(kind, nnz):
    d = 500
    cfg = ProjectionConfig(kind=kind, dim=64, nnz=nnz, seed=9, chunk_size=37)
    x = torch.randn(4, d, generator=torch.Generator().manual_seed(0))
    p = Projector(cfg, d)
    whole = p(x)
    parts = p.project(x[:, :123], 0) + p.project(x[:, 123:400], 123) + p.project(x[:, 400:], 400)
    torch.testing.assert_close(parts, whole, rtol=FP32_REL_TOL, atol=PROJ_ATOL)
    with pytest.raises(ValueError):
        p.project(x[:, :10], 495)


@pytest.mark.parametrize("kind,nnz", SIGN_KINDS)
def test_same_input_same_batch_same_bytes(kind, nnz):
    d = 1000
    cfg = ProjectionConfig(kind=kind, dim=512, nnz=nnz, seed=5, chunk_size=100)
    x = torch.randn(6, d, generator=torch.Generator().manual_seed(2))
    a = Projector(cfg, d)(x).numpy().tobytes()
    b = Projector(cfg, d)(x.clone()).numpy().tobytes()
    assert a == b


@pytest.mark.parametrize("nnz", [1, 2, 4])
def test_sparse_matches_reference_and_has_one_entry_per_block(nnz):
    """Each input coordinate (row of R) has exactly ``nnz`` non-zeros, one in each block of
    ``m = k / nnz`` columns, each ``+-sqrt(k / nnz)`` (so ``R / sqrt(k)`` carries ``+-1/sqrt(nnz)``
    and every row of the projection has unit norm); the projector agrees with ``x R / sqrt(k)``."""
    d, k = 500, 96
    m = k // nnz
    cfg = ProjectionConfig(kind="sparse", dim=k, nnz=nnz, seed=77)
    ref = dense_reference(cfg, d)
    assert ((ref != 0).sum(1) == nnz).all()
    assert ((ref.reshape(d, nnz, m) != 0).sum(2) == 1).all()
    np.testing.assert_array_equal(np.abs(ref[ref != 0]), math.sqrt(k / nnz))
    assert {-1.0, 1.0} <= set(np.sign(ref[ref != 0]).tolist())
    x = np.random.default_rng(4).standard_normal((6, d))
    got = Projector(cfg, d)(torch.tensor(x, dtype=torch.float32)).double().numpy()
    want = project_reference(cfg, x)
    err = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert err.max() < FP32_REL_TOL


@pytest.mark.parametrize("kind,nnz", [*SPARSE, ("rademacher", 1)])
def test_inner_product_estimate_unbiased_with_theoretical_variance(kind, nnz):
    """Over ``n = 400`` seeds (Rademacher: 400 disjoint groups of k columns of one matrix),
    ``T = <Px, Py>`` for fixed unit ``x, y`` (d = 1024, k = 128) has mean ``<x, y>`` and variance
    ``V = (||x||^2 ||y||^2 + <x, y>^2 - 2 sum_i x_i^2 y_i^2) / k``, the same for every sparse
    ``nnz`` and for dense Rademacher (the cross terms ``sigma_i sigma_i' x_i y_i'`` over colliding
    pairs ``i != i'``: each ordered pair collides in a block with probability ``1 / m``, ``nnz``
    independent blocks weighted ``1 / nnz^2``, so ``V = .../(nnz m)``).
    Checks, each given ``FAIL_PROB / 2``:

    * the sample mean within ``sd_band`` sd of ``<x, y>`` (sd ``sqrt(V / n)``; ``T`` has skewness at
      most ``2.8 / sqrt(k)``, the mean's is 20x smaller);
    * the sample variance in the two-sided chi-square band: ``s^2 / V ~ chi^2_nu / nu`` with
      ``nu = 1 / (1/(n-1) + g/(2n))`` matching ``Var(s^2) = V^2 (2/(n-1) + g/n)``, ``g`` the excess
      kurtosis of ``T``: a sum of k (nearly) independent products of nearly Gaussian bucket sums,
      each product's excess kurtosis at most 12 (the bivariate-normal value at ``|rho| = 1``), so
      ``g <= 12 / k``.

    ``x`` and ``y`` have a common offset (``sum_i x_i`` ~ 14): a sketch without random signs is
    biased by ``((sum x)(sum y) - <x, y>) / m`` ~ 1.4, over 40 bands. A scale off by 2.5% moves the
    mean by a band (0.032 of 0.67); half as many buckets (or blocks sharing one hash) doubles ``V``,
    past the band's upper edge (1.41; lower edge 0.68)."""
    d, k, n = 1024, 128, 400
    fail = FAIL_PROB / 2
    g = np.random.default_rng(8).standard_normal((2, d))
    x, y = 0.5 + g[0], 0.5 + 0.6 * g[0] + 0.8 * g[1]
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    dot = x @ y
    var = (1 + dot**2 - 2 * np.sum(x**2 * y**2)) / k
    rows = torch.tensor(np.vstack([x, y]), dtype=torch.float32)
    if kind == "rademacher":  # independent columns: n groups of k columns of one seed's matrix (faster)
        out = Projector(ProjectionConfig(kind=kind, dim=n * k, seed=1000, chunk_size=64), d)(rows).double()
        est = (out[0] * out[1]).reshape(n, k).sum(1).numpy() * n  # rescale 1/(n k) to 1/k
    else:
        est = np.empty(n)
        for i in range(n):
            out = Projector(ProjectionConfig(kind=kind, dim=k, nnz=nnz, seed=1000 + i), d)(rows).double()
            est[i] = (out[0] @ out[1]).item()
    assert abs(est.mean() - dot) <= sd_band(fail) * math.sqrt(var / n)
    nu = 1 / (1 / (n - 1) + (12 / k) / (2 * n))
    ratio = est.var(ddof=1) / var
    assert stats.chi2.ppf(fail / 2, nu) / nu <= ratio <= stats.chi2.isf(fail / 2, nu) / nu


@pytest.mark.parametrize("k,nnz", [(512, 1), (512, 4), (2048, 1), (2048, 8)])
def test_sparse_outputs_keep_heavy_tails_by_k_over_nnz(k, nnz):
    """Why a sparse projection of heavy-tailed gradients quantizes badly at large k / nnz: each
    output sums the signed inputs hashed to it, weighted ``1/sqrt(nnz)``; over signs and hashes
    (each pair of inputs shares a bucket in a block with probability ``nnz / k``, ``nnz`` blocks)

        E[sum_j y_j^4] = (sum_i x_i^4 + 3 (nnz / k) (||x||^4 - sum_i x_i^4)) / nnz,

    so the outputs' kurtosis is about ``3 + r (k / nnz - 3)`` with ``r = sum x^4 / ||x||^4``: the
    inputs' tails pass through in proportion to k / nnz (a dense projection gives 3). Checked on a
    vector with 100 spikes among 20,000 Gaussian coordinates (r = 0.0067; kurtosis 4.7 at
    k / nnz = 256, 16.6 at 2048) over 60 seeds: the mean within 6 of its standard errors of the
    formula (the 60 draws are i.i.d.; Student's t with 59 degrees of freedom leaves that band with
    probability about 1e-7, and the draws' right skew, a few large spike collisions, is averaged
    over 60). Pairs sharing a bucket with probability 1 / k instead of nnz / k (the blocks not
    independent) give a formula over 40% lower at nnz 4 and 8, which the draws must also reject by
    6 standard errors."""
    d, n = 20_000, 60
    rng = np.random.default_rng(5)
    x = rng.standard_normal(d)
    x[rng.choice(d, 100, replace=False)] = 30.0 * rng.choice([-1.0, 1.0], 100)
    s2, s4 = float(np.sum(x**2)), float(np.sum(x**4))
    expected = (s4 + 3 * (nnz / k) * (s2**2 - s4)) / nnz
    rows = torch.tensor(x[None], dtype=torch.float64)
    draws = np.array([float((Projector(ProjectionConfig(kind="sparse", dim=k, nnz=nnz, seed=500 + i), d)(rows)
                             .double() ** 4).sum()) for i in range(n)])
    se = draws.std(ddof=1) / math.sqrt(n)
    assert abs(draws.mean() - expected) <= 6 * se
    wrong = (s4 + 3 * (1 / k) * (s2**2 - s4)) / nnz
    assert nnz == 1 or abs(draws.mean() - wrong) > 6 * se


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_johnson_lindenstrauss_norms_and_cosines(kind):
    """k = 8192: norms and cosines of 64 pairs of unit vectors (d = 1024) preserved within bands
    from theory, each check given FAIL_PROB / 4.

    Each pair lives on its own block of 16 input coordinates (half with heavy-tailed entries), so
    the pairs meet disjoint rows of R and are independent. With ``r = ||Rx||^2 / ||x||^2``:

    * every ``|r - 1| <= eps`` from the JL tail bound ``2 exp(-k (eps^2/4 - eps^3/6))``, valid
      for Gaussian and Rademacher R (eps = 0.104, 6.7 sd of ``sqrt(2/k)``);
    * the mean of ``r`` over the 64 first vectors: for Gaussian R ``k r ~ chi^2_k`` exactly, so the
      mean has sd ``sqrt(2 / (64 k))``; Rademacher's is smaller (its entries' fourth moment is 1,
      not 3). Band: ``sd_band`` = 6.2 sd. A scale off by 1% moves the mean by 2%, 10 sd;
    * projected cosines ``c'`` estimate ``c`` with sd ``(1 - c^2) / sqrt(k)``; Fisher's
      ``atanh(c') - atanh(c)`` has sd ``1/sqrt(k)`` whatever ``c`` (Rademacher's is again
      smaller). Every pair within ``sd_band`` sd;
    * the standardised errors ``z = sqrt(k) (atanh c' - atanh c)`` are independent, so
      ``sum z^2`` stays below the Laurent-Massart bound of ``chi^2_64`` (157): columns of a
      Gaussian R repeated in groups of four (an effective k / 4) make it about 256."""
    n, k = 64, 8192
    fail = FAIL_PROB / 4
    cosines = np.tile([0.0, 0.3, -0.6, 0.9], n // 4)
    x, y = block_pairs(cosines, 16, seed=11, heavy_tailed=[i % 2 == 1 for i in range(n)])
    proj = Projector(ProjectionConfig(kind=kind, dim=k, seed=21, chunk_size=256), x.shape[1])
    out = proj(torch.tensor(np.vstack([x, y]), dtype=torch.float32)).double().numpy()
    px, py = out[:n], out[n:]
    ratio = np.concatenate([(px**2).sum(1), (py**2).sum(1)])  # the inputs are unit vectors
    assert np.abs(ratio - 1).max() <= jl_epsilon(k, fail / (2 * n))
    assert abs(ratio[:n].mean() - 1) <= sd_band(fail) * math.sqrt(2 / (n * k))
    c_proj = (px * py).sum(1) / np.sqrt((px**2).sum(1) * (py**2).sum(1))
    z = math.sqrt(k) * (np.arctanh(c_proj) - np.arctanh(cosines))
    assert np.abs(z).max() <= sd_band(fail / n)
    assert (z**2).sum() <= chi2_upper(n, fail)


def test_config_validation():
    with pytest.raises(ConfigError, match="kind"):
        ProjectionConfig(kind="countsketch")
    with pytest.raises(ConfigError, match="dim"):
        ProjectionConfig(dim=0)
    with pytest.raises(ConfigError, match="even"):
        ProjectionConfig(kind="gaussian", dim=7)
    with pytest.raises(ConfigError, match="seed"):
        ProjectionConfig(seed=-1)
    for nnz in (0, -2, 5, 7, 64, 128):  # not a positive divisor of 96
        with pytest.raises(ConfigError, match="nnz"):
            ProjectionConfig(kind="sparse", dim=96, nnz=nnz)
    for kind in ("rademacher", "gaussian", "none"):
        with pytest.raises(ConfigError, match="nnz"):
            ProjectionConfig(kind=kind, dim=96, nnz=2)
    for nnz in (1, 2, 3, 32, 96):
        assert ProjectionConfig(kind="sparse", dim=96, nnz=nnz).out_dim(1000) == 96


def test_identity_records_nnz_for_sparse_only():
    # dense manifests keep exactly the keys they had before the sparse kind existed
    for kind in ("rademacher", "gaussian"):
        cfg = ProjectionConfig(kind=kind, dim=64, seed=3, chunk_size=7, compute_dtype="bfloat16")
        assert cfg.identity(100) == {"kind": kind, "dim": 64, "seed": 3, "input_dim": 100}
    sparse = ProjectionConfig(kind="sparse", dim=64, nnz=4, seed=3)
    assert sparse.identity(100) == {"kind": "sparse", "dim": 64, "seed": 3, "input_dim": 100, "nnz": 4}
    assert ProjectionConfig(kind="sparse", dim=64, nnz=2, seed=3).identity(100) != sparse.identity(100)


def test_kind_none_is_the_identity():
    d = 300
    cfg = ProjectionConfig(kind="none", dim=64, seed=3, chunk_size=7)
    assert cfg.out_dim(d) == d
    assert cfg.identity(d) == {"kind": "none", "dim": d, "seed": 3, "input_dim": d}
    p = Projector(cfg, d)
    assert p.out_dim == d
    x = torch.randn(5, d, generator=torch.Generator().manual_seed(3))
    out = p(x)
    assert out.dtype == torch.float32 and out.shape == (5, d)
    assert torch.equal(out, x)
    parts = p.project(x[:, :120], 0) + p.project(x[:, 120:], 120)
    assert torch.equal(parts, x)
    np.testing.assert_array_equal(project_reference(cfg, x.double().numpy()), x.double().numpy())
    with pytest.raises(ValueError):
        p.project(x[:, :10], 295)
