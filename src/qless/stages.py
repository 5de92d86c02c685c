"""One function per stage, from files to files: what the ``qless`` subcommands and ``qless run`` call.

Each ``run_<stage>`` takes data files or earlier stages' folders and the stage's configs,
writes its output folder and returns what it wrote. The library functions underneath
(:func:`qless.training.warmup`, :class:`qless.extraction.Extractor`, :func:`qless.scoring.score`,
:func:`qless.selection.choose`) take examples, stores and arrays instead.

* :func:`run_warmup`  pool data -> ``OUT/checkpoint-N`` (LoRA adapter, Adam moments, lr)
* :func:`run_extract` a warmup folder and data sets -> ``OUT/<format>/<set>/<checkpoint>`` stores
* :func:`run_score`   pool and target stores -> a scores folder (LESS/QLESS cosine, or LoRIF influence)
* :func:`run_fit_curvature` LoRIF pool factor stores -> a curvature folder (one per checkpoint)
* :func:`run_select`  a scores folder -> a selection folder (one subfolder per task if several)
* :func:`run_train`   a selection folder or data files -> ``OUT/adapter`` (LoRA fine-tuning, the warmup's recipe)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qless.config import from_dict, to_dict
from qless.data import DataConfig, Example
from qless.distributed import all_succeeded, device_for, launch_info, process_group, shard_config
from qless.errors import ConfigError, DataError, ModelError
from qless.extraction import ExtractConfig, extract, finish_stores
from qless.files import INPUTS, atomic_folder, atomic_write_json, made_from, output_errors, safe_name
from qless.lorif.curvature import CurvatureConfig, fit_curvature_folder
from qless.lorif.score import lorif_score
from qless.models import AdapterConfig, ModelConfig
from qless.pool_index import PoolExamples, PoolRecords, open_examples
from qless.project import ProjectionConfig
from qless.scoring import ScoreConfig, read_scores, score, target_groups, write_scores
from qless.selection import SelectConfig, choose, write_selection_files
from qless.store import Datastore, open_by_checkpoint
from qless.store.derive import content_digest
from qless.training import Checkpoint, TrainConfig, WarmupConfig, read_checkpoints, read_warmup, train, warmup

log = logging.getLogger(__name__)

DataSpec = str | Path
SetSpec = tuple[Sequence[DataSpec] | Sequence[Example], Literal["pool", "target"]]


def load_data(specs: Sequence[DataSpec] | Sequence[Example], cfg: DataConfig = DataConfig(), *,
              index_dir: str | Path | None = None) -> Sequence[Example]:
    """Examples of every data file, folder or Hub id in ``specs``, in order (Examples pass through).

    Files and datasets are read lazily (:func:`qless.pool_index.open_examples`: an offset index,
    records parsed when used), so a pool need not fit in memory; ``index_dir`` keeps the indexes
    for the next run. A lazy sequence passes through as it is."""
    if isinstance(specs, PoolExamples):
        return specs
    specs = list(specs)
    if all(isinstance(spec, Example) for spec in specs):
        return specs
    parts: list[Any] = []
    for spec in specs:
        if isinstance(spec, Example):
            if not parts or not isinstance(parts[-1], list):
                parts.append([])
            parts[-1].append(spec)
        else:
            parts += open_examples(spec, cfg=cfg, index_dir=index_dir).parts
    return PoolExamples(parts)


def run_warmup(pool: Sequence[DataSpec] | Sequence[Example], out: str | Path, cfg: WarmupConfig = WarmupConfig(),
               model: ModelConfig = ModelConfig(), adapter: AdapterConfig = AdapterConfig(),
               data: DataConfig = DataConfig(), *, progress: bool = True) -> list[Checkpoint]:
    """LoRA warmup on a random ``cfg.percent`` of the pool; one checkpoint per epoch in ``out``."""
    check_percent(cfg.percent, "warmup")
    examples = load_data(pool, data)
    with output_errors(out):
        return warmup(examples, out, cfg, model, adapter, data, progress=progress)


def run_extract(warmup_dir: str | Path, sets: Mapping[str, SetSpec], out: str | Path,
                cfg: ExtractConfig = ExtractConfig(), projection: ProjectionConfig = ProjectionConfig(), *,
                model: ModelConfig, data: DataConfig, target_data: DataConfig | None = None,
                checkpoints: Sequence[str] | None = None, progress: bool = True) -> dict[str, dict[str, list[Path]]]:
    """Gradient stores of every ``name -> (data, kind)`` set at the warmup's checkpoints:
    ``{set: {format: [store per checkpoint]}}``. ``target_data`` tokenizes the target sets."""
    every = read_checkpoints(warmup_dir, finished=True)
    ckpts = every
    if checkpoints:
        unknown = [c for c in checkpoints if c not in {k.name for k in every}]
        if unknown:
            raise ConfigError(f"--checkpoints: {', '.join(unknown)} not in {warmup_dir}, which has "
                              f"{', '.join(k.name for k in every)}")
        ckpts = [c for c in every if c.name in checkpoints]
    loaded = {name: (load_data(specs, target_data or data if kind == "target" else data), kind)
              for name, (specs, kind) in sets.items()}
    # under torchrun / accelerate launch: this rank's shard on this rank's device (qless.distributed)
    launch = launch_info()
    cfg = shard_config(cfg, launch)
    model = replace(model, device=device_for(model.device, launch))
    if launch is None:
        with output_errors(out):
            return extract(loaded, ckpts, out, cfg, projection, model, data, target_data_cfg=target_data, progress=progress,
                           warmup_checkpoints=[c.name for c in every])
    with output_errors(out), process_group(launch):
        result, ok = None, False
        try:
            result = extract(loaded, ckpts, out, cfg, projection, model, data, target_data_cfg=target_data,
                             progress=progress and launch.rank == 0, warmup_checkpoints=[c.name for c in every])
            ok = True
        finally:
            if not all_succeeded(ok) and ok:  # this rank is fine, another failed: say so rather than hang
                raise ModelError(f"another rank failed while this one (rank {launch.rank}) finished its shard; see that "
                                 "rank's error, then run the same command again: finished shards are kept")
        ok = False
        try:
            if launch.rank == 0:
                finish_stores(Path(out), result, cfg)
            ok = True
        finally:
            if not all_succeeded(ok) and ok:
                raise ModelError("rank 0 could not finalise the stores; see its error and run the same command again")
        return result


def run_score(pool: Sequence[str | Path], targets: Sequence[str | Path], out: str | Path,
              cfg: ScoreConfig = ScoreConfig(), *, progress: bool = True) -> dict[str, Any]:
    """Score the pool stores against the target stores into the scores folder ``out``;
    returns its manifest (tasks, subtasks, checkpoints, n_pool) with ``path``."""
    pool_stores = open_by_checkpoint(pool)
    target_stores = open_by_checkpoint(targets)
    if Path(out).exists():
        raise ConfigError(f"{out}: already exists; choose a new output folder for the scores")
    with output_errors(out):
        path = score_into(out, pool_stores, target_stores, cfg, progress=progress)
    manifest, _, _ = read_scores(path)
    return {**manifest, "path": str(path)}


#: ``ScoreConfig.method`` -> the scorer: LESS/QLESS cosine, or LoRIF influence from factor stores.
SCORING_METHODS = {"less": score, "lorif": lorif_score}


def score_into(out: str | Path, pool: Sequence[Datastore], targets: Sequence[Datastore], cfg: ScoreConfig, *,
               replace: bool = False, progress: bool = True) -> Path:
    """Score the pool stores against the target stores and write the scores folder ``out``.

    The ``[n_pool, S]`` float32 scores go to a memory-mapped file beside ``out`` (removed
    after), so they need not fit in memory: 372 bytes per pool example for 93 subtasks."""
    out = Path(out)
    n = pool[0].n_rows if pool else 0
    s = len(target_groups(list(targets[0].rows()), by=cfg.target_groups).subtasks) if targets else 0
    scratch = out.parent / f".{out.name}.scores.{os.getpid()}.npy"
    values = result = None
    try:
        if n and s:
            out.parent.mkdir(parents=True, exist_ok=True)
            values = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32, shape=(n, s))
        result = SCORING_METHODS[cfg.method](pool, targets, cfg, out=values, progress=progress)
        return write_scores(out, result, pool, targets, cfg, replace=replace)
    finally:
        del values, result  # unmapped before the file goes
        scratch.unlink(missing_ok=True)


def run_fit_curvature(stores: Sequence[str | Path], out: str | Path, cfg: CurvatureConfig = CurvatureConfig(), *,
                      progress: bool = True) -> dict[str, Path]:
    """LoRIF's curvature of each checkpoint's pool factor store into the new folder ``out``
    (``OUT/<checkpoint>/``, for ``qless score --method lorif --curvature OUT``)."""
    with output_errors(out):
        return fit_curvature_folder(stores, out, cfg, progress=progress)


def curvature_inputs(stores: Sequence[Datastore], cfg: CurvatureConfig) -> dict[str, Any]:
    """What a curvature folder is fitted from: each pool store's content digest, and the settings."""
    return {"stores": [content_digest(s) for s in stores], "config": to_dict(cfg)}


