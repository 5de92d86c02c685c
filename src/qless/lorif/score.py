"""LoRIF influence from factor stores: ``<g_z', H^-1 g_z>`` computed from the factors, aggregated like LESS.

For a pool example z and a target example z' (per checkpoint), with ``g`` an example's projected
layer gradients and ``H = A + lambda I`` the damped curvature of one block
(:mod:`qless.lorif.curvature`, ``A ~ V diag(lam) V^T``), Woodbury gives

    <g', H^-1 g> = ( <g', g> - sum_j lam_j / (lam_j + lambda) (v_j . g')(v_j . g) ) / lambda

summed over blocks. ``<g', g>`` comes from the factors of both sides, ``sum_cd (U^T U')_cd
(V^T V')_cd`` (:func:`~qless.lorif.factors.factor_inner`, ``O(c c' (k_out + k_in))`` per pair and
layer), never from rebuilt gradients; the coordinates ``v_j . g`` are computed once per example,
forming each layer's ``U V^T`` transiently in memory (``O((c + r) k_out k_in)``, fewer operations
than contracting the factors with each eigenvector, :func:`~qless.lorif.factors.factor_apply`'s
``O(c r k_out k_in)``). Layers of one shape are stacked and computed in one batched call.
Without curvature (``--curvature none``) the score is ``<g', g>``.

``normalize``: ``raw`` is the influence itself (the paper); ``cosine`` divides by
``sqrt(<g', H^-1 g'>) sqrt(<g, H^-1 g>)``, the cosine in the ``H^-1`` metric (LESS-like).
Then exactly as ``qless score``: per target subtask the mean over its examples, per checkpoint
weighted by the normalised learning rate, summed over checkpoints; aggregation over subtasks
and the scores folder are LESS's own (:mod:`qless.scoring`). The target side is small and
decoded whole; the pool streams in blocks, memory bounded by ``block_rows``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qless.errors import StoreError, StoreMismatchError
from qless.lorif.curvature import Curvature, check_curvature, read_curvatures
from qless.lorif.factors import FactorLayout
from qless.lorif.stores import all_factor_rows, factor_rows, require_factor_stores, store_layout
from qless.scoring.aggregate import TargetGroups, checkpoint_weights, target_groups
from qless.scoring.driver import ScoreConfig, Scores, accumulate, align_rows, pair_checkpoints
from qless.store import Datastore

log = logging.getLogger(__name__)


# -- the maths on tensors --------------------------------------------------------------------


#: Bound on the elements of one transient tensor of the batched kernels (memory, not results: 64 MiB of float32).
CHUNK_ELEMENTS = 1 << 24


def shape_groups(layout: FactorLayout) -> list[list[int]]:
    """Layer indices grouped by ``(k_out, k_in)``: each group is computed in one batched call."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, lay in enumerate(layout.layers):
        groups.setdefault((lay.k_out, lay.k_in), []).append(i)
    return list(groups.values())


