"""The command line: core subcommands end to end, and user errors as exit code 2."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import write_store
from qless.cli import main


def _setup(tmp_path, tag="absmean4"):
    g = torch.Generator().manual_seed(0)
    trows = [{"source": "mmlu", "id": str(i), "subtask": f"s{i % 3}"} for i in range(9)]
    trows += [{"source": "bbh", "id": str(i), "subtask": f"b{i % 2}"} for i in range(4)]
    prows = [{"source": "flan" if i % 2 else "chat", "id": str(i)} for i in range(40)]
    for c, lr in (("epoch-1", 2e-5), ("epoch-2", 1e-5)):
        write_store(tmp_path / "pool" / c, torch.randn(40, 64, generator=g), tag, checkpoint=c, lr=lr, rows=prows)
        write_store(tmp_path / "target" / c, torch.randn(13, 64, generator=g), tag, checkpoint=c, lr=lr, rows=trows)
    with open(tmp_path / "pool.jsonl", "w") as f:
        for r in prows:
            f.write(json.dumps({"dataset": r["source"], "id": r["id"],
                                "messages": [{"role": "user", "content": "q" + r["id"]},
                                             {"role": "assistant", "content": "a" + r["id"]}]}) + "\n")


def test_score_select_inspect(tmp_path, capsys):
    _setup(tmp_path)
    assert main(["score", "--pool", str(tmp_path / "pool"), "--target", str(tmp_path / "target"),
                 "--out", str(tmp_path / "scores"), "--block-rows", "7"]) == 0
    assert main(["select", "--scores", str(tmp_path / "scores"), "--pool-data", str(tmp_path / "pool.jsonl"),
                 "--percent", "10", "--out", str(tmp_path / "sel")]) == 0
    for task in ("mmlu", "bbh"):
        sel = [json.loads(line) for line in open(tmp_path / "sel" / task / "selected.jsonl")]
        assert len(sel) == 4 and "messages" in sel[0]
    assert main(["select", "--scores", str(tmp_path / "scores"), "--task", "bbh", "--method", "random", "--seed", "3",
                 "--top-n", "5", "--out", str(tmp_path / "rand")]) == 0
    assert len(open(tmp_path / "rand" / "ranking.jsonl").readlines()) == 5
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "pool" / "epoch-1")]) == 0
    out = capsys.readouterr().out
    assert "absmean4" in out and "(4 bits per coordinate)" in out and "32 codes + 4 scale = 36" in out
    assert main(["inspect", "--json", str(tmp_path / "pool")]) == 0
    summaries = [json.loads(chunk) for chunk in capsys.readouterr().out.replace("}\n{", "}\x00{").split("\x00")]
    assert [s["checkpoint"]["name"] for s in summaries] == ["epoch-1", "epoch-2"]


def _expect_exit2(args, capsys, *needles):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    flat = " ".join(err.split())  # the message is wrapped at 100 columns
    for n in needles:
        assert n in flat, err
    return err


def test_user_errors_exit_2(tmp_path, capsys):
    _setup(tmp_path)
    _expect_exit2(["inspect", str(tmp_path / "nope")], capsys, "no such datastore")
    (tmp_path / "pool" / "epoch-1" / "manifest.json").write_text("{oops")
    _expect_exit2(["inspect", str(tmp_path / "pool" / "epoch-1")], capsys, "manifest.json", "not valid JSON")
    _expect_exit2(["score", "--pool", str(tmp_path / "pool"), "--target", str(tmp_path / "target"),
                   "--out", str(tmp_path / "s")], capsys, "manifest.json")
    assert not (tmp_path / "s").exists()


def test_mismatched_bits_exit_2(tmp_path, capsys):
    _setup(tmp_path)
    write_store(tmp_path / "pool2" / "epoch-1", torch.randn(5, 64), "absmean2", checkpoint="epoch-1", lr=2e-5)
    _expect_exit2(["score", "--pool", str(tmp_path / "pool" / "epoch-1"), str(tmp_path / "pool2" / "epoch-1"),
                   "--target", str(tmp_path / "target" / "epoch-1"), "--out", str(tmp_path / "s")],
                  capsys, "quantizer.bits", "4 vs 2")


def test_bad_flag_values_exit_2(tmp_path, capsys):
    _setup(tmp_path)
    main(["score", "--pool", str(tmp_path / "pool"), "--target", str(tmp_path / "target"), "--out", str(tmp_path / "scores")])
    capsys.readouterr()
    _expect_exit2(["select", "--scores", str(tmp_path / "scores"), "--percent", "0", "--out", str(tmp_path / "x")],
                  capsys, "percent")
    _expect_exit2(["select", "--scores", str(tmp_path / "scores"), "--percent", "many", "--out", str(tmp_path / "x")],
                  capsys, "--percent", "expected a number")
    _expect_exit2(["select", "--scores", str(tmp_path / "scores"), "--task", "tydiqa", "--out", str(tmp_path / "x")],
                  capsys, "tydiqa")
    with pytest.raises(SystemExit) as e:  # argparse's own errors exit 2 as well
        main(["score", "--pool"])
    assert e.value.code == 2


def test_truncated_and_empty_stores_exit_2(tmp_path, capsys):
    import os

    import numpy as np

    from qless.store import ShardWriter, finalize

    _setup(tmp_path)
    codes = tmp_path / "pool" / "epoch-1" / "shards" / "00000" / "codes.bin"
    os.truncate(codes, codes.stat().st_size - 3)
    _expect_exit2(["inspect", str(tmp_path / "pool" / "epoch-1")], capsys, "codes.bin", "truncated")
    manifest = json.loads((tmp_path / "target" / "epoch-1" / "manifest.json").read_text())
    for key in ("rows", "shards", "complete"):
        manifest.pop(key)
    w = ShardWriter(tmp_path / "empty", manifest)
    w.append(np.zeros((0, 32), np.uint8), np.zeros(0, np.float32), [], consumed=2,
             skipped=[{"source": "p", "id": "1", "reason": "no response token"}])
    w.finish()
    finalize(tmp_path / "empty")
    _expect_exit2(["score", "--pool", str(tmp_path / "empty"), "--target", str(tmp_path / "target" / "epoch-1"),
                   "--out", str(tmp_path / "s")], capsys, "holds no rows")


def test_unknown_quantizer_exit_2(tmp_path, capsys):
    (tmp_path / "run.json").write_text(json.dumps({"pool": ["p.jsonl"], "targets": ["t.jsonl"],
                                                   "extract": {"formats": ["absmean3"]}}))
    _expect_exit2(["run", str(tmp_path / "run.json")], capsys, "absmean: 3 bits is not supported", "8, 4 or 2")
    (tmp_path / "run.json").write_text(json.dumps({"pool": ["p.jsonl"], "targets": ["t.jsonl"],
                                                   "extract": {"formats": ["lloyd4"]}}))
    _expect_exit2(["run", str(tmp_path / "run.json")], capsys, "unknown method 'lloyd'")


# ---------------------------------------------------------------------------------------------
# Every stage on a tiny model through the CLI: hostile input, refusals, the environment failing


@pytest.fixture(scope="module")
def warmed(tmp_path_factory, tiny_model_dir):
    """A finished one-epoch CLI warmup of a tiny Llama on a toy pool, with a target file."""
    from conftest import toy_pool, write_jsonl

    root = tmp_path_factory.mktemp("cli-stages")
    write_jsonl(root / "pool.jsonl", toy_pool(12))
    write_jsonl(root / "t.jsonl", [{"dataset": "qa", "id": f"t{i}", "subtask": f"s{i % 2}", "prompt": f"what is {i}",
                                    "completion": " four"} for i in range(4)])
    assert main(["warmup", "--pool", str(root / "pool.jsonl"), "--out", str(root / "w"), "--model", str(tiny_model_dir),
                 "--preset", "cpu", "--r", "2", "--epochs", "1", "--percent", "50", "--batch-size", "4"]) == 0
    return root


def _extract_args(root, out, name="pool", kind="pool", data="pool.jsonl", *extra):
    return ["extract", "--warmup", str(root / "w"), "--data", str(root / data), "--name", name, "--kind", kind,
            "--out", str(out), "--formats", "fp32", "sign1", "--projection-dim", "64", "--preset", "cpu", *extra]


def test_stage_outputs_in_a_read_only_folder_exit_2(warmed, tmp_path, read_only_dir, capsys):
    _setup(tmp_path)
    main(["score", "--pool", str(tmp_path / "pool"), "--target", str(tmp_path / "target"), "--out", str(tmp_path / "s")])
    for args in (["warmup", "--pool", str(warmed / "pool.jsonl"), "--out", str(read_only_dir / "w"), "--preset", "cpu",
                  "--model", "unused-model-is-never-loaded"],
                 _extract_args(warmed, read_only_dir / "g"),
                 ["score", "--pool", str(tmp_path / "pool"), "--target", str(tmp_path / "target"),
                  "--out", str(read_only_dir / "s")],
                 ["select", "--scores", str(tmp_path / "s"), "--out", str(read_only_dir / "sel")]):
        _expect_exit2(args, capsys, str(read_only_dir))
    assert list(read_only_dir.iterdir()) == []


def test_full_disk_exit_2_and_leaves_work_resumable(warmed, tmp_path, small_disk, capsys):
    from qless.store import Datastore

    # extraction: 8 KiB rows (fp32, k = 2048) overflow 64 KiB within the pool
    args = _extract_args(warmed, small_disk / "g")
    args[args.index("--projection-dim") + 1] = "2048"
    err = _expect_exit2(args, capsys, "disk is full")
    assert "Traceback" not in err
    store = small_disk / "g" / "fp32" / "pool" / "checkpoint-1"
    partial = Datastore.open(store, allow_incomplete=True, allow_empty=True)  # committed rows are intact
    assert partial.n_rows < 12
    # scoring: 2,000 pool rows x 20 subtasks of float32 do not fit either; nothing half-written is left
    g = torch.Generator().manual_seed(0)
    trows = [{"source": "t", "id": str(i), "subtask": f"s{i}"} for i in range(20)]
    write_store(tmp_path / "p" / "c", torch.randn(2000, 64, generator=g), "sign1", checkpoint="c")
    write_store(tmp_path / "t" / "c", torch.randn(20, 64, generator=g), "sign1", checkpoint="c", rows=trows)
    _expect_exit2(["score", "--pool", str(tmp_path / "p"), "--target", str(tmp_path / "t"), "--out",
                   str(small_disk / "s")], capsys, "disk is full")
    assert not (small_disk / "s").exists() and not [p for p in small_disk.iterdir() if p.name.startswith(".s.")]


def test_extract_never_trusts_remote_code_from_a_warmup_folder(warmed, tmp_path, monkeypatch, capsys):
    """A warmup folder from elsewhere must not be able to make extraction run code."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(json.loads((warmed / "w" / "warmup.json").read_text())["settings"]["model"]["model"], model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "planted.PlantedLlama"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "planted.py").write_text("import os\nfrom transformers import LlamaForCausalLM\n"
                                      "open(os.environ['QLESS_TEST_MARKER'], 'w').write('ran')\n"
                                      "class PlantedLlama(LlamaForCausalLM):\n    pass\n")
    marker = tmp_path / "marker"
    monkeypatch.setenv("QLESS_TEST_MARKER", str(marker))
    shutil.copytree(warmed / "w", tmp_path / "w")
    info = json.loads((tmp_path / "w" / "warmup.json").read_text())
    info["settings"]["model"].update(model=str(model), trust_remote_code=True)
    (tmp_path / "w" / "warmup.json").write_text(json.dumps(info))
    args = _extract_args(warmed, tmp_path / "g")
    args[args.index("--warmup") + 1] = str(tmp_path / "w")
    assert main(args) == 0
    assert not marker.exists(), "code from the model folder ran without the user's --trust-remote-code"
    args[args.index("--out") + 1] = str(tmp_path / "g2")
    assert main([*args, "--trust-remote-code"]) == 0
    assert marker.exists(), "the user's own flag does enable it (so the check above can fail)"


