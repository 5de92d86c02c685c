"""Scoring throughput and peak memory: qless against LESS-style scoring and the read floor.

Stores of N rows (k = 8192 Gaussian rows, as random projections make them; the same rows in
every format) are written once into ``DIR/<N>/<format>/{pool,target}`` and reused when present;
the pool cycles through 16,384 distinct rows (quantizing 1M rows in float64 would take an hour
here, and the cost of scoring does not depend on the values), the target stores hold 3 rows for
each of 93 subtasks (MMLU's 57 + BBH's 27 + 9 QA subtasks).
Every measurement runs alone in a fresh subprocess, started by a small launcher process that
reads its peak resident memory with ``getrusage(RUSAGE_CHILDREN)`` (``ru_maxrss``): a child
started straight from this process would count this process's own memory at the fork. Paths:

* ``qless``: :func:`qless.scoring.score` into a memory-mapped scores file, as ``qless score``
  does; low-bit formats go through the packed kernels (:mod:`qless.scoring.packed`);
* ``decoded``: the same with ``kernels={}``: each block decoded to float32 and multiplied (the
  path before the packed kernels);
* ``less``: LESS-style (``less/data_selection/matching.py``): the fp16 store read whole into
  memory, upcast to float32, one float32 matmul with the ``[k, 93]`` subtask matrix. LESS's own
  script multiplies by every validation example (375 columns for MMLU + BBH + TydiQA), so this
  is kinder to LESS. When the float32 copy does not fit in the memory available, the upcast and
  matmul go in the largest slices that fit and the table says so; when the fp16 store itself
  does not fit, the path is reported as not run;
* ``read``: the format's ``codes.bin`` read sequentially in 16 MiB blocks, every byte touched
  (an xor over its 64-bit words): the floor for any scorer of those bytes.

``--cache cold`` (the default) evicts the store files from the page cache before each
measurement (``posix_fadvise(DONTNEED)``, after a sync), so every path reads from disk;
``--cache warm`` reads them once first (a store larger than the free memory cannot be warm).
Peak memory includes mapped file pages: the store pages read so far and the scores written.
Big stores are deleted at the end unless ``--keep``. ``--kernels`` times the scoring
alternatives on one in-memory block instead (no disk).

    python benchmarks/bench_score.py --dir /work/benchtmp/score                        # 100K and 1M rows
    python benchmarks/bench_score.py --dir /tmp/s --rows 20000 --formats fp16 sign1   # a quick look
    python benchmarks/bench_score.py --kernels                                         # kernel alternatives
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qless.console import progress_bar
from qless.quantize import QuantizerSpec, decode_codes, quantize
from qless.scoring import ScoreConfig, score, subtask_vectors, target_groups
from qless.scoring.packed import PACKED_KERNELS
from qless.store import Datastore, ShardWriter, finalize, new_manifest

FORMATS = ["fp16", "sign1", "absmean2", "absmean4", "absmax8"]
SUBTASKS = [("mmlu", f"s{i}") for i in range(57)] + [("bbh", f"b{i}") for i in range(27)] + [("qa", f"q{i}") for i in range(9)]
TARGET_ROWS = [{"source": t, "id": f"{t}-{s}-{j}", "subtask": s} for t, s in SUBTASKS for j in range(3)]
READ_BLOCK = 16 << 20
BASE_ROWS = 16384  # distinct pool rows, repeated to fill the pool
BIG_ROWS = 500_000  # stores of at least this many rows are deleted at the end unless --keep
MEMORY_MARGIN = 1.5e9  # bytes left free when LESS-style sizes its float32 slices
# Runs the command given and prints, last, its exit code and peak RSS in bytes (Linux: ru_maxrss in KiB)
LAUNCHER = ("import json, resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print(json.dumps({'returncode': rc, 'maxrss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))")


# -- Stores -------------------------------------------------------------------------------------


def store_dir(root: Path, rows: int, tag: str, side: str) -> Path:
    return root / str(rows) / tag / side


def _complete(path: Path, rows: int) -> bool:
    try:
        return Datastore.open(path).n_rows == rows
    except Exception:  # absent, partial or corrupt: written again
        return False


def _writer(path: Path, spec: QuantizerSpec, k: int, target: bool) -> ShardWriter:
    shutil.rmtree(path, ignore_errors=True)
    manifest = new_manifest(projection={"kind": "rademacher", "dim": k, "seed": 0, "input_dim": 10**6}, quantizer=spec,
                            checkpoint={"name": "epoch-1", "learning_rate": 1e-5}, gradient="sgd" if target else "adam")
    return ShardWriter(path, manifest)


def write_stores(root: Path, rows: int, tags: list[str], k: int) -> None:
    """The pool (``rows`` rows) and target stores of every format in ``tags`` not yet complete,
    from the same seeded Gaussian rows: the targets' 279 rows, then BASE_ROWS pool rows repeated."""
    todo = [t for t in tags if not (_complete(store_dir(root, rows, t, "pool"), rows)
                                    and _complete(store_dir(root, rows, t, "target"), len(TARGET_ROWS)))]
    if not todo:
        return
    specs = {t: QuantizerSpec.parse(t) for t in todo}
    need = sum((rows + len(TARGET_ROWS)) * (s.row_bytes(k) + 4) for s in specs.values())
    free = shutil.disk_usage(root).free
    if need > free - 2e9:
        sys.exit(f"{root}: writing {', '.join(todo)} at {rows} rows needs {need / 1e9:.1f} GB and "
                 f"{free / 1e9:.1f} GB is free; choose fewer --formats or another --dir")
    for side, n, seed in (("target", len(TARGET_ROWS), 2), ("pool", rows, 1)):
        writers = {t: _writer(store_dir(root, rows, t, side), s, k, side == "target") for t, s in specs.items()}
        x = torch.randn(min(n, BASE_ROWS), k, generator=torch.Generator().manual_seed(seed))
        base = {t: quantize(x, s) for t, s in specs.items()}
        bar = progress_bar(total=n, desc=f"writing {rows}-row {side} stores ({' '.join(todo)})", unit="row")
        for a in range(0, n, len(x)):
            b = min(a + len(x), n)
            meta = TARGET_ROWS[a:b] if side == "target" else [{"source": "pool", "id": str(i)} for i in range(a, b)]
            for t, w in writers.items():
                codes, scales = base[t]
                w.append(codes[:b - a], scales[:b - a], meta, consumed=b)
            bar.update(b - a)
        bar.close()
        for t, w in writers.items():
            w.finish()
            finalize(store_dir(root, rows, t, side))


