"""The whole pipeline from one config, and the embedded demo.

``run(cfg)`` takes a :class:`RunConfig` (or ``qless run CONFIG.json``) and writes every stage
under one run folder::

    RUN/config.json                 the resolved configuration
    RUN/warmup/                     LoRA checkpoints with Adam moments (qless.training)
    RUN/grads/<format>/<set>/<ckpt> gradient datastores (qless.extraction)
    RUN/scores/<format>/            per-task influence scores, one folder per store format
    RUN/selected/<task>/            the top p% for each target task (pool format + ranking)
    RUN/selected/random/            the seeded random baseline of the same size
    RUN/report/                     plots and report.md
    RUN/summary.json

Every stage skips work that is already complete, so re-running an interrupted run resumes it.
``demo()`` builds the embedded benchmark and runs the pipeline on the real SmolLM2-135M-Instruct
with the ``cpu`` preset, sized for a laptop CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qless import presets
from qless.config import from_dict, option, to_dict
from qless.data import DataConfig, Example, load_examples
from qless.errors import ConfigError
from qless.extraction import ExtractConfig
from qless.models import AdapterConfig, ModelConfig, release_memory
from qless.project import ProjectionConfig
from qless.scoring import ScoreConfig
from qless.selection import SelectConfig
from qless.stages import run_extract, run_score, run_warmup
from qless.training import WarmupConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs. Stage sections use the stage configs' fields."""

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
    select: SelectConfig = option(SelectConfig(), "selection", flag=False)
    select_format: str = option("absmean4", "the store format whose scores make the selection")

    def __post_init__(self) -> None:
        if not self.pool:
            raise ConfigError("run: give the pool data (pool: [files...])")
        if not self.targets:
            raise ConfigError("run: give at least one target task file (targets: [files...])")
        from qless.quantize import QuantizerSpec

        tags = [s.tag for s in self.extract.specs]
        if QuantizerSpec.parse(self.select_format).tag not in tags:
            raise ConfigError(f"run.select_format {self.select_format!r} is not among extract.formats {tags}")


