"""lm-evaluation-harness as the engine: an already loaded model, the task files qless wrote.

The model object goes to lm-eval's ``HFLM`` as is (no second load, same device and dtype), the
tasks come from a ``TaskManager`` over qless's task folder only (lm-eval's built-in tasks are
not indexed: they would fetch from the Hub). Per-sample records are kept so that the SQuAD
breakdown per article, which lm-eval does not report, can be taken from them.

The tasks run through ``lm_eval.evaluator.evaluate``, the engine under ``simple_evaluate``, with
``simple_evaluate``'s seeds: ``simple_evaluate`` also records the environment through torch's
``collect_env`` (it runs ``pip list`` and more: 5 to 15 s per call here), which qless records itself.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from qless.evaluate.tasks import TaskFiles

log = logging.getLogger(__name__)

METRIC = {"mmlu": ("acc", "none"), "bbh": ("exact_match", "get-answer"), "squad": ("f1", "none")}
"""Target -> (lm-eval metric, filter) reported as its value."""
STDERR_BOOTSTRAP_ITERS = 1000
"""lm-eval's standard errors of a mean are analytic; bootstrap iterations only matter for other aggregations."""


def make_lm(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """lm-eval's HFLM around the loaded model and tokenizer."""
    import datasets
    from lm_eval.models.huggingface import HFLM

    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-task INFO lines drown qless's own
        # it warns that a model object (not a name) was passed: that is how qless uses it
        logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
        datasets.disable_progress_bars()  # one bar per data file of a few rows; lm-eval's own bars stay
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _number(value: Any) -> float | None:
    """A metric value as a float; None for lm-eval's "N/A" and non-finite values."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def run(lm: Any, folder: Path, files: TaskFiles) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate one target; returns its summary and lm-eval's per-sample records.

    Summary: ``metric``, ``value``, ``stderr``, ``n`` and ``subtasks`` (subtask -> value, stderr, n);
    SQuAD adds ``exact_match`` beside F1.
    """
    import random

    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    random.seed(0)  # simple_evaluate's defaults (random_seed, numpy_random_seed, torch_random_seed)
    np.random.seed(1234)
    torch.manual_seed(1234)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    raw = evaluate(lm=lm, task_dict=manager.load([files.name]), log_samples=True, bootstrap_iters=STDERR_BOOTSTRAP_ITERS)
    if raw is None:  # lm-eval returns None on non-zero ranks only
        raise RuntimeError("lm-eval returned no results")
    metric, filt = METRIC[files.target]
    results, counts = raw["results"], raw["n-samples"]
    samples = [s for task in files.subtask_of for s in raw["samples"].get(task, [])]
    summary: dict[str, Any] = {
        "metric": metric, "lm_eval_task": files.name,
        "value": _number(results[files.name][f"{metric},{filt}"]),
        "stderr": _number(results[files.name].get(f"{metric}_stderr,{filt}")),
        "n": sum(counts[t]["effective"] for t in files.subtask_of),
    }
    if files.target == "squad":
        em = results[files.name]
        summary["exact_match"] = {"value": _number(em["exact_match,none"]), "stderr": _number(em.get("exact_match_stderr,none"))}
        by_subtask: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for s in samples:
            by_subtask[s["doc"]["subtask"]].append(s)
        summary["subtasks"] = {
            sub: {"value": sum(s["f1"] for s in group) / len(group),
                  "exact_match": sum(s["exact_match"] for s in group) / len(group), "n": len(group)}
            for sub, group in sorted(by_subtask.items())
        }
    else:
        summary["subtasks"] = {
            files.subtask_of[task]: {"value": _number(results[task][f"{metric},{filt}"]),
                                     "stderr": _number(results[task].get(f"{metric}_stderr,{filt}")),
                                     "n": counts[task]["effective"]}
            for task in sorted(files.subtask_of)
        }
    return summary, samples


def sample_record(sample: dict[str, Any]) -> dict[str, Any]:
    """What is kept of one lm-eval sample: id, subtask, target, the (filtered) response, metrics."""
    doc = sample["doc"]
    record = {"id": doc.get("id"), "subtask": doc.get("subtask"), "target": sample.get("target")}
    resps = sample.get("filtered_resps")
    if sample.get("arguments") and isinstance(resps, list) and resps and isinstance(resps[0], (list, tuple)):
        record["loglikelihoods"] = [float(r[0]) for r in resps]  # multiple choice: (loglik, is_greedy) per option
    else:
        record["response"] = resps[0] if isinstance(resps, list) and resps else resps
        raw = sample.get("resps")
        if raw and raw[0] and raw[0][0] != record["response"]:
            record["generation"] = raw[0][0]
    for key in sample.get("metrics", []):
        record[key] = sample.get(key)
    return record
