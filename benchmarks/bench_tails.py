"""How heavy-tailed the coordinates of projected gradients are, per projection kind, k and nnz.

absmean quantization clips every coordinate above the row's mean magnitude, and absmax rounds
small coordinates to zero against the row's largest one: both assume coordinates of similar
size. A dense random projection mixes all d input coordinates into each output (Gaussian by the
central limit theorem, kurtosis 3); a sparse projection with ``nnz`` non-zeros per input
coordinate sums only about ``d nnz / k`` of them into each output, so heavy-tailed inputs stay
heavy-tailed as k grows and nnz falls. This script reads full gradients from a store of
``qless fidelity``'s probe (``projection.kind none``) and prints, for each setting, the mean over
rows of the kurtosis ``E[x^4] / E[x^2]^2`` and of the share of the squared norm held by
coordinates above 4 times the row's mean magnitude.

    python benchmarks/bench_tails.py RUN/fidelity/probe/float32-sgd/fp32/pool/checkpoint-1 \\
        --rows 32 --settings rademacher:8192 sparse:8192 sparse:32768 sparse:131072 sparse:131072:4 sparse:131072:16
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from qless.project import ProjectionConfig, make_projector
from qless.store import Datastore


def kurtosis(x: np.ndarray) -> float:
    x = x - x.mean(axis=1, keepdims=True)
    return float(((x ** 4).mean(axis=1) / (x ** 2).mean(axis=1) ** 2).mean())


def tail_share(x: np.ndarray, factor: float = 4.0) -> float:
    big = np.abs(x) > factor * np.abs(x).mean(axis=1, keepdims=True)
    return float((((x ** 2) * big).sum(axis=1) / (x ** 2).sum(axis=1)).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store", help="an unprojected (projection none) store, e.g. a fidelity probe's pool store")
    p.add_argument("--rows", type=int, default=32, help="rows read, evenly spaced over the store (default 32)")
    p.add_argument("--settings", nargs="+", default=["rademacher:8192", "sparse:8192", "sparse:131072"],
                   help="KIND:K[:NNZ] projections to measure")
    args = p.parse_args()
    store = Datastore.open(args.store)
    if store.manifest["projection"]["kind"] != "none":
        raise SystemExit(f"{args.store}: rows are projected ({store.manifest['projection']['kind']}); give an unprojected store")
    n = store.n_rows
    picks = np.unique(np.linspace(0, n - 1, min(args.rows, n)).round().astype(int))
    x = np.stack([np.asarray(store.decoded(int(i), int(i) + 1), dtype=np.float32)[0] for i in picks])
    print(f"store {args.store}: {len(picks)} of {n} rows, d = {x.shape[1]:,}")
    print("| projection | k | nnz | kurtosis | squared norm above 4x mean magnitude |")
    print("|---|---|---|---|---|")
    print(f"| none | {x.shape[1]} | - | {kurtosis(x):.1f} | {tail_share(x):.3f} |")
    for setting in args.settings:
        kind, k, *rest = setting.split(":")
        nnz = int(rest[0]) if rest else 1
        cfg = ProjectionConfig(kind=kind, dim=int(k), seed=0, nnz=nnz)
        y = make_projector(cfg, x.shape[1]).project(torch.from_numpy(x)).numpy()
        print(f"| {kind} | {k} | {nnz if kind == 'sparse' else '-'} | {kurtosis(y):.1f} | {tail_share(y):.3f} |")


if __name__ == "__main__":
    main()
