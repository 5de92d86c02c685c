"""The scores folder written by ``qless score`` and read by ``qless select`` and the report::

    SCORES/
      manifest.json        tasks, subtasks, checkpoints and weights, the stores scored, settings
      subtask_scores.npy   [n_pool, S] float32, the mean influence per target subtask
      task_scores.npy      [n_pool, T] float32, aggregated per task (max or mean over subtasks)
      pool_rows.jsonl      the pool rows in score order: {"source", "id"}
"""

from __future__ import annotations

import operator
import shutil
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qless import __version__
from qless.config import to_dict
from qless.errors import ConfigError, StoreError
from qless.files import atomic_folder, dumps, read_json
from qless.scoring.aggregate import aggregate
from qless.scoring.driver import ScoreConfig, Scores
from qless.store import Datastore
from qless.store.derive import content_digest
from qless.store.reader import parse_row

SCORES_FORMAT = "qless-scores"


def scores_inputs(pool: Sequence[Datastore], targets: Sequence[Datastore], cfg: ScoreConfig) -> dict[str, Any]:
    """What a scores folder was computed from: each store's content digest, and the settings.
    Equal inputs give equal scores, so a run can reuse the folder."""
    inputs = {"pool": [content_digest(p) for p in pool], "targets": [content_digest(t) for t in targets],
              "config": to_dict(cfg)}
    if cfg.method == "lorif" and cfg.curvature != "none" and Path(cfg.curvature).is_dir():
        from qless.lorif.curvature import curvature_digest

        inputs["curvature"] = curvature_digest(cfg.curvature)  # a folder path alone does not name its content
    return inputs


def write_scores(out_dir: str | Path, scores: Scores, pool: Sequence[Datastore], targets: Sequence[Datastore],
                 cfg: ScoreConfig, *, replace: bool = False) -> Path:
    """Write the scores folder (module docstring) at ``out_dir``, all files or none
    (``replace=True`` swaps out an existing one)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not replace:
        raise ConfigError(f"{out_dir}: already exists; choose a new output folder for the scores")
    with atomic_folder(out_dir, replace=replace, what="the scores") as tmp:
        tasks = scores.groups.tasks
        unscored = _write_values(tmp, scores, cfg.aggregation)
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
            "unscored_rows": unscored,
            "inputs": scores_inputs(pool, targets, cfg),
        }
        (tmp / "manifest.json").write_text(dumps(manifest))
    return out_dir


def _write_values(folder: Path, scores: Scores, how: str, block_rows: int = 65536) -> int:
    """``subtask_scores.npy`` and ``task_scores.npy`` written a block of rows at a time, so that
    memory-mapped ``scores.values`` need not fit in memory; returns the number of unscored rows."""
    n, s = scores.values.shape
    tasks = scores.groups.tasks
    sub = np.lib.format.open_memmap(folder / "subtask_scores.npy", mode="w+", dtype=np.float32, shape=(n, s))
    task = np.lib.format.open_memmap(folder / "task_scores.npy", mode="w+", dtype=np.float32, shape=(n, len(tasks)))
    unscored = 0
    for a in range(0, n, block_rows):
        block = np.asarray(scores.values[a:a + block_rows])  # aggregated in its own dtype, stored as float32
        agg = aggregate(block, scores.groups, how)
        sub[a:a + len(block)] = block
        task[a:a + len(block)] = np.stack([agg[t] for t in tasks], axis=1)
        unscored += int(np.isnan(block).any(axis=1).sum())
    sub.flush()
    task.flush()
    return unscored


class PoolRows(Sequence[dict[str, Any]]):
    """The ``{"source", "id"}`` rows of ``pool_rows.jsonl``, each line checked once, then read
    when needed: memory is one byte offset per row, not a dict per row."""

    def __init__(self, path: Path, fix: str) -> None:
        self.path, self.fix = path, fix
        offsets, pos = array("q", [0]), 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                parse_row(line, path, lineno, fix)
                pos += len(line)
                offsets.append(pos)
        self.offsets = np.frombuffer(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        i = range(len(self))[operator.index(i)]
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[i]))
            return parse_row(f.read(int(self.offsets[i + 1] - self.offsets[i])), self.path, i + 1, self.fix)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        with open(self.path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                yield parse_row(line, self.path, lineno, self.fix)


def read_scores(path: str | Path) -> tuple[dict[str, Any], np.ndarray, Sequence[dict[str, Any]]]:
    """``(manifest, task_scores [n_pool, n_tasks] memory-mapped, pool rows (:class:`PoolRows`))``
    of a scores folder, checked."""
    path = Path(path)
    mpath = path / "manifest.json"
    fix = "re-run `qless score` into a new folder"
    if not mpath.is_file():
        raise StoreError(f"{path}: not a scores folder (no manifest.json); run `qless score` first")
    manifest = read_json(mpath, StoreError, fix)
    if not isinstance(manifest, dict) or manifest.get("format") != SCORES_FORMAT:
        raise StoreError(f"{mpath}: not a qless scores manifest; {fix}")
    n_pool, tasks = manifest.get("n_pool"), manifest.get("tasks")
    if not isinstance(n_pool, int) or not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise StoreError(f"{mpath}: fields 'n_pool' (an integer) and 'tasks' (a list of names) are required; {fix}")
    for name in ("task_scores.npy", "pool_rows.jsonl"):
        if not (path / name).is_file():
            raise StoreError(f"{path / name}: missing from the scores folder; {fix}")
    try:
        values = np.load(path / "task_scores.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise StoreError(f"{path / 'task_scores.npy'}: unreadable ({e}); {fix}") from None
    rows = PoolRows(path / "pool_rows.jsonl", fix)
    if values.shape != (n_pool, len(tasks)) or len(rows) != n_pool:
        raise StoreError(f"{path}: scores ({values.shape}) and rows ({len(rows)}) disagree with the manifest; {fix}")
    return manifest, values, rows
