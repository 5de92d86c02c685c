"""Evaluation: how well a base model, or the base model with a LoRA adapter, does on the targets.

``qless evaluate`` scores a model on the embedded benchmark's held-out evaluation sets with
lm-evaluation-harness as the engine (:mod:`qless.evaluate.tasks` writes the task files,
:mod:`qless.evaluate.harness` runs them), and adds qless's own measure, the model's mean answer
loss on the same held-out rows (:mod:`qless.evaluate.loss`). The metric functions of
:mod:`qless.evaluate.metrics` are the references the tests hold lm-eval's scoring to.

Output (``OUT``): ``eval.json`` (per target: metric, value, standard error, n, per-subtask
values, answer loss; model and adapter identity, settings, versions, wall time), ``eval.md``,
``samples/<target>.jsonl`` (every item's response and score), and the task files lm-eval read
(``lm_eval_tasks/``). Each finished target is kept in ``parts/`` as it completes, so an
interrupted run redoes only the unfinished ones; running again with the same settings reuses
``eval.json``, and other settings are refused (choose another output folder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qless import __version__
from qless.config import Config, describe_differences, option, to_dict
from qless.data import DataConfig, load_examples, tokenize_examples
from qless.errors import ConfigError, DataError, ModelError, OutputError
from qless.evaluate import harness, loss
from qless.evaluate.report import render_markdown
from qless.evaluate.tasks import TASKS, TaskFiles, eval_file, write_bbh, write_mmlu, write_squad
from qless.files import atomic_write_json, atomic_write_text, output_errors, read_json
from qless.models import ModelConfig

log = logging.getLogger(__name__)

EVAL_FORMAT = "qless-eval"
EVAL_FORMAT_VERSION = 1


@dataclass(frozen=True)
class EvaluateConfig(Config):
    """What to evaluate and how; the defaults are the benchmarks' own settings."""

    section = "evaluate"

    tasks: tuple[str, ...] = option(TASKS, "targets to evaluate: mmlu, bbh, squad")
    limit: int = option(0, "items per subtask, the first ones in file order (0: all); e.g. 2 for a quick CPU run")
    mmlu_split: Literal["test", "validation"] = option("test", "MMLU split to evaluate on")
    mmlu_shots: int = option(5, "MMLU in-context examples, from the subject's dev rows (0 to 5)")
    bbh_max_new_tokens: int = option(256, "most tokens generated per BBH chain of thought (lm-eval's YAML says 1024; "
                                     "generation also stops at a blank line)")
    squad_max_new_tokens: int = option(32, "most tokens generated per SQuAD answer (it also stops at a newline)")
    batch_size: int = option(8, "examples per forward pass (lm-eval and the answer loss)")
    answer_loss: bool = option(True, "also compute the mean answer loss on the same held-out rows")

    def validate(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ConfigError(f"evaluate.tasks: {', '.join(map(repr, unknown)) or 'none given'}; choose from {', '.join(TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"evaluate.tasks: {list(self.tasks)} names a task twice")
        if self.limit < 0:
            raise ConfigError(f"evaluate.limit must be 0 (all) or positive, got {self.limit}")
        if not 0 <= self.mmlu_shots <= 5:
            raise ConfigError(f"evaluate.mmlu_shots must be 0 to 5 (MMLU has 5 dev rows per subject), got {self.mmlu_shots}")
        for name in ("bbh_max_new_tokens", "squad_max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluate.{name} must be a positive integer, got {getattr(self, name)}")


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _adapter(model: Any, adapter_dir: Path, identity: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The model with the adapter of ``adapter_dir`` (merged into the weights unless the base is
    quantized), and the adapter's identity. A qless warmup or training record beside the adapter
    names its base model; a different one is refused."""
    from qless.models import adapter_identity, load_adapter

    for record_path in (adapter_dir / "train.json", adapter_dir.parent / "warmup.json", adapter_dir.parent / "train.json"):
        if not record_path.is_file():
            continue
        trained_on = (read_json(record_path, ModelError, "the adapter's folder is damaged") or {}).get("model") or {}
        for key in ("source", "config_sha256"):
            if trained_on.get(key) not in (None, identity.get(key)):
                raise ModelError(f"{adapter_dir}: the adapter was trained on another base model ({record_path} says "
                                 f"{key} {trained_on.get(key)!r}, the model loaded has {identity.get(key)!r}); "
                                 f"pass the model it was trained on with --model {trained_on.get('model', '...')}")
        break
    peft_model = load_adapter(model, adapter_dir)
    info = {k: v for k, v in adapter_identity(peft_model).items() if k != "parameters"}
    info |= {"path": str(adapter_dir.resolve()), "sha256": _sha256(adapter_dir / "adapter_model.safetensors")}
    if identity.get("quantization", "none") == "none":
        return peft_model.merge_and_unload().eval(), info
    return peft_model.eval(), info


def _write_tasks(bench: Path, folder: Path, target: str, cfg: EvaluateConfig) -> TaskFiles:
    if target == "mmlu":
        return write_mmlu(bench, folder, split=cfg.mmlu_split, shots=cfg.mmlu_shots, limit=cfg.limit)
    if target == "bbh":
        return write_bbh(bench, folder, limit=cfg.limit, max_new_tokens=cfg.bbh_max_new_tokens)
    return write_squad(bench, folder, limit=cfg.limit, max_new_tokens=cfg.squad_max_new_tokens)


def _answer_loss(files: TaskFiles, model: Any, tokenizer: Any, data: DataConfig, cfg: EvaluateConfig,
                 progress: bool, tmp: Path) -> dict[str, Any]:
    """Mean answer loss on the target's evaluation rows (read through qless.data, as training reads them)."""
    path = tmp / f"{files.target}_rows.jsonl"
    path.write_text("".join(json.dumps({k: r[k] for k in ("dataset", "id", "subtask", "prompt", "completion") if k in r},
                                       ensure_ascii=False) + "\n" for r in files.rows), encoding="utf-8")
    items, skipped = tokenize_examples(load_examples(path, cfg=data), tokenizer, data, progress=False)
    losses = loss.answer_losses(model, items, tokenizer.pad_token_id, batch_size=cfg.batch_size, progress=progress)
    return loss.summarize_losses(items, losses) | {"skipped": len(skipped)}


def evaluate(benchmark: str | Path, out_dir: str | Path, cfg: EvaluateConfig = EvaluateConfig(),
             model: ModelConfig = ModelConfig(), adapter: str | Path | None = None, data: DataConfig = DataConfig(),
             *, progress: bool = True) -> dict[str, Any]:
    """Evaluate the model (with ``adapter``, a saved LoRA folder, if given) on ``benchmark``'s evaluation
    sets; writes ``out_dir/eval.json`` and ``eval.md`` and returns the eval.json content.

    A target whose evaluation file is missing (BBH without the optional bigbench asset) is recorded
    in ``missing`` and, once the others are done, raised as :class:`DataError` with the fix.
    """
    import torch

    from qless.models import load_model

    try:
        import lm_eval
    except ImportError as e:
        raise ConfigError(f"qless evaluate needs lm-evaluation-harness, an optional dependency: pip install "
                          f"'qless[eval]' (from the repository: pip install -e '.[eval]') ({e})") from None

    started = time.perf_counter()
    bench, out = Path(benchmark), Path(out_dir)
    if not (bench / "eval").is_dir():
        raise DataError(f"{bench}: no eval/ folder; build the benchmark with `qless data build --out {bench}`")
    base, tokenizer, identity = load_model(model)
    adapter_info = None
    if adapter is not None:
        base, adapter_info = _adapter(base, Path(adapter), identity)
    files_used = {t: _sha256(eval_file(bench, t, cfg.mmlu_split)) for t in cfg.tasks}
    if "mmlu" in cfg.tasks:
        files_used["mmlu_shots"] = _sha256(bench / "targets" / "mmlu.jsonl")
    settings = {"evaluate": to_dict(cfg), "data": to_dict(data), "model": identity, "adapter": adapter_info,
                "benchmark": {"path": str(bench.resolve()), "sha256": files_used},
                "versions": {"qless": __version__, "lm_eval": lm_eval.__version__, "torch": torch.__version__}}
    done = _finished(out, settings)
    if done is not None:
        log.info("%s: finished with the same settings; reusing it", out / "eval.json")
        _raise_missing(done)
        return done

    parts, missing = {}, {}
    with output_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        lm = None
        for target in cfg.tasks:
            part_path = out / "parts" / f"{target}.json"
            if part_path.is_file() and (read_json(part_path, OutputError, "delete it") or {}).get("settings") == settings:
                parts[target] = read_json(part_path, OutputError, "delete it")["result"]
                log.info("%s: reusing the finished result", target)
                continue
            target_start = time.perf_counter()
            folder = out / "lm_eval_tasks" / target  # lm-eval's input, written anew each time (paths inside are final)
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            try:
                files = _write_tasks(bench, folder, target, cfg)
            except DataError as e:
                if target != "bbh" or eval_file(bench, "bbh").is_file():
                    raise
                missing[target] = str(e)
                continue
            lm = lm or harness.make_lm(base, tokenizer, cfg.batch_size)
            log.info("%s: %d items in %d subtask(s), lm-eval task %s", target, len(files.rows),
                     len({r["subtask"] for r in files.rows}), files.name)
            result, samples = harness.run(lm, folder, files)
            if cfg.answer_loss:
                result["answer_loss"] = _answer_loss(files, base, tokenizer, data, cfg, progress, folder)
            result |= {"settings": files.settings, "file": str(files.source), "seconds": time.perf_counter() - target_start}
            (out / "samples").mkdir(exist_ok=True)
            atomic_write_text(out / "samples" / f"{target}.jsonl",
                              "".join(json.dumps(harness.sample_record(s), ensure_ascii=False, default=str) + "\n"
                                      for s in samples))
            (out / "parts").mkdir(exist_ok=True)
            atomic_write_json(part_path, {"settings": settings, "result": result})
            parts[target] = result
        report = {"format": EVAL_FORMAT, "format_version": EVAL_FORMAT_VERSION, "settings": settings,
                  "model": identity, "adapter": adapter_info, "tasks": parts, "missing": missing,
                  "wall_seconds": time.perf_counter() - started}
        atomic_write_text(out / "eval.md", render_markdown(report))
        atomic_write_json(out / "eval.json", report)
    _raise_missing(report)
    return report


def _finished(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The finished eval.json in ``out`` if it has these settings; OutputError if it has others."""
    path = out / "eval.json"
    if not path.is_file():
        return None
    done = read_json(path, OutputError, "delete it, or choose another output folder")
    if not isinstance(done, dict) or done.get("format") != EVAL_FORMAT:
        raise OutputError(f"{path}: not a qless evaluation; choose another output folder")
    if done.get("settings") != settings:
        raise OutputError(f"{out}: holds an evaluation with other settings (they differ in "
                          f"{describe_differences(done.get('settings'), settings)}); choose another output folder "
                          "or delete this one")
    return done


def _raise_missing(report: dict[str, Any]) -> None:
    if report.get("missing"):
        raise DataError(" ".join(report["missing"].values()) + f" (the other targets were evaluated: "
                        f"{', '.join(report['tasks']) or 'none'})")


__all__ = ["TASKS", "EvaluateConfig", "evaluate"]
