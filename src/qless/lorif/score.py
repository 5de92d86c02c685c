"""LoRIF influence from factor stores: ``<g_z', H^-1 g_z>`` computed from the factors, aggregated like LESS.

For a pool example z and a target example z' (per checkpoint), with ``g`` an example's projected
layer gradients and ``H = A + lambda I`` the damped curvature of one block
(:mod:`qless.lorif.curvature`, ``A ~ V diag(lam) V^T``), Woodbury gives

    <g', H^-1 g> = ( <g', g> - sum_j lam_j / (lam_j + lambda) (v_j . g')(v_j . g) ) / lambda

summed over blocks. Both parts come from the factors without rebuilding any ``[k_out, k_in]``
gradient: ``<g', g>`` by :func:`~qless.lorif.factors.factor_inner` (``O(c c' (k_out + k_in))``
per pair and layer) and the coordinates ``v_j . g`` by :func:`~qless.lorif.factors.factor_apply`
against the eigenvectors reshaped ``[r, k_out, k_in]`` (``O(r c k_out k_in)`` per example,
once). Without curvature (``--curvature none``) the score is ``<g', g>``.

``normalize``: ``raw`` is the influence itself (the paper); ``cosine`` divides by
``sqrt(<g', H^-1 g'>) sqrt(<g, H^-1 g>)``, the cosine in the ``H^-1`` metric (LESS-like).
Then exactly as ``qless score``: per target subtask the mean over its examples, per checkpoint
weighted by the normalised learning rate, summed over checkpoints; aggregation over subtasks
and the scores folder are LESS's own (:mod:`qless.scoring`). The target side is small and
decoded whole; the pool streams in blocks, memory bounded by ``block_rows``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qless.console import progress_bar
from qless.errors import StoreError, StoreMismatchError
from qless.lorif.curvature import Curvature, check_curvature, read_curvatures
from qless.lorif.factors import FactorLayout, factor_apply, factor_inner
from qless.lorif.stores import all_factor_rows, factor_rows, require_factor_stores, store_layout
from qless.scoring.aggregate import TargetGroups, checkpoint_weights, target_groups
from qless.scoring.driver import ScoreConfig, Scores, align_rows, pair_checkpoints
from qless.store import Datastore

log = logging.getLogger(__name__)


# -- the maths on tensors --------------------------------------------------------------------


@dataclass
class Preconditioner:
    """The Woodbury pieces of one checkpoint's damped curvature, in the scoring dtype: per block
    its layers, eigenvectors reshaped per layer ``[r, k_out, k_in]``, weights
    ``lam / (lam + lambda)`` and ``lambda``. ``None`` blocks (no curvature): one identity block."""

    layers: list[list[int]]
    bases: list[list[torch.Tensor]] | None
    shrink: list[torch.Tensor] | None
    damping: list[float] | None

    @classmethod
    def identity(cls, layout: FactorLayout) -> Preconditioner:
        return cls([list(range(len(layout.layers)))], None, None, None)

    @classmethod
    def from_curvature(cls, curv: Curvature, damping: float | None, device: torch.device,
                       dtype: torch.dtype) -> Preconditioner:
        lams = curv.dampings(damping)
        bases, shrink = [], []
        for block, lam in zip(curv.blocks, lams):
            vec = block.eigenvectors.to(device=device, dtype=dtype)
            parts, at = [], 0
            for i in block.layers:
                lay = curv.layout.layers[i]
                parts.append(vec[:, at:at + lay.dim].reshape(-1, lay.k_out, lay.k_in))
                at += lay.dim
            bases.append(parts)
            shrink.append((block.eigenvalues / (block.eigenvalues + lam)).to(device=device, dtype=dtype))
        return cls([b.layers for b in curv.blocks], bases, shrink, lams)


def coordinates(split: list[tuple[torch.Tensor, torch.Tensor]], pre: Preconditioner) -> list[torch.Tensor]:
    """Per block, ``[n, r]``: each example's gradient coordinates along the block's eigenvectors."""
    if pre.bases is None:
        return []
    return [sum(factor_apply(*split[i], basis) for i, basis in zip(layers, bases))
            for layers, bases in zip(pre.layers, pre.bases)]


def influence(a: list[tuple[torch.Tensor, torch.Tensor]], a_coords: list[torch.Tensor],
              b: list[tuple[torch.Tensor, torch.Tensor]], b_coords: list[torch.Tensor], pre: Preconditioner) -> torch.Tensor:
    """``[n, m]``: ``<g_a, H^-1 g_b>`` for factor sets ``a`` (n examples) and ``b`` (m), summed over blocks."""
    total = 0
    for k, layers in enumerate(pre.layers):
        inner = sum(factor_inner(*a[i], *b[i]) for i in layers)
        if pre.bases is not None:
            inner = (inner - (a_coords[k] * pre.shrink[k]) @ b_coords[k].T) / pre.damping[k]
        total = total + inner
    return total


def self_influence(split: list[tuple[torch.Tensor, torch.Tensor]], coords: list[torch.Tensor],
                   pre: Preconditioner) -> torch.Tensor:
    """``[n]``: ``<g, H^-1 g>`` of each example (``||g||^2`` without curvature)."""
    total = 0
    for k, layers in enumerate(pre.layers):
        sq = sum(((u.transpose(1, 2) @ u) * (v.transpose(1, 2) @ v)).sum(dim=(1, 2)) for u, v in (split[i] for i in layers))
        if pre.bases is not None:
            sq = (sq - (coords[k] ** 2 * pre.shrink[k]).sum(dim=1)) / pre.damping[k]
        total = total + sq
    return total


class TargetSide:
    """The target rows of one checkpoint, decoded whole and prepared once: factors, eigen
    coordinates, norms in the ``H^-1`` metric, and the ``[n_target, S]`` subtask-mean matrix
    (times the checkpoint weight)."""

    def __init__(self, rows: torch.Tensor, layout: FactorLayout, pre: Preconditioner, groups: TargetGroups,
                 weight: float, normalize: str, where: str) -> None:
        self.layout, self.pre, self.normalize = layout, pre, normalize
        self.split = layout.split(rows)
        self.coords = coordinates(self.split, pre)
        counts = np.bincount(groups.row_group, minlength=len(groups.subtasks)).astype(np.float64)
        mean = np.zeros((len(rows), len(groups.subtasks)))
        mean[np.arange(len(rows)), groups.row_group] = weight / counts[groups.row_group]
        if normalize == "cosine":
            h = self_influence(self.split, self.coords, pre)
            if bool((h <= 0).any()):
                bad = int(torch.nonzero(h <= 0)[0])
                raise StoreError(f"{where}: target row {bad} has a zero gradient (or one the curvature cancels); it "
                                 "cannot define a direction for --normalize cosine")
            mean /= h.sqrt().double().cpu().numpy()[:, None]
        self.mean = torch.from_numpy(mean).to(device=rows.device, dtype=rows.dtype)

    def scores(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool factor rows ``[m, width]`` -> (weighted subtask scores ``[m, S]``, zero rows ``[m]``)."""
        split = self.layout.split(rows)
        coords = coordinates(split, self.pre)
        infl = influence(split, coords, self.split, self.coords, self.pre)
        zero = (rows == 0).all(dim=1)
        if self.normalize == "cosine":
            h = self_influence(split, coords, self.pre)
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
    maps = align_rows(pool_stores)
    n = pool_stores[0].n_rows
    values = out if out is not None else np.zeros((n, len(groups.subtasks)), dtype=np.float32)
    values[...] = 0.0
    seen = np.zeros(n, dtype=np.int64)
    device = _device(cfg.device)
    zero_rows = 0
    bar = progress_bar(total=sum(p.n_rows for p in pool_stores), desc="scoring (lorif)", unit="row", enabled=progress)
    for (p, t), w, rowmap in zip(pairs, weights, maps):
        layout = store_layout(p)
        if curvatures is None:
            pre = Preconditioner.identity(layout)
        else:
            if p.checkpoint not in curvatures:
                raise StoreError(f"{cfg.curvature}: no curvature for checkpoint {p.checkpoint!r} (it has "
                                 f"{', '.join(sorted(curvatures))}); fit one on that checkpoint's pool store")
            check_curvature(curvatures[p.checkpoint], p, f"{cfg.curvature} ({p.checkpoint})")
            pre = Preconditioner.from_curvature(curvatures[p.checkpoint], cfg.damping, device, dtype)
        side = TargetSide(all_factor_rows(t, device, dtype), layout, pre, groups, float(w), cfg.normalize, str(t.path))
        for first, rows in factor_rows(p, cfg.block_rows, device, dtype):
            contrib_t, zero = side.scores(rows)
            zero_rows += int(zero.sum())
            contrib = contrib_t.cpu().numpy()
            if rowmap is None:
                values[first:first + len(contrib)] += contrib
                seen[first:first + len(contrib)] += 1
            else:
                pos = rowmap[first:first + len(contrib)]
                keep = pos >= 0
                values[pos[keep]] += contrib[keep]
                seen[pos[keep]] += 1
            bar.update(len(contrib))
    bar.close()
    missing = seen != len(pairs)
    if missing.any():
        values[missing] = np.nan
        log.warning("%d pool rows are missing from some checkpoint's store (skipped there); they get no score "
                    "and are never selected", int(missing.sum()))
    if zero_rows:
        log.warning("%d pool rows had zero factors; their contribution is 0", zero_rows)
    return Scores(values, groups, weights, [p.checkpoint for p in pool_stores])


__all__ = ["Preconditioner", "TargetSide", "coordinates", "influence", "lorif_score", "self_influence"]
