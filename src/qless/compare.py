"""``qless compare``: the QLESS paper's comparison of selectors on a benchmark (its Table 1, Table 2
and Figure 4), from selection to fine-tuned accuracy.

For every setting (a selector) and selected percentage, each target task gets a selection, a LoRA
fine-tune of the base model on it (:func:`qless.stages.run_train`, the warmup's recipe) and an
evaluation on that task (:func:`qless.evaluate.evaluate`: its metric and the held-out answer loss).
Settings:

* ``random`` and ``balanced``: one draw per seed (:mod:`qless.baselines`), the same for every
  target; each seed's fine-tune is evaluated on every target, and the table shows mean ± std over seeds;
* ``rds``: RDS+ (hidden-state cosine, :mod:`qless.represent`);
* a store format (``fp16`` is LESS; ``absmax8/4/2``, ``absmean8/4/2``, ``sign1`` are QLESS): the top p%
  by the scores of the gradient stores in that format; ``FORMAT@int8`` or ``FORMAT@nf4`` extracts the
  gradients with the base model loaded in 8 or 4 bits (the paper's Table 2). Every format of one model
  precision comes from one extraction pass at the checkpoints of one shared warmup.
* ``lorif`` or ``lorif-FORMAT`` (``@int8`` / ``@nf4`` as above): LoRIF influence (:mod:`qless.lorif`) from rank-c
  factor stores of plain gradients (the ``lorif`` section: side, rank c, layers, normalization), preconditioned by
  the rank-r curvature fitted on the pool store (the ``curvature`` section); ``lorif`` keeps fp16 factors,
  ``lorif-sign1`` etc. quantized ones. Every LoRIF format of one precision comes from one more extraction pass.

The base model without fine-tuning is evaluated too, as a reference row. Everything goes under
``OUT``, and every finished piece is reused by the next run (it resumes after a kill)::

    OUT/config.json                    the resolved configuration of the latest run
    OUT/warmup/                        the shared LoRA warmup (qless.training)
    OUT/grads/<precision>/<format>/... gradient stores per base-model precision (none, int8, nf4)
    OUT/represent/                     RDS+ representation stores
    OUT/lorif/<precision>/grads/<format>/...   LoRIF factor stores; OUT/lorif/<precision>/curvature/<format>/
    OUT/scores/<setting>/              scores folder per setting
    OUT/selected/p<percent>/<setting>/<target or seed-S>/   selections, with the inputs they came from
    OUT/units/<key>/                   one fine-tune per distinct training set: data.jsonl, train/, eval/<target>-<key>/
    OUT/base/eval/<target>-<key>/      the base model's evaluations
    OUT/timings.json                   wall time of each piece, measured by the run that finished it
    OUT/compare.json, compare.md, compare.html, figures/

A unit's key is a digest of its training set (the selected examples, whatever their order) and the
training settings, so two settings that select the same examples share one fine-tune (its time counts
for each), and changed settings train into a new unit instead of overwriting one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qless import presets
from qless.baselines import RDS_SCORING, draw_baseline
from qless.config import Config, from_dict, merge, option, parse_overrides, read_config_file, to_dict
from qless.console import progress_bar
from qless.data import DataConfig
from qless.errors import ConfigError, DataError
from qless.evaluate import EvaluateConfig, evaluate
from qless.evaluate.tasks import TASKS, eval_file
from qless.extraction import ExtractConfig, check_projection
from qless.files import atomic_folder, atomic_write_json, atomic_write_text, locked, made_from, output_errors, read_json
from qless.lorif.curvature import CurvatureConfig
from qless.models import AdapterConfig, ModelConfig, release_memory
from qless.project import ProjectionConfig
from qless.quantize import QuantizerSpec
from qless.report_html import write_compare_report
from qless.represent import RepresentConfig, represent
from qless.scoring import ScoreConfig, read_scores, scores_inputs
from qless.selection import SelectConfig
from qless.stages import (
    curvature_inputs,
    curvature_into,
    load_data,
    pool_records,
    run_extract,
    run_train,
    run_warmup,
    score_into,
    select_into,
    selected_examples,
)
from qless.store import open_by_checkpoint
from qless.training import TrainConfig, WarmupConfig, read_train, recipe_of

log = logging.getLogger(__name__)

BASELINES = ("random", "balanced", "rds")
PRECISIONS = ("int8", "nf4")
DEFAULT_SETTINGS = ("random", "balanced", "rds", "fp16", "absmax8", "absmax4", "absmax2", "absmean8", "absmean4",
                    "absmean2", "sign1")
"""The paper's Table 1: random (3 seeds), balanced random, RDS+, LESS (fp16 store), QLESS absmax and absmean
at 8, 4 and 2 bits, sign at 1 bit."""
COMPARE_FORMAT = "qless-compare"


@dataclass(frozen=True)
class Setting:
    """One row of the comparison: a baseline, or a store format (with the base model's precision
    during extraction)."""

    name: str
    kind: str  # random | balanced | rds | gradient
    format: str = ""
    precision: str = "none"

    @classmethod
    def parse(cls, text: str) -> Setting:
        if text in BASELINES:
            return cls(text, text)
        fmt, _, precision = text.partition("@")
        lorif = fmt == "lorif" or fmt.startswith("lorif-")
        if lorif:
            fmt = fmt.removeprefix("lorif").removeprefix("-") or "fp16"
        try:
            tag = QuantizerSpec.parse(fmt).tag
        except (ValueError, ConfigError) as e:
            raise ConfigError(f"compare.settings: {text!r} is neither a baseline ({', '.join(BASELINES)}) nor a store "
                              f"format such as fp16, absmean4, sign1 ({e})") from None
        if precision and precision not in PRECISIONS:
            raise ConfigError(f"compare.settings: {text!r}: the model precision after @ must be one of "
                              f"{', '.join(PRECISIONS)} (e.g. absmean4@nf4)")
        name = ("lorif" if tag == "fp16" else f"lorif-{tag}") if lorif else tag
        return cls(f"{name}@{precision}" if precision else name, "lorif" if lorif else "gradient", tag, precision or "none")

    @property
    def seeded(self) -> bool:
        """A draw per seed, shared by every target (random, balanced)."""
        return self.kind in ("random", "balanced")

    @property
    def stored(self) -> bool:
        """Scored from gradient stores (LESS/QLESS or LoRIF), extracted at the warmup's checkpoints."""
        return self.kind in ("gradient", "lorif")

    @property
    def label(self) -> str:
        if not self.stored:
            return {"random": "Random", "balanced": "Balanced random", "rds": "RDS+"}[self.kind]
        spec = QuantizerSpec.parse(self.format)
        if self.kind == "lorif":
            what = f"LoRIF ({spec.tag} factors)"
        else:
            what = ("LESS (fp16)" if spec.tag == "fp16" else f"{spec.tag} store" if spec.impl.lossless_source
                    else f"QLESS {spec.method} {spec.bits}-bit" + (f" ({spec.scale} scale)" if spec.scale == "global" else ""))
        return what + (f", {self.precision} model" if self.precision != "none" else "")


