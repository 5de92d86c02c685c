"""The whole pipeline from one config, and the embedded demo.

``run(cfg)`` takes a :class:`RunConfig` (or ``qless run CONFIG.yaml``) and writes every stage
under one run folder::

    RUN/config.json                 the resolved configuration of the latest run
    RUN/index/                      offset indexes of the data files (qless.pool_index), reused
    RUN/warmup/                     LoRA checkpoints with Adam moments (qless.training)
    RUN/grads/<format>/<set>/<ckpt> gradient datastores (qless.extraction)
    RUN/curvature/<format>/         LoRIF only (score.method lorif, score.curvature fit): the pool
                                    factor store's curvature per checkpoint (qless.lorif.curvature)
    RUN/scores/<format>/            per-task influence scores, one folder per store format
    RUN/selected/<task>/            the top p% for each target task (pool format + ranking)
    RUN/selected/random/            the seeded random baseline of the same size
    RUN/report/                     plots and report.md
    RUN/summary.json

Every stage checks what it finds against what it is asked for: finished work with the same
inputs is reused, so re-running an interrupted run resumes it, and a run with new targets, another
percentage or more formats reuses the warmup and every store it already has. Work that would
silently change (a warmup of other settings or data, a store of other examples) is refused,
naming the field that differs. Derived outputs (scores, selections, the report) are rebuilt
when their inputs changed.

``demo()`` builds the embedded benchmark and runs the pipeline on the real SmolLM2-135M-Instruct
with the ``cpu`` preset, sized for a laptop CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from qless import presets
from qless.config import Config, describe_differences, from_dict, merge, option, parse_overrides, read_config_file, to_dict
from qless.data import DataConfig, Example
from qless.errors import ConfigError
from qless.extraction import ExtractConfig, check_projection
from qless.files import atomic_folder, atomic_write_json, locked, made_from, output_errors, safe_name
from qless.lorif.curvature import CurvatureConfig
from qless.models import AdapterConfig, ModelConfig, release_memory
from qless.project import ProjectionConfig
from qless.quantize import QuantizerSpec
from qless.scoring import ScoreConfig
from qless.selection import SelectConfig
from qless.stages import curvature_into, load_data, pool_records, run_extract, run_warmup, score_into, select_into
from qless.training import WarmupConfig

log = logging.getLogger(__name__)

RESERVED_SETS = ("pool", "random")


@dataclass(frozen=True)
class RunConfig(Config):
    """Everything a run needs. Stage sections use the stage configs' fields."""

    section = "run"

    run_dir: str = option("runs/qless", "folder that receives every stage's output")
    pool: tuple[str, ...] = option((), "pool data: .jsonl/.json files, datasets folders or Hub dataset ids")
    targets: tuple[str, ...] = option((), "target task data (prompt/completion or messages with a 'subtask' field)")
    model: ModelConfig = option(ModelConfig(), "base model", flag=False)
    adapter: AdapterConfig = option(AdapterConfig(), "LoRA adapter", flag=False)
    data: DataConfig = option(DataConfig(), "pool tokenization", flag=False)
    target_data: DataConfig = option(DataConfig(), "target tokenization", flag=False)
    warmup: WarmupConfig = option(WarmupConfig(), "warmup training", flag=False)
    projection: ProjectionConfig = option(ProjectionConfig(), "gradient projection", flag=False)
    extract: ExtractConfig = option(ExtractConfig(), "gradient extraction", flag=False)
    score: ScoreConfig = option(ScoreConfig(), "scoring", flag=False)
    curvature: CurvatureConfig = option(CurvatureConfig(), "LoRIF curvature, fitted when score.curvature is fit", flag=False)
    select: SelectConfig = option(SelectConfig(), "selection", flag=False)
    select_format: str = option("absmean4", "the store format whose scores make the selection")

    def validate(self) -> None:
        if not self.pool:
            raise ConfigError("run: give the pool data (pool: [files...])")
        if not self.targets:
            raise ConfigError("run: give at least one target task file (targets: [files...])")
        check_projection(self.projection, self.extract)
        if (self.projection.kind == "lorif") != (self.score.method == "lorif"):
            raise ConfigError(f"projection.kind {self.projection.kind} with score.method {self.score.method}: LoRIF factor "
                              "stores (projection.kind lorif) are scored by score.method lorif, and only those; set both "
                              "or neither")
        if self.score.method == "lorif" and self.score.curvature not in ("none", "fit"):
            raise ConfigError(f"score.curvature {self.score.curvature!r}: in a run it is fit (fitted on the run's pool "
                              "stores into RUN/curvature/<format>, with the curvature section's settings) or none (plain "
                              "inner products)")
        tags = [s.tag for s in self.extract.specs]
        if QuantizerSpec.parse(self.select_format).tag not in tags:
            raise ConfigError(f"run.select_format {self.select_format!r} is not among extract.formats {tags}")


