"""Datastore: layout, round trips, sharding, resume, refusals with clear messages."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import write_store
from qless.errors import StoreError, StoreMismatchError
from qless.quantize import QuantizerSpec, decode_codes, quantize
from qless.store import Datastore, ShardWriter, finalize, new_manifest, open_by_checkpoint, requantize


def _x(n=40, k=64, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def _files(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            if f != "manifest.json" and not f.startswith("."):
                p = os.path.join(root, f)
                out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


@pytest.mark.parametrize("tag", ["fp16", "fp32", "absmax8", "absmean4", "absmean2", "sign1"])
def test_round_trip(tmp_path, tag):
    spec = QuantizerSpec.parse(tag)
    x = _x()
    write_store(tmp_path / "s", x, spec)
    store = Datastore.open(tmp_path / "s")
    codes, scales = quantize(x, spec)
    assert store.n_rows == 40 and store.k == 64
    got = np.concatenate([np.array(c) for _, c, _ in store.blocks(16)])
    np.testing.assert_array_equal(got, codes.numpy())
    got_scales = np.concatenate([np.array(s) for _, _, s in store.blocks(16)])
    np.testing.assert_array_equal(got_scales, scales.numpy())
    torch.testing.assert_close(store.decoded(3, 9), decode_codes(codes[3:9], spec, 64))
    assert [r["id"] for r in store.rows()] == [str(i) for i in range(40)]
    assert store.row(17) == {"source": "pool", "id": "17"}
    s = store.summary()
    assert s["row_bytes"] == 64 * spec.bits // 8 and s["bits_per_coordinate"] == spec.bits
    assert s["codes_bytes"] == 40 * 64 * spec.bits // 8 and s["total_bytes"] == 40 * (64 * spec.bits // 8 + 4)


def test_blocks_are_memory_mapped(tmp_path):
    write_store(tmp_path / "s", _x(), "absmean4")
    _, codes, scales = next(Datastore.open(tmp_path / "s").blocks(8))
    assert isinstance(codes, np.memmap) and isinstance(scales, np.memmap)
    assert not codes.flags.writeable


def test_batch_size_and_shards_do_not_change_bytes(tmp_path):
    x = _x(50)
    write_store(tmp_path / "a", x, "absmean2", batch=50)
    write_store(tmp_path / "b", x, "absmean2", batch=3)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    write_store(tmp_path / "c", x, "absmean2", shards=3, batch=4)
    a, c = Datastore.open(tmp_path / "a"), Datastore.open(tmp_path / "c")
    assert len(c.shards) == 3 and c.n_rows == 50
    assert list(a.rows()) == list(c.rows())
    np.testing.assert_array_equal(a.decoded(0, 50).numpy(), c.decoded(0, 50).numpy())


def _manifest(seed=0, bits=4, checkpoint="epoch-1"):
    return new_manifest(projection={"kind": "rademacher", "dim": 64, "seed": seed, "input_dim": 1000},
                        quantizer=QuantizerSpec("absmean", bits), checkpoint={"name": checkpoint, "learning_rate": 1e-5},
                        gradient="adam", model={"name": "m"})


def test_resume_after_interruption_gives_identical_bytes(tmp_path):
    spec = QuantizerSpec("absmean", 4)
    x = _x(30)
    rows = [{"source": "pool", "id": str(i)} for i in range(30)]

    def run(path, stop_after=None):
        w = ShardWriter(path, _manifest())
        for a in range(w.consumed, 30, 10):
            if stop_after is not None and a >= stop_after:
                # the interrupted batch: data written, state never committed
                codes, scales = quantize(x[a:a + 10], spec)
                with open(w.dir / "codes.bin", "ab") as f:
                    f.write(codes.numpy().tobytes()[:77])
                with open(w.dir / "rows.jsonl", "ab") as f:
                    f.write(b'{"source": "pool", "id": "2')
                return
            codes, scales = quantize(x[a:a + 10], spec)
            w.append(codes, scales, rows[a:a + 10], consumed=a + 10)
        w.finish()
        finalize(path)

    run(tmp_path / "whole")
    run(tmp_path / "cut", stop_after=20)
    with pytest.raises(StoreError, match="incomplete"):
        Datastore.open(tmp_path / "cut")
    partial = Datastore.open(tmp_path / "cut", allow_incomplete=True)
    assert partial.n_rows == 20  # the uncommitted tail is not visible
    run(tmp_path / "cut")  # resume
    assert _files(tmp_path / "whole") == _files(tmp_path / "cut")


def test_existing_store_with_other_settings_refused(tmp_path):
    ShardWriter(tmp_path / "s", _manifest(seed=0))
    with pytest.raises(StoreMismatchError, match=r"projection\.seed: 0 vs 1"):
        ShardWriter(tmp_path / "s", _manifest(seed=1))


@pytest.mark.parametrize("field,kw", [("quantizer.bits", {"spec": "absmean2"}), ("projection.seed", {"seed": 5}),
                                      ("checkpoint.name", {"checkpoint": "epoch-2"})])
def test_combining_mismatched_stores_refused(tmp_path, field, kw):
    spec = kw.pop("spec", "absmean4")
    write_store(tmp_path / "a", _x(), "absmean4")
    write_store(tmp_path / "b", _x(), spec, **kw)
    with pytest.raises(StoreMismatchError, match=field.replace(".", r"\.")):
        Datastore.open(tmp_path / "a", tmp_path / "b")


def test_combining_matching_stores(tmp_path):
    rows_b = [{"source": "other", "id": str(i)} for i in range(10)]
    write_store(tmp_path / "a", _x(40), "sign1")
    write_store(tmp_path / "b", _x(10, seed=1), "sign1", rows=rows_b)
    both = Datastore.open(tmp_path / "a", tmp_path / "b")
    assert both.n_rows == 50 and both.row(45) == {"source": "other", "id": "5"}


def test_missing_and_corrupt_manifest(tmp_path):
    with pytest.raises(StoreError, match="no such datastore"):
        Datastore.open(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="manifest missing"):
        Datastore.open(tmp_path / "empty")
    write_store(tmp_path / "s", _x(), "absmean4")
    (tmp_path / "s" / "manifest.json").write_text('{"format": "qless-datastore", ')
    with pytest.raises(StoreError, match="not valid JSON"):
        Datastore.open(tmp_path / "s")
    m = _manifest()
    del m["quantizer"]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="'quantizer' missing"):
        Datastore.open(tmp_path / "s")
    m = _manifest()
    m["quantizer"]["bits"] = 3
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="3 bits is not supported"):
        Datastore.open(tmp_path / "s")


def test_truncated_array_refused(tmp_path):
    write_store(tmp_path / "s", _x(), "absmean4")
    codes = tmp_path / "s" / "shards" / "00000" / "codes.bin"
    os.truncate(codes, codes.stat().st_size - 5)
    with pytest.raises(StoreError, match=r"codes\.bin: holds .* truncated"):
        Datastore.open(tmp_path / "s")


def test_deleted_shard_refused(tmp_path):
    write_store(tmp_path / "s", _x(), "absmean4", shards=2)
    import shutil

    shutil.rmtree(tmp_path / "s" / "shards" / "00001")
    with pytest.raises(StoreError, match="do not match the manifest"):
        Datastore.open(tmp_path / "s")


def test_empty_store_refused(tmp_path):
    w = ShardWriter(tmp_path / "s", _manifest())
    w.append(np.zeros((0, 32), np.uint8), np.zeros(0, np.float32), [], consumed=3,
             skipped=[{"source": "p", "id": str(i), "reason": "no label tokens"} for i in range(3)])
    w.finish()
    finalize(tmp_path / "s")
    with pytest.raises(StoreError, match="holds no rows"):
        Datastore.open(tmp_path / "s")
    assert Datastore.open(tmp_path / "s", allow_empty=True).summary()["skipped"] == 3


def test_complete_shard_not_reopened(tmp_path):
    write_store(tmp_path / "s", _x(), "absmean4")
    with pytest.raises(StoreError, match="finalised|complete"):
        ShardWriter(tmp_path / "s", Datastore.open(tmp_path / "s").manifest)


def test_open_by_checkpoint(tmp_path):
    write_store(tmp_path / "set" / "epoch-1", _x(), "sign1", checkpoint="epoch-1")
    write_store(tmp_path / "set" / "epoch-2", _x(seed=2), "sign1", checkpoint="epoch-2")
    stores = open_by_checkpoint([tmp_path / "set"])
    assert [s.checkpoint for s in stores] == ["epoch-1", "epoch-2"]
    assert len(open_by_checkpoint([tmp_path / "set" / "epoch-2"])) == 1
    with pytest.raises(StoreError, match="neither a datastore"):
        open_by_checkpoint([tmp_path])
    # the same checkpoint in two places is combined
    write_store(tmp_path / "more" / "epoch-1", _x(5, seed=3), "sign1", checkpoint="epoch-1",
                rows=[{"source": "extra", "id": str(i)} for i in range(5)])
    both = open_by_checkpoint([tmp_path / "set", tmp_path / "more"])
    assert [(s.checkpoint, s.n_rows) for s in both] == [("epoch-1", 45), ("epoch-2", 40)]


def test_requantize_global_scale(tmp_path):
    x = _x(25)
    x[0] *= 1e-3
    write_store(tmp_path / "fp32", x, "fp32")
    out = requantize(Datastore.open(tmp_path / "fp32"), tmp_path / "g", QuantizerSpec.parse("absmax2-global"))
    s = float(x.abs().max())
    q_ref = np.clip(np.round(x.double().numpy() / s), -1, 1)
    np.testing.assert_array_equal(out.decoded(0, 25).numpy(), q_ref)
    assert out.manifest["extra"]["global_scale"] == pytest.approx(s, rel=1e-6)
    assert list(out.rows()) == list(Datastore.open(tmp_path / "fp32").rows())
    with pytest.raises(StoreError, match="float"):
        requantize(out, tmp_path / "h", QuantizerSpec.parse("sign1"))


def test_second_writer_of_a_shard_is_refused(tmp_path):
    from qless.errors import BusyError

    first = ShardWriter(tmp_path / "s", _manifest())
    with pytest.raises(BusyError, match="shard 00000 .* another process"):
        ShardWriter(tmp_path / "s", _manifest())
    ShardWriter(tmp_path / "s", _manifest(), "00001").close()  # other shards are free
    first.close()
    ShardWriter(tmp_path / "s", _manifest()).close()  # and a released shard can be resumed


def test_second_writer_process_is_refused(tmp_path):
    """Two processes on one shard: the second exits with a BusyError, nothing interleaves."""
    import subprocess
    import sys

    w = ShardWriter(tmp_path / "s", _manifest())
    code = ("import json, sys; from qless.store import ShardWriter; from qless.errors import BusyError\n"
            "m = json.load(open(sys.argv[1] + '/manifest.json'))\n"
            "try:\n    ShardWriter(sys.argv[1], m)\nexcept BusyError:\n    sys.exit(3)\n")
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")]).returncode == 3
    w.close()


def test_finalised_store_refuses_writers_without_touching_it(tmp_path):
    write_store(tmp_path / "s", _x(), "absmean4")
    before = sorted(p.name for p in (tmp_path / "s" / "shards").iterdir())
    with pytest.raises(StoreError, match="finalised"):
        ShardWriter(tmp_path / "s", Datastore.open(tmp_path / "s").manifest, "00007")
    assert sorted(p.name for p in (tmp_path / "s" / "shards").iterdir()) == before
    assert Datastore.open(tmp_path / "s").n_rows == 40  # still readable


def test_finalize_checks_the_files_of_complete_shards(tmp_path):
    w = ShardWriter(tmp_path / "s", _manifest())
    codes, scales = quantize(_x(5), QuantizerSpec("absmean", 4))
    w.append(codes, scales, [{"source": "p", "id": str(i)} for i in range(5)], consumed=5)
    w.finish()
    with open(tmp_path / "s" / "shards" / "00000" / "codes.bin", "ab") as f:
        f.write(b"\0" * 32)  # a second writer's row that was never committed
    with pytest.raises(StoreError, match="longer than committed"):
        finalize(tmp_path / "s")


def test_manifest_fields_of_the_wrong_type_are_named(tmp_path):
    write_store(tmp_path / "s", _x(), "absmean4")
    good = json.loads((tmp_path / "s" / "manifest.json").read_text())
    for field, value in (("gradient", "adamw"), ("rows", -1), ("shards", "all"), ("complete", "yes"),
                         ("warmup", {"checkpoints": "epoch-1"}), ("projection", [1, 2])):
        (tmp_path / "s" / "manifest.json").write_text(json.dumps({**good, field: value}))
        with pytest.raises(StoreError, match=f"field '{field}"):
            Datastore.open(tmp_path / "s")


def test_garbled_row_table_names_file_and_line(tmp_path):
    write_store(tmp_path / "s", _x(), "absmean4")
    rows = tmp_path / "s" / "shards" / "00000" / "rows.jsonl"
    text = rows.read_bytes().replace(b'"id": "7"', b'"id": 7!!', 1)  # same length
    rows.write_bytes(text)
    with pytest.raises(StoreError, match=r"rows\.jsonl:8: not valid JSON"):
        list(Datastore.open(tmp_path / "s").rows())
    with pytest.raises(StoreError, match=r"rows\.jsonl:8"):
        Datastore.open(tmp_path / "s").row(7)


def test_requantize_writes_beside_a_missing_destination_folder(tmp_path, monkeypatch):
    import tempfile

    write_store(tmp_path / "fp32", _x(), "fp32")

    real = tempfile.mkdtemp

    def no_system_temp(*a, dir=None, **kw):
        assert dir is not None, "a temporary folder on the system temp file system may not rename into place"
        return real(*a, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkdtemp", no_system_temp)
    out = requantize(Datastore.open(tmp_path / "fp32"), tmp_path / "new" / "parents" / "g", QuantizerSpec.parse("sign1"))
    assert out.n_rows == 40 and [p.name for p in (tmp_path / "new" / "parents").iterdir()] == ["g"]
