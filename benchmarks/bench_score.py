"""Scoring throughput and store size per format, against the fp32 and fp16 stores in the same run.

Writes one store per format holding the same N projected gradient rows (k = 8192, Gaussian,
as random projections make them), then scores each against 93 subtask vectors (MMLU's 57 +
BBH's 27 + 9 QA subtasks) and prints rows/s, bytes per row and the ratios to fp32 and fp16.
The stores sit in the page cache after writing, so this measures decoding and arithmetic, not
the disk; on a cold disk, scoring is bound by reading the bytes and the size ratio is the
speed ratio.

    python benchmarks/bench_score.py              # N = 20000 (about 2 minutes on 2 cores)
    python benchmarks/bench_score.py --rows 100000 --formats fp16 sign1
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qless.quantize import QuantizerSpec, quantize
from qless.scoring import ScoreConfig, score
from qless.store import Datastore, ShardWriter, finalize, new_manifest

FORMATS = ["fp32", "fp16", "absmax8", "absmean4", "absmean2", "sign1"]


def write(path: Path, spec: QuantizerSpec, rows: int, k: int, seed: int, trows: list[dict] | None = None) -> Datastore:
    manifest = new_manifest(projection={"kind": "rademacher", "dim": k, "seed": 0, "input_dim": 10**6}, quantizer=spec,
                            checkpoint={"name": "epoch-1", "learning_rate": 1e-5}, gradient="sgd" if trows else "adam")
    w = ShardWriter(path, manifest)
    g = torch.Generator().manual_seed(seed)
    for a in range(0, rows, 4096):
        b = min(a + 4096, rows)
        codes, scales = quantize(torch.randn(b - a, k, generator=g), spec)
        meta = trows[a:b] if trows else [{"source": "pool", "id": str(i)} for i in range(a, b)]
        w.append(codes, scales, meta, consumed=b)
    w.finish()
    finalize(path)
    return Datastore.open(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--formats", nargs="+", default=FORMATS)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per format; the median is reported")
    args = ap.parse_args()
    subtasks = [("mmlu", f"s{i}") for i in range(57)] + [("bbh", f"b{i}") for i in range(27)] + [("qa", f"q{i}") for i in range(9)]
    trows = [{"source": t, "id": f"{t}-{s}-{j}", "subtask": s} for t, s in subtasks for j in range(3)]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); rows={args.rows}, k={args.k}, subtasks={len(subtasks)}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tag in args.formats:
            spec = QuantizerSpec.parse(tag)
            pool = write(Path(tmp) / tag / "pool", spec, args.rows, args.k, seed=1)
            target = write(Path(tmp) / tag / "target", spec, len(trows), args.k, seed=2, trows=trows)
            score([pool], [target], ScoreConfig(), progress=False)  # warm-up
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                score([pool], [target], ScoreConfig(), progress=False)
                times.append(time.perf_counter() - t)
            results[tag] = (float(np.median(times)), pool.row_bytes + 4)
    print(f"{'format':10s} {'bytes/row':>10s} {'rows/s':>12s} {'MB/s read':>10s} {'speed vs fp32':>14s} {'vs fp16':>8s} "
          f"{'size vs fp16':>13s}")
    for tag, (t, nbytes) in results.items():
        base32 = results.get("fp32", (np.nan, 0))[0]
        base16, size16 = results.get("fp16", (np.nan, np.nan))
        print(f"{tag:10s} {nbytes:10d} {args.rows / t:12.0f} {args.rows * nbytes / t / 1e6:10.1f} "
              f"{base32 / t:14.2f} {base16 / t:8.2f} {nbytes / size16:13.3f}")


if __name__ == "__main__":
    main()