def load_run_config(path: str | Path, preset: str | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a JSON run config, layered over a preset (the file's ``preset`` key or ``preset``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the run config ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the run config must be a JSON object")
    preset = data.pop("preset", None) or preset or "paper"
    return build_run_config({**data, **(overrides or {})}, preset, where=f"{path}:")


def build_run_config(data: dict[str, Any], preset: str = "paper", where: str = "config") -> RunConfig:
    """A RunConfig from a JSON-like dict layered over the named preset."""
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    layered: dict[str, Any] = {k: v for k, v in presets.preset(preset, where).items() if k in fields}
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(layered.get(key), dict):
            layered[key] = {**layered[key], **value}
        else:
            layered[key] = value
    return from_dict(RunConfig, layered, where)


def _load_sets(cfg: RunConfig) -> tuple[list[Example], dict[str, list[Example]]]:
    pool: list[Example] = []
    for spec in cfg.pool:
        pool += load_examples(spec, cfg=cfg.data)
    targets = {}
    for spec in cfg.targets:
        name = Path(spec).stem if Path(spec).exists() else spec.replace("/", "_")
        if name in targets or name == "pool":
            raise ConfigError(f"two target sets are both named {name!r}; give the files distinct names")
        targets[name] = load_examples(spec, cfg=cfg.target_data)
    return pool, targets


def run(cfg: RunConfig, *, progress: bool = True, source_groups: dict[str, str] | None = None) -> dict[str, Any]:
    """Run (or resume) the whole pipeline; returns the summary also written to ``RUN/summary.json``.

    ``source_groups`` optionally maps pool sources to coarser groups for the report."""
    from qless.quantize import QuantizerSpec
    from qless.report import write_report
    from qless.scoring import read_scores
    from qless.selection import choose, write_selection

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.json"
    if saved.exists() and json.loads(saved.read_text()) != to_dict(cfg):
        raise ConfigError(f"{run_dir}: holds a run with another configuration ({saved}); use a new run_dir")
    saved.write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    timings: dict[str, float] = {}

    t = time.perf_counter()
    pool, targets = _load_sets(cfg)
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
    scores_dirs = {}
    for spec in cfg.extract.specs:
        out = run_dir / "scores" / spec.tag
        if not (out / "manifest.json").exists():
            run_score([grads / spec.tag / "pool"], [grads / spec.tag / name for name in targets], out, cfg.score,
                      progress=progress)
        scores_dirs[spec.tag] = out
    timings["score"] = time.perf_counter() - t

    primary = QuantizerSpec.parse(cfg.select_format).tag
    manifest, values, rows = read_scores(scores_dirs[primary])
    records = {(e.source, e.id): dict(e.record) for e in pool}
    selections = {}
    for j, task in enumerate(manifest["tasks"]):
        out = run_dir / "selected" / task
        if not (out / "selection.json").exists():
            col = values[:, j]
            write_selection(out, choose(col, cfg.select), col, rows, cfg.select, records=records,
                            info={"task": task, "scores": str(scores_dirs[primary]), "format": primary})
        selections[task] = out
    random_dir = run_dir / "selected" / "random"
    if not (random_dir / "selection.json").exists():
        rcfg = replace(cfg.select, method="random")
        col = values[:, 0]
        write_selection(random_dir, choose(col, rcfg), col, rows, rcfg, records=records, info={"task": None})
    report_dir = write_report(run_dir / "report", scores_dirs, primary, selections, random_dir, cfg.select.percent,
                              cfg.projection.dim, source_groups)
    summary = _summary(run_dir, grads, scores_dirs, selections, random_dir, report_dir, timings, len(pool), targets)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _summary(run_dir: Path, grads: Path, scores_dirs: dict[str, Path], selections: dict[str, Path], random_dir: Path,
             report_dir: Path, timings: dict[str, float], n_pool: int, targets: dict[str, list[Example]]) -> dict[str, Any]:
    sizes = {}
    for tag in scores_dirs:
        total = sum(p.stat().st_size for p in (grads / tag).rglob("*") if p.is_file() and p.name in ("codes.bin", "scales.bin"))
        sizes[tag] = total
    selected = {task: json.loads((path / "counts.json").read_text()) for task, path in selections.items()}
    return {
        "run_dir": str(run_dir),
        "n_pool": n_pool,
        "targets": {name: len(ex) for name, ex in targets.items()},
        "selected": {task: {src: c["selected"] for src, c in counts.items() if c["selected"]} for task, counts in selected.items()},
        "random": {src: c["selected"] for src, c in json.loads((random_dir / "counts.json").read_text()).items() if c["selected"]},
        "store_bytes": sizes,
        "seconds": timings,
        "report": str(report_dir / "report.md"),
    }


def demo(run_dir: str | Path = "runs/demo", pool_size: int = 400, seed: int = 0, *, progress: bool = True) -> dict[str, Any]:
    """Build the embedded benchmark (if needed) and run the CPU preset on SmolLM2-135M-Instruct."""
    from qless.embedded import BenchmarkConfig, build_benchmark

    run_dir = Path(run_dir)
    bench = run_dir / "benchmark"
    if not (bench / "manifest.json").exists():
        build_benchmark(bench, BenchmarkConfig(seed=seed, pool_size=pool_size))
    elif json.loads((bench / "manifest.json").read_text())["config"]["pool_size"] != pool_size:
        raise ConfigError(f"{bench}: was built with another pool size; use a new --run-dir")

    from qless.models import native_bfloat16, resolve_device

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
    sources = json.loads((bench / "manifest.json").read_text())["pool"]["sources"]
    return run(cfg, progress=progress, source_groups={src: info["kind"] for src, info in sources.items()})
