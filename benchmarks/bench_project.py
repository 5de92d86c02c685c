"""Projection throughput: R generated from the seed in chunks (qless) against a dense R held in
memory (the baseline a projector that materialises R would have), in the same run.

The dense baseline only fits for small d (it needs 4 d k bytes: 1 GiB at d = 32,768,
k = 8192), so the comparison is made there; qless's own rate is then also measured at the
d of SmolLM2-135M with LoRA r 8 on q/k/v/o (921,600), where a dense R would need 30 GB.

    python benchmarks/bench_project.py               # about a minute on 2 cores
    python benchmarks/bench_project.py --rows 256 --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from qless.project import ProjectionConfig, Projector, matrix_rows


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=128, help="gradient rows projected per pass")
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--small-d", type=int, default=32768)
    ap.add_argument("--large-d", type=int, default=921_600)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device(args.device)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"device {dev}; rows per pass {args.rows}, k {args.k}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, args.small_d, generator=g).to(dev)
    dense = matrix_rows(ProjectionConfig(dim=args.k), 0, args.small_d, dev) / args.k**0.5
    base = timed(lambda: x @ dense, args.repeat)
    print(f"d = {args.small_d}: dense R in memory (baseline)   {args.rows / base:10.1f} rows/s")
    for dtype in ("float32", "bfloat16"):
        p = Projector(ProjectionConfig(dim=args.k, compute_dtype=dtype), args.small_d, dev)
        t = timed(lambda: p(x), args.repeat)
        print(f"d = {args.small_d}: generated in chunks, {dtype:8s} {args.rows / t:10.1f} rows/s   "
              f"{base / t:5.2f}x the baseline")
    x = torch.randn(args.rows, args.large_d, generator=g).to(dev)
    for dtype in ("float32", "bfloat16"):
        p = Projector(ProjectionConfig(dim=args.k, compute_dtype=dtype), args.large_d, dev)
        t = timed(lambda: p(x), 1)
        print(f"d = {args.large_d}: generated in chunks, {dtype:8s} {args.rows / t:10.1f} rows/s "
              f"({t / args.rows * 1000:.1f} ms per row; a dense R would need {4 * args.large_d * args.k / 2**30:.0f} GiB)")


if __name__ == "__main__":
    main()
