"""The probe: exact (unprojected) per-example gradients of a pool sample and the targets, and the
exact scores they define.

A probe is a stratified sample of the pool (every source keeps its share) plus every target set,
extracted at every warmup checkpoint with projection ``none`` into ``fp32`` stores, once per
model dtype: ``PROBE/<dtype>/fp32/<set>/<checkpoint>``. It is written by the ordinary extraction
(:mod:`qless.extraction`), so it resumes after an interruption and is refused when its settings
or examples changed. Only one chunk of ``chunk_size`` full gradients is in memory at a time.

The exact scores (:func:`exact_scores`) are those of the float32 probe in float64: the Gram
matrix of pool and target rows accumulated over column slices of the stores (memory bounded by
``memory_mb``, whatever ``d``), turned into cosines, averaged per subtask, weighted by the
checkpoints' learning rates and aggregated per task exactly as :mod:`qless.scoring` does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from qless.data import Example
from qless.errors import StoreError, StoreMismatchError
from qless.extraction import ExtractConfig, extract
from qless.files import output_errors
from qless.models import release_memory
from qless.project import ProjectionConfig
from qless.scoring.aggregate import TargetGroups, aggregate, checkpoint_weights, target_groups
from qless.store import Datastore, open_by_checkpoint
from qless.training import read_checkpoints

log = logging.getLogger(__name__)

POOL = "pool"


def probe_sample(pool: Sequence[Example], size: int, seed: int) -> list[int]:
    """Indices (ascending) of a seeded sample of ``size`` pool examples, stratified by source:
    each source gets its share by largest remainder, at least one example when ``size`` allows."""
    n = len(pool)
    if size >= n:
        return list(range(n))
    by_source: dict[str, list[int]] = {}
    for i, ex in enumerate(pool):
        by_source.setdefault(ex.source, []).append(i)
    sources = sorted(by_source)
    exact = np.array([len(by_source[s]) * size / n for s in sources])
    quota = np.floor(exact).astype(int)
    if size >= len(sources):
        quota = np.maximum(quota, 1)
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    j = 0
    while quota.sum() < size:
        s = order[j % len(order)]
        if quota[s] < len(by_source[sources[s]]):
            quota[s] += 1
        j += 1
    while quota.sum() > size:  # the at-least-one rule overshot: trim the largest shares
        quota[int(np.argmax(quota))] -= 1
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    for s, q in zip(sources, quota):
        rows = np.array(by_source[s])
        picked += rows[np.sort(rng.permutation(len(rows))[:q])].tolist()
    return sorted(picked)


def build_probe(out: Path, warmup_dir: Path, pool: Sequence[Example], targets: dict[str, Sequence[Example]], run_cfg,
                dtypes: Sequence[str], chunk_size: int, progress: bool = True, *,
                pool_gradient: str = "adam") -> dict[str, Path]:
    """Extract the probe (unprojected fp32 stores) once per model dtype; returns dtype -> folder
    (``OUT/<dtype>``, or ``OUT/<dtype>-sgd`` for plain pool gradients).
    ``run_cfg`` is the run's :class:`~qless.pipeline.RunConfig` (model, tokenization, batching)."""
    every = read_checkpoints(warmup_dir, finished=True)
    cfg = ExtractConfig(formats=("fp32",), batch_size=run_cfg.extract.batch_size,
                        max_batch_tokens=run_cfg.extract.max_batch_tokens, chunk_size=chunk_size,
                        buffer_mb=run_cfg.extract.buffer_mb, pool_gradient=pool_gradient)
    sets = {POOL: (list(pool), "pool"), **{name: (list(ex), "target") for name, ex in targets.items()}}
    folders = {}
    for dtype in dtypes:
        folder = out / (dtype if pool_gradient == "adam" else f"{dtype}-{pool_gradient}")
        log.info("probe: exact gradients with the model in %s -> %s", dtype, folder)
        with output_errors(folder):
            extract(sets, every, folder, cfg, ProjectionConfig(kind="none"), replace(run_cfg.model, dtype=dtype),
                    run_cfg.data, target_data_cfg=run_cfg.target_data, progress=progress,
                    warmup_checkpoints=[c.name for c in every])
        release_memory()
        folders[dtype] = folder
    return folders


