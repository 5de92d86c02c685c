"""lm-evaluation-harness task definitions over the embedded benchmark's local files.

lm-eval's own MMLU, BBH and SQuAD tasks read their data from the Hugging Face Hub, which is not
reachable offline. qless writes equivalent tasks instead: for each target, JSON Lines data files
(the benchmark's evaluation rows, cut to ``limit`` per subtask) and YAML task files with
``dataset_path: json`` and ``data_files`` pointing at them, into one folder that a
``TaskManager(include_path=...)`` reads.

- MMLU: one multiple-choice task per subject (``qless_mmlu_<subject>``) in lm-eval's ``mmlu``
  form (the subject's header as ``description``, question and lettered options, " A"/" B"/...
  scored by log-likelihood), ``k`` shots from the subject's dev rows (the MMLU target); group
  ``qless_mmlu`` weights subjects by size.
- BBH: one task per BBH task (``qless_bbh_<task>``), lm-eval's ``bbh/cot_fewshot`` settings
  copied from its own YAML (description, 3 CoT exemplars, stop sequences, answer filter), greedy
  generation of at most ``max_new_tokens`` tokens; group ``qless_bbh``.
- SQuAD: one generation task (``qless_squad``) on the benchmark's one-shot prompts, scored by
  lm-eval's TyDiQA-GoldP ``process_results`` (SQuAD F1 and exact match over all gold answers).
"""

from __future__ import annotations

import json
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qless.errors import ConfigError, DataError

TASKS = ("mmlu", "bbh", "squad")
"""Targets ``qless evaluate`` knows, in the order they run."""
GROUP = {"mmlu": "qless_mmlu", "bbh": "qless_bbh", "squad": "qless_squad"}
"""Target -> the lm-eval task or group name that ``qless evaluate`` asks for."""
MMLU_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"
SQUAD_RESULTS = '''"""Written by qless evaluate: SQuAD F1 and exact match as lm-eval's TyDiQA-GoldP task scores them."""

from lm_eval.tasks.tydiqa.utils import process_results_en as process_results  # noqa: F401
'''


@dataclass
class TaskFiles:
    """What was written for one target: its lm-eval name, the rows it scores and where they came from."""

    target: str
    name: str  # the lm-eval task or group to ask for
    subtask_of: dict[str, str]  # lm-eval task name -> subtask
    rows: list[dict[str, Any]]  # evaluation rows after the limit (prompt/completion/subtask for the answer loss)
    source: Path
    settings: dict[str, Any] = field(default_factory=dict)


def eval_file(bench: Path, target: str, mmlu_split: str = "test") -> Path:
    """The benchmark file holding ``target``'s evaluation rows."""
    return bench / "eval" / {"mmlu": f"mmlu_{mmlu_split}.jsonl", "bbh": "bbh.jsonl", "squad": "squad.jsonl"}[target]


def read_rows(path: Path, fields: tuple[str, ...], fix: str) -> list[dict[str, Any]]:
    """The JSON objects of a JSON Lines file, each checked for ``fields``; DataError naming file, line and field."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; {fix}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); {fix}") from None
            missing = [k for k in fields if not isinstance(row, dict) or row.get(k) in (None, "")]
            if missing:
                raise DataError(f"{path}:{lineno}: field {missing[0]!r} is missing or empty; {fix}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows; {fix}")
    return rows


def first_per_subtask(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` rows of each subtask, in file order (all rows when ``limit`` is 0)."""
    if limit <= 0:
        return list(rows)
    seen: Counter[str] = Counter()
    kept = []
    for row in rows:
        seen[row["subtask"]] += 1
        if seen[row["subtask"]] <= limit:
            kept.append(row)
    return kept


def _data_file(folder: Path, name: str, rows: list[dict[str, Any]]) -> str:
    path = folder / "data" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path.resolve())


def _write_yaml(folder: Path, name: str, config: dict[str, Any], extra: str = "") -> None:
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=1 << 16) + extra
    (folder / f"{name}.yaml").write_text(text, encoding="utf-8")


def _group(folder: Path, name: str, tasks: list[str], metric: str, filter_name: str | None = None) -> None:
    aggregate = {"metric": metric, "aggregation": "mean", "weight_by_size": True}
    if filter_name:
        aggregate["filter_list"] = filter_name
    _write_yaml(folder, name, {"group": name, "task": tasks, "aggregate_metric_list": [aggregate],
                               "metadata": {"version": 1}})


def _bench_fix(bench: Path) -> str:
    return f"build the benchmark with `qless data build --out {bench}` (or give --benchmark the folder it wrote)"


