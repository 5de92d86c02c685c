"""The recommendation (cheapest setting meeting the criterion on every task) and the outputs:
``fidelity.json``, ``fidelity.md``, ``agreement.png`` and ``recommendation.json``."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qless.errors import ConfigError
from qless.files import atomic_write_json, atomic_write_text, read_json

log = logging.getLogger(__name__)

RECOMMENDATION = "recommendation.json"
_COMPUTE_COST = {"sparse": 0, "logra": 0, "none": 1, "rademacher": 2, "gaussian": 3}  # per example, at equal bytes


def projection_label(entry: dict[str, Any]) -> str:
    """A setting's projection as the tables name it: the kind, with ``nnz`` when a sparse
    projection has more than one non-zero per input coordinate."""
    nnz = entry.get("nnz", 1) if entry["projection"] == "sparse" else 1
    return f"{entry['projection']} nnz {nnz}" if nnz > 1 else entry["projection"]


def _worst(entry: dict[str, Any], tasks: Sequence[str], cfg) -> float | None:
    """The criterion's lowest value over the tasks (``bound`` end), or None without an interval."""
    values = [entry["tasks"][t][cfg.criterion].get(cfg.bound) for t in tasks]
    return None if any(v is None for v in values) else min(values)


def extraction_bytes(entry: dict[str, Any]) -> int:
    """Bytes per example and checkpoint that extraction writes for a setting: a ``-global`` format
    is derived from an fp32 store of the same k, which extraction writes too."""
    return entry["bytes_per_example"] + (4 * entry["k"] + 4 if entry["scale"] == "global" else 0)


def settings_config(entry: dict[str, Any], seed: int, pool_gradient: str = "adam") -> dict[str, Any]:
    """The run-config sections that reproduce a measured setting (measured on ``pool_gradient`` pool rows)."""
    projection: dict[str, Any] = {"kind": entry["projection"]}
    if entry["projection"] != "none":
        projection.update(dim=entry["side"] if entry["projection"] == "logra" else entry["k"], seed=seed)
    # always written: merged over a config file, a recommendation must not inherit its nnz
    projection["nnz"] = entry.get("nnz", 1) if entry["projection"] == "sparse" else 1
    if entry["projection"] in ("rademacher", "gaussian", "logra") and entry.get("projection_compute"):
        projection["compute_dtype"] = entry["projection_compute"]
    formats = [entry["format"]] + (["fp32"] if entry["scale"] == "global" else [])
    extract: dict[str, Any] = {"formats": formats}
    if pool_gradient != "adam":
        extract["pool_gradient"] = pool_gradient
    return {"model": {"dtype": entry["model_dtype"]}, "projection": projection, "extract": extract,
            "select_format": entry["format"]}


def recommend(results: Sequence[dict[str, Any]], cfg, tasks: Sequence[str]) -> dict[str, Any]:
    """The cheapest setting (bytes per example extraction writes, :func:`extraction_bytes`; then
    compute: sparse before dense, bfloat16 before float32; then the best worst-task criterion)
    whose criterion meets the threshold on every task."""
    scored = [(e, _worst(e, tasks, cfg)) for e in results]
    passing = [(e, w) for e, w in scored if w is not None and w >= cfg.threshold]
    rule = f"{cfg.criterion} {'lower bound ' if cfg.bound == 'low' else ''}>= {cfg.threshold:g} on every task"
    if not passing:
        best = max((x for x in scored if x[1] is not None), key=lambda x: x[1], default=None)
        return {"met": False, "rule": rule, "best": _evidence(best[0], best[1], tasks, cfg) if best else None}
    entry, worst = min(passing, key=lambda x: (extraction_bytes(x[0]), _COMPUTE_COST.get(x[0]["projection"], 9),
                                               x[0].get("nnz", 1),
                                               x[0]["model_dtype"] == "float32", -x[1]))
    out = {"met": True, "rule": rule, "setting": _evidence(entry, worst, tasks, cfg),
           "config": settings_config(entry, cfg.projection_seed, getattr(cfg, "pool_gradient", "adam"))}
    if entry["projection"] == "none":
        # only unprojected gradients pass: say how close the best projected setting came
        projected = [x for x in scored if x[0]["projection"] != "none" and x[1] is not None]
        if projected:
            best = max(projected, key=lambda x: x[1])
            out["best_projected"] = _evidence(best[0], best[1], tasks, cfg)
    return out


def _evidence(entry: dict[str, Any], worst: float | None, tasks: Sequence[str], cfg) -> dict[str, Any]:
    keep = ("model_dtype", "projection", "k", "format", "bytes_per_example")
    extra = {k: entry[k] for k in ("nnz", "side") if k in entry}
    return {**{k: entry[k] for k in keep}, **extra, "worst_task_value": worst,
            "tasks": {t: entry["tasks"][t][cfg.criterion] for t in tasks},
            "spearman": {t: entry["tasks"][t]["spearman"] for t in tasks}}


