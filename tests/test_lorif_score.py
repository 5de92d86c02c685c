"""LoRIF curvature and scoring: Nystrom against eigh, Woodbury against the explicit inverse, factors
against rebuilt gradients, the store driver against a float64 reference, refusals and the CLI."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import replace

import numpy as np
import peft
import pytest
import torch

from conftest import make_tiny_llama, write_store
from qless.cli import main
from qless.errors import StoreMismatchError
from qless.gradients import IGNORE_INDEX
from qless.lorif.capture import LayerCapture
from qless.lorif.curvature import (
    Curvature,
    CurvatureConfig,
    fit_blocks,
    fit_curvature,
    fit_curvature_folder,
    nystrom,
    read_curvature,
    read_curvatures,
    sketch_matrix,
)
from qless.lorif.factors import FactorLayout
from qless.lorif.reference import exact_curvature, lorif_reference
from qless.lorif.score import Factors, Preconditioner, coordinates, influence, lorif_score, self_influence
from qless.lorif.stores import all_factor_rows
from qless.project import ProjectionConfig
from qless.quantize import QuantizerSpec, decode_codes, quantize
from qless.scoring import ScoreConfig, aggregate_reference, read_scores, score
from qless.store import Datastore, ShardWriter, finalize, new_manifest
from utils import LORIF_FLOAT32_TOL, NYSTROM_EXACT_RTOL, WOODBURY_FLOAT64_RTOL

LAYERS = [("m.0.q", 6, 6), ("m.0.v", 4, 4), ("m.1.q", 6, 6)]  # width 64 at c = 2: packs at any bit width
TROWS = ([{"source": "mmlu", "id": f"m{i}", "subtask": f"s{i % 3}"} for i in range(7)]
         + [{"source": "bbh", "id": f"b{i}", "subtask": f"t{i % 2}"} for i in range(4)])


# -- helpers -----------------------------------------------------------------------------------


def _identity(layout: FactorLayout, side: int = 6, seed: int = 0) -> dict:
    return {"kind": "lorif", "dim": layout.width, "seed": seed, "input_dim": 999, "side": side, "rank": layout.rank,
            "layers": "lora", "layer_list": [[lay.name, lay.k_out, lay.k_in] for lay in layout.layers]}


def write_factor_store(path, rows, layout, spec="fp32", *, checkpoint="epoch-1", lr=1e-5, trows=None, seed=0,
                       warmup=None, batch=5):
    """A finalised LoRIF store of factor ``rows [n, width]`` (a manifest as extraction writes it)."""
    spec = QuantizerSpec.parse(spec)
    rows = torch.as_tensor(rows, dtype=torch.float32)
    table = trows if trows is not None else [{"source": "pool", "id": str(i)} for i in range(len(rows))]
    manifest = new_manifest(projection=_identity(layout, seed=seed), quantizer=spec,
                            checkpoint={"name": checkpoint, "learning_rate": lr}, gradient="sgd",
                            model={"name": "test-model"}, adapter={"r": 4}, warmup_checkpoints=warmup)
    w = ShardWriter(path, manifest, "00000")
    for a in range(0, len(rows), batch):
        codes, scales = quantize(rows[a:a + batch], spec)
        w.append(codes, scales, table[a:a + batch], consumed=w.consumed + len(codes))
    w.finish()
    finalize(path)
    return Datastore.open(path)


def _factor_rows(n, layout, seed, shared=None):
    """Random factor rows whose gradients share a few directions (so the curvature has structure)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, layout.width, generator=g, dtype=torch.float64)
    if shared is not None:
        rows[:, : shared.shape[1]] += torch.randn(n, len(shared), generator=g, dtype=torch.float64) @ shared
    return rows