def test_absolute_checkpoint_name_in_warmup_json_refused(warmed, tmp_path, capsys):
    import shutil

    shutil.copytree(warmed / "w", tmp_path / "w")
    info = json.loads((tmp_path / "w" / "warmup.json").read_text())
    info["checkpoints"][0]["name"] = str(tmp_path / "elsewhere")
    (tmp_path / "w" / "warmup.json").write_text(json.dumps(info))
    args = _extract_args(warmed, tmp_path / "g")
    args[args.index("--warmup") + 1] = str(tmp_path / "w")
    _expect_exit2(args, capsys, "warmup.json", "cannot be used as a file or folder name")
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "g").exists()


def test_unknown_checkpoint_is_named(warmed, tmp_path, capsys):
    _expect_exit2(_extract_args(warmed, tmp_path / "g", "pool", "pool", "pool.jsonl", "--checkpoints", "checkpoint-9"),
                  capsys, "checkpoint-9", "checkpoint-1")


def test_damaged_artefacts_exit_2(warmed, tmp_path, capsys):
    import shutil

    # warmup.json that is not JSON
    shutil.copytree(warmed / "w", tmp_path / "w")
    (tmp_path / "w" / "warmup.json").write_text('{"format": "qless-warmup", ')
    args = _extract_args(warmed, tmp_path / "g")
    args[args.index("--warmup") + 1] = str(tmp_path / "w")
    _expect_exit2(args, capsys, "warmup.json", "not valid JSON")
    _setup(tmp_path)
    store = tmp_path / "pool" / "epoch-1"
    manifest = json.loads((store / "manifest.json").read_text())
    # a manifest field of the wrong type
    bad = {**manifest, "checkpoint": {"name": "epoch-1", "learning_rate": "fast"}}
    (store / "manifest.json").write_text(json.dumps(bad))
    _expect_exit2(["inspect", str(store)], capsys, "checkpoint.learning_rate", "finite number")
    bad = {**manifest, "projection": {**manifest["projection"], "dim": "64"}}
    (store / "manifest.json").write_text(json.dumps(bad))
    _expect_exit2(["inspect", str(store)], capsys, "projection.dim", "positive integer")
    (store / "manifest.json").write_text(json.dumps(manifest))
    # a garbled row table
    rows = store / "shards" / "00000" / "rows.jsonl"
    good_rows = rows.read_bytes()
    rows.write_bytes(good_rows.replace(b'"source"', b'"sourcX"', 1))  # same length: the byte counts still agree
    _expect_exit2(["score", "--pool", str(tmp_path / "pool"), "--target", str(tmp_path / "target"), "--out",
                   str(tmp_path / "s")], capsys, "rows.jsonl:1", "corrupt")
    rows.write_bytes(good_rows)
    # a corrupt shard state
    state = store / "shards" / "00000" / "state.json"
    good_state = state.read_text()
    state.write_text(good_state.replace('"rows": 40', '"rows": "forty"'))
    _expect_exit2(["inspect", str(store)], capsys, "state.json", "rows")
    state.write_text("[1, 2]")
    _expect_exit2(["inspect", str(store)], capsys, "state.json")
    state.write_text(good_state)
    # a scores folder missing a file
    assert main(["score", "--pool", str(tmp_path / "pool"), "--target", str(tmp_path / "target"),
                 "--out", str(tmp_path / "s")]) == 0
    (tmp_path / "s" / "pool_rows.jsonl").unlink()
    _expect_exit2(["select", "--scores", str(tmp_path / "s"), "--out", str(tmp_path / "sel")], capsys,
                  "pool_rows.jsonl", "missing")
    assert not (tmp_path / "sel").exists()