def read_recommendation(path: str | Path) -> dict[str, Any]:
    """The run-config sections of a ``recommendation.json`` (or of a fidelity folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / RECOMMENDATION
    data = read_json(path, ConfigError, "give the recommendation.json written by `qless fidelity`")
    if not isinstance(data, dict) or "met" not in data:
        raise ConfigError(f"{path}: not a recommendation written by `qless fidelity`")
    if not data["met"] or not isinstance(data.get("config"), dict):
        raise ConfigError(f"{path}: no measured setting met {data.get('rule')!r}; relax --threshold or widen the "
                          "settings and run `qless fidelity` again")
    config = data["config"]
    allowed = {"model": {"dtype"}, "projection": {"kind", "dim", "seed", "nnz", "compute_dtype"},
               "extract": {"formats", "pool_gradient"},
               "select_format": None}
    for key, value in config.items():
        if key not in allowed:
            raise ConfigError(f"{path}: config.{key} is not a setting a recommendation makes; the file was edited or "
                              "written by something else")
        fields = allowed[key]
        if fields is None:
            if not isinstance(value, str):
                raise ConfigError(f"{path}: config.{key} must be a format name, got {value!r:.60}")
        elif not isinstance(value, dict) or not set(value) <= fields:
            raise ConfigError(f"{path}: config.{key} must be an object with fields among {sorted(fields)}, got {value!r:.80}")
    return config


# ---------------------------------------------------------------------------------------------
# outputs


def _fmt(m: dict[str, float] | None) -> str:
    if m is None:
        return "-"
    if "low" in m:
        return f"{m['value']:.3f} [{m['low']:.2f}, {m['high']:.2f}]"
    return f"{m['value']:.3f}"


def _label(e: dict[str, Any]) -> str:
    proj = "none" if e["projection"] == "none" else f"{projection_label(e)} {e['k']}"
    return f"{e['model_dtype']} | {proj} | {e['format']}"


def _setting_cells(e: dict[str, Any]) -> str:
    """The first cells of a table row naming a setting: model, projection, k, format."""
    return f"| {e['model_dtype']} | {projection_label(e)} | {e['k']} | {e['format']} | "


def _task_columns(tasks: Sequence[str], cfg) -> str:
    return " | ".join(f"{t} spearman | {t} {cfg.criterion}" for t in tasks) + " |"


def _task_cells(e: dict[str, Any], tasks: Sequence[str], cfg) -> str:
    return " | ".join(f"{_fmt(e['tasks'][t]['spearman'])} | {_fmt(e['tasks'][t][cfg.criterion])}" for t in tasks) + " |"


def markdown(report: dict[str, Any], cfg) -> str:
    tasks = report["probe"]["tasks"]
    probe = report["probe"]
    results = report["settings"]
    cols = ["spearman", "kendall", *[f"recall@{p:g}" for p in cfg.percents], f"jaccard@{cfg.ndcg_percent:g}",
            f"ndcg@{cfg.ndcg_percent:g}"]
    cols = [c for c in dict.fromkeys(cols) if c in results[0]["mean"]] if results else cols
    lines = [
        "# Fidelity: compressed scores against exact scores",
        "",
        f"Run `{report['run_dir']}`. Probe: {probe['pool_rows']} pool rows (of {probe['pool_size']}, stratified by source) "
        f"and {probe['target_rows']} target rows, gradient dimension d = {probe['gradient_dim']:,}, checkpoints "
        f"{', '.join(probe['checkpoints'])}. Exact scores: unprojected gradients of the float32 model, cosines in float64, "
        f"aggregated by {report['score']['aggregation']} over subtasks with {report['score']['weights']} checkpoint weights. "
        f"Intervals: {cfg.confidence:.0%} bootstrap over {cfg.bootstrap} resamples of the probe's pool rows.",
        "",
    ]
    rec = report["recommendation"]
    lines += ["## Recommendation", ""]
    if rec["met"]:
        s = rec["setting"]
        k = "" if s["projection"] == "none" else f" k = {s['k']}"
        lines += [f"Cheapest setting with {rec['rule']}: **{s['model_dtype']} model, projection {projection_label(s)}"
                  f"{k}, {s['format']}**, "
                  f"{s['bytes_per_example']:,} bytes per example and checkpoint.", "",
                  "| task | " + cfg.criterion + " | spearman |", "|---|---|---|"]
        lines += [f"| {t} | {_fmt(s['tasks'][t])} | {_fmt(s['spearman'][t])} |" for t in tasks]
        if rec.get("best_projected"):
            b = rec["best_projected"]
            lines += ["", f"No projected setting meets the rule; the closest: {_label(b)}, "
                      f"{b['bytes_per_example']:,} bytes per example, worst task {b['worst_task_value']:.3f}."]
        lines += ["", "Use it: `qless extract ... --from-recommendation recommendation.json` "
                  "or `qless run CONFIG --from-recommendation recommendation.json`.", ""]
    else:
        best = rec["best"]
        lines += [f"No measured setting meets {rec['rule']}."]
        if best:
            lines += [f"Closest: {_label(best)} (worst task {best['worst_task_value']:.3f})."]
        lines += [""]
    lines += ["## Every setting (mean over tasks)", "",
              "| model | projection | k | format | bytes/example | " + " | ".join(cols) + " |",
              "|---|---|---|---|---|" + "---|" * len(cols)]
    for e in results:
        lines.append(_setting_cells(e) + f"{e['bytes_per_example']:,} | "
                     + " | ".join(f"{e['mean'][c]:.3f}" for c in cols) + " |")
    if report.get("run_stores"):
        lines += ["", "## The run's own stores", "",
                  "The scores `qless run` computed from its stores (the run's model dtype and projection), on the probe's "
                  "pool rows, against the exact scores.", "",
                  "| model | projection | k | format | bytes/example | rows | " + _task_columns(tasks, cfg),
                  "|---|---|---|---|---|---|" + "---|---|" * len(tasks)]
        for e in report["run_stores"]:
            lines.append(_setting_cells(e) + f"{e['bytes_per_example']:,} | "
                         f"{e['rows']} | " + _task_cells(e, tasks, cfg))
    for title, code_bytes in (("at the bytes of fp16 at k = 8192", 16384), ("at a quarter of them", 4096)):
        rows = [e for e in results if e["bytes_per_example"] - 4 == code_bytes]
        if not rows:
            continue
        lines += ["", f"## Matched bytes: {code_bytes + 4:,} bytes per example ({title})", "",
                  "| model | projection | k | format | " + _task_columns(tasks, cfg),
                  "|---|---|---|---|" + "---|---|" * len(tasks)]
        for e in sorted(rows, key=lambda e: -e["mean"]["spearman"]):
            lines.append(_setting_cells(e) + _task_cells(e, tasks, cfg))
    lines += ["", "## Per task", "",
              "| model | projection | k | format | " + _task_columns(tasks, cfg),
              "|---|---|---|---|" + "---|---|" * len(tasks)]
    for e in results:
        lines.append(_setting_cells(e) + _task_cells(e, tasks, cfg))
    lines += ["", "![agreement against bytes per example](agreement.png)", "",
              "Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items()) + ".", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], cfg, path: Path) -> None:
    """Mean Spearman and mean criterion against bytes per example, one panel per model dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["settings"]
    dtypes = list(dict.fromkeys(e["model_dtype"] for e in results))
    metrics = list(dict.fromkeys(["spearman", cfg.criterion]))
    fig, axes = plt.subplots(len(metrics), len(dtypes), figsize=(6 * len(dtypes), 4.2 * len(metrics)), squeeze=False)
    formats = list(dict.fromkeys(e["format"] for e in results if e["projection"] != "none"))
    palette = plt.cm.tab10 if len(formats) <= 10 else plt.cm.tab20
    colors = {f: palette(i % palette.N) for i, f in enumerate(formats)}
    kinds = list(dict.fromkeys(projection_label(e) for e in results if e["projection"] != "none"))
    # colour: format; line and marker: projection (sparse with nnz > 1 keeps the solid line, other markers)
    fixed = {"sparse": ("-", "o"), "rademacher": ("--", "D"), "gaussian": (":", "v"), "logra": ("-.", "x")}
    spare = ["s", "^", "P", "*", "h"]
    others = [k for k in kinds if k not in fixed]
    styles = {k: fixed.get(k) or ("-", spare[others.index(k) % len(spare)]) for k in kinds}
    for col, dtype in enumerate(dtypes):
        for row, metric in enumerate(metrics):
            ax = axes[row][col]
            for f in formats:
                for kind, style in styles.items():
                    pts = sorted((e["bytes_per_example"], e["mean"][metric]) for e in results
                                 if e["model_dtype"] == dtype and e["format"] == f and projection_label(e) == kind)
                    if pts:
                        ax.plot(*zip(*pts), linestyle=style[0], marker=style[1], ms=4, color=colors[f],
                                label=f"{f} {kind}")
            for e in results:
                if e["model_dtype"] == dtype and e["projection"] == "none":
                    ax.axhline(e["mean"][metric], color="black", lw=0.8, label="no projection (fp32)")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("bytes per example and checkpoint")
            ax.set_ylabel(f"{metric} vs exact (mean over tasks)")
            ax.set_title(f"{dtype} model")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = max(1, min(len(labels), 3 * len(dtypes)))
    legend_rows = -(-len(labels) // ncol)
    height = fig.get_figheight()
    fig.set_figheight(height + 0.2 * legend_rows)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
    fig.tight_layout(rect=(0, (0.2 * legend_rows + 0.15) / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out: Path, report: dict[str, Any], cfg) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "fidelity.json", report)
    rec = report["recommendation"]
    atomic_write_json(out / RECOMMENDATION, {**rec, "probe": report["probe"], "run_dir": report["run_dir"]})
    if report["settings"]:
        plot(report, cfg, out / "agreement.png")
    atomic_write_text(out / "fidelity.md", markdown(report, cfg))
    log.info("fidelity table: %s", out / "fidelity.md")


def load_report(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "fidelity.json").read_text(encoding="utf-8"))
