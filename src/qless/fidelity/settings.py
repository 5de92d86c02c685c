"""Every requested setting derived from the probe with the production code, and its agreement.

A setting is (model dtype, projection kind, k, store format). Its task scores come from the
probe of that model dtype: the full gradients (norms restored, as the extraction sees them)
are projected with :class:`qless.project.Projector`, quantized with :func:`qless.quantize.quantize`
(a global scale per store, as :func:`qless.store.derive.requantize` computes it), decoded with
:func:`qless.quantize.decode_codes` and scored with the scorer's own tensor maths
(:mod:`qless.scoring.cosine`), so a setting's scores are the scores ``qless score`` would give
stores of that setting for the probe's rows. Projection ``none`` with format ``fp32`` isolates
the model dtype (for float32 it reproduces the exact scores up to float32 rounding).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qless.console import progress_bar
from qless.errors import StoreMismatchError
from qless.fidelity.metrics import bootstrap, metric_functions, resamples
from qless.fidelity.probe import ProbeSide, exact_scores, open_probe, rows_as_tensor
from qless.fidelity.recommend import projection_label
from qless.project import ProjectionConfig, Projector
from qless.project.logra import LograProjection, project_rows
from qless.quantize import QuantizerSpec, compute_scale, decode_codes, global_scale, quantize
from qless.scoring.aggregate import TargetGroups, aggregate, checkpoint_weights
from qless.scoring.cosine import block_scores, subtask_means

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setting:
    model_dtype: str
    projection: ProjectionConfig
    k: int
    format: str

    @property
    def spec(self) -> QuantizerSpec:
        return QuantizerSpec.parse(self.format)

    @property
    def bytes_per_example(self) -> int:
        """Stored bytes per example and checkpoint: packed codes plus the float32 scale."""
        return self.spec.row_bytes(self.k) + 4

    @property
    def name(self) -> str:
        return f"{self.model_dtype} {projection_label(self.describe())} k={self.k} {self.format}"

    def describe(self) -> dict[str, Any]:
        out = {"model_dtype": self.model_dtype, "projection": self.projection.kind, "k": self.k, "format": self.format,
               "projection_compute": self.projection.compute_dtype,
               "method": self.spec.method, "bits": self.spec.bits, "scale": self.spec.scale,
               "bytes_per_example": self.bytes_per_example}
        if self.projection.kind == "logra":
            out["side"] = self.projection.dim
        if self.projection.kind == "sparse":
            out["nnz"] = self.projection.nnz
        return out


@dataclass(frozen=True)
class LograLayout:
    """The LoRA Linears of the run's adapter, as :meth:`PerExampleGradients.layout` gives them."""

    shapes: list[tuple[str, int, int, bool]]
    weight_offsets: list[int]
    bias_offsets: list[int]
    d: int

    def projection(self, cfg: ProjectionConfig) -> LograProjection:
        return LograProjection(cfg, self.shapes, self.d)


def logra_layout(run_cfg, warmup_dir: Path) -> LograLayout:
    """The run's LoRA layer shapes and offsets, read from its model with the first warmup adapter."""
    from dataclasses import replace

    from qless.gradients import PerExampleGradients
    from qless.models import load_adapter, load_model, release_memory
    from qless.training import read_checkpoints

    base, _, _ = load_model(replace(run_cfg.model, dtype="float32", device="cpu"))
    grads = PerExampleGradients(load_adapter(base, read_checkpoints(warmup_dir, finished=True)[0].path))
    rows = grads.layout()
    out = LograLayout([r[:4] for r in rows], [r[4] for r in rows], [r[5] for r in rows], grads.input_dim)
    del grads, base
    release_memory()
    return out


def projections(cfg, d: int) -> list[ProjectionConfig]:
    """The projections of a fidelity config for gradient dimension ``d``: none, then each kind
    at each k (dense kinds up to ``dense_max_dim``; none of them at k >= d; logra at each side;
    sparse at each ``sparse_nnz`` that divides k)."""
    out = [ProjectionConfig(kind="none")]
    for kind in cfg.kinds:
        if kind == "logra":
            out += [ProjectionConfig(kind="logra", dim=s, seed=cfg.projection_seed,
                                     compute_dtype=cfg.projection_compute_dtype) for s in sorted(set(cfg.logra_sides))]
            continue
        for k in sorted(set(cfg.dims)):
            if k >= d or (kind != "sparse" and k > cfg.dense_max_dim):
                continue
            for nnz in sorted(set(cfg.sparse_nnz)) if kind == "sparse" else [1]:
                if k % nnz == 0:
                    out.append(ProjectionConfig(kind=kind, dim=k, seed=cfg.projection_seed, nnz=nnz,
                                                compute_dtype=cfg.projection_compute_dtype))
    return out


