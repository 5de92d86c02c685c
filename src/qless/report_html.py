"""The comparison's report (``compare.md`` and ``compare.html``), and self-contained HTML pages.

:func:`write_page` renders a Markdown report (tables, images, raw HTML blocks) with markdown-it into
one HTML file: inline CSS, every image embedded as a base64 ``data:`` URI, nothing fetched from
elsewhere, so the page can be mailed or archived alone. ``qless report`` writes one beside
``report.md``; :func:`write_compare_report` writes ``compare.md`` and ``compare.html`` with:

* the comparison table (the paper's Table 1; Table 2 with the ``@int8`` / ``@nf4`` settings), the
  held-out answer loss, bytes per example, and the sweep over percentages (its Figure 4);
* each selector's cost per stage (warmup, extraction, LoRIF curvature, scoring, selection, representation, training,
  evaluation);
* source composition of each selection against the pool, as over- or under-representation (Figure 5);
* Jaccard overlap between the settings' selections;
* quantization-bin occupancy per bit width and scheme, from the pool stores (Figure 3: absmax puts
  most coordinates in the zero bin at low bit widths, absmean spreads them);
* score distributions per source (the run report's plots), the top pool examples for a few target
  examples with their text (Tables 6 to 8), which subtask chose each selected example;
* provenance: model, LoRA, checkpoints and their weights, warmup loss, skipped examples, versions.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qless.errors import OutputError

log = logging.getLogger(__name__)

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1300px; margin: 2em auto;
       padding: 0 1.5em; color: #1d1d1f; line-height: 1.45; }
h1 { border-bottom: 2px solid #333; padding-bottom: .2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .8em 0 1.2em; font-size: 13px; }
th, td { border: 1px solid #c8c8c8; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; height: auto; display: block; margin: .6em 0; }
p:has(> img + img) { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }  /* per-target figures, two a row */
p:has(> img + img) > img { flex: 0 1 49%; min-width: 0; }
code { background: #f3f3f3; padding: 0 3px; }
.example { border: 1px solid #ddd; border-radius: 4px; padding: 6px 10px; margin: 6px 0; font-size: 12.5px;
           white-space: normal; background: #fcfcfc; }
.example .meta { color: #666; font-size: 11.5px; }
"""


# ---------------------------------------------------------------------------------------------
# A Markdown report as one self-contained HTML page


def render_page(markdown: str, folder: Path, title: str) -> str:
    """The HTML page of ``markdown``; images are read from ``folder`` and embedded as data URIs."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": True}).enable("table")

    def image(renderer: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        token = tokens[idx]
        src = token.attrGet("src") or ""
        path = folder / src
        if "://" in src or not path.is_file():
            raise OutputError(f"{folder}: the report refers to image {src!r}, which is not a file beside it; write the "
                              "report again")
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        alt = html.escape(token.content or src)
        return f'<img src="data:image/png;base64,{data}" alt="{alt}">'

    md.add_render_rule("image", image)
    body = md.render(markdown)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")


def write_page(markdown_path: Path, html_path: Path, title: str) -> Path:
    """Render ``markdown_path`` (images relative to its folder) into ``html_path``."""
    text = markdown_path.read_text(encoding="utf-8")
    html_path.write_text(render_page(text, markdown_path.parent, title), encoding="utf-8")
    return html_path


def _example_html(text: str, meta: str) -> str:
    """An example's text as one raw HTML block: escaped, newlines as <br> (no blank line ends the block)."""
    body = "<br>".join(html.escape(line) for line in text.splitlines() if line.strip())
    return f'<div class="example"><div class="meta">{html.escape(meta)}</div>{body}</div>'


def example_text(messages: Sequence[tuple[str, str]], limit: int = 800) -> str:
    """An example's turns as text; past ``limit`` characters, its beginning and end (a question
    after a long passage stays visible)."""
    text = "\n".join(f"[{role}] {content}" for role, content in messages)
    half = limit // 2
    return text if len(text) <= limit else f"{text[:half]} [...] {text[-half:]}"


# ---------------------------------------------------------------------------------------------
# Measurements behind the figures


