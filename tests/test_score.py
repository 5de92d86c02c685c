"""Scoring: fast blocked path vs float64 reference, hand-computed aggregation, invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import write_store
from qless.errors import StoreMismatchError
from qless.project import ProjectionConfig, Projector
from qless.quantize import QuantizerSpec, quantize_reference
from qless.scoring import (
    ScoreConfig,
    aggregate_reference,
    influence_reference,
    read_scores,
    score,
    target_groups,
    write_scores,
)
from qless.store import Datastore
from utils import (
    ANGLE_ATOL,
    FAIL_PROB,
    SCORE_ATOL,
    angle,
    binomial_band,
    cosine,
    rows_at_angles,
)


def _target_rows(n_sub=(3, 2, 4), tasks=("mmlu", "bbh")):
    rows = []
    for t in tasks:
        for s, n in enumerate(n_sub):
            rows += [{"source": t, "id": f"{t}-{s}-{i}", "subtask": f"sub{s}"} for i in range(n)]
    return rows


def _stores(tmp_path, tag, n_pool=60, k=256, shards=1, lrs=(2e-5, 1e-5)):
    g = torch.Generator().manual_seed(0)
    trows = _target_rows()
    pool, targets = [], []
    shared = torch.randn(n_pool, k, generator=g)
    for c, lr in enumerate(lrs):
        name = f"epoch-{c + 1}"
        xp = shared + 0.7 * torch.randn(n_pool, k, generator=g)  # checkpoints correlated, not equal
        xt = torch.randn(len(trows), k, generator=g) + shared[: len(trows)] * 0.5
        pool.append(write_store(tmp_path / tag / "pool" / name, xp, tag, checkpoint=name, lr=lr, shards=shards))
        targets.append(write_store(tmp_path / tag / "target" / name, xt, tag, checkpoint=name, lr=lr, rows=trows, gradient="sgd"))
    return [Datastore.open(p) for p in pool], [Datastore.open(t) for t in targets], trows


@pytest.mark.parametrize("tag", ["fp32", "fp16", "absmax8", "absmean4", "absmean2", "sign1"])
@pytest.mark.parametrize("how", ["max", "mean"])
def test_fast_scores_equal_float64_reference(tmp_path, tag, how):
    pool, targets, trows = _stores(tmp_path, tag)
    fast = score(pool, targets, ScoreConfig(block_rows=17, aggregation=how), progress=False)
    ref = aggregate_reference(influence_reference(pool, targets), trows, how)
    agg = fast.aggregate(how)
    assert set(agg) == {"mmlu", "bbh"}
    for task in agg:
        np.testing.assert_allclose(agg[task], ref[task], rtol=0, atol=SCORE_ATOL)


def _unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_hand_computed_two_subtasks_two_checkpoints(tmp_path):
    # eta = (3, 1) / 4; targets: subtask s1 = {e1, e2}, s2 = {e3}, the same at both checkpoints
    trows = [{"source": "t", "id": "a", "subtask": "s1"}, {"source": "t", "id": "b", "subtask": "s1"},
             {"source": "t", "id": "c", "subtask": "s2"}]
    tx = np.eye(4, dtype=np.float32)[:3] * np.array([[2.0], [0.5], [3.0]], dtype=np.float32)  # scale must not matter
    pool_a = np.stack([_unit([1, 1, 0, 0]), _unit([0, 0, 0, 1])])
    pool_b = np.stack([_unit([0, 0, 1, 0]), _unit([5, 0, 0, 0])])
    pool = [Datastore.open(write_store(tmp_path / "p1", pool_a, "fp32", checkpoint="A", lr=3.0)),
            Datastore.open(write_store(tmp_path / "p2", pool_b, "fp32", checkpoint="B", lr=1.0))]
    targets = [Datastore.open(write_store(tmp_path / "t1", tx, "fp32", checkpoint="A", lr=3.0, rows=trows)),
               Datastore.open(write_store(tmp_path / "t2", tx, "fp32", checkpoint="B", lr=1.0, rows=trows))]
    s = score(pool, targets, progress=False)
    r = math.sqrt(0.5)
    # row 0: Inf(a) = Inf(b) = 0.75 r, Inf(c) = 0.25 -> s1 = 0.75 r, s2 = 0.25
    # row 1: Inf(a) = 0.25, others 0          -> s1 = 0.125,  s2 = 0
    np.testing.assert_allclose(s.values, [[0.75 * r, 0.25], [0.125, 0.0]], atol=1e-6)
    np.testing.assert_allclose(s.aggregate("max")["t"], [0.75 * r, 0.125], atol=1e-6)
    np.testing.assert_allclose(s.aggregate("mean")["t"], [(0.75 * r + 0.25) / 2, 0.0625], atol=1e-6)
    np.testing.assert_allclose(s.weights, [0.75, 0.25])
    uni = score(pool, targets, ScoreConfig(weights="uniform"), progress=False)
    np.testing.assert_allclose(uni.values[1], [0.25, 0.0], atol=1e-6)


def test_subtasks_come_from_rows():
    g = target_groups(_target_rows(n_sub=(2, 1)))
    assert g.subtasks == [("mmlu", "sub0"), ("mmlu", "sub1"), ("bbh", "sub0"), ("bbh", "sub1")]
    assert g.tasks == ["mmlu", "bbh"] and g.columns("bbh") == [2, 3]
    g2 = target_groups([{"source": "qa", "id": "1"}, {"source": "qa", "id": "2"}])
    assert g2.subtasks == [("qa", "qa")]


def test_sharded_pool_scores_equal_single_store(tmp_path):
    p1, t1, _ = _stores(tmp_path / "one", "absmean4", shards=1)
    p3, t3, _ = _stores(tmp_path / "three", "absmean4", shards=3)
    a = score(p1, t1, progress=False).values
    b = score(p3, t3, progress=False).values
    np.testing.assert_array_equal(a, b)


def test_block_size_does_not_change_scores(tmp_path):
    pool, targets, _ = _stores(tmp_path, "sign1")
    a = score(pool, targets, ScoreConfig(block_rows=7), progress=False).values
    b = score(pool, targets, ScoreConfig(block_rows=10_000), progress=False).values
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def _reference_reconstruction(x: np.ndarray, spec: QuantizerSpec) -> np.ndarray:
    """``x'`` of float64 rows as the float64 reference defines it: ``codes * S / alpha`` from
    quantize_reference (fp16: the float16-rounded unit vector ``x / ||x||``, the scale is irrelevant)."""
    if spec.method == "float":
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).astype(np.float64)
    q, s = quantize_reference(x, spec)
    return q * (s / spec.alpha)[:, None]


@pytest.mark.parametrize("tag", ["absmax8", "absmax4", "absmax2", "absmean8", "absmean4", "absmean2", "fp16"])
def test_quantized_scores_within_angle_bound_of_exact_cosine(tmp_path, tag):
    """Quantization moves a row ``x`` to ``x'`` by the angle ``b(x) = angle(x, x')`` (at most
    ``arcsin(||e|| / ||x||)`` for ``e = x' - x``), so by the triangle inequality on the sphere
    ``|angle(x', y') - angle(x, y)| <= b(x) + b(y)`` and, cos being 1-Lipschitz,
    ``|cos(x', y') - cos(x, y)| <= b(x) + b(y)``. Scores are eta-weighted subtask means of such
    cosines, so each score lies within the same weighted mean of ``b(pool) + b(target)`` of the
    exact float64 score of the unquantized rows; ``x'`` comes from the float64 reference
    quantizer, not from the code under test. The bound is a worst case (about 4e-4 for fp16,
    0.015 for absmax8, 1 to 2 at 2 bits); the scores must also equal, within SCORE_ATOL, the
    exact float64 score of the reference's ``x'``. Pool rows have cosines with the targets across (-1, 1), plus a
    1e-7-sized row and a row with outliers. Wrong codes or scales in the stores (floor for round,
    a shifted bin edge, the wrong scale statistic), the wrong target rows in a subtask, or uniform
    instead of lr weights break the equality; gross errors (a flipped sign, a row scored against
    the wrong target) break the bound too."""
    spec = QuantizerSpec.parse(tag)
    n, k = 40, 1024
    trows = [{"source": "t", "id": str(i), "subtask": "s0" if i < 2 else "s1"} for i in range(3)]
    mean_of = np.array([[0.5, 0.0], [0.5, 0.0], [0.0, 1.0]])  # target rows -> subtask means
    rng = np.random.default_rng(8)
    exact, exact_quantized, bound, pool, targets = 0.0, 0.0, 0.0, [], []
    for c, lr, eta in (("A", 3e-5, 0.75), ("B", 1e-5, 0.25)):  # eta: the learning rates normalised
        t = rng.standard_normal((3, k))
        x = rng.uniform(-1.5, 1.5, (n, 3)) @ t + rng.uniform(0.1, 3.0, (n, 1)) * rng.standard_normal((n, k))
        x[0] *= 1e-7  # LoRA-gradient-sized
        x[1, :5] *= 50  # outliers
        x, t = x.astype(np.float32).astype(np.float64), t.astype(np.float32).astype(np.float64)  # what the stores get
        pool.append(Datastore.open(write_store(tmp_path / f"p{c}", x, spec, checkpoint=c, lr=lr, batch=64)))
        targets.append(Datastore.open(write_store(tmp_path / f"t{c}", t, spec, checkpoint=c, lr=lr, rows=trows)))
        x_rec, t_rec = _reference_reconstruction(x, spec), _reference_reconstruction(t, spec)
        b_x, b_t = angle(x, x_rec), angle(t, t_rec)
        for v, v_rec, b in ((x, x_rec, b_x), (t, t_rec, b_t)):  # the angle is within arcsin(||e|| / ||x||)
            ratio = np.linalg.norm(v_rec - v, axis=1) / np.linalg.norm(v, axis=1)
            assert np.all(b <= np.where(ratio < 1, np.arcsin(np.minimum(ratio, 1)), np.pi) + ANGLE_ATOL)
        exact = exact + eta * cosine(x[:, None, :], t[None, :, :]) @ mean_of
        exact_quantized = exact_quantized + eta * cosine(x_rec[:, None, :], t_rec[None, :, :]) @ mean_of
        bound = bound + eta * (b_x[:, None] + b_t[None, :]) @ mean_of
    got = score(pool, targets, progress=False).values
    assert np.all(np.abs(got - exact) <= bound + SCORE_ATOL)
    np.testing.assert_allclose(got, exact_quantized, rtol=0, atol=SCORE_ATOL)


def test_sign_scores_follow_the_sign_law(tmp_path):
    """sign1 scores of Gaussian-projected rows at known angles from the target (d = 2048, k = 4096):
    the signs of a row and the target differ at each coordinate with probability ``theta / pi``,
    independently, so the 1-bit cosine is ``1 - 2 D / k`` with ``D ~ Binomial(k, theta / pi)``.
    Each pool row's score (write_store + score, one target row, one checkpoint) lies in the exact
    binomial band (FAIL_PROB over the rows), +-0.04 at 10 degrees to +-0.08 at 90. The band around ``1 - 2 theta / pi``
    excludes ``cos(theta)`` below 90 degrees, so scoring that recovered the float cosine, flipped a
    sign or dropped rows would fail."""
    d, k = 2048, 4096
    degrees = [10, 20, 30, 45, 60, 75, 90]
    t, p = rows_at_angles(d, np.radians(degrees), seed=2)
    proj = Projector(ProjectionConfig(kind="gaussian", dim=k, seed=5, chunk_size=512), d)
    y = proj(torch.tensor(np.vstack([t, p]), dtype=torch.float32))
    pool = Datastore.open(write_store(tmp_path / "pool", y[1:], "sign1"))
    target = Datastore.open(write_store(tmp_path / "target", y[:1], "sign1", rows=[{"source": "t", "id": "0"}]))
    got = score([pool], [target], progress=False).values[:, 0]
    for a, s in zip(degrees, got):
        lo, hi = binomial_band(k, math.radians(a) / math.pi, FAIL_PROB / len(degrees))
        assert 1 - 2 * hi / k - SCORE_ATOL <= s <= 1 - 2 * lo / k + SCORE_ATOL
        assert a == 90 or not 1 - 2 * hi / k <= math.cos(math.radians(a)) <= 1 - 2 * lo / k


def test_row_missing_at_one_checkpoint_gets_no_score(tmp_path):
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
    rows = [{"source": "pool", "id": str(i)} for i in range(10)]
    trows = [{"source": "t", "id": "0"}]
    t = torch.randn(1, 64)
    pool = [Datastore.open(write_store(tmp_path / "a", x, "sign1", checkpoint="A", rows=rows)),
            Datastore.open(write_store(tmp_path / "b", x[[0, 1, 2, 4, 5, 6, 7, 8, 9]], "sign1", checkpoint="B",
                                       rows=rows[:3] + rows[4:]))]
    targets = [Datastore.open(write_store(tmp_path / "ta", t, "sign1", checkpoint="A", rows=trows)),
               Datastore.open(write_store(tmp_path / "tb", t, "sign1", checkpoint="B", rows=trows))]
    s = score(pool, targets, progress=False).values[:, 0]
    assert np.isnan(s[3]) and not np.isnan(np.delete(s, 3)).any()
    full = score(pool[:1], targets[:1], progress=False).values[:, 0]
    np.testing.assert_allclose(np.delete(s, 3), np.delete(full, 3), atol=1e-6)  # equal weights, equal vectors


def test_mismatched_stores_refused(tmp_path):
    x = torch.randn(8, 64)
    trows = [{"source": "t", "id": "0"}]
    p = Datastore.open(write_store(tmp_path / "p", x, "sign1", checkpoint="A"))
    t_other_ckpt = Datastore.open(write_store(tmp_path / "t1", x[:1], "sign1", checkpoint="B", rows=trows))
    with pytest.raises(StoreMismatchError, match="checkpoints"):
        score([p], [t_other_ckpt], progress=False)
    t_other_seed = Datastore.open(write_store(tmp_path / "t2", x[:1], "sign1", checkpoint="A", rows=trows, seed=9))
    with pytest.raises(StoreMismatchError, match=r"projection\.seed"):
        score([p], [t_other_seed], progress=False)


def test_write_and_read_scores(tmp_path):
    pool, targets, _ = _stores(tmp_path, "absmean2")
    s = score(pool, targets, progress=False)
    out = write_scores(tmp_path / "scores", s, pool, targets, ScoreConfig())
    manifest, values, rows = read_scores(out)
    assert manifest["tasks"] == ["mmlu", "bbh"] and len(manifest["subtasks"]) == 6
    assert values.shape == (60, 2) and len(rows) == 60 and rows[0] == {"source": "pool", "id": "0"}
    np.testing.assert_allclose(values[:, 1], s.aggregate("max")["bbh"])
    assert [c["weight"] for c in manifest["checkpoints"]] == pytest.approx([2 / 3, 1 / 3])


def test_every_checkpoint_of_the_warmup_is_required(tmp_path):
    from qless.errors import StoreError

    both = ["epoch-1", "epoch-2"]
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    trows = [{"source": "t", "id": "0"}]
    for c in both:
        write_store(tmp_path / "pool" / c, x, "sign1", checkpoint=c, warmup=both)
        write_store(tmp_path / "target" / c, x[:1], "sign1", checkpoint=c, rows=trows, warmup=both)
    from qless.store import open_by_checkpoint

    assert score(open_by_checkpoint([tmp_path / "pool"]), open_by_checkpoint([tmp_path / "target"]), progress=False)
    import shutil

    shutil.rmtree(tmp_path / "pool" / "epoch-2")
    shutil.rmtree(tmp_path / "target" / "epoch-2")
    with pytest.raises(StoreError, match="lack checkpoint.s. epoch-2 of the warmup"):
        score(open_by_checkpoint([tmp_path / "pool"]), open_by_checkpoint([tmp_path / "target"]), progress=False)
