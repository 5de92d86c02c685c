"""``qless fidelity``: what each compression step costs against the exact scores, on the user's own
model and data, and the cheapest setting that keeps the selection.

QLESS approximates an exact quantity: the learning-rate-weighted cosine between full,
unprojected per-example LoRA gradients (the Adam direction for the pool). The approximations are
the model's compute dtype, the random projection (kind and k) and the quantizer (method, bits,
scale mode). For a finished run this module

1. extracts a probe (:mod:`qless.fidelity.probe`): the unprojected gradients of a stratified
   pool sample and of every target set, with the model in float32 (the exact reference) and in
   any other requested dtype, kept on disk;
2. derives every requested setting from the probe by projecting and quantizing those gradients
   with the production code (:mod:`qless.fidelity.settings`), so one probe serves every setting;
3. measures each setting's task scores against the exact ones, and the run's own scores (from
   its real stores: the setting it used, with its model dtype and projection compute) (:mod:`qless.fidelity.metrics`:
   Spearman, Kendall, top-p recall and Jaccard, NDCG, with bootstrap intervals) and the bytes
   per example it stores;
4. recommends the cheapest setting that meets a target agreement on every task
   (:mod:`qless.fidelity.recommend`), written as a config that ``qless extract`` and ``qless run``
   take with ``--from-recommendation``.

Output folder (default ``RUN/fidelity``): ``probe/``, ``fidelity.json``, ``fidelity.md``,
``agreement.png``, ``recommendation.json``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qless.config import Config, from_dict, option, to_dict
from qless.errors import ConfigError
from qless.files import read_json
from qless.quantize import QuantizerSpec

log = logging.getLogger(__name__)

DENSE_KINDS = ("rademacher", "gaussian")


@dataclass(frozen=True)
class FidelityConfig(Config):
    """What ``qless fidelity`` measures."""

    section = "fidelity"

    probe_size: int = option(2000, "pool examples in the probe, stratified by source (all of a smaller pool)")
    seed: int = option(0, "seed of the probe sample and of the bootstrap")
    model_dtypes: tuple[str, ...] = option(("float32", "bfloat16"), "model compute dtypes to measure; float32 is the "
                                           "exact reference and always computed")
    kinds: tuple[str, ...] = option(("rademacher", "sparse"), "projection kinds: rademacher, gaussian (dense), sparse, "
                                    "logra (per-layer factorised; needs pool_gradient sgd)")
    dims: tuple[int, ...] = option((2048, 4096, 8192, 16384, 32768, 65536, 131072), "projected dimensions k")
    sparse_nnz: tuple[int, ...] = option((1,), "non-zeros per input coordinate of the sparse kind (projection.nnz), "
                                         "each measured at every k it divides; more mix heavy-tailed gradients "
                                         "better before low-bit quantization, at O(d nnz) cost")
    logra_sides: tuple[int, ...] = option((4, 8, 16, 32), "side sizes s of the logra kind (each LoRA factor's long "
                                          "sides projected to s; k follows from the layers)")
    pool_gradient: Literal["adam", "sgd"] = option("adam", "pool rows of the exact scores and of every setting: the Adam "
                                                   "direction (as the run) or the plain gradient (what logra can project)")
    dense_max_dim: int = option(8192, "largest k measured for dense kinds (their cost grows with k; sparse has no limit)")
    projection_seed: int = option(0, "seed of every projection")
    projection_compute_dtype: Literal["float32", "bfloat16"] = option(
        "float32", "operand dtype of dense projection matmuls (as projection.compute_dtype)")
    formats: tuple[str, ...] = option(("fp16", "absmax8", "absmax4", "absmax2", "absmean8", "absmean4", "absmean2", "sign1"),
                                      "store formats (add -global for one scale per store)")
    percents: tuple[float, ...] = option((0.5, 1.0, 5.0, 10.0), "top p% sets compared by recall and Jaccard")
    ndcg_percent: float = option(5.0, "NDCG over the top p% (EOGP uses the top 20 rows)")
    bootstrap: int = option(200, "bootstrap resamples of the probe for confidence intervals (0: none)")
    confidence: float = option(0.95, "confidence of the intervals")
    criterion: str = option("recall@5", "metric the recommendation must meet on every task (a column of the table)")
    threshold: float = option(0.9, "value the criterion must reach")
    bound: Literal["value", "low"] = option("value", "compare the point estimate (value) or the interval's lower end "
                                            "(low, stricter) with the threshold")
    chunk_size: int = option(32, "probe examples per extraction commit (each holds d float32 per example in memory)")
    memory_mb: int = option(2048, "memory for the blocks of full gradients read at a time")

    def validate(self) -> None:
        for name in ("probe_size", "dense_max_dim", "chunk_size", "memory_mb"):
            if getattr(self, name) < 1:
                raise ConfigError(f"fidelity.{name} must be a positive integer, got {getattr(self, name)}")
        if self.bootstrap < 0:
            raise ConfigError(f"fidelity.bootstrap must be 0 or more, got {self.bootstrap}")
        if self.bound == "low" and self.bootstrap == 0:
            raise ConfigError("fidelity.bound 'low' needs intervals: set fidelity.bootstrap above 0")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"fidelity.confidence must lie in (0, 1), got {self.confidence}")
        for dt in self.model_dtypes:
            if dt not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"fidelity.model_dtypes: {dt!r} is not float32, bfloat16 or float16")
        for kind in self.kinds:
            if kind not in (*DENSE_KINDS, "sparse", "logra"):
                raise ConfigError(f"fidelity.kinds: {kind!r} is not rademacher, gaussian, sparse or logra")
        if "logra" in self.kinds and self.pool_gradient != "sgd":
            raise ConfigError("fidelity.kinds: logra cannot project the Adam direction (it never forms the per-example "
                              "gradient); add --pool-gradient sgd to measure every setting on plain pool gradients")
        if any(n < 1 for n in self.sparse_nnz):
            raise ConfigError(f"fidelity.sparse_nnz must be positive, got {list(self.sparse_nnz)}")
        if set(self.sparse_nnz) != {1} and "sparse" not in self.kinds:
            raise ConfigError(f"fidelity.sparse_nnz {list(self.sparse_nnz)} applies to the sparse kind, which "
                              f"fidelity.kinds ({', '.join(self.kinds)}) leaves out: add sparse to --kinds")
        for n in self.sparse_nnz:
            if "sparse" in self.kinds and not any(k % n == 0 for k in self.dims):
                raise ConfigError(f"fidelity.sparse_nnz: {n} divides none of fidelity.dims ({', '.join(map(str, self.dims))}); "
                                  "nnz must divide k")
        if any(s < 1 for s in self.logra_sides):
            raise ConfigError(f"fidelity.logra_sides must be positive, got {list(self.logra_sides)}")
        for k in self.dims:
            if k < 8 or k % 8:
                raise ConfigError(f"fidelity.dims: {k} must be a positive multiple of 8 (1-bit codes pack 8 per byte)")
        for f in self.formats:
            QuantizerSpec.parse(f)
        for name, values in (("percents", self.percents), ("ndcg_percent", (self.ndcg_percent,))):
            for p in values:
                if not 0 < p <= 100:
                    raise ConfigError(f"fidelity.{name}: {p} must lie in (0, 100]")
        names = metric_names(self)
        if self.criterion not in names:
            raise ConfigError(f"fidelity.criterion {self.criterion!r} is not one of {', '.join(names)}")

    @property
    def dtypes(self) -> list[str]:
        """Model dtypes in probe order: float32 (the reference) first."""
        return ["float32", *[d for d in dict.fromkeys(self.model_dtypes) if d != "float32"]]


RULE_FIELDS = ("criterion", "threshold", "bound")
"""Fields that only change the recommendation, not what is measured."""

ADDED_FIELDS: dict[str, Any] = {"sparse_nnz": [1]}
"""Fields added after ``fidelity.json`` was first written, with the value an older file measured."""


def _measured(out: Path, cfg: FidelityConfig) -> dict[str, Any] | None:
    """A previous ``fidelity.json`` in ``out`` measured with the same settings (rule fields aside)."""
    path = out / "fidelity.json"
    if not path.is_file():
        return None
    old = read_json(path, ConfigError, f"delete {path} to measure again")
    if not isinstance(old, dict) or not isinstance(old.get("config"), dict):
        return None
    old_cfg = {**ADDED_FIELDS, **old["config"]}
    same = {k: v for k, v in old_cfg.items() if k not in RULE_FIELDS} == \
        {k: v for k, v in to_dict(cfg).items() if k not in RULE_FIELDS}
    if not same or not all(isinstance(old.get(k), (list, dict)) for k in ("settings", "seconds")):
        return None
    return old


def metric_names(cfg: FidelityConfig) -> list[str]:
    from qless.fidelity.metrics import metric_functions

    return list(metric_functions(cfg.percents, cfg.ndcg_percent))


def fidelity(run_dir: str | Path, out: str | Path | None = None, cfg: FidelityConfig = FidelityConfig(), *,
             progress: bool = True) -> dict[str, Any]:
    """Measure every setting of ``cfg`` on a probe of the run in ``run_dir`` (see the module
    docstring); returns the content of ``fidelity.json``."""
    from qless.distributed import launch_info
    from qless.fidelity.probe import build_probe, exact_scores, open_probe, probe_sample
    from qless.fidelity.recommend import recommend, write_outputs
    from qless.fidelity.settings import evaluate_settings, logra_layout, run_entries
    from qless.pipeline import RunConfig, _target_sets
    from qless.stages import load_data

    if launch_info() is not None:
        raise ConfigError("qless fidelity is one process; run it without torchrun or accelerate launch")
    run_dir = Path(run_dir)
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise ConfigError(f"{run_dir}: no config.json; give the folder of a `qless run` or `qless demo` (its warmup is needed)")
    run_cfg = from_dict(RunConfig, read_json(saved, ConfigError, "give the folder of a finished `qless run`"), f"{saved}:")
    out = Path(out) if out is not None else run_dir / "fidelity"
    formats = [s.tag for s in run_cfg.extract.specs]
    timings: dict[str, float] = {}

    t = time.perf_counter()
    pool = load_data(run_cfg.pool, run_cfg.data)
    names = _target_sets(run_cfg)
    targets = {name: load_data([spec], run_cfg.target_data) for name, spec in names.items()}
    sample = probe_sample(pool, cfg.probe_size, cfg.seed)
    log.info("probe: %d of %d pool examples (stratified by source) and %d target examples", len(sample), len(pool),
             sum(map(len, targets.values())))
    folders = build_probe(out / "probe", run_dir / "warmup", [pool[i] for i in sample], targets, run_cfg, cfg.dtypes,
                          cfg.chunk_size, progress, pool_gradient=cfg.pool_gradient)
    timings["probe"] = time.perf_counter() - t

    t = time.perf_counter()
    ref_pool, ref_targets, rates = open_probe(folders["float32"], list(targets))
    exact, groups = exact_scores(ref_pool, ref_targets, rates, run_cfg.score.weights, run_cfg.score.aggregation,
                                 cfg.memory_mb)
    timings["exact"] = time.perf_counter() - t

    digest = hashlib.sha256()
    for task in exact:  # the exact scores stand for the probe's content: another model or adapter changes them
        digest.update(task.encode() + exact[task].astype("<f8").tobytes())
    probe_info = {"pool_rows": len(ref_pool.rows), "pool_size": len(pool), "target_rows": len(ref_targets.rows),
                  "gradient_dim": ref_pool.d, "checkpoints": ref_pool.checkpoints, "learning_rates": rates,
                  "tasks": list(exact), "exact_sha256": digest.hexdigest()}
    measured = _measured(out, cfg)
    if measured is not None and (measured.get("probe") != probe_info or measured.get("score") != to_dict(run_cfg.score)):
        measured = None  # another probe or other scoring settings: measure again
    if measured is not None:
        # the same measurement (only the recommendation's rule changed): recommend from it again
        log.info("%s: settings already measured with this configuration; recommending again", out / "fidelity.json")
        results, timings = measured["settings"], measured["seconds"]
    else:
        t = time.perf_counter()
        layout = logra_layout(run_cfg, run_dir / "warmup") if "logra" in cfg.kinds else None
        results = evaluate_settings(folders, list(targets), ref_pool.rows, exact, groups, run_cfg.score, cfg, progress,
                                    logra=layout)
        timings["settings"] = time.perf_counter() - t
    run_own = run_entries(run_dir, formats, ref_pool.rows, exact, cfg)  # cheap, and the run's stores may have changed

    report = {
        "run_dir": str(run_dir),
        "config": to_dict(cfg),
        "probe": probe_info,
        "model": to_dict(run_cfg.model),
        "score": to_dict(run_cfg.score),
        "settings": results,
        "run_stores": run_own,
        "seconds": timings,
    }
    report["recommendation"] = recommend(results, cfg, list(exact))
    write_outputs(out, report, cfg)
    if out.resolve() == (run_dir / "fidelity").resolve() and (run_dir / "selected" / "summary.json").is_file():
        from qless.pipeline import run_report

        run_report(run_dir)  # the run's report shows the recommendation and the agreement plot
    return report


__all__ = ["FidelityConfig", "fidelity"]