def bin_occupancy(store: Any, max_rows: int = 4096) -> dict[str, Any]:
    """Share of coordinates in each code bin of a quantized store (its first ``max_rows`` rows):
    ``{"codes": [-alpha..alpha] (sign: [-1, 1]), "share": [...], "coordinates": n}``."""
    import torch

    from qless.quantize import unpack

    spec = store.spec
    counts = None
    seen = 0
    for _, codes, _ in store.blocks(1024):
        q = unpack(torch.from_numpy(np.array(codes[:max_rows - seen])), spec, store.k).to(torch.int64).numpy().ravel()
        alpha = 1 if spec.method == "sign" else spec.alpha
        c = np.bincount(q + alpha, minlength=2 * alpha + 1)
        counts = c if counts is None else counts + c
        seen += len(codes[:max_rows - seen])
        if seen >= max_rows:
            break
    assert counts is not None
    codes = np.arange(len(counts)) - (len(counts) - 1) // 2
    if spec.method == "sign":
        keep = codes != 0
        codes, counts = codes[keep], counts[keep]
    return {"codes": codes.tolist(), "share": (counts / counts.sum()).tolist(), "coordinates": int(counts.sum()), "rows": seen}


def _count(n: float) -> str:
    """A count, or a mean count over seeds to one decimal."""
    return f"{n:.0f}" if n == int(n) else f"{n:.1f}"


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def _ranking(folder: Path) -> list[dict[str, Any]]:
    from qless.compare import read_jsonl

    return read_jsonl(folder / "ranking.jsonl")


# ---------------------------------------------------------------------------------------------
# Figures


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path.name


def plot_sweep(path: Path, rows: Sequence[Mapping[str, Any]], targets: Sequence[str]) -> str:
    """Metric against selected percentage, one line per setting (the paper's Figure 4)."""
    plt = _plt()
    panels = [*targets, "average"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for setting in dict.fromkeys(r["setting"] for r in rows):
            pts = sorted((r["percent"], (r["average"] if panel == "average" else r["tasks"][panel])) for r in rows
                         if r["setting"] == setting)
            x = [p for p, s in pts if s["mean"] is not None]
            y = [100 * s["mean"] for _, s in pts if s["mean"] is not None]
            err = [100 * (s["std"] or 0) for _, s in pts if s["mean"] is not None]
            ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, label=setting)
        percents = sorted({r["percent"] for r in rows})
        ax.set_xscale("log")
        ax.set_xticks(percents, labels=[f"{p:g}" for p in percents])
        ax.minorticks_off()
        ax.set(title=panel, xlabel="selected % of the pool (log scale)", ylabel="metric (%)")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(fig, path)


STAGES = ("warmup", "extraction", "curvature", "representation", "scoring", "selection", "training", "evaluation")


