"""One function per stage, from files to files: what the ``qless`` subcommands and ``qless run`` call.

Each ``run_<stage>`` takes data files or earlier stages' folders and the stage's configs,
writes its output folder and returns what it wrote. The library functions underneath
(:func:`qless.training.warmup`, :class:`qless.extraction.Extractor`, :func:`qless.scoring.score`,
:func:`qless.selection.choose`) take examples, stores and arrays instead.

* :func:`run_warmup`  pool data -> ``OUT/checkpoint-N`` (LoRA adapter, Adam moments, lr)
* :func:`run_extract` a warmup folder and data sets -> ``OUT/<format>/<set>/<checkpoint>`` stores
* :func:`run_score`   pool and target stores -> a scores folder
* :func:`run_select`  a scores folder -> a selection folder (one subfolder per task if several)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qless.data import DataConfig, Example, load_examples
from qless.errors import QlessError
from qless.extraction import ExtractConfig, extract
from qless.models import AdapterConfig, ModelConfig
from qless.project import ProjectionConfig
from qless.scoring import ScoreConfig, read_scores, score, write_scores
from qless.selection import SelectConfig, choose, write_selection
from qless.store import open_by_checkpoint
from qless.training import Checkpoint, WarmupConfig, read_checkpoints, warmup

log = logging.getLogger(__name__)

DataSpec = str | Path
SetSpec = tuple[Sequence[DataSpec] | Sequence[Example], Literal["pool", "target"]]


def load_data(specs: Sequence[DataSpec] | Sequence[Example], cfg: DataConfig = DataConfig()) -> list[Example]:
    """Examples of every data file, folder or Hub id in ``specs``, in order (Examples pass through)."""
    out: list[Example] = []
    for spec in specs:
        out += [spec] if isinstance(spec, Example) else load_examples(spec, cfg=cfg)
    return out


def run_warmup(pool: Sequence[DataSpec] | Sequence[Example], out: str | Path, cfg: WarmupConfig = WarmupConfig(),
               model: ModelConfig = ModelConfig(), adapter: AdapterConfig = AdapterConfig(),
               data: DataConfig = DataConfig(), *, progress: bool = True) -> list[Checkpoint]:
    """LoRA warmup on a random ``cfg.percent`` of the pool; one checkpoint per epoch in ``out``."""
    return warmup(load_data(pool, data), out, cfg, model, adapter, data, progress=progress)


def run_extract(warmup_dir: str | Path, sets: Mapping[str, SetSpec], out: str | Path,
                cfg: ExtractConfig = ExtractConfig(), projection: ProjectionConfig = ProjectionConfig(), *,
                model: ModelConfig, data: DataConfig, target_data: DataConfig | None = None,
                checkpoints: Sequence[str] | None = None, progress: bool = True) -> dict[str, dict[str, list[Path]]]:
    """Gradient stores of every ``name -> (data, kind)`` set at the warmup's checkpoints:
    ``{set: {format: [store per checkpoint]}}``. ``target_data`` tokenizes the target sets."""
    ckpts = read_checkpoints(warmup_dir)
    if checkpoints:
        ckpts = [c for c in ckpts if c.name in checkpoints]
    loaded = {name: (load_data(specs, target_data or data if kind == "target" else data), kind)
              for name, (specs, kind) in sets.items()}
    return extract(loaded, ckpts, out, cfg, projection, model, data, target_data_cfg=target_data, progress=progress)


def run_score(pool: Sequence[str | Path], targets: Sequence[str | Path], out: str | Path,
              cfg: ScoreConfig = ScoreConfig(), *, progress: bool = True) -> dict[str, Any]:
    """Score the pool stores against the target stores into the scores folder ``out``;
    returns its manifest (tasks, subtasks, checkpoints, n_pool) with ``path``."""
    pool_stores = open_by_checkpoint(pool)
    target_stores = open_by_checkpoint(targets)
    result = score(pool_stores, target_stores, cfg, progress=progress)
    path = write_scores(out, result, pool_stores, target_stores, cfg)
    manifest, _, _ = read_scores(path)
    return {**manifest, "path": str(path)}


def pool_records(pool_data: Sequence[DataSpec] | Sequence[Example]) -> dict[tuple[str, str], Mapping[str, Any]]:
    """``(source, id) -> the pool record as read``, to write selections in the pool's own format."""
    return {(ex.source, ex.id): ex.record for ex in load_data(pool_data, DataConfig(on_bad_record="skip"))}


def run_select(scores: str | Path, out: str | Path, cfg: SelectConfig = SelectConfig(), *,
               tasks: Sequence[str] | None = None, pool_data: Sequence[DataSpec] | Sequence[Example] | None = None,
               ) -> dict[str, dict[str, Any]]:
    """Select from a scores folder for each task (default: every scored task) into ``out``
    (``out/<task>`` when several); returns each task's ``selection.json`` content."""
    manifest, values, rows = read_scores(scores)
    chosen = list(tasks or manifest["tasks"])
    unknown = [t for t in chosen if t not in manifest["tasks"]]
    if unknown:
        raise QlessError(f"task(s) {unknown} not in {scores}; it scored {manifest['tasks']}")
    records = pool_records(pool_data) if pool_data is not None else None
    out = Path(out)
    summaries = {}
    for task in chosen:
        col = np.asarray(values[:, manifest["tasks"].index(task)])
        dest = out / task if len(chosen) > 1 else out
        summaries[task] = write_selection(dest, choose(col, cfg), col, rows, cfg, records=records,
                                          info={"task": task, "scores": str(scores)})
    return summaries
