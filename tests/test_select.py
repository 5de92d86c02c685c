"""Selection: ranking, counts, ties, random baseline, output files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qless.errors import ConfigError, DataError
from qless.selection import SelectConfig, choose, rank, write_selection


def test_rank_descending_ties_by_row_order_nan_left_out():
    s = np.array([0.1, 0.5, np.nan, 0.5, 0.9, 0.1])
    assert rank(s).tolist() == [4, 1, 3, 0, 5]


@pytest.mark.parametrize("n_pool,percent,expected", [(1000, 5, 50), (1000, 0.5, 5), (999, 5, 50), (10, 0.1, 1), (7, 100, 7)])
def test_count_from_percent(n_pool, percent, expected):
    assert SelectConfig(percent=percent).count(n_pool) == expected


def test_top_n_and_validation():
    assert SelectConfig(top_n=3).count(10) == 3 and SelectConfig(top_n=30).count(10) == 10
    with pytest.raises(ConfigError):
        SelectConfig(percent=0)
    with pytest.raises(ConfigError):
        SelectConfig(percent=101)
    with pytest.raises(ConfigError):
        SelectConfig(top_n=-1)


def test_choose_top_and_random():
    s = np.arange(100, dtype=float)
    assert choose(s, SelectConfig(percent=5)).tolist() == [99, 98, 97, 96, 95]
    r1 = choose(s, SelectConfig(percent=10, method="random", seed=1))
    r2 = choose(s, SelectConfig(percent=10, method="random", seed=1))
    r3 = choose(s, SelectConfig(percent=10, method="random", seed=2))
    assert r1.tolist() == r2.tolist() and r1.tolist() != r3.tolist() and len(set(r1.tolist())) == 10
    with pytest.raises(DataError):
        choose(np.full(5, np.nan), SelectConfig())


def test_write_selection(tmp_path):
    rows = [{"source": "a" if i % 3 else "b", "id": str(i)} for i in range(30)]
    records = {(r["source"], r["id"]): {"dataset": r["source"], "id": r["id"], "messages": []} for r in rows}
    scores = np.linspace(0, 1, 30)
    picked = choose(scores, SelectConfig(top_n=6))
    summary = write_selection(tmp_path / "sel", picked, scores, rows, SelectConfig(top_n=6), records=records,
                              info={"task": "mmlu"})
    assert summary["n_selected"] == 6 and summary["task"] == "mmlu"
    ranking = [json.loads(line) for line in open(tmp_path / "sel" / "ranking.jsonl")]
    assert [r["id"] for r in ranking] == ["29", "28", "27", "26", "25", "24"] and ranking[0]["rank"] == 1
    selected = [json.loads(line) for line in open(tmp_path / "sel" / "selected.jsonl")]
    assert [r["id"] for r in selected] == ["29", "28", "27", "26", "25", "24"]
    counts = json.loads((tmp_path / "sel" / "counts.json").read_text())
    assert counts["b"]["selected"] == 2 and counts["a"]["selected"] == 4 and counts["b"]["pool"] == 10
    with pytest.raises(ConfigError, match="already exists"):
        write_selection(tmp_path / "sel", picked, scores, rows, SelectConfig(top_n=6))
    with pytest.raises(DataError, match="not in the given pool data"):
        write_selection(tmp_path / "sel2", picked, scores, rows, SelectConfig(top_n=6), records={})
    assert not (tmp_path / "sel2").exists()