def plot_times(path: Path, rows: Sequence[Mapping[str, Any]]) -> str:
    """Wall time per stage of each setting, stacked (shared stages count for each setting)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 1.6))
    left = np.zeros(len(rows))
    names = [f"{r['setting']} {r['percent']:g}%" for r in rows]
    for i, stage in enumerate(STAGES):
        v = np.array([r["seconds"].get(stage) or 0.0 for r in rows]) / 60
        if v.any():
            ax.barh(names, v, left=left, color=f"C{i}", label=stage)
            left += v
    ax.invert_yaxis()
    ax.set(xlabel="wall time (minutes)", title="what each selector cost, per stage")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_composition(path: Path, title: str, pool: Mapping[str, int], selections: Mapping[str, Mapping[str, float]],
                     groups: Mapping[str, str]) -> str:
    """Heatmap of log2(share in selection / share in pool) per source (rows) and setting (columns),
    annotated with the count selected (the mean over seeds for draws)."""
    plt = _plt()
    sources = sorted(pool, key=lambda s: (groups.get(s, ""), s))
    total_pool = sum(pool.values())
    cols = list(selections)
    ratio = np.zeros((len(sources), len(cols)))
    for j, c in enumerate(cols):
        n = sum(selections[c].values()) or 1
        for i, s in enumerate(sources):
            share = selections[c].get(s, 0) / n
            ratio[i, j] = np.log2(max(share, 1e-9) / (pool[s] / total_pool))
    fig, ax = plt.subplots(figsize=(0.7 * len(cols) + 3.5, 0.25 * len(sources) + 1.8))
    im = ax.imshow(np.clip(ratio, -3, 3), cmap="RdBu_r", vmin=-3, vmax=3, aspect="auto")
    for (i, j), _ in np.ndenumerate(ratio):
        count = selections[cols[j]].get(sources[i], 0)
        ax.text(j, i, _count(count), ha="center", va="center", fontsize=6.5)
    ax.set_xticks(range(len(cols)), labels=cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(sources)), labels=[f"{groups[s]}: {s}" if s in groups else s for s in sources], fontsize=7.5)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="log2(share selected / share of pool)", shrink=0.8)
    return _save(fig, path)


def plot_matrix(path: Path, title: str, names: Sequence[str], m: np.ndarray) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(0.45 * len(names) + 3, 0.42 * len(names) + 1.5))
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=1)
    if len(names) <= 12:
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 else "black")
    ax.set_xticks(range(len(names)), labels=names, rotation=60, ha="right", fontsize=7.5)
    ax.set_yticks(range(len(names)), labels=names, fontsize=7.5)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)


def plot_bins(path: Path, occupancy: Mapping[str, Mapping[str, Any]]) -> str:
    """Share of coordinates per code bin, one panel per format: a row per scheme (absmax, absmean; sign
    beside absmax), a column per bit width."""
    from qless.quantize import QuantizerSpec

    plt = _plt()
    specs = {tag: QuantizerSpec.parse(tag) for tag in occupancy}
    bits = sorted({s.bits for s in specs.values()}, reverse=True)
    methods = sorted({s.method for s in specs.values() if s.method != "sign"}) or ["sign"]
    fig, axes = plt.subplots(len(methods), len(bits), figsize=(3.6 * len(bits), 2.6 * len(methods)), squeeze=False)
    for ax in axes.ravel():
        ax.set_visible(False)
    for tag, occ in occupancy.items():
        s = specs[tag]
        ax = axes[0 if s.method == "sign" else methods.index(s.method)][bits.index(s.bits)]
        ax.set_visible(True)
        codes, share = np.array(occ["codes"]), np.array(occ["share"])
        ax.bar(codes, share, width=0.9 if len(codes) < 40 else 1.0, color="C3" if s.method == "absmax" else "C0")
        zero = share[codes == 0].sum()
        ax.set(title=f"{tag}: {zero:.0%} in the zero bin" if s.method != "sign" else f"{tag}", xlabel="code",
               ylabel="share of coordinates")
    fig.suptitle("quantization-bin occupancy of the pool's gradients (last checkpoint)", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# compare.md and compare.html


def write_compare_report(out: Path, result: Mapping[str, Any], pool: Sequence[Any], targets: Mapping[str, Sequence[Any]]) -> Path:
    """Write ``out/compare.md``, ``out/compare.html`` and ``out/figures/`` from ``compare.json``'s
    content, the pool's examples and each target's examples."""
    from qless.files import atomic_folder

    with atomic_folder(out / "figures", replace=True, what="the figures") as tmp:
        text = CompareReport(out, tmp, result, pool, targets).markdown()
    (out / "compare.md").write_text(text, encoding="utf-8")
    write_page(out / "compare.md", out / "compare.html", "qless compare")
    log.info("comparison report: %s", out / "compare.html")
    return out / "compare.html"


class CompareReport:
    """The sections of the comparison report, as Markdown with figures in ``figures``."""

    def __init__(self, out: Path, figures: Path, result: Mapping[str, Any], pool: Sequence[Any],
                 targets: Mapping[str, Sequence[Any]]) -> None:
        from qless.compare import Setting

        self.out, self.fig, self.r, self.pool, self.targets = out, figures, result, pool, targets
        self.settings = [Setting.parse(s) for s in result["config"]["settings"]]
        self.tnames = list(result["targets"])
        percents = list(result["percents"])
        self.percent = 5.0 if 5.0 in percents else percents[0]
        self.rel = "figures"  # the folder the figures are written into becomes out/figures
        bench = Path(result["benchmark"])
        try:
            sources = json.loads((bench / "manifest.json").read_text(encoding="utf-8"))["pool"]["sources"]
            self.groups = {s: v["kind"] for s, v in sources.items()}
        except (OSError, ValueError, KeyError, TypeError):
            self.groups = {}
        grads = [s for s in self.settings if s.kind == "gradient"]
        self.primary = next((s for s in grads if s.format == "absmean4"), grads[0] if grads else None)

    def image(self, name: str, alt: str) -> str:
        return f"![{alt}]({self.rel}/{name})\n"

    def markdown(self) -> str:
        parts = [self.table(), self.cost(), self.composition(), self.overlap(), self.bins(), self.examples(),
                 self.provenance()]
        return "\n".join(p for p in parts if p) + "\n"

    # -- sections ---------------------------------------------------------------------------------

    def table(self) -> str:
        from qless.compare import fmt_stat

        r, targets = self.r, self.tnames
        cfg = r["config"]
        md = ["# qless compare\n",
              f"Benchmark `{r['benchmark']}`: pool of {r['n_pool']} examples; targets {', '.join(targets)}; model "
              f"`{cfg['model']['model']}`; selected {', '.join(f'{p:g}%' for p in r['percents'])}; random and balanced "
              f"over seeds {', '.join(map(str, cfg['seeds']))}. Evaluation: {cfg['evaluate']['limit'] or 'all'} item(s) "
              "per subtask. Values are percent; ± is the standard deviation over seeds (n - 1); n is the number of "
              "fine-tunes behind a value.\n",
              "## Comparison (the paper's Table 1)\n"]
        head = ("| setting | % | n | " + " | ".join(f"{t} {r['metrics'].get(t) or ''}" for t in targets) +
                " | average | answer loss | bytes / example |")
        md += [head, "|---|---|---|" + "---|" * (len(targets) + 3)]
        base = r.get("base")
        if base:
            md.append(f"| {base['label']} | – | 1 | " + " | ".join(fmt_stat(base["tasks"][t]) for t in targets) +
                      f" | {fmt_stat(base['average'])} | {fmt_stat(base['answer_loss'], 1, 3)} | |")
        for row in r["rows"]:
            md.append(f"| {row['label']} | {row['percent']:g} | {row['n']} | " +
                      " | ".join(fmt_stat(row["tasks"][t]) for t in targets) +
                      f" | {fmt_stat(row['average'])} | {fmt_stat(row['answer_loss'], 1, 3)} | {row['bytes_per_example']:,} |")
        md += ["", "Answer loss: mean over the targets of the held-out answer loss (nats per token; lower is better). "
               "Bytes per example: what the selector stores per pool example over all checkpoints (codes and scale).\n",
               "### Held-out answer loss per target (nats/token)\n",
               "| setting | % | " + " | ".join(targets) + " |", "|---|---|" + "---|" * len(targets)]
        if base:
            md.append(f"| {base['label']} | – | " + " | ".join(fmt_stat(base["tasks"][t]["answer_loss"], 1, 3) for t in targets) + " |")
        for row in r["rows"]:
            md.append(f"| {row['label']} | {row['percent']:g} | " +
                      " | ".join(fmt_stat(row["tasks"][t]["answer_loss"], 1, 3) for t in targets) + " |")
        md.append("")
        if len(r["percents"]) > 1:
            md += ["## Selected percentage (the paper's Figure 4)\n",
                   self.image(plot_sweep(self.fig / "sweep.png", r["rows"], targets), "metric against selected percentage")]
        return "\n".join(md)

    def cost(self) -> str:
        rows = self.r["rows"]
        md = ["## What each selector cost\n", f"Wall time in seconds: {self.r['timings_note']}.\n",
              "| setting | % | " + " | ".join(STAGES) + " | total |", "|---|---|" + "---|" * (len(STAGES) + 1)]
        for row in rows:
            sec = row["seconds"]
            md.append(f"| {row['label']} | {row['percent']:g} | " + " | ".join(
                "" if sec.get(s) is None else f"{sec[s]:.1f}" for s in STAGES) +
                f" | {sum(v or 0 for v in sec.values()):.1f} |")
        md += ["", self.image(plot_times(self.fig / "times.png", rows), "wall time per stage")]
        return "\n".join(md)

    def _selections(self, target: str) -> dict[str, Path]:
        """Name -> selection folder of each setting for ``target`` at the report's percent (each seed of a draw)."""
        root = self.out / "selected" / f"p{self.percent:g}"
        out = {}
        for s in self.settings:
            if s.seeded:
                for seed in self.r["config"]["seeds"]:
                    out[f"{s.name} s{seed}"] = root / s.name / f"seed-{seed}"
            else:
                out[s.name] = root / s.name / target
        return out

    def composition(self) -> str:
        md = [f"## Source composition of the selections (the paper's Figure 5), {self.percent:g}%\n",
              "Colour: log2 of a source's share in the selection over its share in the pool (red: over-represented, "
              "blue: under-represented); numbers: examples selected (the mean over seeds for random and balanced).\n"]
        pool_counts = Counter(e.source for e in self.pool)
        figures, counts = [], {}
        seeds = len(self.r["config"]["seeds"])
        for t in self.tnames:
            cols: dict[str, Counter] = {}
            for name, folder in self._selections(t).items():
                cols.setdefault(name.split(" ")[0], Counter()).update(Counter(r["source"] for r in _ranking(folder)))
            counts[t] = {c: {s: n / (seeds if c in ("random", "balanced") else 1) for s, n in cnt.items()} for c, cnt in cols.items()}
            figures.append(self.image(plot_composition(self.fig / f"composition_{t}.png", f"{t}: selected against the pool",
                                                       pool_counts, counts[t], self.groups), f"composition {t}").strip())
        md.append("\n\n".join(figures) + "\n")  # one figure a row: a column per setting, a row per source
        if self.groups:
            kinds = sorted(set(self.groups.values()))
            share = {k: sum(n for s, n in pool_counts.items() if self.groups.get(s) == k) / len(self.pool) for k in kinds}
            md += ["Examples selected from each kind of pool source, and its share of the pool:\n",
                   "| target | setting | " + " | ".join(f"{k} ({share[k]:.0%} of the pool)" for k in kinds) + " |",
                   "|---|---|" + "---|" * len(kinds)]
            for t in self.tnames:
                for name, cnt in counts[t].items():
                    by_kind = {k: sum(n for s, n in cnt.items() if self.groups.get(s) == k) for k in kinds}
                    md.append(f"| {t} | {name} | " + " | ".join(_count(by_kind[k]) for k in kinds) + " |")
            md.append("")
        return "\n".join(md)

    def overlap(self) -> str:
        figures = []
        for t in self.tnames:
            sets = {n: {(r["source"], r["id"]) for r in _ranking(f)} for n, f in self._selections(t).items()}
            names = list(sets)
            m = np.array([[jaccard(sets[a], sets[b]) for b in names] for a in names])
            figures.append(self.image(plot_matrix(self.fig / f"jaccard_{t}.png", f"{t}: Jaccard overlap of the selections",
                                                  names, m), f"overlap {t}").strip())
        return f"## Overlap between the settings' selections (Jaccard), {self.percent:g}%\n\n" + " ".join(figures) + "\n"

    def bins(self) -> str:
        from qless.quantize import QuantizerSpec
        from qless.store import open_by_checkpoint

        occ = {}
        for s in self.settings:
            if s.kind == "gradient" and s.precision == "none" and not QuantizerSpec.parse(s.format).impl.lossless_source:
                occ[s.format] = bin_occupancy(open_by_checkpoint([self.out / "grads" / "none" / s.format / "pool"])[-1])
        if not occ:
            return ""
        md = ["## Quantization-bin occupancy (the paper's Figure 3)\n",
              "Share of the pool's gradient coordinates in each code bin, from the stores (last checkpoint). "
              "With an absmax scale the largest coordinate sets the step, so at low bit widths most coordinates round "
              "to zero; absmean's step follows the typical magnitude.\n",
              self.image(plot_bins(self.fig / "bins.png", occ), "bin occupancy"),
              "| format | zero bin | extreme bins (±alpha) | coordinates |", "|---|---|---|---|"]
        for tag, o in occ.items():
            codes, share = np.array(o["codes"]), np.array(o["share"])
            md.append(f"| {tag} | {share[codes == 0].sum():.1%} | {share[np.abs(codes) == codes.max()].sum():.1%} | "
                      f"{o['coordinates']:,} ({o['rows']} rows) |")
        return "\n".join(md) + "\n"

    def examples(self) -> str:
        """Score plots, the top pool examples of a few target examples, and which subtask chose each pick."""
        from qless.report import _plot_scores
        from qless.scoring import ScoreConfig, read_scores, score
        from qless.stages import pool_records
        from qless.store import open_by_checkpoint

        s = self.primary
        if s is None:
            return ""
        scores_dir = self.out / self.r["scores"][s.name]
        manifest, values, rows = read_scores(scores_dir)
        sub = np.load(scores_dir / "subtask_scores.npy", mmap_mode="r")
        sources = np.array([str(x["source"]) for x in rows])
        grads = self.out / "grads" / s.precision / s.format
        pool_stores = open_by_checkpoint([grads / "pool"])
        records = pool_records(self.pool)
        pool_rows = list(pool_stores[0].rows())
        md = [f"## Scores and examples ({s.label}, {self.percent:g}%)\n"]
        for j, t in enumerate(manifest["tasks"]):
            ranking = _ranking(self.out / "selected" / f"p{self.percent:g}" / s.name / t)
            col = np.asarray(values[:, j], dtype=np.float64)
            _plot_scores(_plt(), self.fig / f"scores_{t}.png", t, col, sources, min(x["score"] for x in ranking),
                         self.percent, s.format)
            md.append(f"### {t}\n")
            md.append(self.image(f"scores_{t}.png", f"{t} scores"))
            # the top pool examples of the first example of the first two subtasks (the paper's Tables 6-8)
            per_example = score(pool_stores, open_by_checkpoint([grads / t]), ScoreConfig(target_groups="example"),
                                progress=False)
            by_id = {e.id: e for e in self.targets[t]}
            picked, seen_sub = [], set()
            for k, (_, ex_id) in enumerate(per_example.groups.subtasks):
                ex = by_id.get(ex_id)
                if ex is not None and ex.subtask not in seen_sub:
                    picked.append((k, ex))
                    seen_sub.add(ex.subtask)
                if len(picked) == 2:
                    break
            md.append("Top pool examples for single target examples, by the lr-weighted cosine to that example alone:\n")
            for k, ex in picked:
                md.append(_example_html(example_text(ex.messages, 500), f"target example {ex.id} (subtask {ex.subtask})"))
                order = np.argsort(-np.nan_to_num(per_example.values[:, k], nan=-np.inf), kind="stable")[:3]
                for rank, i in enumerate(order, start=1):
                    row = pool_rows[i]
                    rec = records.get((row["source"], row["id"]))
                    text = example_text([(m["role"], m["content"]) for m in rec.get("messages", [])]) if rec and \
                        "messages" in rec else json.dumps(rec, ensure_ascii=False)[:700]
                    md.append(_example_html(text, f"#{rank}  {row['source']} / {row['id']}  score "
                                                  f"{per_example.values[i, k]:.4f}"))
                md.append("")
            # which subtask chose each selected example: the subtask column with the highest score
            cols = [c for c, (task, _) in enumerate(manifest["subtasks"]) if task == t]
            chosen = [manifest["subtasks"][cols[int(np.argmax(sub[x["row"], cols]))]][1] for x in ranking]
            counts = Counter(chosen)
            md += [f"Which subtask chose each of the {len(ranking)} selected examples (the subtask with the highest "
                   "score):\n", "| subtask | examples chosen |", "|---|---|"]
            md += [f"| {name} | {n} |" for name, n in counts.most_common()]
            md += ["", f"<details><summary>each selected example and the subtask that chose it ({t})</summary>", "",
                   "| rank | source | id | score | chosen by subtask |", "|---|---|---|---|---|"]
            md += [f"| {x['rank']} | {x['source']} | {x['id']} | {x['score']:.4f} | {c} |" for x, c in zip(ranking, chosen)]
            md += ["", "</details>", ""]
        return "\n".join(md)

    def provenance(self) -> str:
        from qless.files import read_json
        from qless.store import open_by_checkpoint

        cfg = self.r["config"]
        md = ["## Provenance\n"]
        warm_path = self.out / "warmup" / "warmup.json"
        if warm_path.is_file():
            w = read_json(warm_path, OutputError, "run the comparison again")
            m, a = w.get("model", {}), w.get("adapter", {})
            md += [f"- model: `{m.get('model') or cfg['model']['model']}` ({m.get('architecture')}, "
                   f"{m.get('num_parameters') or 0:,} parameters, {m.get('dtype')}, source {m.get('source')})",
                   f"- LoRA: r {a.get('r')}, alpha {a.get('alpha')}, modules {', '.join(a.get('target_modules') or [])}, "
                   f"{a.get('d') or 0:,} LoRA parameters (d)",
                   f"- warmup: {w.get('subset_size')} examples ({len(w.get('subset_skipped') or [])} skipped: no response "
                   f"token within max_length), {cfg['warmup']['epochs']} epochs at lr {cfg['warmup']['learning_rate']:g}"]
            weights = {}
            if self.primary is not None:
                weights = {c["name"]: c["weight"] for c in read_json(self.out / self.r["scores"][self.primary.name] /
                                                                     "manifest.json", OutputError, "run again")["checkpoints"]}
            md += ["", "| checkpoint | epoch | learning rate | weight in the scores | mean warmup loss |", "|---|---|---|---|---|"]
            md += [f"| {c['name']} | {c['epoch']} | {c['learning_rate']:.3g} | "
                   f"{weights[c['name']]:.3f} | {c['mean_loss']:.4f} |" if c["name"] in weights else
                   f"| {c['name']} | {c['epoch']} | {c['learning_rate']:.3g} | | {c['mean_loss']:.4f} |"
                   for c in w.get("checkpoints", [])]
            md.append("")
        skipped = []
        for s in self.settings:
            if s.kind == "gradient":
                for name in ("pool", *self.tnames):
                    st = open_by_checkpoint([self.out / "grads" / s.precision / s.format / name])[0]
                    skipped.append(f"{s.name}/{name} {st.summary()['skipped']}")
                break
        units = self.r["units"]
        train_skipped = sum(u["train"]["skipped"] for u in units.values())
        md += [f"- examples skipped (no response token within max_length): extraction {', '.join(skipped) or 'none'}; "
               f"fine-tunes {train_skipped} over {len(units)} trainings",
               f"- fine-tuning: {cfg['train']['epochs']} epochs, lr {cfg['train']['learning_rate']:g}, "
               f"{cfg['train']['schedule']} schedule, batch {cfg['train']['batch_size']}; {len(units)} distinct training sets",
               f"- projection: {cfg['projection']['kind']}, k = {cfg['projection']['dim']}, seed {cfg['projection']['seed']}"
               + (f", nnz {cfg['projection'].get('nnz', 1)}" if cfg['projection']['kind'] == "sparse" else ""),
               f"- scoring: aggregation {cfg['score']['aggregation']}, checkpoint weights {cfg['score']['weights']}"]
        if any(s.kind == "lorif" for s in self.settings):
            lo, cu = cfg["lorif"], cfg["curvature"]
            md.append(f"- LoRIF: plain pool gradients, each layer's ({lo['layers']}) gradient projected to {lo['side']} x "
                      f"{lo['side']} and kept as rank-{lo['rank']} factors; curvature rank {cu['rank']} per {cu['scope']}, "
                      f"damping {lo['damping'] if lo['damping'] is not None else cu['damping']} x the mean eigenvalue; "
                      f"{lo['normalize']} influence")
        some_eval = next((self.out / e["folder"] / "eval.json" for u in units.values() for e in u["eval"].values()), None)
        if some_eval is not None and some_eval.is_file():
            v = read_json(some_eval, OutputError, "run again")["settings"]["versions"]
            md.append(f"- versions: qless {v['qless']}, lm-eval {v['lm_eval']}, torch {v['torch']}")
        md += ["", "<details><summary>configuration</summary>", "",
               "```json", json.dumps(cfg, indent=1), "```", "", "</details>", ""]
        return "\n".join(md)
