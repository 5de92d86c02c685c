"""qless: select instruction-tuning data by quantized gradient similarity (QLESS / LESS).

The pipeline, one module per stage::

    data        load instruction data, render it, mask the loss to responses
    embedded    the offline benchmark (pool, targets, eval sets) from asset packages
    models      base model + LoRA adapter on a device (optionally 4/8-bit QLoRA base)
    training    LoRA training: the warmup (a random p% of the pool, one checkpoint per epoch) and
                fine-tuning on a selection (`qless train`), one loop for both
    gradients   per-example LoRA gradients in one backward pass; the Adam direction
    project/    random projection R^d -> R^k generated from a seed in chunks
    quantize/   absmax / absmean 8-4-2 bit, sign 1 bit, fp16 / fp32; bit packing
    extraction  the stream gradient -> project -> quantize -> store, resumable
    store/      the self-describing, memory-mapped gradient datastore
    scoring/    lr-weighted cosine influence, aggregated per target task
    lorif/      LoRIF: rank-c factor rows, rank-r curvature (fit-curvature), influence scoring
    selection   top p% (or random baseline) written in the pool's own format
    evaluate/   target-task metrics of a model or adapter (lm-evaluation-harness) and held-out answer loss
    represent   base-model hidden states (RDS+), forward passes only, in the datastore format
    baselines   random (several seeds), balanced random and RDS+ selections in the same format
    report      plots: score distributions, selection composition, bit-width trade-off
    stages      one function per stage from files to files (the CLI and `qless run` call these)
    pipeline    every stage from one config (`qless run`), and the demo
    compare     the paper's comparison: every selector -> LoRA fine-tune -> evaluation (`qless compare`)
    report_html the comparison's report and self-contained HTML pages of reports

The public API: the configs, one function per stage (``warmup``, ``extract``, ``score``,
``select``, ``train``, the baselines, ``write_report``, ``run``, ``demo``, ``compare``, ``build_benchmark``) and the store
(``Datastore``). Names are imported on first use, so ``import qless`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, tuple[str, str]] = {
    # configs
    "BenchmarkConfig": ("qless.embedded", "BenchmarkConfig"),
    "DataConfig": ("qless.data", "DataConfig"),
    "ModelConfig": ("qless.models", "ModelConfig"),
    "AdapterConfig": ("qless.models", "AdapterConfig"),
    "WarmupConfig": ("qless.training", "WarmupConfig"),
    "TrainConfig": ("qless.training", "TrainConfig"),
    "EvaluateConfig": ("qless.evaluate", "EvaluateConfig"),
    "RepresentConfig": ("qless.represent", "RepresentConfig"),
    "ProjectionConfig": ("qless.project", "ProjectionConfig"),
    "ExtractConfig": ("qless.extraction", "ExtractConfig"),
    "ScoreConfig": ("qless.scoring", "ScoreConfig"),
    "CurvatureConfig": ("qless.lorif.curvature", "CurvatureConfig"),
    "SelectConfig": ("qless.selection", "SelectConfig"),
    "RunConfig": ("qless.pipeline", "RunConfig"),
    # one function per stage
    "build_benchmark": ("qless.embedded", "build_benchmark"),
    "warmup": ("qless.stages", "run_warmup"),
    "extract": ("qless.stages", "run_extract"),
    "score": ("qless.stages", "run_score"),
    "fit_curvature": ("qless.stages", "run_fit_curvature"),
    "select": ("qless.stages", "run_select"),
    "train": ("qless.stages", "run_train"),
    "evaluate": ("qless.evaluate", "evaluate"),
    "random_baseline": ("qless.baselines", "random_baseline"),
    "balanced_baseline": ("qless.baselines", "balanced_baseline"),
    "rds_baseline": ("qless.baselines", "rds_baseline"),
    "write_report": ("qless.report", "write_report"),
    "run": ("qless.pipeline", "run"),
    "demo": ("qless.pipeline", "demo"),
    "CompareConfig": ("qless.compare", "CompareConfig"),
    "compare": ("qless.compare", "compare"),
    # the store
    "Datastore": ("qless.store", "Datastore"),
    "QlessError": ("qless.errors", "QlessError"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `import qless` stays light (no torch or transformers until needed).
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qless' has no attribute {name!r}")
