"""Influence scores from datastores (QLESS eq. 7) and their aggregation per target task.

``Inf(z, z') = sum_i eta_i <q_hat(z', i), q_hat(z, i)>`` with ``q_hat = q / ||q||`` the
normalised stored code vector of checkpoint ``i`` (the scale cancels) and ``eta_i`` the
checkpoint learning rates normalised to sum to one. A target task has subtasks (its rows'
``subtask`` field; a task without one is its own single subtask). Per subtask the scores are
averaged over its examples, then aggregated over subtasks by max (LESS, the default) or mean
(the QLESS code).

The mean over a subtask's examples is a dot product with the mean of their normalised
vectors, so the target side shrinks to one vector per subtask and checkpoint, and the pool is
streamed in blocks straight from the packed store: decode a block, one matmul per
checkpoint, memory bounded by the block size whatever the pool size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from qless import __version__
from qless.config import option, to_dict
from qless.datastore import SCORE_FIELDS, Datastore, require_same
from qless.errors import ConfigError, StoreError, StoreMismatchError
from qless.quantize import decode_codes

log = logging.getLogger(__name__)

SCORES_FORMAT = "qless-scores"


@dataclass(frozen=True)
class ScoreConfig:
    """How pool rows are scored against target rows."""

    aggregation: Literal["max", "mean"] = option("max", "over subtasks: max (LESS) or mean (the QLESS code)")
    weights: Literal["lr", "uniform"] = option("lr", "checkpoint weights: normalised learning rates (the paper) or uniform")
    block_rows: int = option(2048, "pool rows decoded at a time (bounds memory: 64 MiB of float32 at k = 8192)")
    device: str = option("cpu", "device for decoding and matmuls: cpu, cuda or auto")

    def __post_init__(self) -> None:
        if self.block_rows < 1:
            raise ConfigError(f"score.block_rows must be positive, got {self.block_rows}")


@dataclass
class TargetGroups:
    """The target rows' grouping: ``subtasks[j] = (task, subtask)``; ``row_group[r] = j``."""

    subtasks: list[tuple[str, str]]
    row_group: np.ndarray

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(t for t, _ in self.subtasks))

    def columns(self, task: str) -> list[int]:
        return [j for j, (t, _) in enumerate(self.subtasks) if t == task]


def target_groups(rows: Sequence[dict[str, Any]]) -> TargetGroups:
    """Group target rows by ``(source, subtask)`` in order of first appearance."""
    index: dict[tuple[str, str], int] = {}
    groups = np.empty(len(rows), dtype=np.int64)
    for r, row in enumerate(rows):
        key = (str(row["source"]), str(row.get("subtask") or row["source"]))
        groups[r] = index.setdefault(key, len(index))
    return TargetGroups(list(index), groups)


def checkpoint_weights(stores: Sequence[Datastore], how: str = "lr") -> np.ndarray:
    """Normalised weights ``eta_i`` of the checkpoints (one store per checkpoint)."""
    if how == "uniform":
        return np.full(len(stores), 1.0 / len(stores))
    lrs = np.array([s.learning_rate for s in stores], dtype=np.float64)
    if not np.all(np.isfinite(lrs)) or np.any(lrs < 0) or lrs.sum() <= 0:
        raise StoreError(f"checkpoint learning rates {lrs.tolist()} cannot be weights; use weights='uniform'")
    return lrs / lrs.sum()


def pair_checkpoints(pool: Sequence[Datastore], targets: Sequence[Datastore]) -> list[tuple[Datastore, Datastore]]:
    """Match pool and target stores by checkpoint name and check they can be scored together."""
    by_name = {}
    for t in targets:
        if t.checkpoint in by_name:
            raise StoreMismatchError(f"two target stores for checkpoint {t.checkpoint!r}: {by_name[t.checkpoint].path} and {t.path}")
        by_name[t.checkpoint] = t
    names = [p.checkpoint for p in pool]
    if len(set(names)) != len(names):
        raise StoreMismatchError(f"pool stores repeat a checkpoint: {names}; give one store per checkpoint")
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


def _rows_digest(store: Datastore) -> str:
    h = hashlib.sha256()
    for shard in store.shards:
        if shard.rows:
            with open(shard.dir / "rows.jsonl", "rb") as f:
                h.update(f.read(shard.rows_bytes))
    return h.hexdigest()


