"""``eval.md``: the evaluation's numbers as a short Markdown table, from the eval.json content."""

from __future__ import annotations

from typing import Any


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _stderr(value: float | None) -> str:
    return "" if value is None else f" ± {100 * value:.1f}"


def headline(report: dict[str, Any]) -> list[str]:
    """One line per target: metric, value (percent) with its standard error, n, answer loss."""
    lines = []
    for target, r in report["tasks"].items():
        line = f"{target}: {r['metric']} {_pct(r['value'])}{_stderr(r.get('stderr'))}"
        if "exact_match" in r:
            line += f", exact_match {_pct(r['exact_match']['value'])}{_stderr(r['exact_match'].get('stderr'))}"
        line += f" (n={r['n']}, {len(r['subtasks'])} subtasks)"
        if "answer_loss" in r:
            line += f"; answer loss {r['answer_loss']['value']:.3f} nats/token"
        lines.append(line)
    for target, why in report.get("missing", {}).items():
        lines.append(f"{target}: not evaluated ({why})")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The whole eval.md: model, adapter, settings, the headline table, then each target's subtasks."""
    model, adapter, s = report["model"], report["adapter"], report["settings"]
    out = ["# Evaluation", "",
           f"- model: {model.get('model')} ({model.get('source')}, {model.get('dtype')}, "
           f"quantization {model.get('quantization')})",
           f"- adapter: {adapter['path']} (sha256 {adapter['sha256'][:12]}, r {adapter['r']})" if adapter else "- adapter: none",
           f"- settings: {s['evaluate']}", f"- lm-eval {s['versions']['lm_eval']}, qless {s['versions']['qless']}, "
           f"torch {s['versions']['torch']}; {report['wall_seconds']:.0f} s", "",
           "| target | metric | value (%) | n | answer loss (nats/token) |", "|---|---|---|---|---|"]
    for target, r in report["tasks"].items():
        loss = f"{r['answer_loss']['value']:.3f}" if "answer_loss" in r else ""
        out.append(f"| {target} | {r['metric']} | {_pct(r['value'])}{_stderr(r.get('stderr'))} | {r['n']} | {loss} |")
        if "exact_match" in r:
            out.append(f"| {target} | exact_match | {_pct(r['exact_match']['value'])}"
                       f"{_stderr(r['exact_match'].get('stderr'))} | {r['n']} | |")
    for target, why in report.get("missing", {}).items():
        out.append(f"| {target} | not evaluated | | | |")
        out.append("")
        out.append(f"{target}: {why}")
    for target, r in report["tasks"].items():
        losses = r.get("answer_loss", {}).get("subtasks", {})
        out += ["", f"## {target} by subtask", "", f"| subtask | {r['metric']} (%) | n | answer loss |", "|---|---|---|---|"]
        for sub, v in r["subtasks"].items():
            sub_loss = f"{losses[sub]['value']:.3f}" if sub in losses else ""
            out.append(f"| {sub} | {_pct(v['value'])} | {v['n']} | {sub_loss} |")
    return "\n".join(out) + "\n"
