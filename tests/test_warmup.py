"""Warmup: the seeded subset, per-epoch checkpoints with named Adam moments, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import toy_pool, write_jsonl
from qless.data import load_examples
from qless.errors import ConfigError
from qless.models import AdapterConfig, ModelConfig
from qless.training import WarmupConfig, draw_subset, read_checkpoints, warmup

ADAPTER = AdapterConfig(r=4, alpha=16, dropout=0.1)


def _cfg(**kw):
    base = dict(percent=50, seed=3, epochs=2, learning_rate=1e-3, batch_size=4, micro_batch_size=3, warmup_ratio=0.2)
    return WarmupConfig(**{**base, **kw})


def _pool(tmp_path):
    return load_examples(write_jsonl(tmp_path / "pool.jsonl", toy_pool(24)))


def test_subset_depends_on_seed():
    a, b, c = draw_subset(1000, 5, 0), draw_subset(1000, 5, 0), draw_subset(1000, 5, 1)
    assert len(a) == 50 and a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert np.all(np.diff(a) > 0)


def test_checkpoints_hold_adapter_named_moments_and_lr(tmp_path, tiny_model_dir):
    pool = _pool(tmp_path)
    cfg = _cfg()
    ckpts = warmup(pool, tmp_path / "w", cfg, ModelConfig(model=str(tiny_model_dir)), ADAPTER, progress=False)
    assert [c.name for c in ckpts] == ["checkpoint-1", "checkpoint-2"]
    info = json.loads((tmp_path / "w" / "warmup.json").read_text())
    assert info["subset_size"] == 12 and info["steps_per_epoch"] == 3
    subset = [json.loads(line)["id"] for line in open(tmp_path / "w" / "subset.jsonl")]
    assert subset == [pool[i].id for i in draw_subset(24, 50, 3)]
    for c in ckpts:
        assert (c.path / "adapter_model.safetensors").is_file() and (c.path / "adapter_config.json").is_file()
        moments = c.moments()
        meta = json.loads((c.path / "checkpoint.json").read_text())
        assert sorted(moments) == sorted(meta["parameters"]) and all("lora_" in n for n in moments)
        assert all(v.min() >= 0 for _, v in moments.values())  # second moments
        assert meta["step"] == 3 * c.epoch
    # lr of a checkpoint = mean of the scheduled lr over its epoch's steps (cosine, 2 warmup steps of 6)
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert ckpts[0].learning_rate == pytest.approx(np.mean(lrs[:3]))
    assert ckpts[1].learning_rate == pytest.approx(np.mean(lrs[3:]))
    # finished warmup: calling again returns the same checkpoints without loading a model
    import qless.training as training

    real, training.load_model = training.load_model, None
    try:
        again = warmup(pool, tmp_path / "w", cfg, ModelConfig(model=str(tiny_model_dir)), ADAPTER, progress=False)
    finally:
        training.load_model = real
    assert again == ckpts


def test_interrupted_warmup_resumes_exactly(tmp_path, tiny_model_dir, monkeypatch):
    pool = _pool(tmp_path)
    model_cfg = ModelConfig(model=str(tiny_model_dir))
    warmup(pool, tmp_path / "whole", _cfg(), model_cfg, ADAPTER, progress=False)

    import qless.training as w

    real = w._micro_batches
    calls = {"n": 0}

    def stop_in_epoch_2(items, size):
        calls["n"] += 1
        if calls["n"] == 5:  # 3 steps per epoch: the second step of epoch 2
            raise KeyboardInterrupt
        return real(items, size)

    monkeypatch.setattr(w, "_micro_batches", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        warmup(pool, tmp_path / "cut", _cfg(), model_cfg, ADAPTER, progress=False)
    monkeypatch.setattr(w, "_micro_batches", real)
    assert [c.name for c in read_checkpoints(tmp_path / "cut")] == ["checkpoint-1"]
    warmup(pool, tmp_path / "cut", _cfg(), model_cfg, ADAPTER, progress=False)
    for name in ("adapter_model.safetensors", "optimizer.safetensors"):
        a = load_file(str(tmp_path / "whole" / "checkpoint-2" / name))
        b = load_file(str(tmp_path / "cut" / "checkpoint-2" / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_other_settings_in_same_folder_refused(tmp_path, tiny_model_dir):
    pool = _pool(tmp_path)
    warmup(pool, tmp_path / "w", _cfg(epochs=1), ModelConfig(model=str(tiny_model_dir)), ADAPTER, progress=False)
    with pytest.raises(ConfigError, match="other settings"):
        warmup(pool, tmp_path / "w", _cfg(epochs=1, seed=4), ModelConfig(model=str(tiny_model_dir)), ADAPTER, progress=False)


def test_config_validation():
    with pytest.raises(ConfigError, match="percent"):
        WarmupConfig(percent=0)
    with pytest.raises(ConfigError, match="epochs"):
        WarmupConfig(epochs=0)


def test_finished_warmup_of_another_pool_is_refused(tmp_path, tiny_model_dir):
    pool = _pool(tmp_path)
    warmup(pool, tmp_path / "w", _cfg(epochs=1), ModelConfig(model=str(tiny_model_dir)), ADAPTER, progress=False)
    other = load_examples(write_jsonl(tmp_path / "other.jsonl", toy_pool(24, seed=9)))  # same size, other examples
    with pytest.raises(ConfigError, match="pool_sha256"):
        warmup(other, tmp_path / "w", _cfg(epochs=1), ModelConfig(model=str(tiny_model_dir)), ADAPTER, progress=False)
    with pytest.raises(ConfigError, match=r"warmup\.seed: 3 vs 4"):
        warmup(pool, tmp_path / "w", _cfg(epochs=1, seed=4), ModelConfig(model=str(tiny_model_dir)), ADAPTER, progress=False)


def test_second_warmup_in_the_same_folder_is_refused(tmp_path, tiny_model_dir):
    from qless.errors import BusyError
    from qless.files import hold_lock

    (tmp_path / "w").mkdir()
    held = hold_lock(tmp_path / "w" / ".warmup.lock", "another warmup")
    with pytest.raises(BusyError):
        warmup(_pool(tmp_path), tmp_path / "w", _cfg(epochs=1), ModelConfig(model=str(tiny_model_dir)), ADAPTER, progress=False)
    held.release()


def test_damaged_warmup_json_is_named(tmp_path, tiny_model_dir):
    from qless.errors import StoreError, UnsafeNameError

    warmup(_pool(tmp_path), tmp_path / "w", _cfg(epochs=1), ModelConfig(model=str(tiny_model_dir)), ADAPTER, progress=False)
    path = tmp_path / "w" / "warmup.json"
    good = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(StoreError, match="warmup.json: not valid JSON"):
        read_checkpoints(tmp_path / "w")
    for bad, error, needle in (({"checkpoints": "all"}, StoreError, "'checkpoints' must be a list"),
                               ({"checkpoints": [{**good["checkpoints"][0], "learning_rate": "high"}]}, StoreError, "learning_rate"),
                               ({"checkpoints": [{**good["checkpoints"][0], "name": "../../elsewhere"}]}, UnsafeNameError,
                                "elsewhere"),
                               ({"settings": None}, StoreError, "settings")):
        path.write_text(json.dumps({**good, **bad}))
        with pytest.raises(error, match=needle):
            read_checkpoints(tmp_path / "w")


def test_step_loss_counts_only_predicted_labels():
    """The loss of a step is divided by the labels the loss takes (positions 1..T-1), as in extraction."""
    from qless.data import IGNORE_INDEX, Tokenized
    from qless.training import _step_tokens

    a = Tokenized(None, [5, 6, 7], [5, 6, 7], False)  # position 0 labelled: it predicts nothing
    b = Tokenized(None, [5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8], False)
    assert _step_tokens([a, b]) == 4