def _files(paths: list[Path]) -> list[Path]:
    return [f for p in paths for f in sorted(p.rglob("*")) if f.is_file()]


def drop_cache(paths: list[Path]) -> None:
    """Evict the files under ``paths`` from the page cache (clean pages only, hence the sync)."""
    os.sync()
    for f in _files(paths):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(paths: list[Path]) -> None:
    buf = bytearray(READ_BLOCK)
    for f in _files(paths):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def codes_files(store: Path) -> list[Path]:
    return [shard.dir / "codes.bin" for shard in Datastore.open(store).shards if shard.rows]


# -- Measurements (each in its own process) ----------------------------------------------------


def run_qless(pool_dir: Path, target_dir: Path, scratch: Path, packed: bool) -> dict:
    pool, target = Datastore.open(pool_dir), Datastore.open(target_dir)
    t0 = time.perf_counter()
    values = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32, shape=(pool.n_rows, len(SUBTASKS)))
    score([pool], [target], ScoreConfig(), out=values, progress=False, kernels=PACKED_KERNELS if packed else {})
    values.flush()
    seconds = time.perf_counter() - t0
    del values
    scratch.unlink()
    return {"seconds": seconds, "note": ""}


def _available_memory() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def run_less(pool_dir: Path, target_dir: Path) -> dict:
    """LESS-style: the fp16 store read whole, upcast to float32, one matmul (slices if it must)."""
    pool, target = Datastore.open(pool_dir), Datastore.open(target_dir)
    if pool.spec.tag != "fp16":
        raise ValueError("LESS-style scoring reads an fp16 store")
    n, k = pool.n_rows, pool.k
    m = subtask_vectors(target, target_groups(list(target.rows()))).to(torch.float32)  # [k, S]
    avail = _available_memory()
    if 2 * n * k > avail - MEMORY_MARGIN:
        return {"seconds": None, "note": f"not run: the fp16 store ({2 * n * k / 1e9:.1f} GB) does not fit in the "
                                         f"{avail / 1e9:.1f} GB available"}
    slice_rows = min(n, int((avail - MEMORY_MARGIN - 2 * n * k) // (4 * (k + m.shape[1]))) // 1024 * 1024)
    if slice_rows < 1024:
        return {"seconds": None, "note": f"not run: no room for a float32 slice beside the {2 * n * k / 1e9:.1f} GB store"}
    t0 = time.perf_counter()
    x16 = torch.empty(n, k, dtype=torch.float16)
    view, pos = memoryview(x16.numpy()).cast("B"), 0
    for f in codes_files(pool_dir):
        with open(f, "rb", buffering=0) as fh:
            while got := fh.readinto(view[pos:pos + READ_BLOCK]):
                pos += got
    out = torch.empty(n, m.shape[1], dtype=torch.float32)
    for a in range(0, n, slice_rows):
        torch.matmul(x16[a:a + slice_rows].float(), m, out=out[a:a + slice_rows])
    seconds = time.perf_counter() - t0
    whole = slice_rows == n
    note = "" if whole else (f"upcast in slices of {slice_rows} rows: the whole float32 copy ({4 * n * k / 1e9:.0f} GB) "
                             f"beside the fp16 store does not fit in {avail / 1e9:.1f} GB")
    return {"seconds": seconds, "note": note}


def run_read(pool_dir: Path) -> dict:
    """Read every byte of the store's codes in large sequential blocks and touch them."""
    buf = bytearray(READ_BLOCK)
    words = np.frombuffer(buf, dtype=np.uint64)
    acc = np.uint64(0)
    t0 = time.perf_counter()
    for f in codes_files(pool_dir):
        with open(f, "rb", buffering=0) as fh:
            while got := fh.readinto(buf):
                acc ^= np.bitwise_xor.reduce(words[:got // 8]) ^ np.uint64(sum(buf[got // 8 * 8:got]))
    return {"seconds": time.perf_counter() - t0, "note": "", "xor": int(acc)}


def child(args: argparse.Namespace) -> None:
    with open("/proc/self/oom_score_adj", "w") as f:  # if memory runs out, this process goes, not a neighbour's
        f.write("1000")
    pool, target = Path(args.pool), Path(args.target)
    if args.child == "less":
        result = run_less(pool, target)
    elif args.child == "read":
        result = run_read(pool)
    else:
        result = run_qless(pool, target, Path(args.scratch), packed=args.child == "qless")
    print(json.dumps(result))


def measure(path: str, root: Path, rows: int, tag: str, cache: str) -> dict:
    """One path on one store in its own process (this process's torch thread count), with its peak RSS."""
    pool, target = store_dir(root, rows, tag, "pool"), store_dir(root, rows, tag, "target")
    (drop_cache if cache == "cold" else warm_cache)([pool, target])
    cmd = [sys.executable, __file__, "--child", path, "--pool", str(pool), "--target", str(target),
           "--scratch", str(root / f".scores.{os.getpid()}.npy"), "--threads", str(torch.get_num_threads())]
    lines = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], stdout=subprocess.PIPE, check=True).stdout.decode().splitlines()
    launched = json.loads(lines[-1])
    if launched["returncode"] != 0:
        return {"seconds": None, "note": f"failed (exit {launched['returncode']})", "rss": launched["maxrss"]}
    return {**json.loads(lines[-2]), "rss": launched["maxrss"]}


# -- Kernel alternatives on one block -------------------------------------------------------------


def _per_1000_rows(fn, rows: int, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) / rows * 1e6  # ms per 1000 rows


def kernel_alternatives(k: int, rows: int, repeat: int) -> None:
    """ms per 1000 rows of each way to score one in-memory block against ``[k, 93]`` subtasks."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=g)
    q = torch.randn(k, len(SUBTASKS), generator=g, dtype=torch.float64) / k**0.5
    q32 = q.to(torch.float32)
    hi = q32.to(torch.bfloat16)
    mid = (q32 - hi.float()).to(torch.bfloat16)
    q_bf16 = torch.cat([hi, mid, (q32 - hi.float() - mid.float()).to(torch.bfloat16)], dim=1)
    print(f"\nkernel alternatives: one block of {rows} rows, k = {k}, {len(SUBTASKS)} subtasks, "
          f"best of {repeat}; ms per 1000 rows")
    print(f"{'format':10s} {'packed int8':>12s} {'decode + fp32':>14s} {'decode + bf16 x3':>17s} {'byte LUT':>9s}")
    for tag in FORMATS:
        spec = QuantizerSpec.parse(tag)
        codes, _ = quantize(x, spec)
        kernel = PACKED_KERNELS.get(spec.impl.tag(spec.bits))
        packed = "-"
        if kernel is not None:
            query = kernel.prepare(q)
            packed = f"{_per_1000_rows(lambda: kernel.scores(codes, query), rows, repeat):.2f}"
        fp32 = _per_1000_rows(lambda: decode_codes(codes, spec, k) @ q32, rows, repeat)
        bf16 = _per_1000_rows(lambda: decode_codes(codes, spec, k).to(torch.bfloat16) @ q_bf16, rows, repeat)
        lut = "-"
        if tag == "sign1":  # per query, the 256 partial sums of +-q over each byte's 8 coordinates
            signs = (torch.arange(256)[:, None] >> torch.arange(8) & 1).to(torch.float32) * 2 - 1  # [256, 8]
            table = torch.einsum("vb,jbs->jvs", signs, q32.reshape(k // 8, 8, -1)).reshape(-1, q32.shape[1])
            offsets = (torch.arange(k // 8) * 256)[None, :]
            bag = torch.nn.functional.embedding_bag
            lut = f"{_per_1000_rows(lambda: bag(codes.long() + offsets, table, mode='sum'), rows, repeat):.2f}"
        print(f"{tag:10s} {packed:>12s} {fp32:14.2f} {bf16:17.2f} {lut:>9s}")


# -- Report ----------------------------------------------------------------------------------------


def _fmt_s(r: dict) -> str:
    return f"{r['seconds']:.2f}" if r.get("seconds") else "-"


def _ratio(a: dict, b: dict) -> str:
    return f"{a['seconds'] / b['seconds']:.2f}" if a.get("seconds") and b.get("seconds") else "-"


def report(results: dict, rows_list: list[int], tags: list[str]) -> None:
    for rows in rows_list:
        res = results[rows]
        print(f"\n{rows} rows (k = 8192, {len(SUBTASKS)} subtasks); seconds, rows/s and peak RSS per path")
        print(f"{'format':9s} {'qless s':>8s} {'rows/s':>9s} {'RSS GB':>7s} | {'decoded s':>9s} {'RSS GB':>7s} | "
              f"{'read s':>7s} {'RSS GB':>7s} | {'less/qless':>10s} {'qless/read':>10s} {'decoded/qless':>13s}")
        less = res.get(("fp16", "less"), {})
        for tag in tags:
            q, d, r = res[(tag, "qless")], res.get((tag, "decoded"), {}), res[(tag, "read")]
            rate = f"{rows / q['seconds']:.0f}" if q.get("seconds") else "-"
            dr = f"{d['rss'] / 1e9:7.2f}" if d else f"{'-':>7s}"
            print(f"{tag:9s} {_fmt_s(q):>8s} {rate:>9s} {q['rss'] / 1e9:7.2f} | {_fmt_s(d):>9s} {dr} | "
                  f"{_fmt_s(r):>7s} {r['rss'] / 1e9:7.2f} | {_ratio(less, q):>10s} {_ratio(q, r):>10s} {_ratio(d, q):>13s}")
        if less:
            print(f"LESS-style (fp16): {_fmt_s(less)} s, peak RSS {less['rss'] / 1e9:.2f} GB. {less['note']}")
        for (tag, path), r in res.items():
            if r.get("note") and path != "less":
                print(f"  {tag} {path}: {r['note']}")
    if len(rows_list) > 1:
        lo, hi = rows_list[0], rows_list[-1]
        print(f"\npeak RSS of qless, {hi} rows against {lo} rows (GB): "
              + ", ".join(f"{t} {results[hi][(t, 'qless')]['rss'] / 1e9:.2f} vs {results[lo][(t, 'qless')]['rss'] / 1e9:.2f}"
                          for t in tags))


def _cpu() -> str:
    """The CPU's model name and whether it has AVX512-VNNI (the int8 dot products of the packed kernels)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), platform.machine())
    return f"{name} ({platform.machine()}, {'with' if 'avx512_vnni' in info else 'without'} AVX512-VNNI)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, help="folder for the stores (reused when present)")
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--formats", nargs="+", default=FORMATS)
    ap.add_argument("--cache", choices=["cold", "warm"], default="cold")
    ap.add_argument("--threads", type=int, help="torch threads of every measurement (default: torch's own choice)")
    ap.add_argument("--no-decoded", action="store_true", help="skip the decode-then-multiply path")
    ap.add_argument("--keep", action="store_true", help="keep stores of 500K rows or more")
    ap.add_argument("--kernels", action="store_true", help="time the kernel alternatives on one block and stop")
    ap.add_argument("--block", type=int, default=4096, help="rows of the --kernels block")
    ap.add_argument("--repeat", type=int, default=5, help="--kernels: timed runs, the best is reported")
    ap.add_argument("--child", choices=["qless", "decoded", "less", "read"], help=argparse.SUPPRESS)
    ap.add_argument("--pool", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    print(f"machine: {_cpu()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; python {platform.python_version()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); {datetime.date.today()}")
    print(f"command: python {shlex.join(sys.argv)}")
    if args.kernels:
        return kernel_alternatives(args.k, args.block, args.repeat)
    if args.dir is None:
        ap.error("--dir is required (a folder for the stores)")
    tags = ["fp16"] + [t for t in args.formats if t != "fp16"]
    args.dir.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict] = {}
    try:
        for rows in args.rows:
            write_stores(args.dir, rows, tags, args.k)
            res = results[rows] = {}
            print(f"\n{rows} rows: page cache {args.cache}", flush=True)
            for tag in tags:
                paths = ["read", "qless"] + ([] if args.no_decoded or tag == "fp16" else ["decoded"])
                paths += ["less"] if tag == "fp16" else []
                for path in paths:
                    res[(tag, path)] = r = measure(path, args.dir, rows, tag, args.cache)
                    print(f"  {tag:9s} {path:8s} {_fmt_s(r):>8s} s  peak RSS {r['rss'] / 1e9:.2f} GB  "
                          f"load {os.getloadavg()[0]:.1f}  {r.get('note', '')}", flush=True)
        report(results, args.rows, tags)
    finally:
        if not args.keep:
            for rows in args.rows:
                if rows >= BIG_ROWS:
                    shutil.rmtree(args.dir / str(rows), ignore_errors=True)


if __name__ == "__main__":
    main()
