"""Slow, obvious references of scoring: the full pool x target matrix in float64, loops (tests)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from qless.quantize.reference import decode_reference
from qless.scoring.aggregate import checkpoint_weights
from qless.scoring.driver import pair_checkpoints
from qless.store import Datastore


def _decode_reference(store: Datastore) -> np.ndarray:
    codes = np.concatenate([np.array(c) for _, c, _ in store.blocks(1 << 30)])
    return decode_reference(codes, store.spec, store.k)


def influence_reference(pool: Sequence[Datastore], targets: Sequence[Datastore], weights: str = "lr") -> np.ndarray:
    """float64 ``[n_pool, n_target]`` matrix ``sum_i eta_i cos(pool row, target row)``."""
    pairs = pair_checkpoints(pool, targets)
    eta = checkpoint_weights([p.learning_rate for p, _ in pairs], weights)
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
