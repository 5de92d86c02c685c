"""Selection baselines, written as qless selections (the same files, the same ranked list), so that
training, evaluation and the report treat them like a qless selection:

* ``random``: a uniform draw of p% of the pool, one selection per seed (QLESS and LESS report three).
* ``balanced``: the same size drawn with an equal share per source (:func:`balanced_quotas`), the
  "balanced random" of Ivison et al. 2025.
* ``rds``: RDS+ (Ivison et al. 2025): the cosine between position-weighted mean hidden states of
  the base model (:mod:`qless.represent`), the max over a task's target examples, the top p%.

Random and balanced write ``OUT/seed-<s>/`` per seed; their ranking is the draw order and carries no
score. RDS+ writes ``OUT/stores`` (representation stores, resumable), ``OUT/scores/<format>`` (a
scores folder) and ``OUT/selected/<task>/``, selected from the first format's scores.

RDS+ scores every pool row against every target example (``ScoreConfig.target_groups =
"example"``) and aggregates with the max, so a pool example ranks high when it is close to any one
target example of the task. The authors' code selects differently from the same cosines: each
target example in turn takes its most similar unselected pool example (round robin), which gives
every target example a similar share; the global top p% of the max is the definition followed here.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from qless.data import DataConfig, Example
from qless.errors import ConfigError
from qless.files import atomic_folder, locked, output_errors, safe_name
from qless.models import ModelConfig
from qless.pool_index import PoolRecords
from qless.represent import RepresentConfig, represent
from qless.scoring import ScoreConfig, score, write_scores
from qless.selection import SelectConfig, choose, write_selection_files
from qless.stages import DataSpec, check_percent, load_data, select_into
from qless.store import open_by_checkpoint

log = logging.getLogger(__name__)

#: RDS+'s scoring: each target example its own group, the max over a task's examples.
RDS_SCORING = ScoreConfig(aggregation="max", target_groups="example")


# ---------------------------------------------------------------------------------------------
# The draws


def random_draw(sources: Sequence[str], count: int, seed: int) -> np.ndarray:
    """``count`` row indices drawn uniformly with ``seed``, in draw order (the draw of
    ``qless select --method random``)."""
    return choose(np.zeros(len(sources)), SelectConfig(top_n=count, method="random", seed=seed))


def balanced_quotas(sizes: Mapping[str, int], count: int) -> dict[str, int]:
    """How many rows each source gives to a balanced draw of ``count`` (at most the pool).

    Every source gets an equal share; a source with fewer rows than its share gives them all and
    the rest is shared again among the others (water-filling). The remainder of the last equal
    division goes one row each to the sources with the most rows (ties by name)."""
    quotas = {s: 0 for s in sizes}
    left = min(count, sum(sizes.values()))
    active = sorted(s for s in sizes if sizes[s] > 0)
    while active:
        share, extra = divmod(left, len(active))
        full = [s for s in active if sizes[s] <= share]
        if not full:
            for s in active:
                quotas[s] = share
            for s in sorted(active, key=lambda s: (-sizes[s], s))[:extra]:
                quotas[s] += 1  # each active source has more than `share` rows
            break
        for s in full:
            quotas[s] = sizes[s]
            left -= sizes[s]
        active = [s for s in active if s not in full]
    return quotas


def balanced_draw(sources: Sequence[str], count: int, seed: int) -> np.ndarray:
    """``count`` row indices, :func:`balanced_quotas` of them from each source (``sources[i]`` is
    row ``i``'s), drawn uniformly within each source with ``seed``, sources interleaved at random."""
    rows: dict[str, list[int]] = {}
    for i, src in enumerate(sources):
        rows.setdefault(src, []).append(i)
    quotas = balanced_quotas({s: len(r) for s, r in rows.items()}, count)
    rng = np.random.default_rng(seed)
    parts = [np.asarray(rows[s])[rng.permutation(len(rows[s]))[:quotas[s]]] for s in sorted(rows)]
    picked = np.concatenate(parts)
    return picked[rng.permutation(len(picked))]


DRAWS = {"random": random_draw, "balanced": balanced_draw}


# ---------------------------------------------------------------------------------------------
# Files to files


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"--seeds: give one or more non-negative integers, got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds repeats a seed: {seeds}")
    return seeds


def _check_select(cfg: SelectConfig, what: str) -> None:
    if cfg.method != "top":
        raise ConfigError(f"{what}: select.method {cfg.method!r} does not apply (the baseline decides how rows are "
                          "picked); leave it at 'top'")
    if not cfg.top_n:
        check_percent(cfg.percent, what)


