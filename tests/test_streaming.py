"""Pools read through an offset index (qless.pool_index): the same Examples as the eager loader,
the same errors, changed files re-indexed or refused, and selections and scores unchanged."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import toy_pool, write_jsonl
from qless import pool_index
from qless.data import DataConfig, examples_digest, load_examples
from qless.errors import DataError
from qless.pool_index import PoolExamples, PoolRecords, open_examples
from qless.scoring import SCORES_FORMAT, ScoreConfig, score
from qless.selection import SelectConfig, rank
from qless.stages import load_data, run_select, score_into


def qa(prompt: str, completion: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], **extra}


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


def eager_and_lazy(path: Path, cfg: DataConfig = DataConfig(), **kw) -> tuple[object, object]:
    """Both loaders' Examples, or their error messages."""
    out = []
    for load in (lambda: load_examples(path, cfg=cfg), lambda: list(open_examples(path, cfg=cfg, progress=False, **kw))):
        try:
            out.append(load())
        except DataError as e:
            out.append(str(e))
    return out[0], out[1]


def hash_id(tmp_path: Path, record: dict) -> str:
    return load_examples(write_lines(tmp_path / "one.jsonl", [record]))[0].id


def random_pool(rng: random.Random, content_id: str) -> list:
    """Records with repeated contents, repeated ids, ids that look like ``#n`` suffixes, blank and bad lines."""
    lines: list = []
    for _ in range(rng.randint(1, 14)):
        kind = rng.random()
        if kind < 0.4:
            lines.append(qa(rng.choice(["hi", "yo"]), "ok", **({"dataset": "s2"} if rng.random() < 0.2 else {})))
        elif kind < 0.6:
            lines.append(qa("q", "a", id=rng.choice(["a", "b", f"{content_id}#2", f"{content_id}#3"])))
        elif kind < 0.7:
            lines.append(rng.choice(["", "{bad", '{"text": 1}']))
        else:
            lines.append(qa(f"unique {rng.random()}", "x"))
    return lines


@pytest.mark.parametrize("on_bad", ["error", "skip"])
def test_lazy_equals_eager_on_random_pools(tmp_path, on_bad):
    content_id = hash_id(tmp_path, qa("hi", "ok"))
    rng = random.Random(0)
    cfg = DataConfig(on_bad_record=on_bad)
    outcomes = set()
    for trial in range(150):
        lines = random_pool(rng, content_id)
        path = write_lines(tmp_path / "pool.jsonl", lines)
        eager, lazy = eager_and_lazy(path, cfg)
        assert lazy == eager, f"trial {trial}"
        if isinstance(eager, list):
            assert examples_digest(open_examples(path, cfg=cfg, progress=False)) == examples_digest(eager)
            outcomes.add("renamed" if any("#" in e.id for e in eager) else "loaded")
            if len(eager) < sum(line != "" for line in lines):
                outcomes.add("skipped")
        else:
            outcomes.add(eager.split(": ", 1)[1][:10])
    # the draws reached renames, and skips or several kinds of error
    assert {"renamed", "loaded"} <= outcomes and ("skipped" in outcomes if on_bad == "skip" else len(outcomes) >= 5)


def test_lazy_equals_eager_when_every_key_hash_collides(tmp_path, monkeypatch):
    """Resolution reads the colliding examples and compares their keys exactly."""
    content_id = hash_id(tmp_path, qa("hi", "ok"))
    monkeypatch.setattr(pool_index, "key_hash", lambda source, example_id: len(example_id) % 3)
    rng = random.Random(1)
    for on_bad in ("error", "skip"):
        for _ in range(60):
            path = write_lines(tmp_path / "pool.jsonl", random_pool(rng, content_id))
            eager, lazy = eager_and_lazy(path, DataConfig(on_bad_record=on_bad))
            assert lazy == eager
    path = write_lines(tmp_path / "pool.jsonl", [qa("hi", "ok"), qa("hi", "ok"), qa("q", "a", id="a"), qa("r", "b", id="b")])
    records = PoolRecords(open_examples(path, progress=False))
    assert records[("pool", "b")] == qa("r", "b", id="b") and records[("pool", content_id + "#2")] == qa("hi", "ok")
    assert ("pool", "c") not in records