def test_help_texts_render(capsys):
    for command in ("extract", "warmup", "run", "score", "select", "report"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "option_strings" not in out and "%%" not in out, out
    with pytest.raises(SystemExit):
        main(["warmup", "--help"])
    assert "random p% of the pool" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    assert "0.3% relative error" in " ".join(capsys.readouterr().out.split())


def test_inspect_prints_the_model_readably(warmed, tmp_path, capsys):
    assert main(_extract_args(warmed, tmp_path / "g")) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "g" / "sign1" / "pool" / "checkpoint-1")]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("model")][0]
    assert "{" not in line and "LlamaForCausalLM" in line and "float32" in line, line


def test_flags_with_underscores_and_fraction_warning(tmp_path, capsys, caplog):
    _setup(tmp_path)
    assert main(["score", "--pool", str(tmp_path / "pool"), "--target", str(tmp_path / "target"),
                 "--out", str(tmp_path / "s"), "--block_rows", "7"]) == 0
    assert main(["select", "--scores", str(tmp_path / "s"), "--out", str(tmp_path / "sel"), "--percent", "0.05"]) == 0
    assert "LESS's --percentage is a fraction" in caplog.text and "--percent 5" in caplog.text


def _bar_and_log_output(tmp_path, capsys, monkeypatch, *flags):
    import logging

    import qless.scoring.driver as driver

    real = driver.block_scorer
    calls = {"n": 0}

    def scorer_that_logs_mid_bar(*a, **kw):
        scorer = real(*a, **kw)

        def scores(codes):
            calls["n"] += 1
            if calls["n"] == 3:
                logging.getLogger("qless.scoring").warning("a message in the middle of the bar")
            return scorer(codes)
        return scores

    monkeypatch.setattr(driver, "block_scorer", scorer_that_logs_mid_bar)
    out = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
    assert main([*flags, "score", "--pool", str(tmp_path / "pool"), "--target", str(tmp_path / "target"),
                 "--out", str(out), "--block-rows", "5"]) == 0
    return capsys.readouterr().err