@dataclass(frozen=True)
class LorifConfig(Config):
    """How the ``lorif`` settings extract and score (the projection's seed, chunk size and compute dtype
    are the comparison's ``projection`` section's; the curvature's settings its ``curvature`` section)."""

    section = "lorif"

    side: int = option(32, "each layer's input and output gradient projected to this many coordinates (D = side^2 "
                       "per layer; projection.dim of kind lorif)")
    rank: int = option(4, "c: rank of each layer's stored factors (projection.rank)")
    layers: Literal["lora", "all"] = option("lora", "layers factored: the LoRA-adapted ones, or every linear layer")
    normalize: Literal["raw", "cosine"] = option("raw", "raw influence <g', H^-1 g> (the LoRIF paper) or its cosine in "
                                                 "the H^-1 metric (LESS-like)")
    damping: float | None = option(None, "lambda as a multiple of each curvature block's mean eigenvalue (default: "
                                   "curvature.damping)")

    def projection(self, base: ProjectionConfig) -> ProjectionConfig:
        return replace(base, kind="lorif", dim=self.side, rank=self.rank, layers=self.layers, nnz=1)


@dataclass(frozen=True)
class CompareConfig(Config):
    """Everything a comparison needs. Sections use the stage configs' fields; ``train`` defaults to
    the warmup's recipe."""

    section = "compare"

    benchmark: str = option("", "a folder written by `qless data build` (pool.jsonl, targets/, eval/)")
    out: str = option("runs/compare", "folder for everything the comparison writes (re-running resumes there)")
    targets: tuple[str, ...] = option(TASKS, "target tasks: mmlu bbh squad")
    settings: tuple[str, ...] = option(DEFAULT_SETTINGS, "selectors: random balanced rds, or a store format (fp16 = LESS, "
                                       "absmax8 ... sign1 = QLESS), lorif or lorif-FORMAT (LoRIF influence from fp16 or "
                                       "quantized factors), FORMAT@int8 / FORMAT@nf4 to extract with the base model in 8 "
                                       "or 4 bits")
    seeds: tuple[int, ...] = option((0, 1, 2), "seeds of the random and balanced baselines (one fine-tune each)")
    percents: tuple[float, ...] = option((5.0,), "selected percentages of the pool; several make the sweep "
                                         "(0.5 1 2 5 10: the paper's Figure 4)")
    base_model: bool = option(True, "also evaluate the base model without fine-tuning (a reference row)")
    model: ModelConfig = option(ModelConfig(), "base model", flag=False)
    adapter: AdapterConfig = option(AdapterConfig(), "LoRA adapter", flag=False)
    data: DataConfig = option(DataConfig(), "pool tokenization", flag=False)
    target_data: DataConfig = option(DataConfig(), "target tokenization (scoring, answer loss)", flag=False)
    warmup: WarmupConfig = option(WarmupConfig(), "warmup training", flag=False)
    projection: ProjectionConfig = option(ProjectionConfig(), "gradient projection", flag=False)
    extract: ExtractConfig = option(ExtractConfig(), "gradient extraction (its formats come from the settings)", flag=False)
    score: ScoreConfig = option(ScoreConfig(), "scoring", flag=False)
    lorif: LorifConfig = option(LorifConfig(), "LoRIF factor stores and influence (the lorif settings)", flag=False)
    curvature: CurvatureConfig = option(CurvatureConfig(), "LoRIF curvature (the lorif settings)", flag=False)
    represent: RepresentConfig = option(RepresentConfig(), "RDS+ representations", flag=False)
    train: TrainConfig = option(TrainConfig(), "fine-tuning on each selection (default: the warmup's recipe)", flag=False)
    evaluate: EvaluateConfig = option(EvaluateConfig(), "evaluation (its tasks come from targets)", flag=False)

    def validate(self) -> None:
        if not self.benchmark:
            raise ConfigError("compare.benchmark: give the folder written by `qless data build` (--benchmark FOLDER)")
        unknown = [t for t in self.targets if t not in TASKS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"compare.targets: {list(self.targets)}; give one or more distinct tasks of {', '.join(TASKS)}")
        if not self.settings:
            raise ConfigError(f"compare.settings: give at least one, e.g. {' '.join(DEFAULT_SETTINGS)}")
        names = [s.name for s in self.parsed_settings()]
        if len(set(names)) != len(names):
            raise ConfigError(f"compare.settings names a setting twice: {list(self.settings)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ConfigError(f"compare.seeds: give one or more distinct non-negative integers, got {list(self.seeds)}")
        if not self.percents or len(set(self.percents)) != len(self.percents) or not all(0 < p <= 100 for p in self.percents):
            raise ConfigError(f"compare.percents: give one or more distinct percentages in (0, 100], got {list(self.percents)}")
        if self.score.method != "less":
            raise ConfigError("compare.score.method: the comparison scores with less (LESS/QLESS cosine)")
        for precision in self.precisions():
            check_projection(self.projection, self.extract_config(precision))
        for precision in self.precisions("lorif"):
            check_projection(self.lorif.projection(self.projection), self.extract_config(precision, "lorif"))

    def parsed_settings(self) -> list[Setting]:
        return [Setting.parse(s) for s in self.settings]

    def precisions(self, kind: str = "gradient") -> list[str]:
        """Base-model precisions the settings of ``kind`` (gradient or lorif) extract with (one pass each)."""
        return list(dict.fromkeys(s.precision for s in self.parsed_settings() if s.kind == kind))

    def extract_config(self, precision: str, kind: str = "gradient") -> ExtractConfig:
        """The extraction settings of one precision's pass: every format its settings score (LoRIF:
        plain pool gradients, which its curvature preconditions)."""
        formats = [s.format for s in self.parsed_settings() if s.kind == kind and s.precision == precision]
        if any(QuantizerSpec.parse(f).scale == "global" for f in formats) and "fp32" not in formats:
            formats.insert(0, "fp32")  # global formats are derived from an fp32 store
        extract = replace(self.extract, formats=tuple(formats))
        return replace(extract, pool_gradient="sgd") if kind == "lorif" else extract


def build_compare_config(data: Mapping[str, Any], preset: Any = "paper", where: str = "config") -> CompareConfig:
    """A CompareConfig from a JSON-like dict over the named preset; ``train`` over the warmup's recipe."""
    fields = {f.name for f in dataclasses.fields(CompareConfig)}
    layered = merge({k: v for k, v in presets.preset(preset, f"{where} preset").items() if k in fields}, dict(data))
    warm = from_dict(WarmupConfig, layered.get("warmup", {}), f"{where} warmup")
    layered["train"] = {**recipe_of(warm), **presets.preset_section(preset, "train"), **(layered.get("train") or {})}
    return from_dict(CompareConfig, layered, where)


def load_compare_config(path: str | Path | None = None, preset: str | None = None,
                        overrides: Sequence[str] | Mapping[str, Any] = ()) -> CompareConfig:
    """A comparison config from a JSON or YAML file (or none) over a preset (``preset``, else the
    file's ``preset`` key, else ``paper``), with ``SECTION.FIELD=VALUE`` overrides applied last."""
    data = read_config_file(path) if path is not None else {}
    file_preset = data.pop("preset", None)
    over = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(list(overrides))
    over_preset = over.pop("preset", None)
    where = f"{path}:" if path is not None else "command line:"
    return build_compare_config(merge(data, over), over_preset or preset or file_preset or "paper", where=where)


# ---------------------------------------------------------------------------------------------
# Bookkeeping: what finished, and what it cost


def digest(obj: Any, n: int = 16) -> str:
    """A short SHA-256 of a JSON-able value (keys sorted): the identity of a piece of work."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:n]


class Timings:
    """``OUT/timings.json``: piece -> {key, seconds}. A piece's seconds are those of the call that
    finished it (a resumed piece counts only its last call); a later run reusing it keeps them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = read_json(path, ConfigError, "delete it") if path.is_file() else {}

    def done(self, name: str, key: str) -> bool:
        return self.data.get(name, {}).get("key") == key

    def seconds(self, name: str) -> float | None:
        return self.data.get(name, {}).get("seconds")

    def run(self, name: str, key: str, fn: Callable[[], Any], earlier: float | None = None) -> Any:
        """Call ``fn`` (which reuses finished work itself); record its wall time unless the piece
        was finished by an earlier call with the same key. ``earlier``: the time the piece's own
        record gives when it was finished before but not recorded here."""
        start = time.perf_counter()
        result = fn()
        if not self.done(name, key):
            self.data[name] = {"key": key, "seconds": earlier if earlier is not None else time.perf_counter() - start}
            atomic_write_json(self.path, self.data)
        return result


def _reuse_folder(folder: Path, inputs: dict[str, Any]) -> bool:
    """Whether ``folder`` was finished from these inputs (its ``inputs.json``); a folder made from
    other inputs, or left unfinished, is removed so that it is made again."""
    if made_from(folder, inputs):
        return True
    if folder.exists():
        log.info("%s: made from other inputs or unfinished; making it again", folder)
        shutil.rmtree(folder)
    return False


# ---------------------------------------------------------------------------------------------
# The comparison


def compare(cfg: CompareConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the comparison; returns ``compare.json``'s content (also written with
    ``compare.md``, ``compare.html`` and the figures into ``cfg.out``)."""
    bench, out = Path(cfg.benchmark), Path(cfg.out)
    for rel in ("pool.jsonl", *(f"targets/{t}.jsonl" for t in cfg.targets)):
        if not (bench / rel).is_file():
            raise ConfigError(f"compare.benchmark: {bench / rel} is missing; build the benchmark with "
                              f"`qless data build --out {bench}`")
    for t in cfg.targets:
        if not eval_file(bench, t, cfg.evaluate.mmlu_split).is_file():
            from qless.embedded.heldout import BIGBENCH_HINT

            hint = f" (BBH's needs the optional bigbench package: {BIGBENCH_HINT}, then build again)" if t == "bbh" else ""
            raise ConfigError(f"compare.targets: {t} has no evaluation set, {eval_file(bench, t, cfg.evaluate.mmlu_split)}"
                              f"{hint}; or leave {t} out of the targets")
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("qless compare evaluates with lm-evaluation-harness, which is not installed: pip install 'qless[eval]'")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"compare.out {str(out)!r} is a file; give a folder")
    with output_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        with locked(out / ".compare.lock", f"the comparison in {out}"):
            return Comparison(cfg, bench, out, progress).run()


class Comparison:
    """One run of :func:`compare`: the stages in order, each reusing what is finished."""

    def __init__(self, cfg: CompareConfig, bench: Path, out: Path, progress: bool) -> None:
        self.cfg, self.bench, self.out, self.progress = cfg, bench, out, progress
        self.settings = cfg.parsed_settings()
        self.timings = Timings(out / "timings.json")
        self.pool = load_data([bench / "pool.jsonl"], cfg.data, index_dir=out / "index")
        self.target_files = {t: bench / "targets" / f"{t}.jsonl" for t in cfg.targets}
        self.targets = {t: load_data([f], cfg.target_data, index_dir=out / "index") for t, f in self.target_files.items()}
        self.pool_sha = _file_sha256(bench / "pool.jsonl")

    # -- stages ---------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        atomic_write_json(self.out / "config.json", to_dict(self.cfg))
        scores: dict[str, Path] = {}
        if any(s.stored for s in self.settings):
            self._warmup()
            for kind in ("gradient", "lorif"):
                for precision in self.cfg.precisions(kind):
                    self._extract(precision, kind)
            for s in self.settings:
                if s.stored:
                    scores[s.name] = self._score(s, self._grads(s))
        if any(s.kind == "rds" for s in self.settings):
            scores["rds"] = self._score(Setting.parse("rds"), self._represent())
        selections = {(s.name, p): self._select(s, p, scores.get(s.name)) for s in self.settings for p in self.cfg.percents}
        units = self._train_and_evaluate(selections)
        result = self._result(selections, units, scores)
        atomic_write_json(self.out / "compare.json", result)
        write_compare_report(self.out, result, self.pool, self.targets)
        return result

    def _warmup(self) -> None:
        cfg = self.cfg
        key = digest([to_dict(cfg.warmup), to_dict(cfg.model), to_dict(cfg.adapter), to_dict(cfg.data), self.pool_sha])
        self.timings.run("warmup", key, lambda: run_warmup(self.pool, self.out / "warmup", cfg.warmup, cfg.model, cfg.adapter,
                                                           cfg.data, progress=self.progress))
        release_memory()

    def _grads(self, s: Setting) -> Path:
        """The folder of a stored setting's format: ``OUT/grads/<precision>/<format>`` (LoRIF: under ``OUT/lorif``)."""
        return (self.out / "lorif" / s.precision / "grads" if s.kind == "lorif" else self.out / "grads" / s.precision) / s.format

    def _extract(self, precision: str, kind: str = "gradient") -> None:
        cfg = self.cfg
        model = replace(cfg.model, quantization=precision)
        extract = cfg.extract_config(precision, kind)
        projection = cfg.lorif.projection(cfg.projection) if kind == "lorif" else cfg.projection
        folder = self.out / "lorif" / precision / "grads" if kind == "lorif" else self.out / "grads" / precision
        sets = {"pool": (self.pool, "pool"), **{t: (ex, "target") for t, ex in self.targets.items()}}
        key = digest([self.timings.data.get("warmup", {}).get("key"), to_dict(model), to_dict(extract),
                      to_dict(projection), to_dict(cfg.target_data), sorted(self.targets)])
        name = f"extract-lorif/{precision}" if kind == "lorif" else f"extract/{precision}"
        self.timings.run(name, key, lambda: run_extract(
            self.out / "warmup", sets, folder, extract, projection, model=model, data=cfg.data,
            target_data=cfg.target_data, progress=self.progress))
        release_memory()

    def _represent(self) -> Path:
        cfg = self.cfg
        sets = {"pool": (self.pool, "pool"), **{t: (ex, "target") for t, ex in self.targets.items()}}
        key = digest([to_dict(cfg.represent), to_dict(cfg.model), to_dict(cfg.data), to_dict(cfg.target_data), self.pool_sha,
                      sorted(self.targets)])
        self.timings.run("represent/rds", key, lambda: represent(sets, self.out / "represent", cfg.represent, cfg.model, cfg.data,
                                                                 target_data_cfg=cfg.target_data, progress=self.progress))
        release_memory()
        return self.out / "represent" / cfg.represent.specs[0].tag

    def _score(self, setting: Setting, root: Path) -> Path:
        """The setting's scores folder, reused when made from the same stores and settings."""
        score_cfg = replace(self.cfg.score, aggregation=RDS_SCORING.aggregation, target_groups=RDS_SCORING.target_groups) \
            if setting.kind == "rds" else self.cfg.score
        folder = self.out / "scores" / setting.name
        pool = open_by_checkpoint([root / "pool"])
        targets = open_by_checkpoint([root / t for t in self.cfg.targets])
        if setting.kind == "lorif":
            curvature = self.out / "lorif" / setting.precision / "curvature" / setting.format
            self.timings.run(f"curvature/{setting.name}", digest(curvature_inputs(pool, self.cfg.curvature)),
                             lambda: curvature_into(curvature, pool, self.cfg.curvature, progress=self.progress))
            score_cfg = replace(score_cfg, method="lorif", curvature=str(curvature), normalize=self.cfg.lorif.normalize,
                                damping=self.cfg.lorif.damping)
        inputs = scores_inputs(pool, targets, score_cfg)

        def make() -> None:
            if (folder / "manifest.json").is_file() and read_scores(folder)[0].get("inputs") == inputs:
                return
            score_into(folder, pool, targets, score_cfg, replace=True, progress=self.progress)

        self.timings.run(f"score/{setting.name}", digest(inputs), make)
        return folder

    def _select(self, setting: Setting, percent: float, scores: Path | None) -> Path:
        """``OUT/selected/p<percent>/<setting>``: one folder per target (``seed-S`` per seed for draws)."""
        folder = self.out / "selected" / f"p{percent:g}" / setting.name
        select = SelectConfig(percent=percent)
        if setting.seeded:
            inputs = {"pool_sha256": self.pool_sha, "select": to_dict(select), "seeds": list(self.cfg.seeds),
                      "data": to_dict(self.cfg.data)}
        else:
            assert scores is not None
            inputs = {"scores": _file_sha256(scores / "manifest.json"), "select": to_dict(select)}

        def make() -> None:
            if _reuse_folder(folder, inputs):
                return
            if setting.seeded:
                draw_baseline(setting.kind, self.pool, folder, select, self.cfg.seeds)
                atomic_write_json(folder / "inputs.json", inputs)
                return
            with atomic_folder(folder, what="the selections") as tmp:
                select_into(tmp, scores, select, records=pool_records(self.pool), info={"setting": setting.name})
                atomic_write_json(tmp / "inputs.json", inputs)

        self.timings.run(f"select/p{percent:g}/{setting.name}", digest(inputs), make)
        return folder

    # -- fine-tuning and evaluation ---------------------------------------------------------------

    def _groups(self, setting: Setting) -> list[str]:
        """The selection folders of a setting: a seed's draw, or a target's selection."""
        return [f"seed-{s}" for s in self.cfg.seeds] if setting.seeded else list(self.cfg.targets)

    def _train_and_evaluate(self, selections: Mapping[tuple[str, float], Path]) -> dict[str, Any]:
        """Fine-tune once per distinct training set; evaluate each on the targets it is for.
        Returns ``{"units": {key: {...}}, "rows": {(setting, percent, group): key}}``."""
        units: dict[str, dict[str, Any]] = {}
        rows: dict[tuple[str, float, str], str] = {}
        for s in self.settings:
            for p in self.cfg.percents:
                for group in self._groups(s):
                    folder = selections[(s.name, p)] / group
                    key = self._unit_key(folder)
                    unit = units.setdefault(key, {"selection": folder, "targets": [], "used_by": []})
                    unit["used_by"].append(f"{s.name} p{p:g} {group}")
                    for t in (self.cfg.targets if s.seeded else [group]):
                        if t not in unit["targets"]:
                            unit["targets"].append(t)
                    rows[(s.name, p, group)] = key
        work = sum(1 + len(u["targets"]) for u in units.values()) + (len(self.cfg.targets) if self.cfg.base_model else 0)
        bar = progress_bar(total=work, desc="fine-tunes and evaluations", unit="job", enabled=self.progress)
        for key, unit in units.items():
            unit["train"] = self._train(key, unit.pop("selection"), unit["used_by"])
            bar.update(1)
            unit["eval"] = {}
            for t in unit["targets"]:
                unit["eval"][t] = self._evaluate(self.out / "units" / key / "eval", t, self.out / "units" / key / "train" / "adapter")
                bar.update(1)
        base = {}
        if self.cfg.base_model:
            for t in self.cfg.targets:
                base[t] = self._evaluate(self.out / "base" / "eval", t, None)
                bar.update(1)
        bar.close()
        return {"units": units, "rows": rows, "base": base}

    def _unit_key(self, selection: Path) -> str:
        """A training set's key: its examples (whatever their order) and the training settings."""
        keys = sorted([r["source"], r["id"]] for r in read_jsonl(selection / "ranking.jsonl"))
        cfg = self.cfg
        return digest([keys, self.pool_sha, to_dict(cfg.train), to_dict(cfg.model), to_dict(cfg.adapter), to_dict(cfg.data)])

    def _train(self, key: str, selection: Path, used_by: list[str]) -> dict[str, Any]:
        """The unit's fine-tune on ``data.jsonl``: the selection's records sorted by (source, id), so
        that the training order depends on the set only."""
        folder = self.out / "units" / key
        data = folder / "data.jsonl"
        if not data.is_file():
            ranked = read_jsonl(selection / "ranking.jsonl")
            records = read_jsonl(Path(selected_examples(selection)))  # in rank order, as ranking.jsonl
            order = sorted(range(len(ranked)), key=lambda i: (ranked[i]["source"], ranked[i]["id"]))
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(data, "".join(json.dumps(records[i], ensure_ascii=False) + "\n" for i in order))
        info = {"used_by": used_by}
        if not (folder / "unit.json").is_file() or read_json(folder / "unit.json", DataError, "delete it") != info:
            atomic_write_json(folder / "unit.json", info)  # which settings use the unit (informational)
        train_dir = folder / "train"
        finished = read_train(train_dir) if (train_dir / "train.json").is_file() else None
        if not (finished and finished.get("finished") and self.timings.done(f"train/{key}", key)):
            cfg = self.cfg
            earlier = finished["seconds"] if finished and finished.get("finished") else None
            self.timings.run(f"train/{key}", key, lambda: run_train([data], train_dir, cfg.train, cfg.model, cfg.adapter,
                                                                    cfg.data, progress=self.progress), earlier)
            release_memory()
        record = read_train(train_dir)
        return {"examples": record["examples"], "skipped": len(record.get("skipped") or []),
                "final_loss": record["epochs"][-1]["mean_loss"], "seconds": self.timings.seconds(f"train/{key}")}

    def _evaluate(self, root: Path, target: str, adapter: Path | None) -> dict[str, Any]:
        """One target's evaluation in ``root/<target>-<settings key>``; a finished one is read back."""
        cfg = self.cfg
        eval_cfg = replace(cfg.evaluate, tasks=(target,))
        key = digest([to_dict(eval_cfg), to_dict(cfg.model), to_dict(cfg.target_data)], 8)
        folder = root / f"{target}-{key}"
        name = f"eval/{folder.relative_to(self.out)}"
        if not ((folder / "eval.json").is_file() and self.timings.done(name, key)):
            earlier = read_json(folder / "eval.json", DataError, f"delete {folder}").get("wall_seconds") \
                if (folder / "eval.json").is_file() else None
            self.timings.run(name, key, lambda: evaluate(self.bench, folder, eval_cfg, cfg.model, adapter, cfg.target_data,
                                                         progress=self.progress), earlier)
            release_memory()
        r = read_json(folder / "eval.json", DataError, f"delete {folder} and run again")["tasks"][target]
        return {"metric": r["metric"], "value": r["value"], "stderr": r.get("stderr"), "n": r["n"],
                "exact_match": (r.get("exact_match") or {}).get("value"),
                "answer_loss": (r.get("answer_loss") or {}).get("value"), "seconds": self.timings.seconds(name),
                "folder": str(folder.relative_to(self.out))}

    # -- the table ------------------------------------------------------------------------------

    def _result(self, selections: Mapping[tuple[str, float], Path], done: dict[str, Any],
                scores: Mapping[str, Path]) -> dict[str, Any]:
        cfg, units = self.cfg, done["units"]
        rows = []
        for p in cfg.percents:
            for s in self.settings:
                # (unit, target) evaluations behind the row: each seed's unit on every target, or each target's own
                pairs = ([(done["rows"][(s.name, p, g)], t) for g in self._groups(s) for t in cfg.targets] if s.seeded
                         else [(done["rows"][(s.name, p, t)], t) for t in cfg.targets])
                used = list(dict.fromkeys(key for key, _ in pairs))
                per_seed = ([{t: units[done["rows"][(s.name, p, g)]]["eval"][t] for t in cfg.targets} for g in self._groups(s)]
                            if s.seeded else [{t: units[key]["eval"][t] for key, t in pairs}])
                train_s = sum(units[key]["train"]["seconds"] or 0.0 for key in used)
                eval_s = sum(units[key]["eval"][t]["seconds"] or 0.0 for key, t in pairs)
                row = _summarize(per_seed, cfg.targets)
                row.update(setting=s.name, label=s.label, kind=s.kind, percent=p, units=used,
                           selection=str(selections[(s.name, p)].relative_to(self.out)),
                           bytes_per_example=self._bytes_per_example(s),
                           seconds=self._stage_seconds(s, p) | {"training": train_s, "evaluation": eval_s})
                rows.append(row)
        base = _summarize([done["base"]], cfg.targets) | {"setting": "base", "label": "Base model (no fine-tuning)",
                                                          "kind": "base"} if done["base"] else None
        return {"format": COMPARE_FORMAT, "format_version": 1, "config": to_dict(cfg), "benchmark": str(self.bench),
                "n_pool": len(self.pool), "targets": list(cfg.targets), "percents": list(cfg.percents),
                "metrics": {t: rows[0]["tasks"][t]["metric"] for t in cfg.targets} if rows else {},
                "rows": rows, "base": base, "scores": {k: str(v.relative_to(self.out)) for k, v in scores.items()},
                "units": units,
                "timings_note": "each piece's time is that of the call that finished it; the warmup and an extraction are "
                                "shared by every setting of one model precision, a fine-tune by every setting that selected "
                                "the same set, and each counts for every setting that uses it"}

    def _stage_seconds(self, s: Setting, percent: float) -> dict[str, float | None]:
        t = self.timings.seconds
        if s.kind == "gradient":
            return {"warmup": t("warmup"), "extraction": t(f"extract/{s.precision}"), "scoring": t(f"score/{s.name}"),
                    "selection": t(f"select/p{percent:g}/{s.name}")}
        if s.kind == "lorif":
            return {"warmup": t("warmup"), "extraction": t(f"extract-lorif/{s.precision}"),
                    "curvature": t(f"curvature/{s.name}"), "scoring": t(f"score/{s.name}"),
                    "selection": t(f"select/p{percent:g}/{s.name}")}
        if s.kind == "rds":
            return {"representation": t("represent/rds"), "scoring": t("score/rds"), "selection": t(f"select/p{percent:g}/rds")}
        return {"selection": t(f"select/p{percent:g}/{s.name}")}

    def _bytes_per_example(self, s: Setting) -> int:
        """Bytes the selector keeps per pool example: every checkpoint's row (codes and scale)."""
        if s.seeded:
            return 0
        stores = open_by_checkpoint([self.out / "represent" / self.cfg.represent.specs[0].tag / "pool"] if s.kind == "rds"
                                    else [self._grads(s) / "pool"])
        return sum(st.summary()["bytes_per_row_with_scale"] for st in stores)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON Lines file (lines end at newlines only: text may hold U+2028)."""
    with open(path, encoding="utf-8", newline="\n") as f:
        return [json.loads(line) for line in f if line.strip()]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation (n - 1; None for one value) and n of the values present."""
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return {"mean": None, "std": None, "n": 0, "values": list(values)}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None, "n": len(v), "values": list(values)}