def test_a_renamed_id_taken_by_a_later_explicit_id_is_an_error_at_that_line(tmp_path):
    content_id = hash_id(tmp_path, qa("hi", "ok"))
    path = write_lines(tmp_path / "pool.jsonl", [qa("hi", "ok"), qa("hi", "ok"), qa("x", "y"), qa("q", "a", id=content_id + "#2")])
    eager, lazy = eager_and_lazy(path)
    assert lazy == eager and eager.startswith(f"{path}:4: id '{content_id}#2' of source 'pool' is already used at {path}:2")
    # an explicit '#2' id before the repeats pushes the repeat to #3
    path = write_lines(tmp_path / "pool.jsonl", [qa("q", "a", id=content_id + "#2"), qa("hi", "ok"), qa("hi", "ok")])
    eager, lazy = eager_and_lazy(path)
    assert lazy == eager and [e.id for e in eager] == [content_id + "#2", content_id, content_id + "#3"]


def test_sequence_behaviour(tmp_path):
    path = write_jsonl(tmp_path / "pool.jsonl", toy_pool(30))
    eager = load_examples(path)
    lazy = open_examples(path, progress=False)
    assert len(lazy) == 30 and lazy[0] == eager[0] and lazy[-1] == eager[-1] and lazy[np.int64(7)] == eager[7]
    assert list(lazy[5:20][3:9]) == eager[5:20][3:9] and list(lazy[::-3]) == eager[::-3] and len(lazy[40:]) == 0
    with pytest.raises(IndexError):
        lazy[30]
    # several files and in-memory Examples in one sequence
    other = write_jsonl(tmp_path / "other.jsonl", toy_pool(5, seed=3))
    mixed = load_data([path, eager[0], other])
    expected = eager + [eager[0]] + load_examples(other)
    assert isinstance(mixed, PoolExamples) and list(mixed) == expected and list(mixed[28:33]) == expected[28:33]
    assert load_data(mixed) is mixed  # passed through, not read


def test_datasets_folder_and_json_array(tmp_path):
    import datasets

    rows = [qa("hi", "yo", id="x", subtask="s1"), qa("hey", "ho", subtask="s2"), qa("hey", "ho")]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    eager, lazy = eager_and_lazy(tmp_path / "saved", index_dir=tmp_path / "index")
    assert lazy == eager and lazy[1].origin == f"{tmp_path / 'saved'}#1"
    assert list(open_examples(tmp_path / "saved", index_dir=tmp_path / "index", progress=False)) == eager  # reused
    array_file = tmp_path / "arr.json"
    array_file.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    assert eager_and_lazy(array_file)[1] == load_examples(array_file)


@pytest.mark.parametrize("line,message", [
    ('{"messages": [', "invalid JSON"),
    ({"text": "hello"}, "neither 'messages' nor 'prompt'"),
    (qa("x", "  "), r"messages\[1\] \(assistant\) has empty content"),
    (qa("x", "y", id="a"), "id 'a' of source 'pool' is already used at .*pool.jsonl:1"),
])
def test_malformed_line_is_named_with_its_line(tmp_path, line, message):
    path = write_lines(tmp_path / "pool.jsonl", [qa("fine", "ok", id="a"), "", qa("fine", "too"), line, "{also bad"])
    with pytest.raises(DataError, match=message) as err:
        list(open_examples(path, progress=False))
    assert str(err.value).startswith(f"{path}:4: ") and str(err.value) == eager_and_lazy(path)[0]


