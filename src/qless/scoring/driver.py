"""Influence scores from datastores (QLESS eq. 7): the store driver around :mod:`qless.scoring.cosine`.

``pool`` and ``targets`` hold one store per checkpoint, matched by checkpoint name. The
target side is reduced to one mean vector per subtask and checkpoint; the pool is streamed in
blocks straight from the packed store, memory bounded by the block size whatever the pool
size. A format with a packed kernel (:data:`qless.scoring.packed.PACKED_KERNELS`: sign1 and
absmax/absmean at 2, 4, 8 bits) is scored from its bytes by int8 matmuls on CPU; the others
(fp16, fp32, and any format on CUDA) are decoded to float32 and multiplied.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from qless.config import Config, option
from qless.console import progress_bar
from qless.errors import ConfigError, StoreError, StoreMismatchError
from qless.lorif.stores import refuse_factor_stores
from qless.quantize import decode_codes
from qless.scoring.aggregate import TargetGroups, aggregate, checkpoint_weights, target_groups
from qless.scoring.cosine import block_scores, subtask_means
from qless.scoring.packed import PACKED_KERNELS, PackedKernel
from qless.store import SCORE_FIELDS, Datastore, require_same

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreConfig(Config):
    """How pool rows are scored against target rows."""

    section = "score"

    aggregation: Literal["max", "mean"] = option("max", "over subtasks: max (LESS) or mean (the QLESS code)")
    target_groups: Literal["subtask", "example"] = option(
        "subtask", "target rows grouped by subtask, each group's cosines averaged before aggregation (LESS), or each "
        "example its own group, so that aggregation max is the max over a task's examples (RDS+)")
    weights: Literal["lr", "uniform"] = option("lr", "checkpoint weights: normalised learning rates (the paper) or uniform")
    block_rows: int = option(2048, "pool rows decoded at a time (bounds memory: 64 MiB of float32 at k = 8192)")
    device: str = option("cpu", "device for decoding and matmuls: cpu, cuda or auto")
    method: Literal["less", "lorif"] = option("less", "less: lr-weighted cosine of the stored vectors (LESS, QLESS); lorif: "
                                              "influence from LoRIF factor stores (projection.kind lorif, qless.lorif.score)")
    curvature: str = option("none", "lorif: a folder written by `qless fit-curvature` (damped Gauss-Newton inverse by "
                            "Woodbury), or none (plain inner products of the gradients)")
    normalize: Literal["raw", "cosine"] = option("raw", "lorif: raw influence <g', H^-1 g> (the LoRIF paper) or its cosine in "
                                                 "the H^-1 metric (LESS-like)")
    damping: float | None = option(None, "lorif: lambda as a multiple of each curvature block's mean eigenvalue (default: "
                                   "the one recorded by fit-curvature, 0.1)")

    def validate(self) -> None:
        if self.block_rows < 1:
            raise ConfigError(f"score.block_rows must be positive, got {self.block_rows}")
        if self.method == "less" and (self.curvature != "none" or self.normalize != "raw" or self.damping is not None):
            raise ConfigError("score.curvature, score.normalize and score.damping are settings of --method lorif")


@dataclass
class Scores:
    """Per-subtask influence ``values [n_pool, S]`` (NaN for rows missing at some checkpoint)."""

    values: np.ndarray
    groups: TargetGroups
    weights: np.ndarray
    checkpoints: list[str]

    def aggregate(self, how: str = "max") -> dict[str, np.ndarray]:
        """Task -> ``[n_pool]`` scores: max or mean over the task's subtasks."""
        return aggregate(self.values, self.groups, how)