def align_rows(stores: Sequence[Datastore]) -> list[np.ndarray | None]:
    """For each store, the position of each of its rows in the first store's order (``None``
    when the row tables are identical). Rows absent from the first store get -1."""
    ref = _rows_digest(stores[0])
    maps: list[np.ndarray | None] = [None]
    ref_index: dict[tuple[str, str], int] | None = None
    for s in stores[1:]:
        if _rows_digest(s) == ref:
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
        x = decode_codes(torch.from_numpy(np.array(codes)), store.spec, store.k).to(torch.float64)
        norms = torch.linalg.vector_norm(x, dim=1)
        if torch.any(norms == 0):
            bad = first + int(torch.nonzero(norms == 0)[0])
            raise StoreError(f"{store.path}: target row {bad} ({store.row(bad)}) has a zero gradient; it cannot define a direction")
        idx = torch.from_numpy(groups.row_group[first:first + len(x)])
        sums.index_add_(0, idx, x / norms[:, None])
    return (sums / torch.from_numpy(counts).to(torch.float64)[:, None]).T.contiguous()


@dataclass
class Scores:
    """Per-subtask influence ``values [n_pool, S]`` (NaN for rows missing at some checkpoint)."""

    values: np.ndarray
    groups: TargetGroups
    weights: np.ndarray
    checkpoints: list[str]

    def aggregate(self, how: str = "max") -> dict[str, np.ndarray]:
        """Task -> ``[n_pool]`` scores: max or mean over the task's subtasks."""
        out = {}
        for task in self.groups.tasks:
            cols = self.values[:, self.groups.columns(task)]
            out[task] = cols.max(axis=1) if how == "max" else cols.mean(axis=1)
        return out


def score(pool: Sequence[Datastore], targets: Sequence[Datastore], cfg: ScoreConfig = ScoreConfig(),
          out: np.ndarray | None = None, progress: bool = True) -> Scores:
    """Score every pool row against every target subtask (see the module docstring).

    ``pool`` and ``targets`` hold one store per checkpoint, matched by checkpoint name;
    the pool stores' rows are reported in the first pool store's order. ``out`` may be a
    preallocated (e.g. memory-mapped) ``[n_pool, S]`` float32 array."""
    pairs = pair_checkpoints(pool, targets)
    pool_stores = [p for p, _ in pairs]
    target_stores = [t for _, t in pairs]
    target_maps = align_rows(target_stores)
    if any(m is not None for m in target_maps):
        raise StoreMismatchError("target stores hold different rows at different checkpoints; extract the targets again")
    groups = target_groups(list(target_stores[0].rows()))
    weights = checkpoint_weights(pool_stores, cfg.weights)
    maps = align_rows(pool_stores)
    n = pool_stores[0].n_rows
    values = out if out is not None else np.zeros((n, len(groups.subtasks)), dtype=np.float32)
    values[...] = 0.0
    seen = np.zeros(n, dtype=np.int64)
    device = _device(cfg.device)
    zero_rows = 0
    total = sum(p.n_rows for p in pool_stores)
    bar = tqdm(total=total, desc="scoring", unit="row", disable=not progress)
    for (p, t), w, rowmap in zip(pairs, weights, maps):
        m = (subtask_vectors(t, groups) * w).to(device=device, dtype=torch.float32)
        for first, codes, _ in p.blocks(cfg.block_rows):
            x = decode_codes(torch.from_numpy(np.array(codes)).to(device), p.spec, p.k)
            norms = torch.linalg.vector_norm(x, dim=1)
            zero = norms == 0
            zero_rows += int(zero.sum())
            contrib = (x @ m) / torch.where(zero, 1.0, norms)[:, None]
            contrib[zero] = 0.0
            contrib = contrib.cpu().numpy()
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
        log.warning("%d pool rows had a zero gradient code vector; their contribution is 0", zero_rows)
    return Scores(values, groups, weights, [p.checkpoint for p in pool_stores])