def load_run_config(path: str | Path | None = None, preset: str | None = None,
                    overrides: Sequence[str] | Mapping[str, Any] = (), *,
                    recommendation: Mapping[str, Any] | None = None) -> RunConfig:
    """A run config from a JSON or YAML file, layered over a preset (``preset``, else the file's
    ``preset`` key, else ``paper``), then the projection and format of a ``qless fidelity`` recommendation,
    with ``SECTION.FIELD=VALUE`` overrides applied last."""
    data = read_config_file(path) if path is not None else {}
    if recommendation:
        # projection and format only: the run's model dtype also trains its warmup, which the
        # recommendation did not measure (`qless extract --from-recommendation` takes the dtype too)
        data = merge(data, {k: v for k, v in recommendation.items() if k != "model"})
    file_preset = data.pop("preset", None)
    over = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(list(overrides))
    over_preset = over.pop("preset", None)
    where = f"{path}:" if path is not None else "command line:"
    return build_run_config(merge(data, over), over_preset or preset or file_preset or "paper", where=where)


def build_run_config(data: Mapping[str, Any], preset: Any = "paper", where: str = "config") -> RunConfig:
    """A RunConfig from a JSON-like dict layered over the named preset."""
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    layered = {k: v for k, v in presets.preset(preset, f"{where} preset").items() if k in fields}
    return from_dict(RunConfig, merge(layered, dict(data)), where)


def _target_sets(cfg: RunConfig) -> dict[str, str]:
    """Target set name (its file's stem) -> data spec; names are checked as folder names."""
    names: dict[str, str] = {}
    for spec in cfg.targets:
        name = Path(spec).stem if Path(spec).exists() else spec.replace("/", "_")
        safe_name(name, f"target set name (from {spec!r})")
        if name in names or name in RESERVED_SETS:
            raise ConfigError(f"targets: the set name {name!r} (from {spec!r}) is taken (by another target or "
                              f"{'/'.join(RESERVED_SETS)}); give the files distinct names")
        names[name] = spec
    return names