def curvature_into(folder: str | Path, stores: Sequence[Datastore], cfg: CurvatureConfig, *,
                   progress: bool = True) -> Path:
    """LoRIF's curvature of the pool factor ``stores`` (one per checkpoint) in ``folder``, reused when
    it was fitted from the same stores with the same settings (its ``inputs.json``), else fitted
    again in its place. For pipelines that own the folder (``qless run``, ``qless compare``)."""
    folder = Path(folder)
    inputs = curvature_inputs(stores, cfg)
    if made_from(folder, inputs):
        return folder
    if folder.exists():
        log.info("%s: the stores or curvature settings changed; fitting it again", folder)
    fit_curvature_folder(stores, folder, cfg, replace=True, progress=progress)
    atomic_write_json(folder / INPUTS, inputs)
    return folder


def pool_records(pool_data: Sequence[DataSpec] | Sequence[Example], *,
                 index_dir: str | Path | None = None) -> Mapping[tuple[str, str], Mapping[str, Any]]:
    """``(source, id) -> the pool record as read``, to write selections in the pool's own format:
    looked up through the pool files' indexes, one record at a time (:class:`~qless.pool_index.PoolRecords`)."""
    return PoolRecords(load_data(pool_data, DataConfig(on_bad_record="skip"), index_dir=index_dir))


