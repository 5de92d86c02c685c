"""Distributed extraction: shard ranges made of whole chunks, the launcher's environment, and a
2-process torchrun (gloo) run against a 1-process run: the same rows, byte for byte."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import toy_pool, write_jsonl
from qless.distributed import Launch, launch_info, shard_config
from qless.errors import ConfigError
from qless.extraction import ExtractConfig, shard_range
from qless.models import AdapterConfig, ModelConfig
from qless.store import Datastore
from qless.training import WarmupConfig, warmup


@pytest.mark.parametrize("n", [0, 1, 7, 64, 65, 1000])
@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shard_ranges_are_whole_chunks_covering_every_example_once(n, chunk, world):
    ranges = [shard_range(n, chunk, i, world) for i in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (a, b), (c, _) in itertools.pairwise(ranges):
        assert b == c and a <= b
    for a, b in ranges:
        assert a % chunk == 0 and (b % chunk == 0 or b == n)  # boundaries are the single process's chunk boundaries
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= chunk  # balanced to within a chunk


def test_launcher_environment(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert launch_info() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert launch_info() == Launch(rank=2, world_size=4, local_rank=2)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launch_info() == Launch(rank=2, world_size=4, local_rank=0)
    cfg = shard_config(ExtractConfig(), launch_info())
    assert (cfg.shard_index, cfg.num_shards) == (2, 4)
    for shards in ({"num_shards": 4, "shard_index": 2}, {"num_shards": 2, "shard_index": 1}):
        with pytest.raises(ConfigError, match="leave them unset"):  # refused on every rank alike
            shard_config(ExtractConfig(**shards), launch_info())
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match="RANK"):
        launch_info()
    monkeypatch.setenv("RANK", "9")
    with pytest.raises(ConfigError, match="outside"):
        launch_info()


def test_torchrun_two_processes_write_the_rows_of_one(tmp_path, tiny_model_dir):
    pool = write_jsonl(tmp_path / "pool.jsonl", toy_pool(22))
    model_cfg = ModelConfig(model=str(tiny_model_dir))
    from qless.data import load_examples

    warmup(load_examples(pool), tmp_path / "warmup", WarmupConfig(percent=50, epochs=1, batch_size=4, learning_rate=1e-2),
           model_cfg, AdapterConfig(r=4, alpha=16), progress=False)
    args = ["-q", "extract", "--warmup", str(tmp_path / "warmup"), "--data", str(pool), "--name", "pool", "--kind", "pool",
            "--formats", "fp32", "sign1", "absmean2-global", "--chunk-size", "4", "--batch-size", "2",
            "--projection-dim", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default per process: the same kernels in both runs
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    one = subprocess.run([sys.executable, "-m", "qless.cli", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                          "qless.cli", *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    for tag in ("fp32", "sign1", "absmean2-global"):
        a = Datastore.open(tmp_path / "one" / tag / "pool" / "checkpoint-1")
        b = Datastore.open(tmp_path / "two" / tag / "pool" / "checkpoint-1")
        assert a.manifest["complete"] and b.manifest["complete"]
        assert len(a.shards) == 1 and len(b.shards) == 2  # derived global stores keep the shards
        ids_a, ids_b = [r["id"] for r in a.rows()], [r["id"] for r in b.rows()]
        assert sorted(ids_a) == sorted(ids_b) and len(ids_a) == 22
        order = [ids_b.index(i) for i in ids_a]
        codes_a = np.concatenate([np.array(c) for _, c, _ in a.blocks(100)])
        codes_b = np.concatenate([np.array(c) for _, c, _ in b.blocks(100)])[order]
        scales_a = np.concatenate([np.array(s) for _, _, s in a.blocks(100)])
        scales_b = np.concatenate([np.array(s) for _, _, s in b.blocks(100)])[order]
        assert np.array_equal(codes_a, codes_b) and np.array_equal(scales_a, scales_b), tag


def test_all_succeeded_is_the_minimum_over_ranks(monkeypatch):
    """With a (one-rank) gloo group, the flag exchange returns each rank's own verdict combined by
    MIN; without a group it is the rank's own flag."""
    import socket

    import torch.distributed as dist

    from qless.distributed import all_succeeded

    assert all_succeeded(True) is True and all_succeeded(False) is False
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        assert all_succeeded(True) is True and all_succeeded(False) is False
    finally:
        dist.destroy_process_group()