def _summarize(per_seed: Sequence[Mapping[str, Mapping[str, Any]]], targets: Sequence[str]) -> dict[str, Any]:
    """Per target: the metric (and answer loss) over seeds; the average over targets per seed, over seeds."""
    def avg(seed: Mapping[str, Mapping[str, Any]], field: str) -> float | None:
        vals = [seed[t][field] for t in targets]
        return None if any(v is None for v in vals) else float(np.mean(vals))

    return {"n": len(per_seed),
            "tasks": {t: {"metric": per_seed[0][t]["metric"], **_stats([s[t]["value"] for s in per_seed]),
                          "answer_loss": _stats([s[t]["answer_loss"] for s in per_seed])} for t in targets},
            "average": _stats([avg(s, "value") for s in per_seed]),
            "answer_loss": _stats([avg(s, "answer_loss") for s in per_seed])}


def fmt_stat(stat: Mapping[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    """``"45.2 ± 1.3"`` (std over seeds) or ``"45.2"``; ``"n/a"`` without a value."""
    if stat.get("mean") is None:
        return "n/a"
    text = f"{stat['mean'] * scale:.{digits}f}"
    return text + (f" ± {stat['std'] * scale:.{digits}f}" if stat.get("std") is not None else "")


def percent_label(p: float) -> str:
    return f"{p:g}%"


__all__ = ["DEFAULT_SETTINGS", "CompareConfig", "LorifConfig", "Setting", "build_compare_config", "compare", "load_compare_config"]