def test_progress_bars_can_be_silenced_and_logs_start_their_own_line(tmp_path, capsys, monkeypatch):
    _setup(tmp_path)
    err = _bar_and_log_output(tmp_path, capsys, monkeypatch)
    assert "scoring" in err and "row/s" in err, "the bar is shown by default"
    line = [seg for seg in err.replace("\r", "\n").split("\n") if "middle of the bar" in seg][0]
    assert line.split(" ")[0].count(":") == 2, f"the log line is glued onto the bar: {line!r}"
    assert "row/s" not in _bar_and_log_output(tmp_path, capsys, monkeypatch, "--quiet")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    err = _bar_and_log_output(tmp_path, capsys, monkeypatch)
    assert "row/s" not in err and "middle of the bar" in err


def test_public_api_gives_the_stage_functions():
    import subprocess
    import sys

    code = ("import inspect, qless.cli, qless.pipeline, qless.stages\n"
            "from qless import warmup, extract, score, select, run, Datastore, ScoreConfig\n"
            "assert all(inspect.isfunction(f) for f in (warmup, extract, score, select, run)), (warmup, score)\n"
            "import qless\nassert set(qless.__all__) >= {'warmup', 'extract', 'score', 'select', 'Datastore'}\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_multi_task_select_is_all_or_nothing(tmp_path, capsys, monkeypatch):
    import qless.stages as stages

    _setup(tmp_path)
    assert main(["score", "--pool", str(tmp_path / "pool"), "--target", str(tmp_path / "target"),
                 "--out", str(tmp_path / "s")]) == 0
    real = stages.write_selection_files
    calls = {"n": 0}

    def killed_at_second_task(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(stages, "write_selection_files", killed_at_second_task)
    assert main(["select", "--scores", str(tmp_path / "s"), "--out", str(tmp_path / "sel")]) == 130
    assert not (tmp_path / "sel").exists() and not list(tmp_path.glob(".sel.*")), "a killed select leaves nothing"
    monkeypatch.setattr(stages, "write_selection_files", real)
    assert main(["select", "--scores", str(tmp_path / "s"), "--out", str(tmp_path / "sel")]) == 0
    assert sorted(p.name for p in (tmp_path / "sel").iterdir()) == ["bbh", "mmlu"]
    # an output that exists in part is refused before anything is written
    (tmp_path / "sel2" / "bbh").mkdir(parents=True)
    _expect_exit2(["select", "--scores", str(tmp_path / "s"), "--out", str(tmp_path / "sel2")], capsys, "already exists")
    assert [p.name for p in (tmp_path / "sel2").iterdir()] == ["bbh"]


def test_random_baseline_ranking_carries_no_task_scores(tmp_path, capsys):
    _setup(tmp_path)
    assert main(["score", "--pool", str(tmp_path / "pool"), "--target", str(tmp_path / "target"),
                 "--out", str(tmp_path / "s")]) == 0
    assert main(["select", "--scores", str(tmp_path / "s"), "--task", "mmlu", "--method", "random",
                 "--out", str(tmp_path / "r")]) == 0
    ranking = [json.loads(line) for line in open(tmp_path / "r" / "ranking.jsonl")]
    assert ranking and all(r["score"] is None for r in ranking)
    assert json.loads((tmp_path / "r" / "selection.json").read_text())["min_selected_score"] is None


def test_unsafe_task_names_never_become_paths(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    for name in ("../../escaped", "/abs/escaped"):
        root = tmp_path / name.replace("/", "_")
        trows = [{"source": name, "id": str(i)} for i in range(3)]
        write_store(root / "pool" / "c", torch.randn(20, 64, generator=g), "sign1", checkpoint="c")
        write_store(root / "target" / "c", torch.randn(3, 64, generator=g), "sign1", checkpoint="c", rows=trows)
        write_store(root / "t2" / "c", torch.randn(3, 64, generator=g), "sign1", checkpoint="c",
                    rows=[{"source": "ok", "id": str(i)} for i in range(3)])
        assert main(["score", "--pool", str(root / "pool"), "--target", str(root / "target"), str(root / "t2"),
                     "--out", str(root / "s")]) == 0
        _expect_exit2(["select", "--scores", str(root / "s"), "--out", str(root / "sel")], capsys, "escaped",
                      "cannot be used as a file or folder name")
        assert not (root / "sel").exists()
    assert not list(tmp_path.parent.glob("escaped")) and not os.path.exists("/abs")


def test_non_finite_flag_values_exit_2(tmp_path, capsys):
    _expect_exit2(["warmup", "--pool", "p.jsonl", "--out", str(tmp_path / "w"), "--learning-rate", "nan"], capsys,
                  "--learning-rate", "finite number")
    _expect_exit2(["warmup", "--pool", "p.jsonl", "--out", str(tmp_path / "w"), "--learning_rate", "inf"], capsys,
                  "finite number")
    assert not (tmp_path / "w").exists()
