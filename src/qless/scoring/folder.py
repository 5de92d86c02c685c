"""The scores folder written by ``qless score`` and read by ``qless select`` and the report::

    SCORES/
      manifest.json        tasks, subtasks, checkpoints and weights, the stores scored, settings
      subtask_scores.npy   [n_pool, S] float32, the mean influence per target subtask
      task_scores.npy      [n_pool, T] float32, aggregated per task (max or mean over subtasks)
      pool_rows.jsonl      the pool rows in score order: {"source", "id"}
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qless import __version__
from qless.config import to_dict
from qless.errors import ConfigError, StoreError
from qless.files import atomic_folder, dumps
from qless.scoring.driver import ScoreConfig, Scores
from qless.store import Datastore

SCORES_FORMAT = "qless-scores"


def write_scores(out_dir: str | Path, scores: Scores, pool: Sequence[Datastore], targets: Sequence[Datastore],
                 cfg: ScoreConfig) -> Path:
    """Write the scores folder (module docstring) at ``out_dir``, all files or none."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ConfigError(f"{out_dir}: already exists; choose a new output folder for the scores")
    with atomic_folder(out_dir, what="the scores") as tmp:
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
        (tmp / "manifest.json").write_text(dumps(manifest))
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
