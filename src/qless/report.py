"""Report: what was selected and what the bit width cost, as plots and one markdown page.

From a run's scores (one folder per store format) and selections it draws:

* ``scores_<task>.png``: the distribution of each task's scores per pool source, with the
  selection threshold;
* ``composition.png``: the share of each source in the pool, in each task's selection and in
  the random baseline;
* ``bits.png``: for each format, bytes per row against agreement with the reference format's
  scores (Spearman rank correlation and top-p% overlap), per task;

and writes ``report.md`` with the same numbers as tables, ``report.html`` (the same page with the plots
embedded: one file, :mod:`qless.report_html`), and ``report.json``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qless.fidelity.metrics import recall_at, spearman
from qless.fidelity.recommend import projection_label
from qless.files import atomic_folder
from qless.quantize import QuantizerSpec
from qless.scoring import read_scores

log = logging.getLogger(__name__)


def _reference_format(formats: list[str]) -> str:
    """The most exact format present: a float format before any quantized one, more bits first."""
    return max(formats, key=lambda t: (QuantizerSpec.parse(t).impl.lossless_source, QuantizerSpec.parse(t).bits))


def format_agreement(scores_dirs: Mapping[str, Path], percent: float, k: int) -> dict[str, Any]:
    """Per format and task: bytes per row, Spearman and top-``percent`` overlap with the reference."""
    loaded = {tag: read_scores(path) for tag, path in scores_dirs.items()}
    ref_tag = _reference_format(list(loaded))
    ref_manifest, ref_values, _ = loaded[ref_tag]
    out: dict[str, Any] = {"reference": ref_tag, "percent": percent, "formats": {}}
    for tag, (manifest, values, _) in loaded.items():
        spec = QuantizerSpec.parse(tag)
        row = {"bits": spec.bits, "bytes_per_row": spec.row_bytes(k) + 4, "tasks": {}}
        for j, task in enumerate(manifest["tasks"]):
            a = np.asarray(ref_values[:, ref_manifest["tasks"].index(task)], dtype=np.float64)
            b = np.asarray(values[:, j], dtype=np.float64)
            ok = ~(np.isnan(a) | np.isnan(b))
            row["tasks"][task] = {"spearman": spearman(a[ok], b[ok]), "top_overlap": recall_at(a[ok], b[ok], percent)}
        out["formats"][tag] = row
    return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _plot_scores(plt: Any, path: Path, task: str, col: np.ndarray, sources: np.ndarray, threshold: float,
                 percent: float, primary: str) -> None:
    """All scores as a histogram, and per source as box plots sorted by median, with the threshold."""
    ok = ~np.isnan(col)
    names = sorted(set(sources[ok].tolist()), key=lambda src: np.median(col[ok & (sources == src)]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, max(3.5, 0.28 * len(names) + 1.2)),
                                      gridspec_kw={"width_ratios": [1, 1.4]})
    left.hist(col[ok], bins=40, color="0.6")
    right.boxplot([col[ok & (sources == src)] for src in names], orientation="horizontal", tick_labels=names, widths=0.6,
                  flierprops={"markersize": 3})
    for ax in (left, right):
        ax.axvline(threshold, color="C3", linestyle="--", label=f"top {percent:g}% threshold")
        ax.set_xlabel("score")
    left.set(title=f"{task}: influence scores ({primary})", ylabel="pool examples")
    left.legend(fontsize=8)
    right.set_title("by pool source (sorted by median)")
    right.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_composition(plt: Any, path: Path, columns: dict[str, dict[str, float]], title: str) -> None:
    """Heatmap: rows are sources (largest pool share first), columns the pool and each selection."""
    names = sorted(columns["pool"], key=lambda src: -columns["pool"][src])
    grid = np.array([[columns[c][src] for c in columns] for src in names])
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 3, 0.3 * len(names) + 1.5))
    im = ax.imshow(grid, cmap="Blues", aspect="auto", vmin=0, vmax=max(grid.max(), 1e-9))
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=7, color="white" if v > 0.6 * grid.max() else "black")
    ax.set_xticks(range(len(columns)), labels=list(columns))
    ax.set_yticks(range(len(names)), labels=names, fontsize=8)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="share")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _shares(counts: Mapping[str, int], names: list[str]) -> dict[str, float]:
    total = max(sum(counts.values()), 1)
    return {src: counts.get(src, 0) / total for src in names}


def write_report(out_dir: str | Path, scores_dirs: Mapping[str, Path], primary: str, selections: Mapping[str, Path],
                 random_selection: Path | None, percent: float, k: int,
                 source_groups: Mapping[str, str] | None = None, fidelity_dir: Path | None = None) -> Path:
    """Draw the plots and write ``report.md`` / ``report.json`` into ``out_dir``.

    ``source_groups`` (optional) maps each pool source to a coarser group (e.g. flan / cot /
    chat), for one more composition table and plot at that level. ``fidelity_dir`` (optional) is
    a ``qless fidelity`` output folder whose recommendation and agreement plot the report shows."""
    out_dir = Path(out_dir)
    with atomic_folder(out_dir, replace=True, what="the report") as tmp:
        _write_report(tmp, scores_dirs, primary, selections, random_selection, percent, k, source_groups)
        if fidelity_dir is not None and (fidelity_dir / "fidelity.json").is_file():
            _fidelity_section(tmp, fidelity_dir)
        from qless.report_html import write_page

        write_page(tmp / "report.md", tmp / "report.html", "qless report")  # the same page, self-contained
    log.info("report written to %s and report.html", out_dir / "report.md")
    return out_dir


def _write_report(out_dir: Path, scores_dirs: Mapping[str, Path], primary: str, selections: Mapping[str, Path],
                  random_selection: Path | None, percent: float, k: int, source_groups: Mapping[str, str] | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    manifest, values, rows = read_scores(scores_dirs[primary])
    sources = np.array([str(r["source"]) for r in rows])
    pool_counts = Counter(sources.tolist())
    names = sorted(pool_counts)
    report: dict[str, Any] = {"primary_format": primary, "percent": percent, "n_pool": len(rows), "tasks": {}}
    md = ["# qless report\n", f"Pool: {len(rows)} examples from {len(names)} sources; selection: top {percent:g}% "
          f"by the `{primary}` scores.\n"]

    selected_counts: dict[str, Counter] = {}
    for j, task in enumerate(manifest["tasks"]):
        sel = _read_jsonl(selections[task] / "ranking.jsonl")
        threshold = min(r["score"] for r in sel)
        _plot_scores(plt, out_dir / f"scores_{task}.png", task, np.asarray(values[:, j], dtype=np.float64), sources,
                     threshold, percent, primary)
        selected_counts[task] = Counter(r["source"] for r in sel)
        report["tasks"][task] = {"threshold": threshold, "selected": dict(selected_counts[task]), "n_selected": len(sel)}
    if random_selection is not None:
        selected_counts["random"] = Counter(r["source"] for r in _read_jsonl(random_selection / "ranking.jsonl"))
        report["random"] = dict(selected_counts["random"])

    levels = [("source", lambda src: src)]
    if source_groups:
        levels.insert(0, ("group", lambda src: source_groups.get(src, "other")))
    md.append("## Selection composition\n")
    for level, key in levels:
        keys = sorted({key(src) for src in names})
        regroup = lambda counts: Counter({g: sum(n for src, n in counts.items() if key(src) == g) for g in keys})
        columns = {"pool": _shares(regroup(pool_counts), keys)}
        columns.update({name: _shares(regroup(c), keys) for name, c in selected_counts.items()})
        _plot_composition(plt, out_dir / f"composition_{level}.png", columns, f"share of each pool {level}")
        report[f"composition_by_{level}"] = columns
        md.append(f"![composition by {level}](composition_{level}.png)\n")
        md.append(f"| {level} | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
        for g in sorted(keys, key=lambda g: -columns["pool"][g]):
            md.append(f"| {g} | " + " | ".join(f"{columns[c][g]:.1%}" for c in columns) + " |")
        md.append("")
    for task in manifest["tasks"]:
        md.append(f"![{task} scores](scores_{task}.png)\n")

    # bit-width trade-off
    if len(scores_dirs) > 1:
        agree = format_agreement(scores_dirs, percent, k)
        report["formats"] = agree
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        tags = sorted(agree["formats"], key=lambda t: agree["formats"][t]["bytes_per_row"])
        for task in manifest["tasks"]:
            x = [agree["formats"][t]["bytes_per_row"] for t in tags]
            axes[0].plot(x, [agree["formats"][t]["tasks"][task]["spearman"] for t in tags], "o-", label=task)
            axes[1].plot(x, [agree["formats"][t]["tasks"][task]["top_overlap"] for t in tags], "o-", label=task)
        for ax, what in zip(axes, ("Spearman rank correlation", f"top-{percent:g}% overlap")):
            ax.set_xscale("log")
            ax.set_xticks([agree["formats"][t]["bytes_per_row"] for t in tags], labels=tags, rotation=45, fontsize=8)
            ax.set(title=f"{what} with {agree['reference']}", xlabel="bytes per row (log)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "bits.png", dpi=110)
        plt.close(fig)
        md.append(f"## Bit width against agreement with {agree['reference']}\n\n![bits](bits.png)\n")
        md.append("| format | bytes/row | " + " | ".join(f"{t} spearman / top-{percent:g}%" for t in manifest["tasks"]) +
                  " |\n|---|---|" + "---|" * len(manifest["tasks"]))
        for t in tags:
            row = agree["formats"][t]
            md.append(f"| {t} | {row['bytes_per_row']} | " + " | ".join(
                f"{row['tasks'][task]['spearman']:.3f} / {row['tasks'][task]['top_overlap']:.2f}" for task in manifest["tasks"]) + " |")
        md.append("")
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return out_dir


def _fidelity_section(out_dir: Path, fidelity_dir: Path) -> None:
    """Append the fidelity recommendation and its agreement plot (copied in) to ``report.md``."""
    import shutil

    from qless.errors import StoreError
    from qless.files import read_json

    data = read_json(fidelity_dir / "fidelity.json", StoreError, f"run `qless fidelity` again into {fidelity_dir}")
    try:
        md = _fidelity_lines(data, fidelity_dir)
    except (AttributeError, KeyError, TypeError):
        log.warning("%s: not a fidelity.json this version reads; the report leaves it out (run `qless fidelity` again)",
                    fidelity_dir / "fidelity.json")
        return
    if (fidelity_dir / "agreement.png").is_file():
        shutil.copyfile(fidelity_dir / "agreement.png", out_dir / "fidelity.png")
        md.append("\n![agreement against bytes per example](fidelity.png)")
    with open(out_dir / "report.md", "a", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")


def _fidelity_lines(data: dict[str, Any], fidelity_dir: Path) -> list[str]:
    rec, probe = data["recommendation"], data["probe"]
    md = ["## Fidelity against exact scores\n",
          f"Probe: {probe.get('pool_rows')} pool rows and {probe.get('target_rows')} target rows, unprojected gradients "
          f"of the float32 model (full table: `{fidelity_dir / 'fidelity.md'}`)."]
    if rec.get("met"):
        s = rec["setting"]
        k = "" if s["projection"] == "none" else f" k = {s['k']}"
        md.append(f"Cheapest setting with {rec['rule']}: {s['model_dtype']} model, projection {projection_label(s)}{k}, "
                  f"{s['format']} ({s['bytes_per_example']} bytes per example and checkpoint).")
    else:
        md.append(f"No measured setting meets {rec['rule']}.")
    return md
