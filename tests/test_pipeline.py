"""The whole pipeline on a tiny model: every stage's output, reuse of finished stages, config
files and overrides, refusals naming the field, the CLI."""

from __future__ import annotations

import json
import os

import pytest

from conftest import toy_pool, write_jsonl
from qless.cli import main
from qless.errors import ConfigError, UnsafeNameError
from qless.pipeline import build_run_config, load_run_config, run


def _files(tmp_path):
    write_jsonl(tmp_path / "pool.jsonl", toy_pool(30))
    write_jsonl(tmp_path / "mmlu.jsonl", [
        {"dataset": "mmlu", "id": f"m{i}", "subtask": f"s{i % 2}", "prompt": f"question {i} what is", "completion": " yes"}
        for i in range(4)])
    write_jsonl(tmp_path / "qa.jsonl", [{"dataset": "qa", "id": "q0", "prompt": "hello world", "completion": " four"}])
    write_jsonl(tmp_path / "bbh.jsonl", [{"dataset": "bbh", "id": f"b{i}", "subtask": "logic", "prompt": f"is {i} small",
                                          "completion": " no"} for i in range(2)])


def _config(tmp_path, tiny_model_dir, **extra):
    _files(tmp_path)
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


def _mtimes(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_run_writes_every_stage(tmp_path, tiny_model_dir):
    summary = run(build_run_config(_config(tmp_path, tiny_model_dir), preset="cpu"), progress=False)
    run_dir = tmp_path / "run"
    for tag in ("fp32", "absmean4", "sign1"):
        for s in ("pool", "mmlu", "qa"):
            for c in ("checkpoint-1", "checkpoint-2"):
                assert (run_dir / "grads" / tag / s / c / "manifest.json").is_file()
        assert (run_dir / "scores" / tag / "task_scores.npy").is_file()
    for task in ("mmlu", "qa"):
        sel = [json.loads(line) for line in open(run_dir / "selected" / task / "selected.jsonl")]
        assert len(sel) == 3 and all("messages" in r for r in sel)
    random = [json.loads(line) for line in open(run_dir / "selected" / "random" / "ranking.jsonl")]
    assert len(random) == 3 and all(r["score"] is None for r in random), "the random baseline is ranked by no task"
    for png in ("composition_source.png", "bits.png", "scores_mmlu.png", "scores_qa.png"):
        assert (run_dir / "report" / png).stat().st_size > 1000
    assert summary["n_pool"] == 30 and set(summary["selected"]) == {"mmlu", "qa"} and summary["percent"] == 10
    rows = (30 + 5) * 2  # pool + targets, two checkpoints; k = 128: row bytes + 4-byte scale
    assert summary["store_bytes"] == {"fp32": rows * (512 + 4), "absmean4": rows * (64 + 4), "sign1": rows * (16 + 4)}
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert report["formats"]["reference"] == "fp32" and set(report["formats"]["formats"]) == {"fp32", "absmean4", "sign1"}


def test_run_reuses_finished_stages_when_targets_percent_or_formats_change(tmp_path, tiny_model_dir, monkeypatch):
    base = _config(tmp_path, tiny_model_dir)
    run(build_run_config(base, preset="cpu"), progress=False)
    run_dir = tmp_path / "run"
    warm, pool = _mtimes(run_dir / "warmup"), _mtimes(run_dir / "grads" / "fp32" / "pool")

    import qless.training as training

    def no_training(*a, **kw):
        raise AssertionError("the finished warmup was trained again")

    monkeypatch.setattr(training, "load_model", no_training)
    # another percentage: only the selections change
    again = run(build_run_config({**base, "select": {"percent": 20}}, preset="cpu"), progress=False)
    assert json.loads((run_dir / "selected" / "summary.json").read_text())["tasks"] == {"mmlu": 6, "qa": 6}
    assert again["percent"] == 20
    # a new target: extracted; the pool stores are kept; the scores now cover it
    run(build_run_config({**base, "targets": [*base["targets"], str(tmp_path / "bbh.jsonl")]}, preset="cpu"), progress=False)
    assert (run_dir / "grads" / "sign1" / "bbh" / "checkpoint-2" / "manifest.json").is_file()
    assert json.loads((run_dir / "scores" / "sign1" / "manifest.json").read_text())["tasks"] == ["mmlu", "qa", "bbh"]
    assert (run_dir / "selected" / "bbh" / "ranking.jsonl").is_file()
    # another format: only its stores are written
    formats = {**base["extract"], "formats": ["fp32", "absmean4", "sign1", "absmax8"]}
    run(build_run_config({**base, "extract": formats}, preset="cpu"), progress=False)
    assert (run_dir / "scores" / "absmax8" / "task_scores.npy").is_file()
    assert _mtimes(run_dir / "warmup") == warm and _mtimes(run_dir / "grads" / "fp32" / "pool") == pool


def test_changed_warmup_settings_are_refused_by_name(tmp_path, tiny_model_dir):
    base = _config(tmp_path, tiny_model_dir, extract={"formats": ["sign1"], "chunk_size": 16}, select_format="sign1")
    run(build_run_config(base, preset="cpu"), progress=False)
    with pytest.raises(ConfigError, match=r"warmup\.learning_rate: 0\.001 vs 0\.002"):
        run(build_run_config({**base, "warmup": {**base["warmup"], "learning_rate": 2e-3}}, preset="cpu"), progress=False)
    write_jsonl(tmp_path / "pool.jsonl", toy_pool(30, seed=1))  # same size, other examples
    with pytest.raises(ConfigError, match="pool_sha256"):
        run(build_run_config(base, preset="cpu"), progress=False)


def test_a_failed_run_can_be_corrected_and_rerun(tmp_path, tiny_model_dir, capsys):
    cfg = _config(tmp_path, tiny_model_dir, extract={"formats": ["sign1"], "chunk_size": 16}, select_format="sign1")
    broken = {**cfg, "targets": [str(tmp_path / "missing.jsonl")]}
    (tmp_path / "run.json").write_text(json.dumps({**broken, "preset": "cpu"}))
    assert main(["run", str(tmp_path / "run.json")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    (tmp_path / "run.json").write_text(json.dumps({**cfg, "preset": "cpu"}))
    assert main(["run", str(tmp_path / "run.json")]) == 0


def test_unsafe_target_task_names_are_refused(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, extract={"formats": ["sign1"], "chunk_size": 16}, select_format="sign1")
    write_jsonl(tmp_path / "qa.jsonl", [{"dataset": "../../escaped", "id": "q0", "prompt": "hi", "completion": " four"}])
    with pytest.raises(UnsafeNameError, match="escaped"):
        run(build_run_config(cfg, preset="cpu"), progress=False)
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()
    assert not (tmp_path / "run" / "selected").exists()


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
    for bad, needle in (({"preset": {"name": "cpu"}}, "unknown preset"), ({"preset": ["cpu"]}, "unknown preset"),
                        ({"run_dir": str(tmp_path / "a-file")}, "is a file"),
                        ({"warmup": {"learning_rate": "nan"}}, "finite number"),
                        ({"select": {"method": "best"}}, "'best' is not one of")):
        (tmp_path / "a-file").write_text("")
        (tmp_path / "run.json").write_text(json.dumps({**_config(tmp_path, tiny_model_dir), **bad}))
        assert main(["run", str(tmp_path / "run.json")]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err


def test_yaml_config_overrides_and_dry_run(tmp_path, tiny_model_dir, capsys):
    import yaml

    cfg = _config(tmp_path, tiny_model_dir)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**cfg, "preset": "cpu", "warmup": {"learning-rate": 3e-4}}))
    assert main(["run", "--dry-run", str(tmp_path / "run.yaml"), "warmup.epochs=3", "select.percent=1",
                 f"targets=[{tmp_path / 'qa.jsonl'}]"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["warmup"]["epochs"] == 3 and resolved["warmup"]["learning_rate"] == 3e-4
    assert resolved["select"]["percent"] == 1 and resolved["targets"] == [str(tmp_path / "qa.jsonl")]
    assert resolved["data"]["max_length"] == 256, "the cpu preset lies under the file"
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"
    assert main(["run", "--dry-run", str(tmp_path / "run.yaml"), "warmup.epochs"]) == 2
    assert "SECTION.FIELD=VALUE" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("pool: [a\nwarmup: {")
    assert main(["run", str(tmp_path / "bad.yaml")]) == 2
    assert "not valid YAML (line" in capsys.readouterr().err


def test_cli_run_and_report(tmp_path, tiny_model_dir, capsys):
    cfg = _config(tmp_path, tiny_model_dir, preset="cpu")
    cfg["extract"]["formats"] = ["absmean4"]
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    assert main(["run", str(tmp_path / "run.json")]) == 0
    out = capsys.readouterr().out
    assert "selected per source (top 10%)" in out and "report:" in out
    report = tmp_path / "run" / "report"
    before = (report / "report.md").read_text()
    for p in report.iterdir():
        os.remove(p)
    assert main(["report", str(tmp_path / "run")]) == 0
    assert (report / "report.md").read_text() == before
    assert main(["report", str(tmp_path)]) == 2


def test_run_with_lorif_fits_the_curvature_scores_and_reuses_it(tmp_path, tiny_model_dir, monkeypatch):
    """`qless run` with LoRIF factor stores: the curvature is fitted per format into RUN/curvature, the
    scores equal `--method lorif` on the same stores and curvature, and a second run reuses it."""
    from qless.lorif import curvature as curv_mod
    from qless.scoring import read_scores
    from qless.stages import run_score

    cfg = _config(tmp_path, tiny_model_dir, projection={"kind": "lorif", "dim": 8, "rank": 2},
                  extract={"formats": ["fp32", "absmax8"], "chunk_size": 16, "pool_gradient": "sgd"},
                  score={"method": "lorif", "curvature": "fit"}, curvature={"rank": 6}, select_format="fp32")
    run(build_run_config(cfg, preset="cpu"), progress=False)
    run_dir = tmp_path / "run"
    for tag in ("fp32", "absmax8"):
        meta = json.loads((run_dir / "curvature" / tag / "checkpoint-1" / "curvature.json").read_text())
        assert meta["rank"] == 6 and meta["fitted_on"]["set"] == "pool"
        manifest, values, _ = read_scores(run_dir / "scores" / tag)
        assert manifest["config"]["method"] == "lorif" and manifest["config"]["curvature"] == str(run_dir / "curvature" / tag)
        # the same scores through the scoring stage on its own
        again = run_score([run_dir / "grads" / tag / "pool"], [run_dir / "grads" / tag / t for t in ("mmlu", "qa")],
                          tmp_path / f"again-{tag}", replace_cfg(manifest["config"]), progress=False)
        assert (read_scores(again["path"])[1] == values).all()
    assert len(list((run_dir / "selected" / "mmlu").glob("selected.jsonl"))) == 1

    fits: list[int] = []
    real = curv_mod.fit_curvature
    monkeypatch.setattr(curv_mod, "fit_curvature", lambda *a, **k: fits.append(1) or real(*a, **k))
    before = _mtimes(run_dir / "curvature")
    run(build_run_config(cfg, preset="cpu"), progress=False)
    assert fits == [] and _mtimes(run_dir / "curvature") == before
    # another curvature rank fits again, and the scores follow it
    old_scores = read_scores(run_dir / "scores" / "fp32")[1].copy()
    run(build_run_config({**cfg, "curvature": {"rank": 2}}, preset="cpu"), progress=False)
    assert len(fits) == 4  # two formats x two checkpoints
    assert json.loads((run_dir / "curvature" / "fp32" / "checkpoint-1" / "curvature.json").read_text())["rank"] == 2
    assert not (read_scores(run_dir / "scores" / "fp32")[1] == old_scores).all()


def replace_cfg(config):
    from qless.config import from_dict
    from qless.scoring import ScoreConfig

    return from_dict(ScoreConfig, config, "scores manifest")


def test_lorif_run_settings_are_checked_together(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="score.method lorif"):
        build_run_config(_config(tmp_path, tiny_model_dir, projection={"kind": "lorif", "dim": 8},
                                 extract={"formats": ["fp32"], "pool_gradient": "sgd"}), preset="cpu")
    with pytest.raises(ConfigError, match="set both or neither"):
        build_run_config(_config(tmp_path, tiny_model_dir, score={"method": "lorif"}), preset="cpu")
    with pytest.raises(ConfigError, match="fit .*or none"):
        build_run_config(_config(tmp_path, tiny_model_dir, projection={"kind": "lorif", "dim": 8},
                                 extract={"formats": ["fp32"], "pool_gradient": "sgd"}, select_format="fp32",
                                 score={"method": "lorif", "curvature": str(tmp_path)}), preset="cpu")