def write_scores(out_dir: str | Path, scores: Scores, pool: Sequence[Datastore], targets: Sequence[Datastore],
                 cfg: ScoreConfig) -> Path:
    """Write ``subtask_scores.npy``, ``task_scores.npy``, ``pool_rows.jsonl`` and ``manifest.json``
    into ``out_dir`` (built in a temporary folder and renamed into place)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ConfigError(f"{out_dir}: already exists; choose a new output folder for the scores")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        agg = scores.aggregate(cfg.aggregation)
        tasks = scores.groups.tasks
        np.save(tmp / "subtask_scores.npy", scores.values.astype(np.float32), allow_pickle=False)
        np.save(tmp / "task_scores.npy", np.stack([agg[t] for t in tasks], axis=1).astype(np.float32), allow_pickle=False)
        first = [p for p in pool if p.checkpoint == scores.checkpoints[0]][0]
        with open(tmp / "pool_rows.jsonl", "wb") as f:
            for shard in first.shards:
                if shard.rows:
                    with open(shard.dir / "rows.jsonl", "rb") as src:
                        shutil.copyfileobj(src, f)  # committed rows only: complete shards end exactly there
        manifest = {
            "format": SCORES_FORMAT,
            "format_version": 1,
            "created_with": f"qless {__version__}",
            "config": to_dict(cfg),
            "n_pool": int(scores.values.shape[0]),
            "tasks": tasks,
            "subtasks": [list(s) for s in scores.groups.subtasks],
            "checkpoints": [{"name": c, "weight": float(w)} for c, w in zip(scores.checkpoints, scores.weights)],
            "pool_stores": [str(p.path) for p in pool],
            "target_stores": [str(t.path) for t in targets],
            "pool_quantizer": pool[0].spec.tag,
            "target_quantizer": targets[0].spec.tag,
            "unscored_rows": int(np.isnan(scores.values).any(axis=1).sum()),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_scores(path: str | Path) -> tuple[dict[str, Any], np.ndarray, list[dict[str, Any]]]:
    """``(manifest, task_scores [n_pool, n_tasks], pool rows)`` of a scores folder."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise StoreError(f"{path}: not a scores folder (no manifest.json); run `qless score` first")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{mpath}: not valid JSON ({e}); re-run `qless score`") from None
    if manifest.get("format") != SCORES_FORMAT:
        raise StoreError(f"{mpath}: not a qless scores manifest")
    try:
        values = np.load(path / "task_scores.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise StoreError(f"{path / 'task_scores.npy'}: unreadable ({e}); re-run `qless score`") from None
    with open(path / "pool_rows.jsonl", "rb") as f:
        rows = [json.loads(line) for line in f]
    if values.shape != (manifest["n_pool"], len(manifest["tasks"])) or len(rows) != manifest["n_pool"]:
        raise StoreError(f"{path}: scores ({values.shape}) and rows ({len(rows)}) disagree with the manifest; re-run `qless score`")
    return manifest, values, rows


# ---------------------------------------------------------------------------------------------
# Slow, obvious reference (float64, full pool x target matrix), for tests


def _decode_reference(store: Datastore) -> np.ndarray:
    """Every row's signed codes (or float values) as float64, one coordinate position at a time."""
    codes = np.concatenate([np.array(c) for _, c, _ in store.blocks(1 << 30)])
    spec = store.spec
    if spec.method == "float":
        dtype = "<f2" if spec.bits == 16 else "<f4"
        return codes.view(dtype).astype(np.float64)
    per_byte = 8 // spec.bits
    out = np.zeros((len(codes), store.k), dtype=np.float64)
    for m in range(store.k):
        u = (codes[:, m // per_byte].astype(np.int64) >> ((m % per_byte) * spec.bits)) & ((1 << spec.bits) - 1)
        out[:, m] = (2 * u - 1) if spec.method == "sign" else (u - spec.alpha)
    return out


def influence_reference(pool: Sequence[Datastore], targets: Sequence[Datastore], weights: str = "lr") -> np.ndarray:
    """float64 ``[n_pool, n_target]`` matrix ``sum_i eta_i cos(pool row, target row)``."""
    pairs = pair_checkpoints(pool, targets)
    eta = checkpoint_weights([p for p, _ in pairs], weights)
    total = None
    for (p, t), w in zip(pairs, eta):
        a = _decode_reference(p)
        b = _decode_reference(t)
        cos = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
        total = w * cos if total is None else total + w * cos
    return total


def aggregate_reference(matrix: np.ndarray, target_rows: Sequence[dict[str, Any]], how: str) -> dict[str, np.ndarray]:
    """Mean over each subtask's columns, then max or mean over the task's subtasks, by loops."""
    tasks: dict[str, dict[str, list[int]]] = {}
    for j, row in enumerate(target_rows):
        tasks.setdefault(row["source"], {}).setdefault(row.get("subtask") or row["source"], []).append(j)
    out = {}
    for task, subs in tasks.items():
        per_sub = [matrix[:, cols].mean(axis=1) for cols in subs.values()]
        out[task] = np.max(per_sub, axis=0) if how == "max" else np.mean(per_sub, axis=0)
    return out