def project_side(side: ProbeSide, checkpoint: str, projection: ProjectionConfig, memory_mb: int,
                 logra: LograLayout | None = None) -> torch.Tensor:
    """``[rows, k]`` float32 projections of a probe side's full gradients at one checkpoint
    (``logra``: the run's layer layout, needed by that kind)."""
    if projection.kind == "logra":
        if logra is None:
            raise ValueError("projection kind logra needs the run's layer layout")
        proj = logra.projection(projection)
        projector = lambda x: project_rows(proj, x, logra.weight_offsets, logra.bias_offsets)
    else:
        projector = Projector(projection, side.d)
    block = max(1, memory_mb * 2**20 // (4 * side.d))
    parts = [projector(x) for _, x in rows_as_tensor(side, checkpoint, scaled=True, block_rows=block)]
    return torch.cat(parts)


def _codes(x: torch.Tensor, spec: QuantizerSpec, segments: Sequence[int]) -> torch.Tensor:
    """Quantize then decode rows ``x``, one store per segment of rows (the global scale is per store)."""
    out = []
    start = 0
    for n in segments:
        part = x[start:start + n]
        scale = None
        if spec.scale == "global":
            scale = global_scale(compute_scale(part, spec), spec, part.shape[1])
        codes, _ = quantize(part, spec, scale)
        out.append(decode_codes(codes, spec, part.shape[1]))
        start += n
    return torch.cat(out)


def _subtask_vectors(decoded: torch.Tensor, groups: TargetGroups) -> torch.Tensor:
    """``[k, S]`` float64 mean normalised vectors per subtask (as the scorer's ``subtask_vectors``)."""
    sums, _ = subtask_means(decoded, torch.from_numpy(groups.row_group), len(groups.subtasks))
    counts = torch.from_numpy(np.bincount(groups.row_group, minlength=len(groups.subtasks))).to(torch.float64)
    return (sums / counts[:, None]).T.contiguous()


def setting_scores(pool: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], spec: QuantizerSpec,
                   pool_segments: Sequence[int], target_segments: Sequence[int], groups: TargetGroups,
                   weights: np.ndarray, aggregation: str) -> dict[str, np.ndarray]:
    """Task scores of projected rows (per checkpoint) stored in format ``spec``."""
    values = None
    for (c, x), w in zip(pool.items(), weights):
        m = (_subtask_vectors(_codes(targets[c], spec, target_segments), groups) * w).to(torch.float32)
        part, _ = block_scores(_codes(x, spec, pool_segments), m)
        values = part.double() if values is None else values + part.double()
    return aggregate(values.numpy(), groups, aggregation)


def _row_positions(ref_rows: Sequence[dict], rows: Sequence[dict]) -> np.ndarray:
    index = {(str(r["source"]), str(r["id"])): i for i, r in enumerate(rows)}
    return np.array([index.get((str(r["source"]), str(r["id"])), -1) for r in ref_rows])


