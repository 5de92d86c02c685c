"""qless train: the warmup's loop on given data, exact resume, the final adapter, the command line."""

from __future__ import annotations

import json

import pytest

from conftest import toy_pool, write_jsonl
from qless.cli import main
from qless.data import load_examples
from qless.errors import BusyError, ConfigError, DataError
from qless.models import AdapterConfig, ModelConfig
from qless.stages import run_train
from qless.training import TrainConfig, WarmupConfig, draw_subset, read_train, recipe_of, train, warmup

ADAPTER = AdapterConfig(r=4, alpha=16, dropout=0.1)
WARMUP = WarmupConfig(percent=50, seed=3, epochs=2, learning_rate=1e-3, batch_size=4, micro_batch_size=3, warmup_ratio=0.2)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**recipe_of(WARMUP), **kw})


def _data(tmp_path, n=12, seed=0):
    return load_examples(write_jsonl(tmp_path / f"data{seed}.jsonl", toy_pool(n, seed=seed)))


def _bytes(path):
    return path.read_bytes()


def test_train_on_the_warmup_subset_is_the_warmup(tmp_path, tiny_model_dir):
    """One loop serves both: the warmup's subset trained with the warmup's recipe gives the warmup's
    checkpoints byte for byte (adapter and Adam moments of every epoch) and its losses."""
    model = ModelConfig(model=str(tiny_model_dir))
    pool = _data(tmp_path, 24)
    ckpts = warmup(pool, tmp_path / "w", WARMUP, model, ADAPTER, progress=False)
    subset = [pool[i] for i in draw_subset(len(pool), WARMUP.percent, WARMUP.seed)]
    record = train(subset, tmp_path / "t", _cfg(save_epochs=True), model, ADAPTER, progress=False)
    assert _bytes(tmp_path / "t" / "adapter" / "adapter_model.safetensors") == _bytes(
        ckpts[-1].path / "adapter_model.safetensors")
    for c in ckpts:
        for name in ("adapter_model.safetensors", "optimizer.safetensors", "rng_state.safetensors"):
            assert _bytes(tmp_path / "t" / c.name / name) == _bytes(c.path / name), (c.name, name)
    warm = json.loads((tmp_path / "w" / "warmup.json").read_text())
    assert [e["mean_loss"] for e in record["epochs"]] == [c["mean_loss"] for c in warm["checkpoints"]]
    assert [e["mean_learning_rate"] for e in record["epochs"]] == [c.learning_rate for c in ckpts]


def test_train_record_and_final_adapter(tmp_path, tiny_model_dir):
    data = _data(tmp_path)
    record = train(data, tmp_path / "t", _cfg(), ModelConfig(model=str(tiny_model_dir)), ADAPTER, progress=False,
                   source={"data": ["toy"]})
    assert record == read_train(tmp_path / "t") and record["finished"] and record["source"] == {"data": ["toy"]}
    assert record["examples"] == 12 and record["steps_per_epoch"] == 3
    assert [len(e["losses"]) for e in record["epochs"]] == [3, 3]
    assert [len(e["learning_rates"]) for e in record["epochs"]] == [3, 3]
    assert record["seconds"] == pytest.approx(sum(e["seconds"] for e in record["epochs"]))
    from qless.data import examples_digest

    assert record["settings"]["data_sha256"] == examples_digest(data)
    # without save_epochs only the final adapter is kept, in peft's layout: it loads onto the base model
    assert sorted(p.name for p in (tmp_path / "t").iterdir() if not p.name.startswith(".")) == ["adapter", "train.json"]
    from qless.models import load_adapter, load_model

    base, _, _ = load_model(ModelConfig(model=str(tiny_model_dir)))
    load_adapter(base, tmp_path / "t" / "adapter")
    # finished: returned again without loading a model
    import qless.training as training

    real, training.load_model = training.load_model, None
    try:
        assert train(data, tmp_path / "t", _cfg(), ModelConfig(model=str(tiny_model_dir)), ADAPTER, progress=False) == record
    finally:
        training.load_model = real


