"""Pool streaming memory: indexing, extraction's example stream and selection at two pool sizes.

    python benchmarks/bench_pool.py                      # 100K and 1M records
    python benchmarks/bench_pool.py --sizes 20000 --tokenize

Writes synthetic JSON Lines pools in the embedded pool's form (``{"dataset", "id": "SOURCE/I",
"messages"}``, a user and an assistant turn, about 450 bytes a record) and, for each size,
runs every phase in its own process. Each phase's peak resident memory is read by a parent
that ran only that one child, with ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``:

* ``imports``: ``import qless.stages`` only: the floor every phase starts from;
* ``eager load``: ``load_examples``, the whole pool as Examples: what extraction held before;
* ``index``: one pass that validates every record and saves the offset index;
* ``extraction stream``: from the saved index, what :mod:`qless.extraction` does with the
  examples: the shard range, the inputs' fingerprint, then chunk by chunk (256) the chunk's
  digest, and with ``--tokenize`` its tokenization with SmolLM2's tokenizer (no model runs);
* ``selection``: ``run_select`` on a synthetic ``[n, 1]`` memory-mapped scores folder,
  top 5%, ``selected.jsonl`` written through the saved index;
* ``eager selection``: the same selection the way it was done before (every record in a
  dict, every row in a list, a full sort); its files are checked equal to the streamed one's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

SOURCES = ("flan_v2", "cot", "dolly", "oasst1")
WORDS = ("the answer is a question about physics history law code data model train test small large first "
         "second because therefore however which would could should number value result explain step").split()
PHASES = ("imports", "eager load", "index", "extraction stream", "selection", "eager selection")


def write_pool(path: Path, n: int, seed: int = 0) -> None:
    """``n`` records of a few hundred bytes in the embedded pool's form."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            source = SOURCES[i % len(SOURCES)]
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(25, 60)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(8, 35)))
            f.write(json.dumps({"dataset": source, "id": f"{source}/{i}", "messages": [
                {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}) + "\n")


def write_scores_folder(folder: Path, n: int, seed: int = 0) -> None:
    """A scores folder as ``qless score`` writes it, with one task of random scores."""
    import numpy as np

    from qless.scoring import SCORES_FORMAT

    folder.mkdir(parents=True)
    values = np.lib.format.open_memmap(folder / "task_scores.npy", mode="w+", dtype=np.float32, shape=(n, 1))
    values[:, 0] = np.random.default_rng(seed).standard_normal(n, dtype=np.float32)
    values.flush()
    with open(folder / "pool_rows.jsonl", "w") as f:
        for i in range(n):
            source = SOURCES[i % len(SOURCES)]
            f.write(json.dumps({"source": source, "id": f"{source}/{i}"}) + "\n")
    (folder / "manifest.json").write_text(json.dumps({"format": SCORES_FORMAT, "n_pool": n, "tasks": ["task"]}))


def run_phase(phase: str, work: Path, tokenize: bool) -> dict:
    """One phase, in this process; returns its seconds and what it counted."""
    import qless.stages  # noqa: F401  (every phase pays the same imports)

    pool, index, scores = work / "pool.jsonl", work / "index", work / "scores"
    t = time.perf_counter()
    if phase == "imports":
        return {"seconds": 0.0}
    if phase == "eager load":
        from qless.data import load_examples

        n = len(load_examples(pool))
        return {"seconds": time.perf_counter() - t, "examples": n}
    if phase == "index":
        from qless.pool_index import open_examples

        shutil.rmtree(index, ignore_errors=True)
        n = len(open_examples(pool, index_dir=index, progress=False))
        return {"seconds": time.perf_counter() - t, "examples": n, "index_bytes": sum(p.stat().st_size for p in index.iterdir())}
    if phase == "extraction stream":
        return _extraction_stream(pool, index, tokenize, t)
    from qless.selection import SelectConfig

    out = work / ("selected" if phase == "selection" else "selected-eager")
    shutil.rmtree(out, ignore_errors=True)
    if phase == "selection":
        from qless.stages import run_select

        summary = run_select(scores, out, SelectConfig(percent=5), pool_data=[pool], index_dir=index)
        return {"seconds": time.perf_counter() - t, "selected": summary["task"]["n_selected"]}
    return _eager_selection(pool, scores, out, work / "selected", t)


def _extraction_stream(pool: Path, index: Path, tokenize: bool, t: float) -> dict:
    import hashlib

    from qless.data import DataConfig, examples_digest, tokenize_examples
    from qless.extraction import ExtractConfig, _fingerprint, shard_range
    from qless.pool_index import open_examples

    tokenizer = None
    if tokenize:
        from transformers import AutoTokenizer

        from qless.gguf import embedded_model_dir

        tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    t = time.perf_counter()
    examples = open_examples(pool, index_dir=index, progress=False)
    cfg = ExtractConfig()
    a, b = shard_range(len(examples), cfg.chunk_size, 0, 1)
    inputs = examples[a:b]
    full = _fingerprint(inputs, len(inputs), cfg.chunk_size).hexdigest()  # what a checkpoint's extraction checks first
    running, tokens = hashlib.sha256(), 0
    for c0 in range(0, len(inputs), cfg.chunk_size):
        chunk = inputs[c0:c0 + cfg.chunk_size]
        if tokenizer is not None:
            items, _ = tokenize_examples(chunk, tokenizer, DataConfig(), progress=False, log_summary=False)
            tokens += sum(len(item.input_ids) for item in items)
        running.update(bytes.fromhex(examples_digest(chunk)))
    assert running.hexdigest() == full, "the chunked stream's fingerprint differs from the whole inputs' one"
    return {"seconds": time.perf_counter() - t, "examples": len(inputs), "tokens": tokens}


def _eager_selection(pool: Path, scores: Path, out: Path, streamed: Path, t: float) -> dict:
    """The selection as written before streaming: a dict of every record, a list of every row, a full sort."""
    import numpy as np

    from qless.data import DataConfig, load_examples
    from qless.scoring import read_scores
    from qless.selection import SelectConfig, rank, write_selection_files

    records = {(e.source, e.id): e.record for e in load_examples(pool, cfg=DataConfig(on_bad_record="skip"))}
    _, values, rows = read_scores(scores)
    rows = list(rows)
    col = np.asarray(values[:, 0])
    ranked = rank(col)
    cfg = SelectConfig(percent=5)
    summary = write_selection_files(out, ranked[:cfg.count(len(ranked))], col, rows, cfg, records=records)
    seconds = time.perf_counter() - t
    for name in ("ranking.jsonl", "selected.jsonl", "counts.json"):
        if (out / name).read_bytes() != (streamed / name).read_bytes():
            raise SystemExit(f"{name}: the streamed selection differs from the eager one")
    return {"seconds": seconds, "selected": summary["n_selected"], "same_files": True}


def measure(phase: str, work: Path, tokenize: bool) -> dict:
    """Run ``phase`` in a child of a fresh process that has no other child, and read its peak RSS."""
    args = ["--work", str(work)] + (["--tokenize"] if tokenize else [])
    proc = subprocess.run([sys.executable, __file__, "--measure", phase, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"phase {phase!r} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measured_child(phase: str, args: list[str]) -> dict:
    """In the measuring process: run the phase as its only child; RUSAGE_CHILDREN is then that child's peak."""
    proc = subprocess.run([sys.executable, __file__, "--phase", phase, *args], capture_output=True, text=True)
    sys.stderr.write(proc.stderr)
    if proc.returncode:
        raise SystemExit(proc.returncode)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["peak_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux
    return result


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import numpy

    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB; Python {platform.python_version()}, numpy {numpy.__version__}; "
            f"{date.today().isoformat()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="pool sizes (records)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qless-bench-pool"), help="folder for the pools (kept)")
    parser.add_argument("--tokenize", action="store_true", help="tokenize each chunk in the extraction stream")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=PHASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args.phase, args.work, args.tokenize)))
        return
    if args.measure:
        print(json.dumps(measured_child(args.measure, ["--work", str(args.work)] + (["--tokenize"] if args.tokenize else []))))
        return

    print(f"machine: {machine()}")
    print(f"command: python benchmarks/bench_pool.py {' '.join(sys.argv[1:])}".rstrip())
    results: dict[int, dict[str, dict]] = {}
    for n in args.sizes:
        work = args.work / f"n{n}"
        if not (work / "scores" / "manifest.json").is_file():
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            write_pool(work / "pool.jsonl", n)
            write_scores_folder(work / "scores", n)
        size_mib = (work / "pool.jsonl").stat().st_size / 2**20
        print(f"\npool of {n:,} records: {size_mib:.1f} MiB ({size_mib * 2**20 / n:.0f} bytes a record)")
        results[n] = {}
        for phase in PHASES:
            r = measure(phase, work, args.tokenize)
            results[n][phase] = r
            floor = results[n]["imports"]["peak_mib"]
            extra = {k: v for k, v in r.items() if k not in ("seconds", "peak_mib")}
            print(f"  {phase:18s} {r['seconds']:8.1f} s  peak {r['peak_mib']:8.1f} MiB  above imports "
                  f"{r['peak_mib'] - floor:8.1f} MiB  {extra}")

    if len(args.sizes) >= 2:
        small, large = args.sizes[0], args.sizes[-1]
        print(f"\n| phase | {small:,}: s | {small:,}: peak MiB (above imports) | {large:,}: s | "
              f"{large:,}: peak MiB (above imports) | peak ratio | above-imports ratio |")
        print("|---|---|---|---|---|---|---|")
        for phase in PHASES[1:]:
            a, b = results[small][phase], results[large][phase]
            fa, fb = results[small]["imports"]["peak_mib"], results[large]["imports"]["peak_mib"]
            above_a, above_b = a["peak_mib"] - fa, b["peak_mib"] - fb
            print(f"| {phase} | {a['seconds']:.1f} | {a['peak_mib']:.0f} ({above_a:.0f}) | {b['seconds']:.1f} | "
                  f"{b['peak_mib']:.0f} ({above_b:.0f}) | {b['peak_mib'] / a['peak_mib']:.2f} | "
                  f"{above_b / max(above_a, 1e-9):.2f} |")


if __name__ == "__main__":
    main()