def write_mmlu(bench: Path, folder: Path, *, split: str, shots: int, limit: int) -> TaskFiles:
    """MMLU tasks: one per subject, ``shots`` dev rows as in-context examples."""
    source = eval_file(bench, "mmlu", split)
    fix = _bench_fix(bench)
    rows = first_per_subtask(read_rows(source, ("prompt", "completion", "subtask", "choices", "answer"), fix), limit)
    dev = read_rows(bench / "targets" / "mmlu.jsonl", ("prompt", "completion", "subtask"), fix)
    subtask_of: dict[str, str] = {}
    for subject in sorted({r["subtask"] for r in rows}):
        header = MMLU_HEADER.format(subject=subject.replace("_", " "))

        def doc(row: dict[str, Any], letter: str, n_choices: int, header: str = header) -> dict[str, Any]:
            if not row["prompt"].startswith(header):
                raise DataError(f"{source}: row {row.get('id')!r} does not start with the MMLU header {header!r}")
            letters = list(string.ascii_uppercase[:n_choices])
            if letter not in letters:
                raise DataError(f"{source}: row {row.get('id')!r} has answer {letter!r}, not one of {letters}")
            return {"id": row.get("id"), "subtask": subject, "text": row["prompt"][len(header):],
                    "letters": letters, "gold": letters.index(letter)}

        docs = [doc(r, r["answer"], len(r["choices"])) for r in rows if r["subtask"] == subject]
        shot_rows = [r for r in dev if r["subtask"] == subject]
        if len(shot_rows) < shots:
            raise ConfigError(f"mmlu_shots: {subject} has {len(shot_rows)} dev rows in {bench / 'targets/mmlu.jsonl'}, "
                              f"fewer than {shots} shots")
        shot_docs = [doc(r, r["completion"].strip(), len(docs[0]["letters"])) for r in shot_rows[:max(shots, 1)]]
        name = f"qless_mmlu_{subject}"
        _write_yaml(folder, name, {
            "task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": _data_file(folder, name, docs),
                                              "dev": _data_file(folder, f"{name}_dev", shot_docs)}},
            "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
            "num_fewshot": shots, "output_type": "multiple_choice", "description": header,
            "doc_to_text": "{{text}}", "doc_to_choice": "letters", "doc_to_target": "gold",
            "target_delimiter": " ", "fewshot_delimiter": "\n\n",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1},
        })
        subtask_of[name] = subject
    _group(folder, GROUP["mmlu"], sorted(subtask_of), "acc")
    return TaskFiles("mmlu", GROUP["mmlu"], subtask_of, rows, source, {"split": split, "shots": shots})


def bbh_settings() -> dict[str, dict[str, Any]]:
    """lm-eval's ``bbh/cot_fewshot`` settings per BBH task (each task file merged over its template)."""
    from qless.embedded import assets

    settings = {}
    for path in assets.bbh_task_files():
        task = assets.read_yaml(path)
        shared = assets.read_yaml(path.parent / task["include"]) if "include" in task else {}
        setting = {**shared, **task}
        settings[str(setting.get("dataset_name") or path.stem)] = setting
    return settings


def write_bbh(bench: Path, folder: Path, *, limit: int, max_new_tokens: int) -> TaskFiles:
    """BBH tasks with lm-eval's CoT settings over the benchmark's BBH evaluation rows."""
    from qless.embedded.heldout import BIGBENCH_HINT

    source = eval_file(bench, "bbh")
    if not source.is_file():
        raise DataError(
            f"{source}: no BBH evaluation set in the benchmark. It is rebuilt from BIG-bench's task files, which the "
            f"optional bigbench package ships: `{BIGBENCH_HINT}`, "
            f"then `qless data build --out {bench}` again; or leave bbh out with --tasks mmlu squad"
        )
    rows = first_per_subtask(read_rows(source, ("prompt", "completion", "subtask", "input", "target"),
                                       _bench_fix(bench)), limit)
    settings = bbh_settings()
    subtask_of: dict[str, str] = {}
    for subtask in sorted({r["subtask"] for r in rows}):
        if subtask not in settings:
            raise DataError(f"{source}: subtask {subtask!r} is not a BBH task of lm-eval's bbh/cot_fewshot")
        setting = dict(settings[subtask])
        name = f"qless_bbh_{subtask}"
        docs = [{"id": r.get("id"), "subtask": subtask, "input": r["input"], "target": r["target"]}
                for r in rows if r["subtask"] == subtask]
        for key in ("include", "tag", "dataset_name", "dataset_path", "test_split", "task", "group"):
            setting.pop(key, None)
        setting["generation_kwargs"] = {**setting.get("generation_kwargs", {}), "max_gen_toks": max_new_tokens}
        _write_yaml(folder, name, {"task": name, "dataset_path": "json",
                                   "dataset_kwargs": {"data_files": {"test": _data_file(folder, name, docs)}},
                                   "test_split": "test", **setting})
        subtask_of[name] = subtask
    _group(folder, GROUP["bbh"], sorted(subtask_of), "exact_match", "get-answer")
    return TaskFiles("bbh", GROUP["bbh"], subtask_of, rows, source, {"shots": 3, "max_new_tokens": max_new_tokens})


def write_squad(bench: Path, folder: Path, *, limit: int, max_new_tokens: int) -> TaskFiles:
    """The SQuAD task: the benchmark's one-shot prompts, greedy answers up to the first newline."""
    source = eval_file(bench, "squad")
    rows = first_per_subtask(read_rows(source, ("prompt", "completion", "subtask", "answers"), _bench_fix(bench)), limit)
    name = GROUP["squad"]
    docs = [{"id": r.get("id"), "subtask": r["subtask"], "prompt": r["prompt"], "answers": list(r["answers"])}
            for r in rows]
    (folder / "qless_squad_results.py").write_text(SQUAD_RESULTS, encoding="utf-8")
    _write_yaml(folder, name, {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": _data_file(folder, name, docs)}},
        "test_split": "test", "output_type": "generate_until", "num_fewshot": 0,
        "doc_to_text": "{{prompt}}", "doc_to_target": "{{answers[0]}}", "target_delimiter": " ",
        "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": max_new_tokens},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "f1", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1},
    }, "process_results: !function qless_squad_results.process_results\n")
    return TaskFiles("squad", name, {name: ""}, rows, source, {"shots": 1, "max_new_tokens": max_new_tokens})