def pair_checkpoints(pool: Sequence[Datastore], targets: Sequence[Datastore]) -> list[tuple[Datastore, Datastore]]:
    """Match pool and target stores by checkpoint name and check they can be scored together."""
    features = {side: sorted({s.manifest.get("features", "gradient") for s in stores})
                for side, stores in (("pool", pool), ("target", targets))}
    if len(set(features["pool"] + features["target"])) > 1:
        raise StoreMismatchError(
            f"the pool stores hold {' and '.join(features['pool'])} rows and the target stores {' and '.join(features['target'])} "
            "rows (manifest field 'features'); score gradient stores against gradient stores, and hidden-state "
            "representations (qless baseline rds) against representations")
    by_name = {}
    for t in targets:
        if t.checkpoint in by_name:
            raise StoreMismatchError(f"two target stores for checkpoint {t.checkpoint!r}: {by_name[t.checkpoint].path} and {t.path}")
        by_name[t.checkpoint] = t
    names = [p.checkpoint for p in pool]
    if len(set(names)) != len(names):
        raise StoreMismatchError(f"pool stores repeat a checkpoint: {names}; give one store per checkpoint")
    for side, stores, have in (("pool", pool, set(names)), ("target", targets, set(by_name))):
        for store in stores:
            missing = [c for c in store.manifest.get("warmup", {}).get("checkpoints", []) if c not in have]
            if missing:
                raise StoreError(
                    f"the {side} stores lack checkpoint(s) {', '.join(missing)} of the warmup (which has "
                    f"{', '.join(store.manifest['warmup']['checkpoints'])}); scores need every checkpoint: give the "
                    f"store of each (e.g. the folder {store.path.parent} holding one store per checkpoint), or extract "
                    "the missing ones")
    if set(names) != set(by_name):
        raise StoreMismatchError(
            f"pool checkpoints {sorted(names)} and target checkpoints {sorted(by_name)} differ; "
            f"extract both sets at the same checkpoints"
        )
    pairs = []
    for p in pool:
        t = by_name[p.checkpoint]
        require_same(p.manifest, t.manifest, SCORE_FIELDS, f"pool store {p.path}", f"target store {t.path}",
                     "Pool and target gradients must come from the same model, adapter, checkpoint and projection.")
        pairs.append((p, t))
    return pairs


def _row_keys(store: Datastore) -> list[tuple[str, str]]:
    return [(str(r["source"]), str(r["id"])) for r in store.rows()]


def rows_digest(store: Datastore) -> str:
    """SHA-256 of a store's row table (the committed ``rows.jsonl`` of every shard, in order)."""
    h = hashlib.sha256()
    for shard in store.shards:
        if shard.rows:
            with open(shard.dir / "rows.jsonl", "rb") as f:
                h.update(f.read(shard.rows_bytes))
    return h.hexdigest()


def align_rows(stores: Sequence[Datastore]) -> list[np.ndarray | None]:
    """For each store, the position of each of its rows in the first store's order (``None``
    when the row tables are identical). Rows absent from the first store get -1."""
    ref = rows_digest(stores[0])
    maps: list[np.ndarray | None] = [None]
    ref_index: dict[tuple[str, str], int] | None = None
    for s in stores[1:]:
        if rows_digest(s) == ref:
            maps.append(None)
            continue
        if ref_index is None:
            ref_index = {key: i for i, key in enumerate(_row_keys(stores[0]))}
        maps.append(np.array([ref_index.get(key, -1) for key in _row_keys(s)], dtype=np.int64))
    return maps


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def subtask_vectors(store: Datastore, groups: TargetGroups, block_rows: int = 4096) -> torch.Tensor:
    """``[k, S]`` float64: per subtask, the mean of its rows' normalised vectors."""
    sums = torch.zeros(len(groups.subtasks), store.k, dtype=torch.float64)
    counts = np.bincount(groups.row_group, minlength=len(groups.subtasks))
    for first, codes, _ in store.blocks(block_rows):
        x = decode_codes(torch.from_numpy(np.array(codes)), store.spec, store.k)
        part, zero = subtask_means(x, torch.from_numpy(groups.row_group[first:first + len(x)]), len(groups.subtasks))
        if bool(zero.any()):
            bad = first + int(torch.nonzero(zero)[0])
            raise StoreError(f"{store.path}: target row {bad} ({store.row(bad)}) has a zero gradient; it cannot define a direction")
        sums += part
    return (sums / torch.from_numpy(counts).to(torch.float64)[:, None]).T.contiguous()


def _read_block(block: tuple[int, np.ndarray, np.ndarray]) -> tuple[int, torch.Tensor]:
    return block[0], torch.from_numpy(np.array(block[1]))