def _stores(tmp_path, spec="fp32", lrs=(2e-5, 1e-5), n_pool=23):
    layout = FactorLayout(LAYERS, rank=2)
    g = torch.Generator().manual_seed(5)
    shared = torch.randn(3, layout.width, generator=g, dtype=torch.float64)
    names = [f"epoch-{c + 1}" for c in range(len(lrs))]
    pool, targets = [], []
    for c, (name, lr) in enumerate(zip(names, lrs)):
        pool.append(write_factor_store(tmp_path / spec / "pool" / name, _factor_rows(n_pool, layout, 10 + c, shared),
                                       layout, spec, checkpoint=name, lr=lr, warmup=names))
        targets.append(write_factor_store(tmp_path / spec / "target" / name, _factor_rows(len(TROWS), layout, 20 + c, shared),
                                          layout, spec, checkpoint=name, lr=lr, trows=TROWS, warmup=names))
    return pool, targets, layout


def _explicit(gp: torch.Tensor, gt: torch.Tensor, g_fit: torch.Tensor, damping: float) -> torch.Tensor:
    """``gp (G^T G / N + lambda I)^-1 gt^T`` by a dense solve, lambda = damping x trace / D (float64)."""
    a = exact_curvature(g_fit)
    lam = damping * float(torch.trace(a)) / len(a)
    return gp @ torch.linalg.solve(a + lam * torch.eye(len(a), dtype=torch.float64), gt.T)


# -- Nystrom -----------------------------------------------------------------------------------


def test_nystrom_recovers_an_exactly_low_rank_psd_matrix():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(40, 5, generator=gen, dtype=torch.float64) @ torch.randn(5, 48, generator=gen, dtype=torch.float64)
    a = exact_curvature(g)  # rank 5
    omega = sketch_matrix(48, 9, torch.Generator().manual_seed(1))
    lam, vec = nystrom(a @ omega, omega, 5)
    want_lam, want_vec = torch.linalg.eigh(a)
    want_lam, want_vec = want_lam.flip(0)[:5], want_vec.flip(1)[:, :5]
    top = float(want_lam[0])
    assert (lam - want_lam).abs().max() <= NYSTROM_EXACT_RTOL * top
    # the same subspace and the same matrix
    torch.testing.assert_close(vec @ vec.T, want_vec @ want_vec.T, rtol=0, atol=NYSTROM_EXACT_RTOL * 10)
    torch.testing.assert_close(vec @ torch.diag(lam) @ vec.T, a, rtol=0, atol=NYSTROM_EXACT_RTOL * top)


def test_nystrom_is_within_the_randomized_bound_of_the_top_eigenpairs():
    # A = Q diag(spectrum) Q^T with r = 6 large eigenvalues and a tail from 1e-9 down. The Nystrom error is
    # ||A - A_nys|| = ||(I - P) A^(1/2)||^2 (P the projector on range(A^(1/2) Omega)), and Halko, Martinsson, Tropp
    # (2011, Thm 10.8) bound ||(I - P) M|| <= (1 + 11 sqrt(s) sqrt(D)) sigma_(r+1)(M) except with probability
    # 6 p^-p (p = s - r = 10: 6e-10). Truncation to rank r adds at most lambda_(r+1) (A_nys <= A), and by Weyl each
    # of the top r eigenvalues moves by at most the norm of the error.
    d, r, p = 64, 6, 10
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([5.0, 3.0, 2.0, 1.5, 1.0, 0.5], dtype=torch.float64),
                          1e-9 * 0.9 ** torch.arange(d - r, dtype=torch.float64)])
    a = q @ torch.diag(spectrum) @ q.T
    omega = sketch_matrix(d, r + p, torch.Generator().manual_seed(4))
    lam, vec = nystrom(a @ omega, omega, r)
    bound = (1 + 11 * math.sqrt((r + p) * d)) ** 2 * 1e-9 + 1e-9
    assert float(torch.linalg.matrix_norm(a - vec @ torch.diag(lam) @ vec.T, ord=2)) <= bound
    assert float((lam - spectrum[:r]).abs().max()) <= bound
    assert bound < 1e-3 * float(spectrum[r - 1])  # the bound says something about the kept eigenpairs