def test_not_utf8_line(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_bytes(json.dumps(qa("a", "b")).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=f"^{path}:2: not UTF-8"):
        open_examples(path, progress=False)


def test_saved_index_is_reused_and_a_changed_file_indexed_again(tmp_path, caplog):
    path = write_jsonl(tmp_path / "pool.jsonl", toy_pool(12))
    index = tmp_path / "index"
    first = list(open_examples(path, index_dir=index, progress=False))
    assert sorted(p.suffix for p in index.iterdir()) == [".json", ".npy"]
    with caplog.at_level(logging.INFO, logger="qless.pool_index"):
        assert list(open_examples(path, index_dir=index, progress=False)) == first
    assert "index reused" in caplog.text

    # the same bytes under a new mtime: recognised by the SHA-256, reused
    os.utime(path, ns=(1, 1))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qless.pool_index"):
        assert list(open_examples(path, index_dir=index, progress=False)) == load_examples(path)
    assert "index reused" in caplog.text

    # other content of the same size: indexed again, and the new content is what is read
    records = toy_pool(12)
    records[3]["id"], records[4]["id"] = "ex4", "ex3"
    write_jsonl(path, records)
    assert path.stat().st_size == sum(len(json.dumps(r)) + 1 for r in toy_pool(12))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qless.pool_index"):
        again = open_examples(path, index_dir=index, progress=False)
    assert "changed since it was indexed; indexing it again" in caplog.text
    assert list(again) == load_examples(path) != first

    # a file changed under an open index is refused, not misread
    write_jsonl(path, toy_pool(13))
    with pytest.raises(DataError, match="changed since it was indexed"):
        again[0]


def test_other_settings_get_their_own_index(tmp_path):
    path = write_lines(tmp_path / "pool.jsonl", [qa("a", "b"), "{bad", qa("c", "d")])
    index = tmp_path / "index"
    assert len(open_examples(path, cfg=DataConfig(on_bad_record="skip"), index_dir=index, progress=False)) == 2
    with pytest.raises(DataError, match=":2: invalid JSON"):
        open_examples(path, index_dir=index, progress=False)
    assert open_examples(path, source="mine", cfg=DataConfig(on_bad_record="skip"), index_dir=index,
                         progress=False)[0].source == "mine"


# --------------------------------------------------------------------------- selection and scores


def _scores_folder(folder: Path, rows: list[dict], values: np.ndarray, tasks: list[str]) -> Path:
    folder.mkdir()
    np.save(folder / "task_scores.npy", values.astype(np.float32), allow_pickle=False)
    (folder / "pool_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "manifest.json").write_text(json.dumps({"format": SCORES_FORMAT, "n_pool": len(rows), "tasks": tasks}))
    return folder


def _expected_selection(col: np.ndarray, rows: list[dict], records: dict, n: int) -> tuple[str, str, dict]:
    """The selection files as written before streaming: a full ranking, a dict of every record."""
    picked = rank(col)[:n]
    keys = [(rows[i]["source"], rows[i]["id"]) for i in picked]
    ranking = "".join(json.dumps({"rank": r, "source": s, "id": i, "score": float(col[j]), "row": int(j)}) + "\n"
                      for r, (j, (s, i)) in enumerate(zip(picked, keys), start=1))
    selected = "".join(json.dumps(dict(records[k]), ensure_ascii=False) + "\n" for k in keys)
    pool_counts: dict[str, int] = {}
    for r in rows:
        pool_counts[r["source"]] = pool_counts.get(r["source"], 0) + 1
    counts = {s: {"selected": sum(k[0] == s for k in keys), "pool": c, "share_of_selection": sum(k[0] == s for k in keys) / n,
                  "share_of_pool": c / len(rows)} for s, c in sorted(pool_counts.items())}
    return ranking, selected, counts


def test_selection_through_the_index_equals_the_in_memory_one(tmp_path):
    pool = toy_pool(60) + [qa("same", "text"), qa("same", "text"), qa("non-ascii é", "ü")]
    path = write_jsonl(tmp_path / "pool.jsonl", pool)
    examples = load_examples(path)
    rows = [{"source": e.source, "id": e.id} for e in examples if e.id != "ex7"]  # one row skipped at extraction
    values = np.random.default_rng(0).normal(size=(len(rows), 2))
    values[[3, 9, 20], 0] = values[5, 0]  # ties at whatever rank they land
    values[11, :] = np.nan
    scores = _scores_folder(tmp_path / "scores", rows, values, ["mmlu", "bbh"])
    summaries = run_select(scores, tmp_path / "sel", SelectConfig(percent=10), pool_data=[path], index_dir=tmp_path / "index")
    records = {(e.source, e.id): e.record for e in examples}
    for j, task in enumerate(["mmlu", "bbh"]):
        col = values[:, j].astype(np.float32)
        ranking, selected, counts = _expected_selection(col, rows, records, SelectConfig(percent=10).count(len(rows) - 1))
        assert (tmp_path / "sel" / task / "ranking.jsonl").read_text() == ranking
        assert (tmp_path / "sel" / task / "selected.jsonl").read_text(encoding="utf-8") == selected
        assert json.loads((tmp_path / "sel" / task / "counts.json").read_text()) == counts
        assert summaries[task]["n_selected"] == 7
    other = write_jsonl(tmp_path / "other.jsonl", toy_pool(60, seed=9)[:50])
    with pytest.raises(DataError, match="selected rows are not in the given pool data"):
        run_select(scores, tmp_path / "sel2", SelectConfig(percent=50), pool_data=[other])
    assert not (tmp_path / "sel2").exists()


def test_scores_through_a_memory_map_equal_in_memory_scores(tmp_path):
    from test_score import _stores

    pool, targets, _ = _stores(tmp_path, "absmean4")
    out = score_into(tmp_path / "scores", pool, targets, ScoreConfig(block_rows=17), progress=False)
    s = score(pool, targets, ScoreConfig(block_rows=17), progress=False)
    assert np.load(out / "subtask_scores.npy").tobytes() == s.values.astype(np.float32).tobytes()
    agg = s.aggregate("max")
    assert np.load(out / "task_scores.npy").tobytes() == np.stack([agg[t] for t in s.groups.tasks], axis=1).astype(np.float32).tobytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the scratch map is gone


# --------------------------------------------------------------------------- extraction


def test_extraction_from_the_index_writes_the_same_stores(tmp_path, tiny_model_dir):
    from qless.extraction import ExtractConfig, extract
    from qless.models import AdapterConfig, ModelConfig
    from qless.project import ProjectionConfig
    from qless.training import WarmupConfig, warmup

    path = write_jsonl(tmp_path / "pool.jsonl", toy_pool(10))
    eager = load_examples(path)
    model = ModelConfig(model=str(tiny_model_dir))
    ckpts = warmup(open_examples(path, progress=False), tmp_path / "warmup", WarmupConfig(percent=20, epochs=1, batch_size=2),
                   model, AdapterConfig(r=2, alpha=8, dropout=0.0), progress=False)
    cfg, proj = ExtractConfig(formats=("absmean4",), batch_size=4, chunk_size=4), ProjectionConfig(dim=32, seed=1)
    sets = {"eager": (eager, "pool"), "lazy": (open_examples(path, progress=False), "pool")}
    extract(sets, ckpts, tmp_path / "grads", cfg, proj, model, progress=False)  # one model for both sets
    stores = {}
    for name in sets:
        shard = tmp_path / "grads" / "absmean4" / name / ckpts[0].name / "shards"
        stores[name] = {p.relative_to(shard): p.read_bytes() for p in sorted(shard.rglob("*")) if p.is_file()}
    assert stores["lazy"] == stores["eager"] and len(stores["eager"]) >= 3
