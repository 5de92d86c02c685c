"""The whole pipeline on a tiny model: every stage's output, resume, config errors, the CLI."""

from __future__ import annotations

import json

import pytest
from conftest import toy_pool, write_jsonl

from qless.cli import main
from qless.errors import ConfigError
from qless.pipeline import build_run_config, load_run_config, run


def _config(tmp_path, tiny_model_dir, **extra):
    write_jsonl(tmp_path / "pool.jsonl", toy_pool(30))
    write_jsonl(tmp_path / "mmlu.jsonl", [
        {"dataset": "mmlu", "id": f"m{i}", "subtask": f"s{i % 2}", "prompt": f"question {i} what is", "completion": " yes"}
        for i in range(4)])
    write_jsonl(tmp_path / "qa.jsonl", [{"dataset": "qa", "id": "q0", "prompt": "hello world", "completion": " four"}])
    return {
        "run_dir": str(tmp_path / "run"),
        "pool": [str(tmp_path / "pool.jsonl")],
        "targets": [str(tmp_path / "mmlu.jsonl"), str(tmp_path / "qa.jsonl")],
        "model": {"model": str(tiny_model_dir)},
        "adapter": {"r": 4, "alpha": 16},
        "warmup": {"percent": 40, "epochs": 2, "batch_size": 4, "learning_rate": 1e-3},
        "projection": {"dim": 128},
        "extract": {"formats": ["fp32", "absmean4", "sign1"], "chunk_size": 16},
        "select": {"percent": 10},
        **extra,
    }


def test_run_writes_every_stage_and_resumes(tmp_path, tiny_model_dir):
    cfg = build_run_config(_config(tmp_path, tiny_model_dir), preset="cpu")
    summary = run(cfg, progress=False)
    run_dir = tmp_path / "run"
    for tag in ("fp32", "absmean4", "sign1"):
        for s in ("pool", "mmlu", "qa"):
            for c in ("checkpoint-1", "checkpoint-2"):
                assert (run_dir / "grads" / tag / s / c / "manifest.json").is_file()
        assert (run_dir / "scores" / tag / "task_scores.npy").is_file()
    for task in ("mmlu", "qa"):
        sel = [json.loads(line) for line in open(run_dir / "selected" / task / "selected.jsonl")]
        assert len(sel) == 3 and all("messages" in r for r in sel)
    assert (run_dir / "selected" / "random" / "ranking.jsonl").is_file()
    for png in ("composition_source.png", "bits.png", "scores_mmlu.png", "scores_qa.png"):
        assert (run_dir / "report" / png).stat().st_size > 1000
    assert summary["n_pool"] == 30 and set(summary["selected"]) == {"mmlu", "qa"}
    rows = (30 + 5) * 2  # pool + targets, two checkpoints; k = 128: row bytes + 4-byte scale
    assert summary["store_bytes"] == {"fp32": rows * (512 + 4), "absmean4": rows * (64 + 4), "sign1": rows * (16 + 4)}
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert report["formats"]["reference"] == "fp32"
    assert report["formats"]["formats"]["fp32"]["tasks"]["mmlu"]["spearman"] == pytest.approx(1.0)
    # a second run finds everything done and gives the same summary
    again = run(cfg, progress=False)
    assert again["selected"] == summary["selected"]
    with pytest.raises(ConfigError, match="another configuration"):
        run(build_run_config({**_config(tmp_path, tiny_model_dir), "select": {"percent": 20}}, preset="cpu"), progress=False)


def test_run_config_errors(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(ConfigError, match="pool"):
        build_run_config({"targets": ["t.jsonl"]})
    with pytest.raises(ConfigError, match="unknown field"):
        build_run_config({**_config(tmp_path, tiny_model_dir), "warmup": {"epoch": 2}})
    with pytest.raises(ConfigError, match="select_format"):
        build_run_config({**_config(tmp_path, tiny_model_dir), "select_format": "absmax8"})
    (tmp_path / "bad.json").write_text('{"pool": [')
    with pytest.raises(ConfigError, match="line 1"):
        load_run_config(tmp_path / "bad.json")
    assert main(["run", str(tmp_path / "bad.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_cli_run(tmp_path, tiny_model_dir, capsys):
    cfg = _config(tmp_path, tiny_model_dir, preset="cpu")
    cfg["extract"]["formats"] = ["absmean4"]
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    assert main(["run", str(tmp_path / "run.json")]) == 0
    out = capsys.readouterr().out
    assert "selected per source" in out and "report:" in out