def test_fit_from_a_store_is_the_exact_eigendecomposition_at_full_rank_and_block_invariant(tmp_path):
    layout = FactorLayout(LAYERS, rank=2)
    rows = _factor_rows(17, layout, 0)
    store = write_factor_store(tmp_path / "pool", rows, layout)
    g = layout.reconstruct(all_factor_rows(store, dtype=torch.float64))  # the stored rows, as the fit reads them
    full = CurvatureConfig(rank=30, oversample=0, block_rows=4)
    curv = fit_curvature(store, full, progress=False)
    at = 0
    for block, lay in zip(curv.blocks, layout.layers):
        a = exact_curvature(g[:, at:at + lay.dim])
        at += lay.dim
        vec = block.eigenvectors.double()
        torch.testing.assert_close(vec.T @ torch.diag(block.eigenvalues) @ vec, a, rtol=0,
                                   atol=NYSTROM_EXACT_RTOL * float(torch.linalg.matrix_norm(a, ord=2)))
        assert block.trace == pytest.approx(float(torch.trace(a)), rel=1e-12)
    # one block of all layers holds the cross-layer terms too
    whole = fit_curvature(store, CurvatureConfig(rank=100, oversample=0, scope="all"), progress=False).blocks[0]
    vec = whole.eigenvectors.double()
    torch.testing.assert_close(vec.T @ torch.diag(whole.eigenvalues) @ vec, exact_curvature(g), rtol=0,
                               atol=NYSTROM_EXACT_RTOL * float(torch.linalg.matrix_norm(exact_curvature(g), ord=2)))
    # streaming in other blocks changes only float64 summation order
    other = fit_curvature(store, CurvatureConfig(rank=4, block_rows=1000), progress=False)
    again = fit_curvature(store, CurvatureConfig(rank=4, block_rows=3), progress=False)
    for x, y in zip(other.blocks, again.blocks):
        torch.testing.assert_close(x.eigenvalues, y.eigenvalues, rtol=NYSTROM_EXACT_RTOL, atol=0)


# -- Woodbury on a tiny model ------------------------------------------------------------------


