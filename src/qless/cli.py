"""The ``qless`` command: one subcommand per stage, a thin layer over the Python API.

A user error (:class:`~qless.errors.QlessError`) becomes a one-paragraph message on stderr
and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

from qless import __version__
from qless.config import add_arguments, from_args
from qless.errors import QlessError

log = logging.getLogger("qless")

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _subcommand(sub: argparse._SubParsersAction, name: str, help: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=f"{help}\n\nexample:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


# ---------------------------------------------------------------------------------------------
# score / select / inspect


def _cmd_score(ns: argparse.Namespace) -> int:
    from qless.datastore import open_by_checkpoint
    from qless.score import ScoreConfig, score, write_scores

    cfg = from_args(ScoreConfig, ns)
    pool = open_by_checkpoint(ns.pool)
    targets = open_by_checkpoint(ns.target)
    result = score(pool, targets, cfg)
    out = write_scores(ns.out, result, pool, targets, cfg)
    agg = result.aggregate(cfg.aggregation)
    print(f"scored {result.values.shape[0]} pool rows against {len(result.groups.subtasks)} subtasks "
          f"of {len(agg)} task(s) over {len(result.checkpoints)} checkpoint(s) -> {out}")
    return 0


def _cmd_select(ns: argparse.Namespace) -> int:
    import numpy as np

    from qless.score import read_scores
    from qless.select import SelectConfig, choose, write_selection

    cfg = from_args(SelectConfig, ns)
    manifest, values, rows = read_scores(ns.scores)
    tasks = manifest["tasks"]
    if ns.task:
        unknown = [t for t in ns.task if t not in tasks]
        if unknown:
            raise QlessError(f"task(s) {unknown} not in {ns.scores}; it scored {tasks}")
        tasks = ns.task
    records = _pool_records(ns.pool_data) if ns.pool_data else None
    for task in tasks:
        col = np.asarray(values[:, manifest["tasks"].index(task)])
        picked = choose(col, cfg)
        out = Path(ns.out) / task if len(tasks) > 1 or not ns.task else Path(ns.out)
        summary = write_selection(out, picked, col, rows, cfg, records=records,
                                  info={"task": task, "scores": str(ns.scores)})
        print(f"{task}: selected {summary['n_selected']} of {summary['n_pool']} rows ({cfg.method}) -> {out}")
    return 0


def _pool_records(specs: Sequence[str]) -> dict[tuple[str, str], dict]:
    from qless.data import DataConfig, load_examples

    records: dict[tuple[str, str], dict] = {}
    for spec in specs:
        for ex in load_examples(spec, cfg=DataConfig(on_bad_record="skip")):
            records[(ex.source, ex.id)] = dict(ex.record)
    return records


def _cmd_inspect(ns: argparse.Namespace) -> int:
    from qless.datastore import open_by_checkpoint

    for store in open_by_checkpoint(ns.store, allow_incomplete=ns.allow_incomplete, allow_empty=True):
        s = store.summary()
        if ns.json:
            print(json.dumps(s, indent=2))
            continue
        print(f"{', '.join(s['paths'])}")
        print(f"  quantizer      {s['quantizer']}  ({s['bits_per_coordinate']:g} bits per coordinate)")
        p = s["projection"]
        print(f"  projection     {p['kind']}  k={p['dim']}  d={p['input_dim']}  seed={p['seed']}")
        print(f"  checkpoint     {s['checkpoint']['name']}  lr={s['checkpoint']['learning_rate']:g}  gradient={s['gradient']}")
        print(f"  rows           {s['rows']}  (skipped {s['skipped']}; {s['shards']} shard(s); "
              f"{'complete' if s['complete'] else 'INCOMPLETE'})")
        print(f"  bytes per row  {s['row_bytes']} codes + 4 scale = {s['bytes_per_row_with_scale']}")
        print(f"  total          {_human(s['total_bytes'])}  (codes {_human(s['codes_bytes'])})")
        if s["model"]:
            print(f"  model          {s['model'].get('name', s['model'])}")
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from qless.score import ScoreConfig
    from qless.select import SelectConfig

    parser = argparse.ArgumentParser(
        prog="qless",
        description="Select instruction-tuning data by quantized gradient similarity (QLESS / LESS).",
    )
    parser.add_argument("--version", action="version", version=f"qless {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _subcommand(sub, "score", "score pool gradients against target gradients",
                    "qless score --pool run/grads/absmean4/pool --target run/grads/absmean4/mmlu --out run/scores/mmlu")
    p.add_argument("--pool", nargs="+", required=True, metavar="STORE", help="pool store(s) or folder(s) of per-checkpoint stores")
    p.add_argument("--target", nargs="+", required=True, metavar="STORE", help="target store(s) or folder(s) of per-checkpoint stores")
    p.add_argument("--out", required=True, help="new folder for the scores")
    add_arguments(p, ScoreConfig)
    _COMMANDS["score"] = _cmd_score

    p = _subcommand(sub, "select", "select the top-scoring pool examples (or a random baseline)",
                    "qless select --scores run/scores/mmlu --pool-data pool.jsonl --percent 5 --out run/selected/mmlu")
    p.add_argument("--scores", required=True, help="a folder written by `qless score`")
    p.add_argument("--out", required=True, help="new folder for the selection (one subfolder per task if several)")
    p.add_argument("--task", nargs="+", help="task(s) to select for (default: every scored task)")
    p.add_argument("--pool-data", nargs="+", metavar="DATA",
                   help="the pool's data files (to write the selected examples in their own format)")
    add_arguments(p, SelectConfig)
    _COMMANDS["select"] = _cmd_select

    p = _subcommand(sub, "inspect", "describe datastores: settings, rows, bytes per row",
                    "qless inspect run/grads/absmean4/pool")
    p.add_argument("store", nargs="+", help="store(s) or folder(s) of stores")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--allow-incomplete", action="store_true", help="also describe stores whose writing is unfinished")
    _COMMANDS["inspect"] = _cmd_inspect
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return _COMMANDS[ns.command](ns)
    except QlessError as e:
        msg = textwrap.fill(str(e), width=100, break_long_words=False, break_on_hyphens=False)
        print(f"qless {ns.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
