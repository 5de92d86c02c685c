"""Extraction: stores equal a slow float64 reference, resume is byte-identical, bad rows reported."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import requires_cuda, toy_pool, write_jsonl
from qless.data import DataConfig, collate, load_examples, tokenize_examples
from qless.errors import ConfigError, StoreMismatchError
from qless.extraction import ExtractConfig, extract
from qless.gradients import adam_direction, per_example_gradients_loop
from qless.models import AdapterConfig, ModelConfig, load_adapter, load_model
from qless.project import ProjectionConfig, project_reference
from qless.quantize import QuantizerSpec, quantize
from qless.store import Datastore, ShardWriter
from qless.training import WarmupConfig, warmup
from utils import QUANTIZED_RTOL, ROW_REL_TOL, THREADS_REL_TOL, layer_gradients, reference_gradients

PROJ = ProjectionConfig(dim=256, seed=4, chunk_size=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("extract")
    pool = load_examples(write_jsonl(root / "pool.jsonl", toy_pool(20)))
    targets = load_examples(write_jsonl(root / "t.jsonl", [
        {"prompt": "what is two plus two", "completion": " four", "subtask": "math", "dataset": "qa", "id": "t1"},
        {"prompt": "hello world", "completion": " yes", "subtask": "chat", "dataset": "qa", "id": "t2"},
        {"prompt": "physics test", "completion": " maybe no", "subtask": "chat", "dataset": "qa", "id": "t3"}]))
    model_cfg = ModelConfig(model=str(tiny_model_dir))
    ckpts = warmup(pool, root / "warmup", WarmupConfig(percent=50, epochs=2, learning_rate=1e-2, batch_size=4,
                                                       micro_batch_size=4), model_cfg,
                   AdapterConfig(r=4, alpha=16, dropout=0.0), progress=False)
    return root, pool, targets, model_cfg, ckpts


def _cfg(**kw):
    return ExtractConfig(**{**dict(formats=("fp32", "absmean4", "sign1"), batch_size=3, chunk_size=8), **kw})


def _files(path):
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            if f != "manifest.json":
                out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


@pytest.mark.parametrize("proj", [PROJ, ProjectionConfig(kind="sparse", dim=256, nnz=2, seed=4)], ids=["dense", "sparse"])
def test_stores_equal_float64_reference(setup, tmp_path, proj):
    root, pool, targets, model_cfg, ckpts = setup
    out = extract({"pool": (pool, "pool"), "qa": (targets, "target")}, ckpts, tmp_path, _cfg(), proj, model_cfg,
                  progress=False)
    assert sorted(out["pool"]) == ["absmean4", "fp32", "sign1"]
    base, tok, _ = load_model(model_cfg)
    model = load_adapter(base, ckpts[0].path)
    for set_name, examples, kind in (("pool", pool, "pool"), ("qa", targets, "target")):
        for ckpt in ckpts:
            from qless.models import set_adapter_weights

            set_adapter_weights(model, ckpt.path)
            g = reference_gradients(model, tok, examples, ckpt, kind)
            ref = project_reference(proj, g)
            store = Datastore.open(tmp_path / "fp32" / set_name / ckpt.name)
            assert store.manifest["projection"] == proj.identity(g.shape[1])
            assert store.manifest["gradient"] == ("adam" if kind == "pool" else "sgd")
            assert store.manifest["checkpoint"] == {"name": ckpt.name, "learning_rate": ckpt.learning_rate,
                                                   "adapter_sha256": ckpt.adapter_sha256()}
            assert store.manifest["warmup"] == {"checkpoints": [c.name for c in ckpts]}
            scales = np.concatenate([np.array(s) for _, _, s in store.blocks(100)])
            got = store.decoded(0, store.n_rows).double().numpy() * scales[:, None]
            err = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
            assert err.max() < ROW_REL_TOL
            assert [r["id"] for r in store.rows()] == [e.id for e in examples]
            # the other formats hold the same rows, quantized
            s4 = Datastore.open(tmp_path / "absmean4" / set_name / ckpt.name)
            codes, _ = quantize(torch.tensor(got, dtype=torch.float32), QuantizerSpec.parse("absmean4"))
            agree = (np.concatenate([np.array(c) for _, c, _ in s4.blocks(100)]) == codes.numpy()).mean()
            assert agree > 0.99  # only codes sitting on a rounding boundary may flip
    t = Datastore.open(tmp_path / "sign1" / "qa" / "checkpoint-1")
    assert [r.get("subtask") for r in t.rows()] == ["math", "chat", "chat"]


def test_lorif_stores_hold_factors_of_the_projected_layer_gradients(setup, tmp_path):
    from qless.data import DataConfig
    from qless.lorif.capture import LayerCapture
    from qless.project.logra import logra_reference

    root, pool, targets, model_cfg, ckpts = setup
    proj = ProjectionConfig(kind="lorif", dim=8, rank=64, seed=1)  # c covers every example's token count: exact
    extract({"pool": (pool, "pool")}, ckpts, tmp_path, _cfg(formats=("fp32",), pool_gradient="sgd"), proj, model_cfg,
            progress=False)
    base, tok, _ = load_model(model_cfg)
    model = load_adapter(base, ckpts[-1].path)
    cap = LayerCapture(model, proj)
    store = Datastore.open(tmp_path / "fp32" / "pool" / ckpts[-1].name)
    assert store.manifest["projection"] == cap.identity() and store.k == cap.layout.width
    items, _ = tokenize_examples(pool, tok, DataConfig(), progress=False)
    full = layer_gradients(model, [n for n, _, _, _ in cap.layers], collate(items, tok.pad_token_id))
    offsets = np.cumsum([0] + [o * i for _, _, o, i in cap.layers])[:-1]
    want = logra_reference(cap.sides.cfg, cap.sides.factors, full, list(offsets), [-1] * len(cap.layers))
    scales = np.concatenate([np.array(s) for _, _, s in store.blocks(100)])
    rows = store.decoded(0, store.n_rows).double() * torch.from_numpy(scales).double()[:, None]
    got = cap.layout.reconstruct(rows).numpy()
    err = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert err.max() < ROW_REL_TOL


def test_logra_stores_equal_the_kronecker_projection_of_float64_plain_gradients(setup, tmp_path):
    from qless.gradients import PerExampleGradients
    from qless.project.logra import logra_reference

    root, pool, targets, model_cfg, ckpts = setup
    proj = ProjectionConfig(kind="logra", dim=8, seed=3)
    extract({"pool": (pool, "pool")}, ckpts, tmp_path, _cfg(formats=("fp32",), pool_gradient="sgd"), proj, model_cfg,
            progress=False)
    base, tok, _ = load_model(model_cfg)
    model = load_adapter(base, ckpts[-1].path)
    fast = PerExampleGradients(model, projection=proj)
    want = logra_reference(proj, fast.logra.factors, reference_gradients(model, tok, pool, ckpts[-1], "target"),
                           [s.weight_offset for s in fast._slots], [s.bias_offset for s in fast._slots])
    store = Datastore.open(tmp_path / "fp32" / "pool" / ckpts[-1].name)
    assert store.manifest["gradient"] == "sgd" and "pool_gradient" not in store.manifest["extra"]["extraction"]
    assert store.manifest["projection"] == {"kind": "logra", "dim": fast.logra.out_dim, "seed": 3, "side": 8,
                                            "input_dim": fast.input_dim}
    scales = np.concatenate([np.array(s) for _, _, s in store.blocks(100)])
    got = store.decoded(0, store.n_rows).double().numpy() * scales[:, None]
    err = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert err.max() < ROW_REL_TOL


def test_interrupted_extraction_resumes_byte_identical(setup, tmp_path, monkeypatch):
    root, pool, _, model_cfg, ckpts = setup
    extract({"pool": (pool, "pool")}, ckpts, tmp_path / "whole", _cfg(), PROJ, model_cfg, progress=False)
    real = ShardWriter.append
    calls = {"n": 0}

    def append_then_stop(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # inside the second chunk of the first checkpoint, between formats
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(ShardWriter, "append", append_then_stop)
    with pytest.raises(KeyboardInterrupt):
        extract({"pool": (pool, "pool")}, ckpts, tmp_path / "cut", _cfg(), PROJ, model_cfg, progress=False)
    monkeypatch.setattr(ShardWriter, "append", real)
    extract({"pool": (pool, "pool")}, ckpts, tmp_path / "cut", _cfg(), PROJ, model_cfg, progress=False)
    assert _files(tmp_path / "whole") == _files(tmp_path / "cut")
    # a finished or partial store is never continued with other settings or other input
    with pytest.raises(StoreMismatchError, match="chunk_size"):
        extract({"pool": (pool, "pool")}, ckpts, tmp_path / "cut", _cfg(chunk_size=4), PROJ, model_cfg, progress=False)
    calls["n"] = 0
    monkeypatch.setattr(ShardWriter, "append", append_then_stop)
    with pytest.raises(KeyboardInterrupt):
        extract({"pool": (pool, "pool")}, ckpts, tmp_path / "cut2", _cfg(), PROJ, model_cfg, progress=False)
    monkeypatch.setattr(ShardWriter, "append", real)
    with pytest.raises(StoreMismatchError, match="other input"):
        extract({"pool": (pool[::-1], "pool")}, ckpts, tmp_path / "cut2", _cfg(), PROJ, model_cfg, progress=False)


def test_non_finite_and_unlabelled_examples_are_reported(setup, tmp_path, monkeypatch):
    root, pool, _, model_cfg, ckpts = setup
    import qless.extraction as ex

    real = ex.PerExampleGradients.__call__

    def poison(self, batch):
        g, losses = real(self, batch)
        g[0, 0] = float("nan")  # the longest example of each micro-batch
        return g, losses

    monkeypatch.setattr(ex.PerExampleGradients, "__call__", poison)
    long_prompt = {"dataset": "flan", "id": "long", "messages": [{"role": "user", "content": "hello " * 400},
                                                                    {"role": "assistant", "content": "yes"}]}
    examples = pool[:6] + load_examples(write_jsonl(tmp_path / "long.jsonl", [long_prompt]))
    extract({"pool": (examples, "pool")}, ckpts[:1], tmp_path, _cfg(batch_size=7), PROJ, model_cfg,
            DataConfig(max_length=64), progress=False)
    store = Datastore.open(tmp_path / "fp32" / "pool" / "checkpoint-1")
    skipped = [json.loads(line) for line in open(store.shards[0].dir / "skipped.jsonl")]
    reasons = {s["id"]: s["reason"] for s in skipped}
    assert "long" in reasons and "no" in reasons["long"].lower()
    assert sum(r == "non-finite gradient" for r in reasons.values()) == 1
    assert store.n_rows == 5 and not any(r["id"] in reasons for r in store.rows())


def test_sharded_extraction_matches_single_process(setup, tmp_path):
    root, pool, _, model_cfg, ckpts = setup
    extract({"pool": (pool, "pool")}, ckpts[:1], tmp_path / "one", _cfg(), PROJ, model_cfg, progress=False)
    for i in range(2):
        extract({"pool": (pool, "pool")}, ckpts[:1], tmp_path / "two", _cfg(shard_index=i, num_shards=2), PROJ,
                model_cfg, progress=False)
    a = Datastore.open(tmp_path / "one" / "fp32" / "pool" / "checkpoint-1")
    b = Datastore.open(tmp_path / "two" / "fp32" / "pool" / "checkpoint-1")
    assert len(b.shards) == 2 and list(a.rows()) == list(b.rows())
    # other micro-batch groupings change float rounding only
    np.testing.assert_allclose(b.decoded(0, b.n_rows).numpy(), a.decoded(0, a.n_rows).numpy(), atol=1e-5)


def test_global_formats_need_fp32():
    with pytest.raises(ConfigError, match="fp32"):
        ExtractConfig(formats=("absmax2-global",))
    assert ExtractConfig(formats=("fp32", "absmax2-global")).specs[1].scale == "global"


def test_nf4_extraction_equals_the_reference_on_the_nf4_model(setup, tmp_path):
    """The QLoRA path against an exact oracle: the same NF4 weights, one example at a time."""
    pytest.importorskip("bitsandbytes")
    from qless.errors import ModelError
    from qless.models import set_adapter_weights

    root, pool, _, model_cfg, ckpts = setup
    nf4 = ModelConfig(model=model_cfg.model, quantization="nf4")
    try:
        extract({"pool": (pool[:8], "pool")}, ckpts, tmp_path, _cfg(formats=("fp32",)), PROJ, nf4, progress=False)
    except ModelError as e:
        pytest.skip(f"bitsandbytes NF4 is not supported here: {e}")
    base, tok, _ = load_model(nf4)
    model = load_adapter(base, ckpts[0].path)
    items, _ = tokenize_examples(pool[:8], tok, DataConfig(), progress=False)
    for ckpt in ckpts:
        set_adapter_weights(model, ckpt.path)
        g, _ = per_example_gradients_loop(model, collate(items, tok.pad_token_id), dtype=None)
        mom = ckpt.moments()
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        m = torch.cat([mom[n][0].reshape(-1) for n in names]).double()
        v = torch.cat([mom[n][1].reshape(-1) for n in names]).double()
        ref = project_reference(PROJ, adam_direction(g.double(), m, v).numpy())
        store = Datastore.open(tmp_path / "fp32" / "pool" / ckpt.name)
        assert store.manifest["model"]["quantization"] == "nf4"
        scales = np.concatenate([np.array(s) for _, _, s in store.blocks(100)])
        got = store.decoded(0, store.n_rows).double().numpy() * scales[:, None]
        assert (np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)).max() < QUANTIZED_RTOL


@pytest.mark.gpu
@requires_cuda
def test_cuda_extraction_matches_cpu(setup, tmp_path):
    root, pool, targets, model_cfg, ckpts = setup
    cuda_cfg = ModelConfig(model=model_cfg.model, device="cuda", dtype="float32")
    extract({"pool": (pool, "pool")}, ckpts[:1], tmp_path / "cpu", _cfg(formats=("fp32",)), PROJ, model_cfg, progress=False)
    extract({"pool": (pool, "pool")}, ckpts[:1], tmp_path / "cuda", _cfg(formats=("fp32",)), PROJ, cuda_cfg, progress=False)
    a = Datastore.open(tmp_path / "cpu" / "fp32" / "pool" / "checkpoint-1")
    b = Datastore.open(tmp_path / "cuda" / "fp32" / "pool" / "checkpoint-1")
    # same projection matrix on both devices; float32 kernels differ in summation order only
    np.testing.assert_allclose(b.decoded(0, b.n_rows).numpy(), a.decoded(0, a.n_rows).numpy(), atol=1e-4)


@pytest.mark.gpu
@requires_cuda
def test_projection_matrix_identical_on_cuda():
    from qless.project import matrix_rows

    cfg = ProjectionConfig(dim=1024, seed=7)
    assert torch.equal(matrix_rows(cfg, 1000, 1500, "cuda").cpu(), matrix_rows(cfg, 1000, 1500, "cpu"))


def test_set_with_no_storable_example_is_an_error(setup, tmp_path):
    from qless.errors import DataError

    root, pool, _, model_cfg, ckpts = setup
    with pytest.raises(DataError, match="no example could be stored"):
        extract({"pool": (pool[:4], "pool")}, ckpts[:1], tmp_path, _cfg(), PROJ, model_cfg, DataConfig(max_length=3),
                progress=False)


def test_finished_store_of_other_examples_is_never_reused(setup, tmp_path):
    root, pool, _, model_cfg, ckpts = setup
    extract({"pool": (pool[:10], "pool")}, ckpts[:1], tmp_path, _cfg(), PROJ, model_cfg, progress=False)
    other = load_examples(write_jsonl(tmp_path / "other.jsonl", toy_pool(10, seed=5)))
    with pytest.raises(StoreMismatchError, match="finished store of set 'pool' made from other input examples"):
        extract({"pool": (other, "pool")}, ckpts[:1], tmp_path, _cfg(), PROJ, model_cfg, progress=False)
    edited = [*pool[:9], type(pool[9])(**{**pool[9].__dict__, "messages": (("user", "changed"), ("assistant", "x"))})]
    with pytest.raises(StoreMismatchError, match="other input examples"):  # same ids, other content
        extract({"pool": (edited, "pool")}, ckpts[:1], tmp_path, _cfg(), PROJ, model_cfg, progress=False)
    assert [r["id"] for r in Datastore.open(tmp_path / "fp32" / "pool" / "checkpoint-1").rows()] == [e.id for e in pool[:10]]


def test_a_complete_store_is_checked_not_assumed(setup, tmp_path):
    from qless.errors import StoreError

    root, pool, _, model_cfg, ckpts = setup
    extract({"pool": (pool[:6], "pool")}, ckpts[:1], tmp_path, _cfg(), PROJ, model_cfg, progress=False)
    codes = next((tmp_path / "sign1" / "pool" / "checkpoint-1" / "shards").glob("*/codes.bin"))
    with open(codes, "ab") as f:
        f.write(b"\x01" * 16)  # rows that a second writer appended
    with pytest.raises(StoreError, match="longer than committed"):
        extract({"pool": (pool[:6], "pool")}, ckpts[:1], tmp_path, _cfg(), PROJ, model_cfg, progress=False)


def test_a_second_extraction_into_the_same_shard_is_refused(setup, tmp_path):
    from qless.errors import BusyError
    from qless.files import hold_lock

    root, pool, _, model_cfg, ckpts = setup
    shards = tmp_path / "fp32" / "pool" / "checkpoint-1" / "shards"
    shards.mkdir(parents=True)
    held = hold_lock(shards / ".00000-of-00001.lock", "another extraction")  # as another process would
    with pytest.raises(BusyError, match="being written by another process"):
        extract({"pool": (pool[:4], "pool")}, ckpts[:1], tmp_path, _cfg(), PROJ, model_cfg, progress=False)
    held.release()
    extract({"pool": (pool[:4], "pool")}, ckpts[:1], tmp_path, _cfg(), PROJ, model_cfg, progress=False)


def test_global_formats_with_several_shards(setup, tmp_path):
    root, pool, _, model_cfg, ckpts = setup
    cfg = dict(formats=("fp32", "absmean2-global"))
    one = extract({"pool": (pool, "pool")}, ckpts[:1], tmp_path / "one", _cfg(**cfg), PROJ, model_cfg, progress=False)
    first = extract({"pool": (pool, "pool")}, ckpts[:1], tmp_path / "two", _cfg(**cfg, shard_index=0, num_shards=2), PROJ,
                    model_cfg, progress=False)
    assert first["pool"]["absmean2-global"] == []  # not yet: the other shard is unfinished
    last = extract({"pool": (pool, "pool")}, ckpts[:1], tmp_path / "two", _cfg(**cfg, shard_index=1, num_shards=2), PROJ,
                   model_cfg, progress=False)
    a = Datastore.open(one["pool"]["absmean2-global"][0])
    b = Datastore.open(last["pool"]["absmean2-global"][0])
    assert b.n_rows == a.n_rows == len(pool) and list(a.rows()) == list(b.rows())


def test_extraction_needs_a_finished_warmup(setup, tmp_path):
    import shutil

    from qless.errors import ModelError
    from qless.stages import run_extract

    root, pool, _, model_cfg, ckpts = setup
    shutil.copytree(root / "warmup", tmp_path / "w")
    info = json.loads((tmp_path / "w" / "warmup.json").read_text())
    info["checkpoints"] = info["checkpoints"][:1]  # as if killed during epoch 2
    (tmp_path / "w" / "warmup.json").write_text(json.dumps(info))
    with pytest.raises(ModelError, match="unfinished .1 of 2 epochs"):
        run_extract(tmp_path / "w", {"pool": (pool, "pool")}, tmp_path / "g", _cfg(), PROJ, model=model_cfg,
                    data=DataConfig(), progress=False)


def test_same_input_same_bytes_across_processes(setup, tmp_path):
    """Separate processes (other hash seeds) write byte-identical stores; another thread count may
    change float32 summation order in the model's kernels, which moves rows by float32 rounding only."""
    import subprocess
    import sys

    root, *_ = setup
    outs = {}
    for threads, hash_seed in (("1", "1"), ("1", "2"), ("2", "3")):
        out = tmp_path / f"t{threads}-{hash_seed}"
        env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONHASHSEED": hash_seed, "TQDM_DISABLE": "1"}
        subprocess.run([sys.executable, "-m", "qless.cli", "--quiet", "extract", "--warmup", str(root / "warmup"), "--data",
                        str(root / "pool.jsonl"), "--name", "pool", "--kind", "pool", "--out", str(out), "--formats", "fp32",
                        "sign1", "--projection-dim", "256", "--batch-size", "3", "--chunk-size", "8"], env=env, check=True)
        outs[threads, hash_seed] = out
    assert _files(outs["1", "1"]) == _files(outs["1", "2"])
    for c in ("checkpoint-1", "checkpoint-2"):
        a, b = (Datastore.open(outs[key] / "fp32" / "pool" / c) for key in (("1", "1"), ("2", "3")))
        rows_a = a.decoded(0, a.n_rows).double().numpy() * np.concatenate([np.array(s) for _, _, s in a.blocks(99)])[:, None]
        rows_b = b.decoded(0, b.n_rows).double().numpy() * np.concatenate([np.array(s) for _, _, s in b.blocks(99)])[:, None]
        rel = np.linalg.norm(rows_a - rows_b, axis=1) / np.linalg.norm(rows_a, axis=1)
        assert rel.max() < THREADS_REL_TOL
