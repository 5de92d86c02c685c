"""Random projection: exact agreement with the dense reference, invariances, JL guarantees."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

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


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("chunk", [1, 5, 64, 1000])
def test_chunked_entries_equal_dense_reference(kind, chunk):
    cfg = ProjectionConfig(kind=kind, dim=96, seed=12345, chunk_size=chunk)
    ref = dense_reference(cfg, 70)
    got = torch.cat([matrix_rows(cfg, a, min(a + chunk, 70)) for a in range(0, 70, chunk)]).double().numpy()
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_entries_at_large_row_indices_equal_reference(kind):
    # input coordinates beyond 2^32 use the high word of the index
    cfg = ProjectionConfig(kind=kind, dim=40, seed=2**40 + 3)
    first = 2**33 + 17
    np.testing.assert_array_equal(matrix_rows(cfg, first, first + 9).double().numpy(), dense_reference(cfg, 9, first))
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


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("batch,chunk", [(1, 7), (3, 64), (16, 333), (5, 5000)])
def test_projection_matches_float64_reference(kind, batch, chunk):
    d = 300
    cfg = ProjectionConfig(kind=kind, dim=128, seed=3, chunk_size=chunk)
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


def test_blocks_sum_to_whole_projection():
    d = 500
    cfg = ProjectionConfig(dim=64, seed=9, chunk_size=37)
    x = torch.randn(4, d, generator=torch.Generator().manual_seed(0))
    p = Projector(cfg, d)
    whole = p(x)
    parts = p.project(x[:, :123], 0) + p.project(x[:, 123:400], 123) + p.project(x[:, 400:], 400)
    torch.testing.assert_close(parts, whole, rtol=FP32_REL_TOL, atol=PROJ_ATOL)
    with pytest.raises(ValueError):
        p.project(x[:, :10], 495)


def test_same_input_same_batch_same_bytes():
    d = 1000
    cfg = ProjectionConfig(dim=512, seed=5, chunk_size=100)
    x = torch.randn(6, d, generator=torch.Generator().manual_seed(2))
    a = Projector(cfg, d)(x).numpy().tobytes()
    b = Projector(cfg, d)(x.clone()).numpy().tobytes()
    assert a == b


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
        ProjectionConfig(kind="sparse")
    with pytest.raises(ConfigError, match="dim"):
        ProjectionConfig(dim=0)
    with pytest.raises(ConfigError, match="even"):
        ProjectionConfig(kind="gaussian", dim=7)
    with pytest.raises(ConfigError, match="seed"):
        ProjectionConfig(seed=-1)
