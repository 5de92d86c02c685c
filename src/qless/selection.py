"""Selection: rank the whole pool by a task's score and keep the top p% (or top n).

All sources compete in one ranking (no per-source quota). Ties are broken by row order, so
the same scores always give the same selection. Rows without a score (missing at some
checkpoint) are never selected. The random baseline draws the same number of rows
uniformly with a seed.

Outputs in a folder: ``selected.jsonl`` (the selected pool records in the pool's own format,
in rank order, when the pool data is given), ``ranking.jsonl`` (rank, source, id, score of
each selected row), ``counts.json`` (selected and pool counts per source) and
``selection.json`` (what was selected, how, from which scores).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qless import __version__
from qless.config import Config, option, to_dict
from qless.errors import ConfigError, DataError
from qless.files import atomic_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectConfig(Config):
    """How many rows to keep and how to pick them."""

    section = "select"

    percent: float = option(5.0, "keep the top PERCENT of the pool (the paper: 5; 0.5 already recovers most of the gain)")
    top_n: int = option(0, "keep exactly this many rows instead of a percentage (0: use percent)")
    method: Literal["top", "random"] = option("top", "top-scoring rows, or a uniform random baseline of the same size")
    seed: int = option(0, "seed of the random baseline")

    def validate(self) -> None:
        if self.top_n < 0:
            raise ConfigError(f"select.top_n must be >= 0, got {self.top_n}")
        if not self.top_n and not 0 < self.percent <= 100:
            raise ConfigError(f"select.percent must be in (0, 100], got {self.percent}")

    def count(self, n_pool: int) -> int:
        """Rows to keep: ``top_n``, or ``ceil(n_pool * percent / 100)``; at most the pool."""
        n = self.top_n if self.top_n else math.ceil(n_pool * self.percent / 100 - 1e-9)
        return max(1, min(n, n_pool))


def rank(scores: np.ndarray) -> np.ndarray:
    """Row indices by descending score, ties by ascending row index; NaN rows left out."""
    scores = np.asarray(scores, dtype=np.float64)
    valid = np.flatnonzero(~np.isnan(scores))
    order = np.argsort(-scores[valid], kind="stable")
    return valid[order]


def choose(scores: np.ndarray, cfg: SelectConfig) -> np.ndarray:
    """Indices of the selected rows, in rank order (random baseline: in draw order).

    The same rows as ``rank(scores)[:n]``, found without sorting the whole pool: the n-th
    largest score by a partition, then only the rows at or above it are sorted."""
    scores = np.asarray(scores)
    scored = ~np.isnan(scores)
    n_scored = int(np.count_nonzero(scored))
    if n_scored == 0:
        raise DataError("no pool row has a score; nothing can be selected")
    n = cfg.count(n_scored)
    if cfg.method == "random":
        rng = np.random.default_rng(cfg.seed)
        return np.flatnonzero(scored)[rng.permutation(n_scored)[:n]]
    valid = scores[scored]
    edge = np.partition(valid, n_scored - n)[n_scored - n]  # the n-th largest score
    del valid
    above = np.flatnonzero(scores > edge)  # NaN compares false
    at_edge = np.flatnonzero(scores == edge)[: n - len(above)]  # ties: the lowest rows
    top = np.sort(np.concatenate([above, at_edge]))
    return top[np.argsort(-scores[top].astype(np.float64), kind="stable")]


def write_selection(out_dir: str | Path, picked: np.ndarray, scores: np.ndarray, rows: Sequence[Mapping[str, Any]],
                    cfg: SelectConfig, *, records: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
                    info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the selection files (module docstring) into a new folder, all or none, and return
    ``selection.json``'s content.

    ``rows[i]`` is pool row ``i``'s ``{"source", "id"}``; ``records`` maps ``(source, id)`` to the
    original pool record, to write ``selected.jsonl``."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ConfigError(f"{out_dir}: already exists; choose a new output folder for the selection")
    with atomic_folder(out_dir, what="the selection") as tmp:
        summary = write_selection_files(tmp, picked, scores, rows, cfg, records=records, info=info)
    log.info("selected %d of %d rows into %s", summary["n_selected"], len(rows), out_dir)
    return summary


def write_selection_files(folder: Path, picked: np.ndarray, scores: np.ndarray, rows: Sequence[Mapping[str, Any]],
                          cfg: SelectConfig, *, records: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
                          info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The files of :func:`write_selection` written into ``folder`` (created; the caller makes it
    atomic: a selected row missing from ``records`` raises DataError after part is written).

    A random baseline's ranking carries no score (``null``): it was not chosen by any task's."""
    pool_counts = Counter(str(r["source"]) for r in rows)
    sel_counts: Counter[str] = Counter()
    scored = cfg.method == "top"
    summary = {
        "format": "qless-selection",
        "created_with": f"qless {__version__}",
        "config": to_dict(cfg),
        "n_pool": len(rows),
        "n_selected": len(picked),
        "min_selected_score": float(np.min(scores[picked])) if scored and len(picked) else None,
        **dict(info or {}),
    }
    folder.mkdir(parents=True, exist_ok=True)
    # one picked row at a time: its table entry, and its pool record read through ``records``
    # (a lazy PoolRecords reads just that record), so memory does not grow with the pool
    missing, first_missing = 0, None
    with open(folder / "ranking.jsonl", "w") as f, \
            (open(folder / "selected.jsonl", "w") if records is not None else nullcontext()) as out:
        for r, i in enumerate(np.asarray(picked).tolist(), start=1):
            row = rows[i]
            src, ex_id = str(row["source"]), str(row["id"])
            sel_counts[src] += 1
            score = float(scores[i]) if scored else None
            f.write(json.dumps({"rank": r, "source": src, "id": ex_id, "score": score, "row": int(i)}) + "\n")
            if records is None:
                continue
            record = records.get((src, ex_id))
            if record is None:
                missing += 1
                first_missing = first_missing or (src, ex_id)
                continue
            out.write(json.dumps(dict(record), ensure_ascii=False) + "\n")
    if missing:
        assert first_missing is not None
        raise DataError(
            f"{missing} selected rows are not in the given pool data (first: source {first_missing[0]!r}, "
            f"id {first_missing[1]!r}); pass the same pool files the gradients were extracted from"
        )
    counts = {
        src: {"selected": sel_counts.get(src, 0), "pool": pool_counts[src],
              "share_of_selection": sel_counts.get(src, 0) / len(picked), "share_of_pool": pool_counts[src] / len(rows)}
        for src in sorted(pool_counts)
    }
    (folder / "counts.json").write_text(json.dumps(counts, indent=2) + "\n")
    (folder / "selection.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