def evaluate_settings(folders: dict[str, Path], target_names: Sequence[str], ref_rows: Sequence[dict],
                      exact: dict[str, np.ndarray], groups: TargetGroups, score_cfg, cfg, progress: bool = True,
                      logra: LograLayout | None = None) -> list[dict]:
    """Every setting's agreement with ``exact`` (one entry per setting, in table order)."""
    functions = metric_functions(cfg.percents, cfg.ndcg_percent)
    results = []
    ref_target_rows = None
    for dtype, folder in folders.items():  # float32 first
        pool, targets, rates = open_probe(folder, target_names)
        ref_target_rows = targets.rows if ref_target_rows is None else ref_target_rows
        if targets.rows != ref_target_rows:
            raise StoreMismatchError(f"{folder}: the {dtype} probe holds other target rows than the float32 probe; "
                                     "extract the probe again")
        pos = _row_positions(ref_rows, pool.rows)
        keep = np.nonzero(pos >= 0)[0]
        if len(keep) < len(ref_rows):
            log.warning("%s probe: %d of %d pool rows missing (skipped there); its settings are measured on the rest",
                        dtype, len(ref_rows) - len(keep), len(ref_rows))
        draws = resamples(len(keep), cfg.bootstrap, cfg.seed)
        weights = checkpoint_weights(rates, score_cfg.weights)
        pool_segments = [s.n_rows for s in pool.stores[pool.checkpoints[0]]]
        target_segments = [s.n_rows for s in targets.stores[targets.checkpoints[0]]]
        todo = projections(cfg, pool.d)
        bar = progress_bar(total=len(todo), desc=f"settings ({dtype} model)", unit="projection", enabled=progress)
        for projection in todo:
            k = logra.projection(projection).out_dim if projection.kind == "logra" else projection.out_dim(pool.d)
            if projection.kind == "none":
                # the full gradients in float64, streamed (no [rows, d] copy): the model dtype's effect alone
                approx, _ = exact_scores(pool, targets, rates, score_cfg.weights, score_cfg.aggregation, cfg.memory_mb)
                results.append(_entry(Setting(dtype, projection, k, "fp32"), exact, approx, keep, pos, functions, draws, cfg))
                bar.update(1)
                continue
            xs = {c: project_side(pool, c, projection, cfg.memory_mb, logra) for c in pool.checkpoints}
            ts = {c: project_side(targets, c, projection, cfg.memory_mb, logra) for c in targets.checkpoints}
            for tag in cfg.formats:
                setting = Setting(dtype, projection, k, QuantizerSpec.parse(tag).tag)
                approx = setting_scores(xs, ts, setting.spec, pool_segments, target_segments, groups, weights,
                                        score_cfg.aggregation)
                results.append(_entry(setting, exact, approx, keep, pos, functions, draws, cfg))
            del xs, ts
            bar.update(1)
        bar.close()
    return results


def _entry(setting: Setting, exact: dict[str, np.ndarray], approx: dict[str, np.ndarray], keep: np.ndarray,
           pos: np.ndarray, functions, draws: np.ndarray, cfg) -> dict[str, Any]:
    tasks = {task: bootstrap(exact[task][keep], approx[task][pos[keep]], functions, draws, cfg.confidence) for task in exact}
    mean = {name: float(np.mean([tasks[t][name]["value"] for t in tasks])) for name in functions}
    return {**setting.describe(), "rows": len(keep), "tasks": tasks, "mean": mean}


def run_entries(run_dir: Path, formats: Sequence[str], ref_rows: Sequence[dict], exact: dict[str, np.ndarray], cfg) -> list[dict]:
    """The run's own scores (``RUN/scores/<format>``, from its real stores) against the exact
    scores, on the probe rows the run scored: the setting the run actually used, measured."""
    from qless.scoring import read_scores
    from qless.store import read_manifest

    functions = metric_functions(cfg.percents, cfg.ndcg_percent)
    out = []
    for tag in formats:
        folder = run_dir / "scores" / tag
        stores = sorted((run_dir / "grads" / tag / "pool").glob("*/manifest.json"))
        if not (folder / "manifest.json").is_file() or not stores:
            continue
        manifest, values, rows = read_scores(folder)
        store = read_manifest(stores[0].parent)
        if store.get("gradient") != cfg.pool_gradient:
            continue  # the run's pool rows are another gradient than the exact scores': not comparable
        pos = _row_positions(ref_rows, rows)
        keep = np.nonzero(pos >= 0)[0]
        if not len(keep) or set(manifest["tasks"]) != set(exact):
            continue
        approx = {task: np.asarray(values[:, j], dtype=np.float64) for j, task in enumerate(manifest["tasks"])}
        projection, k = store["projection"], int(store["projection"]["dim"])
        described = ProjectionConfig(kind=projection["kind"], dim=int(projection.get("side", k)),
                                     nnz=int(projection.get("nnz", 1)))
        entry = {**Setting(str(store.get("model", {}).get("dtype", "?")), described, k, QuantizerSpec.parse(tag).tag).describe(),
                 "source": f"run stores ({run_dir / 'grads' / tag})",
                 "projection_compute": store.get("extra", {}).get("projection_compute", {}).get("dtype")}
        draws = resamples(len(keep), cfg.bootstrap, cfg.seed)
        tasks = {t: bootstrap(exact[t][keep], approx[t][pos[keep]], functions, draws, cfg.confidence) for t in exact}
        entry.update(rows=len(keep), tasks=tasks, mean={n: float(np.mean([tasks[t][n]["value"] for t in tasks])) for n in functions})
        out.append(entry)
    return out
