"""The command line: core subcommands end to end, and user errors as exit code 2."""

from __future__ import annotations

import json

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