def draw_baseline(kind: str, pool: Sequence[DataSpec] | Sequence[Example], out: str | Path,
                  cfg: SelectConfig = SelectConfig(), seeds: Sequence[int] = (0,), data: DataConfig = DataConfig(),
                  ) -> dict[str, dict[str, Any]]:
    """The ``random`` or ``balanced`` baseline of the pool, ``cfg.count`` rows per seed, into the new
    folder ``out`` (``out/seed-<s>``, all seeds or none); returns each seed's ``selection.json``."""
    if kind not in DRAWS:
        raise ConfigError(f"baseline {kind!r}: use one of {', '.join(DRAWS)}")
    _check_select(cfg, f"{kind} baseline")
    seeds = _check_seeds(seeds)
    examples = load_data(pool, data)
    rows = [{"source": e.source, "id": e.id} for e in examples]
    records = PoolRecords(examples)  # looked up per pick, not a dict of the whole pool
    sources = [row["source"] for row in rows]
    count = cfg.count(len(rows))
    described = [str(p) for p in pool if not isinstance(p, Example)]
    out = Path(out)
    summaries = {}
    with output_errors(out), atomic_folder(out, what=f"the {kind} baseline") as tmp:
        for seed in seeds:
            picked = DRAWS[kind](sources, count, seed)
            info: dict[str, Any] = {"task": None, "baseline": kind, "seed": seed, "pool": described}
            if kind == "balanced":
                info["quotas"] = balanced_quotas(Counter(sources), count)
            summaries[f"seed-{seed}"] = write_selection_files(
                tmp / f"seed-{seed}", picked, np.full(len(rows), np.nan), rows, replace(cfg, method="random", seed=seed),
                records=records, info=info)
    log.info("%s baseline: %d of %d rows for seeds %s -> %s", kind, count, len(rows), seeds, out)
    return summaries


def random_baseline(pool: Sequence[DataSpec] | Sequence[Example], out: str | Path, cfg: SelectConfig = SelectConfig(),
                    seeds: Sequence[int] = (0, 1, 2), data: DataConfig = DataConfig()) -> dict[str, dict[str, Any]]:
    """Random p% of the pool for each seed (see :func:`draw_baseline`)."""
    return draw_baseline("random", pool, out, cfg, seeds, data)


def balanced_baseline(pool: Sequence[DataSpec] | Sequence[Example], out: str | Path, cfg: SelectConfig = SelectConfig(),
                      seeds: Sequence[int] = (0, 1, 2), data: DataConfig = DataConfig()) -> dict[str, dict[str, Any]]:
    """Balanced random p% of the pool (an equal share per source) for each seed (see :func:`draw_baseline`)."""
    return draw_baseline("balanced", pool, out, cfg, seeds, data)


def _target_names(targets: Sequence[DataSpec]) -> dict[str, DataSpec]:
    """Target set name (the file's stem) -> data spec; names are checked as folder names."""
    names: dict[str, DataSpec] = {}
    for spec in targets:
        name = Path(spec).stem if Path(spec).exists() else str(spec).replace("/", "_")
        safe_name(name, f"target set name (from {str(spec)!r})")
        if name in names or name == "pool":
            raise ConfigError(f"--targets: the set name {name!r} (from {str(spec)!r}) is taken (by another target or the "
                              "pool); give the files distinct names")
        names[name] = spec
    return names


def rds_baseline(pool: Sequence[DataSpec], targets: Sequence[DataSpec], out: str | Path, cfg: SelectConfig = SelectConfig(),
                 represent_cfg: RepresentConfig = RepresentConfig(), model: ModelConfig = ModelConfig(),
                 data: DataConfig = DataConfig(), target_data: DataConfig | None = None, *,
                 progress: bool = True) -> dict[str, dict[str, Any]]:
    """RDS+ (module docstring) into ``out``: representation stores (an interrupted run resumes them),
    scores per format, and the top ``cfg`` rows per target task in ``out/selected/<task>``;
    returns each task's ``selection.json``."""
    _check_select(cfg, "rds baseline")
    if not targets:
        raise ConfigError("rds baseline: give at least one target file (--targets)")
    names = _target_names(targets)
    target_data = target_data or data
    pool_examples = load_data(pool, data)
    sets = {"pool": (pool_examples, "pool"), **{n: (load_data([s], target_data), "target") for n, s in names.items()}}
    out = Path(out)
    with output_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        with locked(out / ".baseline.lock", f"the RDS+ baseline in {out}"):
            represent(sets, out / "stores", represent_cfg, model, data, target_data_cfg=target_data, progress=progress)
            for spec in represent_cfg.specs:
                root = out / "stores" / spec.tag
                pool_stores = open_by_checkpoint([root / "pool"])
                target_stores = open_by_checkpoint([root / n for n in names])
                write_scores(out / "scores" / spec.tag, score(pool_stores, target_stores, RDS_SCORING, progress=progress),
                             pool_stores, target_stores, RDS_SCORING, replace=True)
            tag = represent_cfg.specs[0].tag
            records = PoolRecords(pool_examples)
            with atomic_folder(out / "selected", replace=True, what="the selections") as tmp:
                return select_into(tmp, out / "scores" / tag, cfg, records=records,
                                   info={"baseline": "rds+", "format": tag})