@functools.cache
def _tiny_rows(n_pool=14, n_target=4):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          init_lora_weights=False)
    torch.manual_seed(1)
    model = peft.get_peft_model(make_tiny_llama(320), cfg).to(torch.float64).eval()
    cap = LayerCapture(model, ProjectionConfig(kind="lorif", dim=4, rank=3, seed=2))
    out = []
    for n, seed in ((n_pool, 0), (n_target, 1)):
        gen = torch.Generator().manual_seed(seed)
        lengths = [int(x) for x in torch.randint(5, 12, (n,), generator=gen)]
        ids = torch.randint(0, 320, (n, max(lengths)), generator=gen)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for b, t in enumerate(lengths):
            mask[b, :t] = 1
            labels[b, t // 2:t] = ids[b, t // 2:t]
        rows, _ = cap({"input_ids": ids, "attention_mask": mask, "labels": labels})
        out.append(rows.double())
    return cap.layout, out[0], out[1]


@pytest.mark.parametrize("normalize", ["raw", "cosine"])
def test_woodbury_scores_equal_the_explicit_damped_inverse_on_a_tiny_model(normalize):
    layout, pool_rows, target_rows = _tiny_rows()
    blocks, n = fit_blocks(layout, [pool_rows[:9], pool_rows[9:]], CurvatureConfig(rank=16, oversample=0))
    assert n == len(pool_rows) and all(lay.dim == 16 for lay in layout.layers)  # full rank: the exact G^T G / N
    pre = Preconditioner.from_curvature(Curvature(layout, blocks, {"damping": 0.1}), None, torch.device("cpu"),
                                        torch.float64)
    sp, st = Factors.of(layout, pool_rows), Factors.of(layout, target_rows)
    cp, ct = coordinates(sp, pre), coordinates(st, pre)
    got = influence(sp, cp, st, ct, pre)
    gp, gt = layout.reconstruct(pool_rows), layout.reconstruct(target_rows)
    want = torch.zeros_like(got)
    hp, ht = torch.zeros(len(gp), dtype=torch.float64), torch.zeros(len(gt), dtype=torch.float64)
    at = 0
    for lay in layout.layers:
        cols = slice(at, at + lay.dim)
        at += lay.dim
        want += _explicit(gp[:, cols], gt[:, cols], gp[:, cols], 0.1)
        hp += torch.diagonal(_explicit(gp[:, cols], gp[:, cols], gp[:, cols], 0.1))
        ht += torch.diagonal(_explicit(gt[:, cols], gt[:, cols], gp[:, cols], 0.1))
    torch.testing.assert_close(self_influence(sp, cp, pre), hp, rtol=WOODBURY_FLOAT64_RTOL, atol=0)
    if normalize == "cosine":
        got = got / self_influence(sp, cp, pre).sqrt()[:, None] / self_influence(st, ct, pre).sqrt()[None, :]
        want = want / hp.sqrt()[:, None] / ht.sqrt()[None, :]
    torch.testing.assert_close(got, want, rtol=0, atol=WOODBURY_FLOAT64_RTOL * float(want.abs().max()))


def test_scores_from_factors_equal_scores_of_rebuilt_gradients():
    layout, pool_rows, target_rows = _tiny_rows(6, 3)
    pre = Preconditioner.identity()
    sp, st = Factors.of(layout, pool_rows), Factors.of(layout, target_rows)
    got = influence(sp, None, st, None, pre)
    gp, gt = layout.reconstruct(pool_rows), layout.reconstruct(target_rows)
    torch.testing.assert_close(got, gp @ gt.T, rtol=0, atol=WOODBURY_FLOAT64_RTOL * float((gp @ gt.T).abs().max()))
    torch.testing.assert_close(self_influence(sp, None, pre), (gp * gp).sum(1), rtol=WOODBURY_FLOAT64_RTOL, atol=0)


# -- the store driver --------------------------------------------------------------------------


def _scale_bound(pool, targets, curvatures, normalize):
    """Largest error a float32 Woodbury score may carry (LORIF_FLOAT32_TOL relative to what it is made of): per
    checkpoint, ||g|| ||g'|| / lambda summed over blocks (raw), or (lam_max + lambda) / lambda (cosine, whose
    denominators are at least ||g||^2 / (lam_max + lambda)); weighted by eta and summed."""
    from qless.lorif.curvature import block_gradients
    from qless.lorif.stores import all_factor_rows, store_layout
    from qless.scoring.aggregate import checkpoint_weights

    eta = checkpoint_weights([p.learning_rate for p in pool])
    total = 0.0
    for p, t, w in zip(pool, targets, eta):
        layout = store_layout(p)
        pr, tr = all_factor_rows(p, dtype=torch.float64), all_factor_rows(t, dtype=torch.float64)
        if curvatures is None:
            per = [(None, 1.0, 0.0)]
        else:
            curv = curvatures[p.checkpoint]
            per = [(b.layers, lam, float(b.eigenvalues.max())) for b, lam in zip(curv.blocks, curv.dampings())]
        if normalize == "cosine":
            total += w * max((top + lam) / lam for _, lam, top in per)
            continue
        part = 0.0
        for layers, lam, _ in per:
            gp = layout.reconstruct(pr) if layers is None else block_gradients(layout, pr, layers)
            gt = layout.reconstruct(tr) if layers is None else block_gradients(layout, tr, layers)
            part += float(gp.norm(dim=1).max() * gt.norm(dim=1).max()) / lam
        total += w * part
    return total


@pytest.mark.parametrize("curvature", ["none", "layer", "all"])
@pytest.mark.parametrize("normalize", ["raw", "cosine"])
def test_store_scores_equal_the_float64_reference(tmp_path, curvature, normalize):
    pool, targets, _ = _stores(tmp_path)
    folder = "none"
    if curvature != "none":
        folder = tmp_path / "curv"
        # rank 20 > D = 16 of the 4 x 4 layer: its block is padded to the others' rank
        fit_curvature_folder([p.path for p in pool], folder, CurvatureConfig(rank=20, scope=curvature), progress=False)
    curvs = read_curvatures(folder) if folder != "none" else None
    cfg = ScoreConfig(method="lorif", curvature=str(folder), normalize=normalize, block_rows=6, aggregation="max")
    ref = aggregate_reference(lorif_reference(pool, targets, curvs, normalize=normalize), TROWS, "max")
    # float64 through the fast path: the same numbers as the dense reference up to summation order
    values = np.zeros((pool[0].n_rows, 5))  # float64 all the way (a scores folder keeps float32)
    exact = lorif_score(pool, targets, cfg, out=values, progress=False, dtype=torch.float64).aggregate("max")
    for task in ref:
        torch.testing.assert_close(torch.from_numpy(exact[task]).double(), torch.from_numpy(ref[task]), rtol=0,
                                   atol=WOODBURY_FLOAT64_RTOL * float(np.abs(ref[task]).max()))
    fast = lorif_score(pool, targets, cfg, progress=False).aggregate("max")
    bound = LORIF_FLOAT32_TOL * _scale_bound(pool, targets, curvs, normalize)
    for task in ref:
        assert np.abs(fast[task] - ref[task]).max() <= bound
    assert bound < 1e-2 * max(np.abs(ref[t]).max() for t in ref)  # the bound is tight enough to mean something


def test_chunked_kernels_and_block_sizes_give_the_same_scores(tmp_path, monkeypatch):
    import qless.lorif.score as lorif

    pool, targets, _ = _stores(tmp_path, lrs=(1e-5,))
    fit_curvature_folder([pool[0].path], tmp_path / "curv", CurvatureConfig(rank=6), progress=False)
    cfg = ScoreConfig(method="lorif", curvature=str(tmp_path / "curv"), normalize="cosine")
    whole = lorif_score(pool, targets, cfg, progress=False, dtype=torch.float64).values
    monkeypatch.setattr(lorif, "CHUNK_ELEMENTS", 1)  # one layer per batched call
    for rows in (1, 7):
        part = lorif_score(pool, targets, replace(cfg, block_rows=rows), progress=False, dtype=torch.float64).values
        np.testing.assert_allclose(part, whole, rtol=WOODBURY_FLOAT64_RTOL, atol=0)


@pytest.mark.parametrize("tag", ["absmax8", "absmean4", "absmean2", "sign1"])
def test_quantized_factor_stores_score_through_the_same_path(tmp_path, tag):
    pool, targets, layout = _stores(tmp_path, tag, lrs=(1e-5,))
    fit_curvature_folder([pool[0].path], tmp_path / "curv", CurvatureConfig(rank=4), progress=False)
    got = lorif_score(pool, targets, ScoreConfig(method="lorif", curvature=str(tmp_path / "curv")), progress=False,
                      out=np.zeros((pool[0].n_rows, 5)), dtype=torch.float64)
    # by hand: integer codes times scale / alpha (sign: times mean |x|), rebuilt and scored densely
    spec = QuantizerSpec.parse(tag)
    alpha = 1.0 if tag == "sign1" else 2 ** (spec.bits - 1) - 1

    def rows(store):
        codes = torch.from_numpy(np.array(store.shards[0].codes))
        return decode_codes(codes, spec, store.k).double() * (
            torch.from_numpy(np.array(store.shards[0].scales)).double() / alpha)[:, None]

    curv = read_curvature(tmp_path / "curv" / "epoch-1")
    pr, tr = rows(pool[0]), rows(targets[0])
    want = torch.zeros(len(pr), len(tr), dtype=torch.float64)
    for block, lam in zip(curv.blocks, curv.dampings()):
        from qless.lorif.curvature import block_gradients

        vec = block.eigenvectors.double()
        h = vec.T @ torch.diag(block.eigenvalues) @ vec + lam * torch.eye(block.dim, dtype=torch.float64)
        want += block_gradients(layout, pr, block.layers) @ torch.linalg.solve(h, block_gradients(layout, tr, block.layers).T)
    ref = aggregate_reference(want.numpy(), TROWS, "max")
    agg = got.aggregate("max")
    for task in ref:
        # float32 rounding of the stored scale (DEQUANT-like, 1e-7) against everything else in float64
        np.testing.assert_allclose(agg[task], ref[task], rtol=0, atol=1e-5 * np.abs(ref[task]).max())


def test_store_kinds_are_refused_both_ways(tmp_path):
    pool, targets, layout = _stores(tmp_path, lrs=(1e-5,))
    less = write_store(tmp_path / "less" / "epoch-1", torch.randn(10, 32), "fp32", warmup=["epoch-1"])
    less_t = write_store(tmp_path / "less_t" / "epoch-1", torch.randn(3, 32), "fp32", rows=TROWS[:3], gradient="sgd")
    with pytest.raises(StoreMismatchError, match="a LoRIF factor store; score it with --method lorif"):
        score(pool, targets, ScoreConfig(), progress=False)
    with pytest.raises(StoreMismatchError, match="a LESS/QLESS gradient store .*--method less"):
        lorif_score([Datastore.open(less)], [Datastore.open(less_t)], ScoreConfig(method="lorif"), progress=False)
    with pytest.raises(StoreMismatchError, match="LESS/QLESS gradient store"):
        fit_curvature(Datastore.open(less), progress=False)
    # a curvature fitted on another projection (another seed) is refused, naming the field
    other = write_factor_store(tmp_path / "other" / "epoch-1", _factor_rows(9, layout, 3), layout, seed=7)
    fit_curvature_folder([other.path], tmp_path / "curv-other", CurvatureConfig(rank=3), progress=False)
    with pytest.raises(StoreMismatchError, match="projection.seed"):
        lorif_score(pool, targets, ScoreConfig(method="lorif", curvature=str(tmp_path / "curv-other")), progress=False)


# -- the command line --------------------------------------------------------------------------


def test_cli_fit_score_select_round_trip_and_bad_input(tmp_path, capsys):
    pool, targets, layout = _stores(tmp_path)
    p, t = str(tmp_path / "fp32" / "pool"), str(tmp_path / "fp32" / "target")
    curv = str(tmp_path / "curv")
    assert main(["-q", "fit-curvature", p, "--rank", "4", "--out", curv]) == 0
    assert sorted(read_curvatures(curv)) == ["epoch-1", "epoch-2"]
    assert main(["-q", "score", "--method", "lorif", "--curvature", curv, "--normalize", "cosine", "--pool", p,
                 "--target", t, "--out", str(tmp_path / "s")]) == 0
    manifest, values, rows = read_scores(tmp_path / "s")
    assert manifest["config"]["method"] == "lorif" and manifest["config"]["curvature"] == curv
    assert manifest["tasks"] == ["mmlu", "bbh"] and values.shape == (23, 2) and np.isfinite(values).all()
    assert main(["-q", "select", "--scores", str(tmp_path / "s"), "--percent", "20", "--out", str(tmp_path / "sel")]) == 0
    capsys.readouterr()

    def fails(args, message):
        assert main(["-q", *args]) == 2
        assert message in " ".join(capsys.readouterr().err.split())

    less = tmp_path / "less"
    write_store(less / "epoch-1", torch.randn(10, 32), "fp32")
    fails(["fit-curvature", str(less), "--out", str(tmp_path / "c2")], "LESS/QLESS gradient store")
    fails(["score", "--pool", p, "--target", t, "--out", str(tmp_path / "s2")], "score it with --method lorif")
    fails(["score", "--method", "lorif", "--curvature", str(tmp_path / "nowhere"), "--pool", p, "--target", t,
           "--out", str(tmp_path / "s3")], "no such curvature folder")
    fails(["score", "--curvature", curv, "--pool", p, "--target", t, "--out", str(tmp_path / "s4")],
          "settings of --method lorif")
    fails(["fit-curvature", p, "--rank", "0", "--out", str(tmp_path / "c3")], "curvature.rank must be a positive")
    fails(["fit-curvature", p, "--out", curv], "already exists")
    # a damaged artefact is named, with the fix
    (tmp_path / "curv" / "epoch-1" / "curvature.safetensors").write_bytes(b"not a tensor file")
    fails(["score", "--method", "lorif", "--curvature", curv, "--pool", p, "--target", t, "--out", str(tmp_path / "s5")],
          "curvature.safetensors: unreadable")
    meta = json.loads((tmp_path / "curv" / "epoch-2" / "curvature.json").read_text())
    assert meta["identity"]["projection"]["kind"] == "lorif" and meta["n"] == 23 and meta["damping"] == 0.1