def _step(per_layer: int) -> int:
    """Layers per chunk when each takes ``per_layer`` elements of a transient tensor."""
    return max(1, CHUNK_ELEMENTS // max(1, per_layer))


@dataclass
class Factors:
    """The factors of n examples, the layers of each shape stacked: per group its layer indices,
    ``U [G, n, k_out, c]`` and ``V [G, n, k_in, c]`` (G layers)."""

    n: int
    n_layers: int
    groups: list[tuple[list[int], torch.Tensor, torch.Tensor]]

    @classmethod
    def of(cls, layout: FactorLayout, rows: torch.Tensor) -> Factors:
        split = layout.split(rows)
        return cls(len(rows), len(layout.layers), [(idx, torch.stack([split[i][0] for i in idx]),
                                                    torch.stack([split[i][1] for i in idx])) for idx in shape_groups(layout)])

    def inner(self, other: Factors) -> torch.Tensor:
        """``[L, n, m]``: per layer ``<U V^T, U' V'^T>_F`` of every pair, from the factors:
        ``sum_cd (U^T U')_cd (V^T V')_cd``, ``O(c c' (k_out + k_in))`` per pair and layer."""
        ref = self.groups[0][1]
        out = torch.empty(self.n_layers, self.n, other.n, dtype=ref.dtype, device=ref.device)
        for (idx, u, v), (_, u2, v2) in zip(self.groups, other.groups):
            step = _step(self.n * other.n * u.shape[-1] * u2.shape[-1])
            for a in range(0, len(idx), step):
                uu = torch.einsum("gnoc,gmod->gnmcd", u[a:a + step], u2[a:a + step])
                vv = torch.einsum("gnic,gmid->gnmcd", v[a:a + step], v2[a:a + step])
                out[idx[a:a + step]] = (uu * vv).sum(dim=(-1, -2))
        return out

    def squared_norms(self) -> torch.Tensor:
        """``[L, n]``: per layer ``||U V^T||_F^2`` of each example."""
        ref = self.groups[0][1]
        out = torch.empty(self.n_layers, self.n, dtype=ref.dtype, device=ref.device)
        for idx, u, v in self.groups:
            out[idx] = ((u.transpose(-1, -2) @ u) * (v.transpose(-1, -2) @ v)).sum(dim=(-1, -2))
        return out

    def project(self, bases: list[torch.Tensor]) -> torch.Tensor:
        """``[L, n, r]``: per layer the coordinates ``<U V^T, b_j>`` along basis matrices ``bases[group]
        [G, D_l, r]`` (flattened ``[k_out, k_in]``). Each chunk of layers forms ``U V^T`` transiently and
        multiplies: ``O((c + r) k_out k_in)`` per example and layer, fewer operations than contracting
        the factors with each basis matrix (``O(c r k_out k_in)``, :func:`~qless.lorif.factors.factor_apply`)."""
        r = bases[0].shape[-1]
        ref = self.groups[0][1]
        out = torch.empty(self.n_layers, self.n, r, dtype=ref.dtype, device=ref.device)
        for (idx, u, v), basis in zip(self.groups, bases):
            step = _step(self.n * u.shape[2] * v.shape[2])
            for a in range(0, len(idx), step):
                g = (u[a:a + step] @ v[a:a + step].transpose(-1, -2)).flatten(2)  # [G', n, D_l]
                out[idx[a:a + step]] = g @ basis[a:a + step]
        return out


@dataclass
class Preconditioner:
    """The Woodbury pieces of one checkpoint's damped curvature, in the scoring dtype: each layer's
    block (``layer_block [L]``), the eigenvectors cut per layer and stacked like :class:`Factors`
    (``bases[group] [G, D_l, r]``), and per block ``shrink [B, r] = lam / (lam + lambda)`` and
    ``damping [B] = lambda``; blocks of lower rank are padded with zero vectors and weights.
    Without curvature (:meth:`identity`) the bases are ``None``."""

    layer_block: torch.Tensor | None
    bases: list[torch.Tensor] | None
    shrink: torch.Tensor | None
    damping: torch.Tensor | None

    @classmethod
    def identity(cls) -> Preconditioner:
        return cls(None, None, None, None)

    @classmethod
    def from_curvature(cls, curv: Curvature, damping: float | None, device: torch.device,
                       dtype: torch.dtype) -> Preconditioner:
        lams = curv.dampings(damping)
        r = max(len(b.eigenvalues) for b in curv.blocks)
        layer_block = torch.empty(len(curv.layout.layers), dtype=torch.long)
        per_layer: dict[int, torch.Tensor] = {}
        shrink = torch.zeros(len(curv.blocks), r, dtype=torch.float64)
        for k, (block, lam) in enumerate(zip(curv.blocks, lams)):
            at = 0
            for i in block.layers:
                lay = curv.layout.layers[i]
                layer_block[i] = k
                vec = torch.zeros(lay.dim, r, dtype=torch.float64)
                vec[:, :len(block.eigenvalues)] = block.eigenvectors[:, at:at + lay.dim].T
                per_layer[i] = vec
                at += lay.dim
            shrink[k, :len(block.eigenvalues)] = block.eigenvalues / (block.eigenvalues + lam)
        bases = [torch.stack([per_layer[i] for i in idx]).to(device=device, dtype=dtype)
                 for idx in shape_groups(curv.layout)]
        return cls(layer_block.to(device), bases, shrink.to(device=device, dtype=dtype),
                   torch.tensor(lams, dtype=dtype, device=device))


def coordinates(f: Factors, pre: Preconditioner) -> torch.Tensor | None:
    """``[B, n, r]``: each example's gradient coordinates along each block's eigenvectors."""
    if pre.bases is None:
        return None
    part = f.project(pre.bases)
    return torch.zeros(len(pre.shrink), *part.shape[1:], dtype=part.dtype, device=part.device).index_add_(
        0, pre.layer_block, part)


def influence(a: Factors, a_coords: torch.Tensor | None, b: Factors, b_coords: torch.Tensor | None,
              pre: Preconditioner) -> torch.Tensor:
    """``[n, m]``: ``<g_a, H^-1 g_b>`` for factor sets ``a`` (n examples) and ``b`` (m), summed over
    blocks: ``(<g_a, g_b> - sum_j shrink_j (v_j . g_a)(v_j . g_b)) / lambda`` per block."""
    inner = a.inner(b)
    if pre.bases is None:
        return inner.sum(dim=0)
    blocks = torch.zeros(len(pre.shrink), a.n, b.n, dtype=inner.dtype, device=inner.device).index_add_(
        0, pre.layer_block, inner)
    correction = torch.bmm(a_coords * pre.shrink[:, None, :], b_coords.transpose(1, 2))
    return ((blocks - correction) / pre.damping[:, None, None]).sum(dim=0)


def self_influence(f: Factors, coords: torch.Tensor | None, pre: Preconditioner) -> torch.Tensor:
    """``[n]``: ``<g, H^-1 g>`` of each example (``||g||^2`` without curvature)."""
    sq = f.squared_norms()
    if pre.bases is None:
        return sq.sum(dim=0)
    blocks = torch.zeros(len(pre.shrink), f.n, dtype=sq.dtype, device=sq.device).index_add_(0, pre.layer_block, sq)
    return ((blocks - (coords ** 2 * pre.shrink[:, None, :]).sum(dim=-1)) / pre.damping[:, None]).sum(dim=0)


class TargetSide:
    """The target rows of one checkpoint, decoded whole and prepared once: factors, eigen
    coordinates, norms in the ``H^-1`` metric, and the ``[n_target, S]`` subtask-mean matrix
    (times the checkpoint weight)."""

    def __init__(self, rows: torch.Tensor, layout: FactorLayout, pre: Preconditioner, groups: TargetGroups,
                 weight: float, normalize: str, where: str) -> None:
        self.layout, self.pre, self.normalize = layout, pre, normalize
        self.factors = Factors.of(layout, rows)
        self.coords = coordinates(self.factors, pre)
        counts = np.bincount(groups.row_group, minlength=len(groups.subtasks)).astype(np.float64)
        mean = np.zeros((len(rows), len(groups.subtasks)))
        mean[np.arange(len(rows)), groups.row_group] = weight / counts[groups.row_group]
        if normalize == "cosine":
            h = self_influence(self.factors, self.coords, pre)
            if bool((h <= 0).any()):
                bad = int(torch.nonzero(h <= 0)[0])
                raise StoreError(f"{where}: target row {bad} has a zero gradient (or one the curvature cancels); it "
                                 "cannot define a direction for --normalize cosine")
            mean /= h.sqrt().double().cpu().numpy()[:, None]
        self.mean = torch.from_numpy(mean).to(device=rows.device, dtype=rows.dtype)

    def scores(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool factor rows ``[m, width]`` -> (weighted subtask scores ``[m, S]``, zero rows ``[m]``)."""
        factors = Factors.of(self.layout, rows)
        coords = coordinates(factors, self.pre)
        infl = influence(factors, coords, self.factors, self.coords, self.pre)
        zero = (rows == 0).all(dim=1)
        if self.normalize == "cosine":
            h = self_influence(factors, coords, self.pre)
            zero = zero | (h <= 0)
            infl = infl / torch.where(zero, 1.0, h).sqrt()[:, None]
        out = infl @ self.mean
        out[zero] = 0.0
        return out, zero


# -- the store driver --------------------------------------------------------------------------


def _device(spec: str) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if spec == "auto" else torch.device(spec)


def lorif_score(pool: Sequence[Datastore], targets: Sequence[Datastore], cfg: ScoreConfig = ScoreConfig(method="lorif"),
                out: np.ndarray | None = None, progress: bool = True, dtype: torch.dtype = torch.float32) -> Scores:
    """Score LoRIF pool factor stores against target factor stores (module docstring), one store
    per checkpoint on each side; the same :class:`~qless.scoring.Scores` as ``qless score``.

    ``cfg.curvature`` is a folder of ``qless fit-curvature`` (one curvature per checkpoint, fitted
    on this extraction) or ``none``; ``cfg.damping`` overrides the fit's damping factor."""
    require_factor_stores([*pool, *targets], "--method lorif")
    pairs = pair_checkpoints(pool, targets)
    pool_stores = [p for p, _ in pairs]
    if any(m is not None for m in align_rows([t for _, t in pairs])):
        raise StoreMismatchError("target stores hold different rows at different checkpoints; extract the targets again")
    groups = target_groups(list(pairs[0][1].rows()), by=cfg.target_groups)
    weights = checkpoint_weights([p.learning_rate for p in pool_stores], cfg.weights)
    curvatures = read_curvatures(cfg.curvature) if cfg.curvature != "none" else None
    device = _device(cfg.device)

    def blocks(i: int, p: Datastore) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        t = pairs[i][1]
        if curvatures is None:
            pre = Preconditioner.identity()
        else:
            if p.checkpoint not in curvatures:
                raise StoreError(f"{cfg.curvature}: no curvature for checkpoint {p.checkpoint!r} (it has "
                                 f"{', '.join(sorted(curvatures))}); fit one on that checkpoint's pool store")
            check_curvature(curvatures[p.checkpoint], p, f"{cfg.curvature} ({p.checkpoint})")
            pre = Preconditioner.from_curvature(curvatures[p.checkpoint], cfg.damping, device, dtype)
        side = TargetSide(all_factor_rows(t, device, dtype), store_layout(p), pre, groups, float(weights[i]),
                          cfg.normalize, str(t.path))
        for first, rows in factor_rows(p, cfg.block_rows, device, dtype):
            yield first, *side.scores(rows)

    values = accumulate(pool_stores, len(groups.subtasks), blocks, out=out, desc="scoring (lorif)", progress=progress,
                        zero_what="zero factors")
    return Scores(values, groups, weights, [p.checkpoint for p in pool_stores])


__all__ = ["Factors", "Preconditioner", "TargetSide", "coordinates", "influence", "lorif_score", "self_influence",
           "shape_groups"]
