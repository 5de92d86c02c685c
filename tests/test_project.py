"""Random projection: exact agreement with the dense reference, invariances, JL guarantees."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qless.errors import ConfigError
from qless.project import ProjectionConfig, Projector, dense_reference, matrix_rows, project_reference

# float32 accumulation over d <= 4096 terms of magnitude <= |x|: relative error well under 1e-5.
FP32_REL_TOL = 1e-5
# bfloat16 operands (8-bit mantissa) and per-chunk bf16 partial sums: about 0.3% relative error.
BF16_REL_TOL = 1.5e-2


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
    torch.testing.assert_close(parts, whole, rtol=FP32_REL_TOL, atol=1e-6)
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
def test_johnson_lindenstrauss_norms_and_inner_products(kind):
    """k = 8192: squared norms and inner products of 200 random vectors (d = 1024) preserved.

    For sub-Gaussian projections P(|‖Rx‖²/‖x‖² - 1| > eps) <= 2 exp(-k (eps²/2 - eps³/3) / 2),
    about 1e-8 at eps = 0.1; inner products of unit vectors are then within 2 eps by
    polarisation. The mean ratio must also be unbiased within 5 standard errors (sd sqrt(2/k))."""
    d, n, k, eps = 1024, 200, 8192, 0.1
    rng = np.random.default_rng(11)
    x = rng.standard_normal((n, d))
    x[: n // 2] *= rng.exponential(size=(n // 2, d))  # heavier-tailed inputs too
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = Projector(ProjectionConfig(kind=kind, dim=k, seed=21, chunk_size=256), d)(torch.tensor(x, dtype=torch.float32)).double().numpy()
    ratio = (y**2).sum(axis=1)
    assert np.abs(ratio - 1).max() < eps
    assert abs(ratio.mean() - 1) < 5 * math.sqrt(2 / k) / math.sqrt(n)
    ip_true = x[:50] @ x[50:100].T
    ip_proj = y[:50] @ y[50:100].T
    assert np.abs(ip_proj - ip_true).max() < 2 * eps
    # typical error is about sqrt(1/k) ~ 0.011 for near-orthogonal unit vectors
    assert np.abs(ip_proj - ip_true).std() < 3 / math.sqrt(k)


def test_config_validation():
    with pytest.raises(ConfigError, match="kind"):
        ProjectionConfig(kind="sparse")
    with pytest.raises(ConfigError, match="dim"):
        ProjectionConfig(dim=0)
    with pytest.raises(ConfigError, match="even"):
        ProjectionConfig(kind="gaussian", dim=7)
    with pytest.raises(ConfigError, match="seed"):
        ProjectionConfig(seed=-1)
