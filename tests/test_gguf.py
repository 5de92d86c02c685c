"""The GGUF conversion cache (qless.gguf); the conversion itself is replaced by a stub here,
and runs for real on the embedded model in tests/test_models.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qless import gguf


@pytest.fixture
def stub_conversion(monkeypatch):
    calls = []

    def convert(src: Path, out: Path) -> None:
        calls.append(src)
        (out / "config.json").write_text(json.dumps({"from": src.read_text()}))

    monkeypatch.setattr(gguf, "_convert_gguf", convert)
    return calls


def test_gguf_cache_reuse_and_staleness(tmp_path, stub_conversion):
    src = tmp_path / "m.gguf"
    src.write_text("version one")
    out = tmp_path / "cache" / "m"
    assert gguf.gguf_model_dir(src, out) == out and len(stub_conversion) == 1
    assert json.loads((out / gguf.CONVERSION_MARKER).read_text())["size"] == len("version one")
    gguf.gguf_model_dir(src, out)
    os.utime(src, ns=(1, 1))  # same content, new mtime (a reinstalled package): re-hashed, reused
    gguf.gguf_model_dir(src, out)
    assert len(stub_conversion) == 1
    src.write_text("version two")  # same size, new content: converted again
    gguf.gguf_model_dir(src, out)
    assert len(stub_conversion) == 2 and json.loads((out / "config.json").read_text()) == {"from": "version two"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"], "no temporary or stale folders left"


def test_gguf_cache_interrupted_and_concurrent(tmp_path, monkeypatch, stub_conversion):
    src = tmp_path / "m.gguf"
    src.write_text("weights")
    out = tmp_path / "cache" / "m"

    def interrupted(src: Path, tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gguf.gguf_model_dir(src, out)
    assert list(out.parent.iterdir()) == [], "an interrupted conversion leaves nothing behind"

    def other_run_wins(src: Path, tmp: Path) -> None:  # another process publishes first
        out.mkdir()
        (out / "config.json").write_text('{"winner": true}')
        stamp = {"size": src.stat().st_size, "mtime_ns": src.stat().st_mtime_ns, "sha256": gguf._sha256(src)}
        (out / gguf.CONVERSION_MARKER).write_text(json.dumps(stamp))
        (tmp / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "_convert_gguf", other_run_wins)
    assert gguf.gguf_model_dir(src, out) == out
    assert json.loads((out / "config.json").read_text()) == {"winner": True}
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]
