"""qless: select instruction-tuning data by quantized gradient similarity (QLESS / LESS).

The pipeline, one module per stage::

    data      load instruction data, render it, mask the loss to responses
    embedded  the offline benchmark (pool, targets, eval sets) from asset packages
    models    base model + LoRA adapter on a device (optionally 4/8-bit QLoRA base)
    warmup    LoRA warmup training on a random p% of the pool, one checkpoint per epoch
    gradients per-example LoRA gradients in one backward pass; the Adam direction
    project   random projection R^d -> R^k generated from a seed in chunks
    quantize  absmax / absmean 8-4-2 bit, sign 1 bit, fp16 / fp32; bit packing
    extract   the stream gradient -> project -> quantize -> datastore, resumable
    datastore the self-describing, memory-mapped gradient store
    score     lr-weighted cosine influence, aggregated per target task
    select    top p% (or random baseline) written in the pool's own format
    report    plots: score distributions, selection composition, bit-width trade-off
    pipeline  every stage from one config (`qless run`), and the demo
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DataConfig": "qless.data",
    "load_examples": "qless.data",
    "tokenize_examples": "qless.data",
    "BenchmarkConfig": "qless.embedded",
    "build_benchmark": "qless.embedded",
    "ModelConfig": "qless.models",
    "AdapterConfig": "qless.models",
    "load_model": "qless.models",
    "WarmupConfig": "qless.warmup",
    "warmup": "qless.warmup",
    "read_checkpoints": "qless.warmup",
    "PerExampleGradients": "qless.gradients",
    "adam_direction": "qless.gradients",
    "ExtractConfig": "qless.extract",
    "extract": "qless.extract",
    "ProjectionConfig": "qless.project",
    "Projector": "qless.project",
    "QuantizerSpec": "qless.quantize",
    "quantize": "qless.quantize",
    "dequantize": "qless.quantize",
    "Datastore": "qless.datastore",
    "ShardWriter": "qless.datastore",
    "finalize": "qless.datastore",
    "open_by_checkpoint": "qless.datastore",
    "requantize": "qless.datastore",
    "ScoreConfig": "qless.score",
    "score": "qless.score",
    "write_scores": "qless.score",
    "read_scores": "qless.score",
    "SelectConfig": "qless.select",
    "choose": "qless.select",
    "write_selection": "qless.select",
    "write_report": "qless.report",
    "RunConfig": "qless.pipeline",
    "run": "qless.pipeline",
    "demo": "qless.pipeline",
    "QlessError": "qless.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `import qless` stays light (no transformers until needed).
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qless' has no attribute {name!r}")
