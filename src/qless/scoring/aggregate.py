"""Target grouping, checkpoint weights and the aggregation of per-subtask scores into task scores.

A target task has subtasks (its rows' ``subtask`` field; a task without one is its own single
subtask). Per subtask the scores are averaged over its examples, then aggregated over subtasks
by max (LESS, the default) or mean (the QLESS code). Grouped by example instead
(``ScoreConfig.target_groups = "example"``), every target example is a group of one, and the max
aggregation is the max over the task's examples (RDS+, Ivison et al. 2025). Checkpoints are
weighted by their learning rates normalised to sum to one (``eta_i``), or uniformly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qless.errors import StoreError


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


def target_groups(rows: Sequence[dict[str, Any]], by: str = "subtask") -> TargetGroups:
    """Group target rows by ``(source, subtask)`` (``by="subtask"``) or ``(source, id)``
    (``by="example"``: one group per example), in order of first appearance."""
    if by not in ("subtask", "example"):
        raise ValueError(f"target grouping {by!r}: use 'subtask' or 'example'")
    index: dict[tuple[str, str], int] = {}
    groups = np.empty(len(rows), dtype=np.int64)
    for r, row in enumerate(rows):
        name = row["id"] if by == "example" else row.get("subtask") or row["source"]
        key = (str(row["source"]), str(name))
        groups[r] = index.setdefault(key, len(index))
    return TargetGroups(list(index), groups)


_REDUCE = {"max": np.max, "mean": np.mean}


def checkpoint_weights(learning_rates: Sequence[float], how: str = "lr") -> np.ndarray:
    """Normalised weights ``eta_i`` of the checkpoints: by learning rate (``lr``) or ``uniform``."""
    if how not in ("lr", "uniform"):
        raise ValueError(f"checkpoint weights {how!r}: use 'lr' or 'uniform'")
    if how == "uniform":
        return np.full(len(learning_rates), 1.0 / len(learning_rates))
    lrs = np.array(learning_rates, dtype=np.float64)
    if not np.all(np.isfinite(lrs)) or np.any(lrs < 0) or lrs.sum() <= 0:
        raise StoreError(f"checkpoint learning rates {lrs.tolist()} cannot be weights; use weights='uniform'")
    return lrs / lrs.sum()


def aggregate(values: np.ndarray, groups: TargetGroups, how: str = "max") -> dict[str, np.ndarray]:
    """Task -> ``[n_pool]`` scores: the max or mean of the task's subtask columns of ``values``."""
    if how not in _REDUCE:
        raise ValueError(f"aggregation {how!r}: use one of {', '.join(_REDUCE)}")
    return {task: _REDUCE[how](values[:, groups.columns(task)], axis=1) for task in groups.tasks}