def test_interrupted_training_resumes_exactly(tmp_path, tiny_model_dir, monkeypatch):
    data = _data(tmp_path)
    model = ModelConfig(model=str(tiny_model_dir))
    whole = train(data, tmp_path / "whole", _cfg(), model, ADAPTER, progress=False)

    import qless.training as training

    real = training._micro_batches
    calls = {"n": 0}

    def stop_in_epoch_2(items, size):
        calls["n"] += 1
        if calls["n"] == 5:  # 3 steps per epoch: the second step of epoch 2
            raise KeyboardInterrupt
        return real(items, size)

    monkeypatch.setattr(training, "_micro_batches", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(data, tmp_path / "cut", _cfg(), model, ADAPTER, progress=False)
    monkeypatch.setattr(training, "_micro_batches", real)
    cut = read_train(tmp_path / "cut")
    assert len(cut["epochs"]) == 1 and not cut["finished"] and (tmp_path / "cut" / "checkpoint-1").is_dir()
    resumed = train(data, tmp_path / "cut", _cfg(), model, ADAPTER, progress=False)
    assert _bytes(tmp_path / "cut" / "adapter" / "adapter_model.safetensors") == _bytes(
        tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    assert [e["losses"] for e in resumed["epochs"]] == [e["losses"] for e in whole["epochs"]]


def test_other_data_or_settings_in_the_same_folder_refused(tmp_path, tiny_model_dir):
    model = ModelConfig(model=str(tiny_model_dir))
    train(_data(tmp_path), tmp_path / "t", _cfg(epochs=1), model, ADAPTER, progress=False)
    with pytest.raises(ConfigError, match="data_sha256"):
        train(_data(tmp_path, seed=5), tmp_path / "t", _cfg(epochs=1), model, ADAPTER, progress=False)
    with pytest.raises(ConfigError, match=r"train\.learning_rate: 0\.001 vs 0\.002"):
        train(_data(tmp_path), tmp_path / "t", _cfg(epochs=1, learning_rate=2e-3), model, ADAPTER, progress=False)


def test_second_writer_is_refused(tmp_path, tiny_model_dir):
    from qless.files import hold_lock

    (tmp_path / "t").mkdir()
    held = hold_lock(tmp_path / "t" / ".train.lock", "another training")
    try:
        with pytest.raises(BusyError):
            train(_data(tmp_path), tmp_path / "t", _cfg(epochs=1), ModelConfig(model=str(tiny_model_dir)), ADAPTER,
                  progress=False)
    finally:
        held.release()


def test_selection_folders_as_data(tmp_path):
    from qless.stages import selected_examples

    one = tmp_path / "sel"
    one.mkdir()
    (one / "selection.json").write_text("{}")
    with pytest.raises(DataError, match="no selected.jsonl"):
        selected_examples(one)
    write_jsonl(one / "selected.jsonl", toy_pool(3))
    assert selected_examples(one) == one / "selected.jsonl"
    several = tmp_path / "tasks"
    for task in ("bbh", "mmlu"):
        (several / task).mkdir(parents=True)
        (several / task / "selection.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"one selection per task \(bbh, mmlu\)"):
        run_train([several], tmp_path / "t")
    assert selected_examples(tmp_path / "data.jsonl") == tmp_path / "data.jsonl"


def test_config_validation():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match=r"train\.warmup_ratio"):
        TrainConfig(warmup_ratio=1.0)
    from qless.training import train_preset

    cpu = train_preset("cpu")
    assert (cpu.epochs, cpu.learning_rate, cpu.batch_size) == (2, 2e-4, 8) and not cpu.save_epochs
    assert train_preset("paper") == TrainConfig()


def test_cli_train_round_trip_and_bad_input(tmp_path, tiny_model_dir, capsys):
    from conftest import write_jsonl as write

    sel = tmp_path / "sel"
    sel.mkdir()
    (sel / "selection.json").write_text("{}")
    write(sel / "selected.jsonl", toy_pool(6))
    args = ["train", "--data", str(sel), "--model", str(tiny_model_dir), "--preset", "cpu", "--r", "2", "--epochs", "1",
            "--batch-size", "4"]
    assert main([*args, "--out", str(tmp_path / "t")]) == 0
    assert "6 examples, 1 epochs" in capsys.readouterr().out
    record = read_train(tmp_path / "t")
    assert record["source"] == {"data": [str(sel / "selected.jsonl")]} and record["settings"]["train"]["learning_rate"] == 2e-4
    for bad, needle in (([*args[:2], str(tmp_path / "missing.jsonl"), *args[3:]], "no such file"),
                        ([*args, "--epochs", "0"], "train.epochs must be a positive integer"),
                        ([*args, "--learning-rate", "1e-3"], "other settings")):
        code = main([*bad, "--out", str(tmp_path / "t")])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and needle in " ".join(err.split()), err