class ProbeSide:
    """One set of probe stores (pool, or all targets concatenated), one store per checkpoint,
    in the checkpoint order of ``checkpoints``."""

    def __init__(self, stores: dict[str, list[Datastore]], checkpoints: Sequence[str]) -> None:
        self.checkpoints = list(checkpoints)
        self.stores = stores  # checkpoint -> stores (targets: one per task, concatenated in order)
        first = stores[self.checkpoints[0]]
        self.rows = [r for s in first for r in s.rows()]
        self.d = first[0].k
        for c in self.checkpoints:
            rows = [r for s in stores[c] for r in s.rows()]
            if rows != self.rows:
                raise StoreMismatchError(f"{stores[c][0].path}: holds other rows than {first[0].path}; extract the probe again")
            for s in stores[c]:
                if s.manifest["projection"]["kind"] != "none" or s.spec.tag != "fp32":
                    raise StoreError(f"{s.path}: not a probe store (projection none, fp32); it was written by another command")

    def blocks(self, checkpoint: str, block_rows: int, cols: slice | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(first_row, rows [m, d or len(cols)] float32 unit vectors, norms [m] float32)`` in row order."""
        first = 0
        for store in self.stores[checkpoint]:
            for start, codes, scales in store.blocks(block_rows):
                raw = codes if cols is None else codes[:, cols.start * 4:cols.stop * 4]
                yield first + start, np.ascontiguousarray(raw).view("<f4"), np.asarray(scales)
            first += store.n_rows


def open_probe(folder: Path, target_names: Sequence[str]) -> tuple[ProbeSide, ProbeSide, list[float]]:
    """The pool and target sides of one probe folder and the checkpoints' learning rates."""
    pool = open_by_checkpoint([folder / "fp32" / POOL])
    by_ckpt: dict[str, list[Datastore]] = {p.checkpoint: [] for p in pool}
    for name in target_names:
        for s in open_by_checkpoint([folder / "fp32" / name]):
            if s.checkpoint not in by_ckpt:
                raise StoreMismatchError(f"{s.path}: checkpoint {s.checkpoint!r} has no pool probe store in {folder}")
            by_ckpt[s.checkpoint].append(s)
    names = [p.checkpoint for p in pool]
    rates = [p.learning_rate for p in pool]
    return ProbeSide({p.checkpoint: [p] for p in pool}, names), ProbeSide(by_ckpt, names), rates


def _column_width(rows: int, d: int, memory_mb: int) -> int:
    return int(max(1024, min(d, memory_mb * 2**20 // (8 * max(rows, 1)))))


def exact_cosines(pool: ProbeSide, targets: ProbeSide, checkpoint: str, memory_mb: int = 1024) -> np.ndarray:
    """``[n_pool, n_target]`` float64 cosines of the probe's full gradients at one checkpoint."""
    n, m, d = len(pool.rows), len(targets.rows), pool.d
    width = _column_width(n + m, d, memory_mb)
    gram = np.zeros((n, m))
    pn, tn = np.zeros(n), np.zeros(m)
    for c0 in range(0, d, width):
        cols = slice(c0, min(c0 + width, d))
        t = np.concatenate([b for _, b, _ in targets.blocks(checkpoint, 1 << 30, cols)]).astype(np.float64)
        tn += np.einsum("ij,ij->i", t, t)
        for first, block, _ in pool.blocks(checkpoint, max(1, memory_mb * 2**20 // (8 * (cols.stop - c0))), cols):
            x = block.astype(np.float64)
            gram[first:first + len(x)] += x @ t.T
            pn[first:first + len(x)] += np.einsum("ij,ij->i", x, x)
    if (pn == 0).any() or (tn == 0).any():
        raise StoreError("a probe row has a zero gradient; it has no direction to compare")
    return gram / np.sqrt(pn)[:, None] / np.sqrt(tn)[None, :]


def subtask_matrix(groups: TargetGroups) -> np.ndarray:
    """``[n_target, S]``: column j averages the rows of subtask j."""
    counts = np.bincount(groups.row_group, minlength=len(groups.subtasks))
    out = np.zeros((len(groups.row_group), len(groups.subtasks)))
    out[np.arange(len(groups.row_group)), groups.row_group] = 1.0 / counts[groups.row_group]
    return out


def task_scores_from_cosines(cosines: Sequence[np.ndarray], groups: TargetGroups, weights: np.ndarray,
                             aggregation: str) -> dict[str, np.ndarray]:
    """Task -> ``[n_pool]``: the checkpoint-weighted subtask means of per-row cosines, aggregated."""
    values = sum(w * (c @ subtask_matrix(groups)) for w, c in zip(weights, cosines))
    return aggregate(np.asarray(values), groups, aggregation)


def exact_scores(pool: ProbeSide, targets: ProbeSide, rates: Sequence[float], weights: str = "lr",
                 aggregation: str = "max", memory_mb: int = 1024) -> tuple[dict[str, np.ndarray], TargetGroups]:
    """Exact task scores of the probe pool (float64) and the target grouping."""
    groups = target_groups(targets.rows)
    eta = checkpoint_weights(rates, weights)
    cos = [exact_cosines(pool, targets, c, memory_mb) for c in pool.checkpoints]
    return task_scores_from_cosines(cos, groups, eta, aggregation), groups


def rows_as_tensor(side: ProbeSide, checkpoint: str, scaled: bool, block_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Blocks of full gradient rows as float32 tensors: unit vectors, or times their norms (``scaled``)."""
    for first, rows, norms in side.blocks(checkpoint, block_rows):
        x = torch.from_numpy(rows.copy())
        if scaled:
            x *= torch.from_numpy(norms.astype(np.float32))[:, None]
        yield first, x