def read_ahead(store: Datastore, block_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first_row, codes)`` of each block, copied into memory, while a background thread reads
    the next block: disk reads overlap the scoring of the previous block (two blocks in memory)."""
    blocks = store.blocks(block_rows)
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(_read_block, b) if (b := next(blocks, None)) is not None else None
        while pending is not None:
            block = pending.result()
            pending = reader.submit(_read_block, b) if (b := next(blocks, None)) is not None else None
            yield block


def block_scorer(store: Datastore, subtasks: torch.Tensor, device: torch.device,
                 kernels: Mapping[str, PackedKernel] = PACKED_KERNELS) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The scorer of one checkpoint's pool blocks against ``subtasks [k, S]`` (float64, weighted):
    packed codes ``[m, row_bytes]`` -> (scores ``[m, S]``, zero rows ``[m]``). The packed kernel of
    the store's format when there is one (CPU only), its query built once here; else decode to
    float32 and multiply (:func:`block_scores`)."""
    kernel = kernels.get(store.spec.impl.tag(store.spec.bits))
    if kernel is not None and device.type == "cpu" and store.k <= kernel.max_dim:
        query = kernel.prepare(subtasks)
        return lambda codes: kernel.scores(codes, query)
    m = subtasks.to(device=device, dtype=torch.float32)
    return lambda codes: block_scores(decode_codes(codes.to(device), store.spec, store.k), m)


def accumulate(pool_stores: Sequence[Datastore], n_subtasks: int,
               blocks: Callable[[int, Datastore], Iterator[tuple[int, torch.Tensor, torch.Tensor]]], *,
               out: np.ndarray | None = None, desc: str = "scoring", progress: bool = True,
               zero_what: str = "zero vectors") -> np.ndarray:
    """The ``[n_pool, S]`` sum over checkpoints of each pool row's contributions, in the first pool
    store's row order (``out`` if given, else a new float32 array). ``blocks(i, store)`` yields
    ``(first_row, contributions [m, S], zero rows [m])`` for checkpoint ``i``'s store; a row missing
    from some checkpoint's store gets NaN (never selected), with a warning, as do zero rows."""
    maps = align_rows(pool_stores)
    n = pool_stores[0].n_rows
    values = out if out is not None else np.zeros((n, n_subtasks), dtype=np.float32)
    values[...] = 0.0
    seen = np.zeros(n, dtype=np.int64)
    zero_rows = 0
    bar = progress_bar(total=sum(p.n_rows for p in pool_stores), desc=desc, unit="row", enabled=progress)
    for i, (p, rowmap) in enumerate(zip(pool_stores, maps)):
        for first, contrib_t, zero in blocks(i, p):
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
    missing = seen != len(pool_stores)
    if missing.any():
        values[missing] = np.nan
        log.warning("%d pool rows are missing from some checkpoint's store (skipped there); they get no score "
                    "and are never selected", int(missing.sum()))
    if zero_rows:
        log.warning("%d pool rows had %s; their contribution is 0", zero_rows, zero_what)
    return values


def score(pool: Sequence[Datastore], targets: Sequence[Datastore], cfg: ScoreConfig = ScoreConfig(),
          out: np.ndarray | None = None, progress: bool = True,
          kernels: Mapping[str, PackedKernel] = PACKED_KERNELS) -> Scores:
    """Score every pool row against every target subtask (see the module docstring).

    The pool stores' rows are reported in the first pool store's order. ``out`` may be a
    preallocated (e.g. memory-mapped) ``[n_pool, S]`` float32 array. ``kernels`` maps formats to
    packed kernels; ``{}`` decodes every format to float32 (the slower path, for comparison)."""
    refuse_factor_stores([*pool, *targets])
    pairs = pair_checkpoints(pool, targets)
    pool_stores = [p for p, _ in pairs]
    target_stores = [t for _, t in pairs]
    target_maps = align_rows(target_stores)
    if any(m is not None for m in target_maps):
        raise StoreMismatchError("target stores hold different rows at different checkpoints; extract the targets again")
    groups = target_groups(list(target_stores[0].rows()), by=cfg.target_groups)
    weights = checkpoint_weights([p.learning_rate for p in pool_stores], cfg.weights)
    device = _device(cfg.device)

    def blocks(i: int, p: Datastore) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        scorer = block_scorer(p, subtask_vectors(target_stores[i], groups) * weights[i], device, kernels)
        for first, codes in read_ahead(p, cfg.block_rows):
            yield first, *scorer(codes)

    values = accumulate(pool_stores, len(groups.subtasks), blocks, out=out, desc="scoring", progress=progress,
                        zero_what="a zero gradient code vector")
    return Scores(values, groups, weights, [p.checkpoint for p in pool_stores])