def run(cfg: RunConfig | str | Path, *, progress: bool = True, source_groups: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run (or resume) the whole pipeline; returns the summary also written to ``RUN/summary.json``.

    ``cfg`` is a RunConfig or the path of a JSON/YAML run config. ``source_groups`` optionally
    maps pool sources to coarser groups for the report (kept in ``RUN/source_groups.json``)."""
    if not isinstance(cfg, RunConfig):
        cfg = load_run_config(cfg)
    from qless.distributed import launch_info

    if launch_info() is not None:
        raise ConfigError("qless run is one process (its warmup trains on one device); under torchrun or accelerate "
                          "launch run the extraction alone: `qless extract` (see the README, 'Several GPUs and nodes')")
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir {str(run_dir)!r} is a file, not a folder; give a folder for the run's outputs")
    with output_errors(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        with locked(run_dir / ".run.lock", f"the run in {run_dir}"):
            return _run(cfg, run_dir, progress, source_groups)


def _run(cfg: RunConfig, run_dir: Path, progress: bool, source_groups: Mapping[str, str] | None) -> dict[str, Any]:
    atomic_write_json(run_dir / "config.json", to_dict(cfg))
    if source_groups is not None:
        atomic_write_json(run_dir / "source_groups.json", dict(source_groups))
    timings: dict[str, float] = {}
    t = time.perf_counter()
    target_specs = _target_sets(cfg)
    pool = load_data(cfg.pool, cfg.data, index_dir=run_dir / "index")  # lazy: records read when used
    targets = {name: load_data([spec], cfg.target_data, index_dir=run_dir / "index") for name, spec in target_specs.items()}
    log.info("pool: %d examples; targets: %s", len(pool), {k: len(v) for k, v in targets.items()})
    run_warmup(pool, run_dir / "warmup", cfg.warmup, cfg.model, cfg.adapter, cfg.data, progress=progress)
    release_memory()  # the warmup's model is gone; hand its memory back before extraction loads its own
    timings["warmup"] = time.perf_counter() - t

    t = time.perf_counter()
    grads = run_dir / "grads"
    sets = {"pool": (pool, "pool"), **{name: (ex, "target") for name, ex in targets.items()}}
    run_extract(run_dir / "warmup", sets, grads, cfg.extract, cfg.projection, model=cfg.model, data=cfg.data,
                target_data=cfg.target_data, progress=progress)
    release_memory()
    timings["extract"] = time.perf_counter() - t

    t = time.perf_counter()
    scores_dirs = {spec.tag: _scores(run_dir, spec.tag, list(targets), cfg, progress) for spec in cfg.extract.specs}
    timings["score"] = time.perf_counter() - t

    primary = QuantizerSpec.parse(cfg.select_format).tag
    selected = _selections(run_dir / "selected", scores_dirs[primary], primary, cfg.select, pool)
    report_dir = run_report(run_dir)
    summary = _summary(run_dir, grads, scores_dirs, selected, report_dir, timings, len(pool), targets, cfg.select)
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def _scores(run_dir: Path, tag: str, targets: list[str], cfg: RunConfig, progress: bool) -> Path:
    """The scores folder of one format: reused when computed from the same stores and settings
    (with LoRIF's curvature, fitted or reused first when ``score.curvature`` is fit)."""
    from qless.scoring import read_scores, scores_inputs
    from qless.store import open_by_checkpoint

    out = run_dir / "scores" / tag
    pool_stores = open_by_checkpoint([run_dir / "grads" / tag / "pool"])
    target_stores = open_by_checkpoint([run_dir / "grads" / tag / name for name in targets])
    score_cfg = cfg.score
    if score_cfg.method == "lorif" and score_cfg.curvature == "fit":
        folder = curvature_into(run_dir / "curvature" / tag, pool_stores, cfg.curvature, progress=progress)
        score_cfg = replace(score_cfg, curvature=str(folder))
    inputs = scores_inputs(pool_stores, target_stores, score_cfg)
    if (out / "manifest.json").exists():
        if read_scores(out)[0].get("inputs") == inputs:
            return out
        log.info("%s: the stores or settings changed since these scores were computed; computing them again", out)
    return score_into(out, pool_stores, target_stores, score_cfg, replace=True, progress=progress)


def _selections(out: Path, scores_dir: Path, primary: str, cfg: SelectConfig, pool: Sequence[Example]) -> dict[str, Any]:
    """``RUN/selected``: one folder per task plus the random baseline, written as one folder.
    Reused when made from the same scores with the same settings."""
    scores_id = hashlib.sha256((scores_dir / "manifest.json").read_bytes()).hexdigest()
    inputs = {"scores_manifest_sha256": scores_id, "format": primary, "select": to_dict(cfg)}
    if made_from(out, inputs):
        try:
            return json.loads((out / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # unreadable: rebuilt below
    if out.exists():
        log.info("%s: the scores or selection settings changed; selecting again", out)
    records = pool_records(pool)  # looked up one record at a time, not a dict of the pool
    with atomic_folder(out, replace=True, what="the selections") as tmp:
        tasks = select_into(tmp, scores_dir, cfg, records=records, info={"format": primary})
        if "random" in tasks:
            raise ConfigError("a target task is named 'random', which is the random baseline's folder; rename the "
                              "targets' 'dataset' field")
        random = _random_baseline(tmp / "random", scores_dir, cfg, records)
        summary = {"tasks": {t: s["n_selected"] for t, s in tasks.items()}, "random": random["n_selected"],
                   "percent": cfg.percent, "top_n": cfg.top_n, "format": primary}
        atomic_write_json(tmp / "summary.json", summary)
        atomic_write_json(tmp / "inputs.json", inputs)
    return summary


def _random_baseline(folder: Path, scores_dir: Path, cfg: SelectConfig, records: Mapping[tuple[str, str], Any]) -> dict:
    """A seeded uniform draw of the same size among the rows that have scores (no task's scores rank it)."""
    from qless.scoring import read_scores
    from qless.selection import choose, write_selection_files

    _, values, rows = read_scores(scores_dir)
    scored = np.where(np.isnan(np.asarray(values)).any(axis=1), np.nan, 0.0)
    rcfg = replace(cfg, method="random")
    return write_selection_files(folder, choose(scored, rcfg), scored, rows, rcfg, records=records,
                                 info={"task": None, "scores": str(scores_dir)})


def run_report(run_dir: str | Path) -> Path:
    """(Re)write ``RUN/report`` from a run folder's config, scores and selections."""
    from qless.report import write_report
    from qless.store import read_manifest

    run_dir = Path(run_dir)
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise ConfigError(f"{run_dir}: no config.json; give the folder of a `qless run` or `qless demo`")
    try:
        cfg = from_dict(RunConfig, json.loads(saved.read_text(encoding="utf-8")), f"{saved}:")
        summary = json.loads((run_dir / "selected" / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{run_dir}: the run is unfinished or damaged ({e}); run it (again) first") from None
    groups_path = run_dir / "source_groups.json"
    groups = json.loads(groups_path.read_text(encoding="utf-8")) if groups_path.is_file() else None
    scores_dirs = {spec.tag: run_dir / "scores" / spec.tag for spec in cfg.extract.specs}
    selections = {task: run_dir / "selected" / task for task in summary["tasks"]}
    k = cfg.projection.dim
    primary = QuantizerSpec.parse(str(summary.get("format"))).tag  # a format name, never a path
    first = next(iter(sorted((run_dir / "grads" / primary / "pool").glob("*/manifest.json"))), None)
    if first is not None:
        k = read_manifest(first.parent)["projection"]["dim"]  # kind none stores d coordinates
    return write_report(run_dir / "report", scores_dirs, primary, selections, run_dir / "selected" / "random",
                        cfg.select.percent, k, groups, fidelity_dir=run_dir / "fidelity")


def _summary(run_dir: Path, grads: Path, scores_dirs: dict[str, Path], selected: Mapping[str, Any], report_dir: Path,
             timings: dict[str, float], n_pool: int, targets: Mapping[str, Sequence[Example]], cfg: SelectConfig) -> dict[str, Any]:
    sizes = {}
    for tag in scores_dirs:
        total = sum(p.stat().st_size for p in (grads / tag).rglob("*") if p.is_file() and p.name in ("codes.bin", "scales.bin"))
        sizes[tag] = total

    def counts(folder: Path) -> dict[str, int]:
        data = json.loads((folder / "counts.json").read_text(encoding="utf-8"))
        return {src: c["selected"] for src, c in data.items() if c["selected"]}

    return {
        "run_dir": str(run_dir),
        "n_pool": n_pool,
        "targets": {name: len(ex) for name, ex in targets.items()},
        "percent": cfg.percent,
        "top_n": cfg.top_n,
        "selected": {task: counts(run_dir / "selected" / task) for task in selected["tasks"]},
        "random": counts(run_dir / "selected" / "random"),
        "store_bytes": sizes,
        "seconds": timings,
        "report": str(report_dir / "report.md"),
    }


def demo(run_dir: str | Path = "runs/demo", pool_size: int = 400, seed: int = 0, *, progress: bool = True) -> dict[str, Any]:
    """Build the embedded benchmark (if needed) and run the CPU preset on SmolLM2-135M-Instruct."""
    from qless.embedded import BenchmarkConfig, build_benchmark
    from qless.models import native_bfloat16, resolve_device

    run_dir = Path(run_dir)
    bench = run_dir / "benchmark"
    wanted = BenchmarkConfig(seed=seed, pool_size=pool_size)
    if not (bench / "manifest.json").exists():
        build_benchmark(bench, wanted)
    else:
        built = json.loads((bench / "manifest.json").read_text(encoding="utf-8"))["config"]
        if built != to_dict(wanted):
            raise ConfigError(f"{bench}: was built with other settings ({describe_differences(built, to_dict(wanted))}); "
                              "use a new --run-dir")

    # bfloat16 where the processor computes it natively (2-3x faster here), else float32
    fast = native_bfloat16(resolve_device("auto"))
    dtype = "bfloat16" if fast else "float32"
    log.info("demo: model and projection matmuls in %s (%s)", dtype,
             "native bfloat16 units" if fast else "no native bfloat16 on this processor")
    cfg = build_run_config({
        "run_dir": str(run_dir),
        "pool": [str(bench / "pool.jsonl")],
        "targets": [str(bench / "targets" / f"{t}.jsonl") for t in ("mmlu", "bbh", "squad")],
        "model": {"model": "embedded", "dtype": dtype},
        "projection": {"compute_dtype": dtype},
        "warmup": {"seed": seed},
    }, preset="cpu", where="demo")
    sources = json.loads((bench / "manifest.json").read_text(encoding="utf-8"))["pool"]["sources"]
    return run(cfg, progress=progress, source_groups={src: info["kind"] for src, info in sources.items()})