def run_select(scores: str | Path, out: str | Path, cfg: SelectConfig = SelectConfig(), *,
               tasks: Sequence[str] | None = None, pool_data: Sequence[DataSpec] | Sequence[Example] | None = None,
               index_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Select from a scores folder for each task (default: every scored task) into the new folder
    ``out`` (``out/<task>`` when several), all tasks or none; returns each task's ``selection.json``.
    ``index_dir`` keeps (and reuses) the pool files' indexes."""
    records = pool_records(pool_data, index_dir=index_dir) if pool_data is not None else None
    with output_errors(out), atomic_folder(out, what="the selection") as tmp:
        return select_into(tmp, scores, cfg, tasks=tasks, records=records, flat=True)


def select_into(folder: Path, scores: str | Path, cfg: SelectConfig, *, tasks: Sequence[str] | None = None,
                records: Mapping[tuple[str, str], Mapping[str, Any]] | None = None, flat: bool = False,
                info: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Write one selection per task into ``folder/<task>`` (straight into ``folder`` when
    ``flat`` and there is one task); the caller makes ``folder`` appear atomically."""
    manifest, values, rows = read_scores(scores)
    chosen = list(tasks or manifest["tasks"])
    unknown = [t for t in chosen if t not in manifest["tasks"]]
    if unknown:
        raise ConfigError(f"task(s) {unknown} not in {scores}; it scored {manifest['tasks']}")
    for task in chosen:
        safe_name(task, "target task name (the targets' 'dataset' field, or their file name)")
    if not cfg.top_n:
        check_percent(cfg.percent, "select")
    summaries = {}
    for task in chosen:
        col = np.asarray(values[:, manifest["tasks"].index(task)])
        dest = folder if flat and len(chosen) == 1 else folder / task
        summaries[task] = write_selection_files(dest, choose(col, cfg), col, rows, cfg, records=records,
                                                info={"task": task, "scores": str(scores), **dict(info or {})})
    return summaries


def run_train(data: Sequence[DataSpec] | Sequence[Example], out: str | Path, cfg: TrainConfig = TrainConfig(),
              model: ModelConfig = ModelConfig(), adapter: AdapterConfig = AdapterConfig(),
              data_cfg: DataConfig = DataConfig(), *, progress: bool = True) -> dict[str, Any]:
    """LoRA fine-tuning of the base model on data files, selection folders (their ``selected.jsonl``)
    or examples; writes ``out/adapter`` and ``out/train.json`` and returns the latter's content."""
    specs = [spec if isinstance(spec, Example) else selected_examples(spec) for spec in data]
    examples = load_data(specs, data_cfg)
    source = {"data": [str(s) for s in specs if not isinstance(s, Example)]}
    with output_errors(out):
        return train(examples, out, cfg, model, adapter, data_cfg, progress=progress, source=source)


def selected_examples(spec: DataSpec) -> DataSpec:
    """The ``selected.jsonl`` of a selection folder (``qless select``, ``qless baseline``); any
    other data spec unchanged."""
    path = Path(spec)
    if not path.is_dir():
        return spec
    if (path / "selection.json").is_file():
        if not (path / "selected.jsonl").is_file():
            raise DataError(f"{path}: the selection has no selected.jsonl (it was made without the pool data); select "
                            "again with --pool-data, or give the data file")
        return path / "selected.jsonl"
    tasks = sorted(p.name for p in path.iterdir() if (p / "selection.json").is_file())
    if tasks:
        raise ConfigError(f"{path}: holds one selection per task ({', '.join(tasks)}); give one of them, "
                          f"e.g. {path / tasks[0]}")
    return spec


def check_percent(percent: float, what: str) -> None:
    """Warn when a percentage looks like LESS's fraction (its ``--percentage 0.05`` meant 5%)."""
    if percent < 1:
        log.warning("%s: percent %g means %g%% of the pool, not %g%%; LESS's --percentage is a fraction "
                    "(0.05 = 5%%): for 5%% pass --percent 5", what, percent, percent, percent * 100)


def warmup_defaults(warmup_dir: str | Path) -> tuple[ModelConfig, DataConfig]:
    """The model and tokenization of a warmup, as defaults for extracting at its checkpoints.

    Never ``trust_remote_code``: a setting that can run code comes from the user's own flags or
    config, not from a folder that may come from elsewhere."""
    where = f"{Path(warmup_dir) / 'warmup.json'}: settings"
    settings = read_warmup(warmup_dir)["settings"]
    model = from_dict(ModelConfig, {**settings["model"], "trust_remote_code": False}, f"{where}.model")
    return model, from_dict(DataConfig, settings["data"], f"{where}.data")
