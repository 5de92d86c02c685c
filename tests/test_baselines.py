"""Baselines: random and balanced draws, RDS+ representations and scores against float64 references,
representation stores kept apart from gradient stores, the command line."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import toy_pool, write_jsonl, write_store
from qless.baselines import balanced_baseline, balanced_draw, balanced_quotas, random_baseline, random_draw, rds_baseline
from qless.cli import main
from qless.data import DataConfig, load_examples
from qless.errors import ConfigError, OutputError, StoreMismatchError
from qless.models import ModelConfig, load_model
from qless.represent import RepresentConfig, Representer, position_weighted_mean, representation_reference
from qless.scoring import ScoreConfig, score
from qless.selection import SelectConfig
from qless.store import Datastore, open_by_checkpoint
from utils import EXACT_COSINE_ATOL, HIDDEN_STATE_RTOL, SCORE_ATOL

# -- random and balanced draws ------------------------------------------------------------------


@pytest.mark.parametrize("sizes,count,expected", [
    ({"a": 10, "b": 10, "c": 10}, 9, {"a": 3, "b": 3, "c": 3}),
    # 10 = 3 each and one more; all equal: the first name takes it
    ({"a": 10, "b": 10, "c": 10}, 10, {"a": 4, "b": 3, "c": 3}),
    # the remainder goes to the largest source
    ({"a": 5, "b": 9, "c": 7}, 10, {"a": 3, "b": 4, "c": 3}),
    # a has 2 < its share 4: all of a, the other 10 split 5 and 5
    ({"a": 2, "b": 10, "c": 10}, 12, {"a": 2, "b": 5, "c": 5}),
    # a (1) and b (3) are below the share 3 of 11: all of both, c gives the other 7
    ({"a": 1, "b": 3, "c": 10}, 11, {"a": 1, "b": 3, "c": 7}),
    # redistribution cascades: share 4 of 12 caps a (1); 11 / 2 = 5 caps b (4); c takes 7
    ({"a": 1, "b": 4, "c": 20}, 12, {"a": 1, "b": 4, "c": 7}),
    # more than the pool: everything
    ({"a": 2, "b": 3}, 10, {"a": 2, "b": 3}),
    ({"a": 0, "b": 3}, 2, {"a": 0, "b": 2}),
])
def test_balanced_quotas_by_hand(sizes, count, expected):
    assert balanced_quotas(sizes, count) == expected


def test_balanced_draw_takes_the_quotas_uniformly_and_reproducibly():
    sources = ["flan"] * 50 + ["chat"] * 7 + ["cot"] * 23
    picked = balanced_draw(sources, 30, seed=4)
    assert len(set(picked.tolist())) == 30 and picked.min() >= 0 and picked.max() < len(sources)
    # share 10 of 30: chat gives its 7; 23 left for cot and flan, 11 each and the odd one to flan (the larger)
    assert Counter(sources[i] for i in picked) == {"chat": 7, "cot": 11, "flan": 12}
    assert balanced_draw(sources, 30, seed=4).tolist() == picked.tolist()
    assert set(balanced_draw(sources, 30, seed=5).tolist()) != set(picked.tolist())


def test_random_seeds_differ_and_are_reproducible():
    sources = ["s"] * 200
    draws = {seed: random_draw(sources, 10, seed) for seed in (0, 1, 2)}
    assert all(len(set(d.tolist())) == 10 for d in draws.values())
    assert len({tuple(sorted(d.tolist())) for d in draws.values()}) == 3
    assert random_draw(sources, 10, 1).tolist() == draws[1].tolist()
    from qless.selection import choose

    # the draw of `qless select --method random` over the same rows
    assert draws[2].tolist() == choose(np.zeros(200), SelectConfig(top_n=10, method="random", seed=2)).tolist()


def test_draw_baselines_write_selections(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", toy_pool(30))  # sources flan, chat, cot: 10 each
    summaries = random_baseline([pool], tmp_path / "random", SelectConfig(percent=20), seeds=(0, 1))
    assert sorted(summaries) == ["seed-0", "seed-1"]
    picked = {}
    for name in summaries:
        folder = tmp_path / "random" / name
        ranking = [json.loads(line) for line in open(folder / "ranking.jsonl")]
        selected = [json.loads(line) for line in open(folder / "selected.jsonl")]
        assert len(ranking) == 6 and all(r["score"] is None for r in ranking)
        assert [s["id"] for s in selected] == [r["id"] for r in ranking] and "messages" in selected[0]
        info = json.loads((folder / "selection.json").read_text())
        assert info["baseline"] == "random" and info["config"]["method"] == "random"
        picked[name] = [r["id"] for r in ranking]
    assert picked["seed-0"] != picked["seed-1"]
    balanced_baseline([pool], tmp_path / "balanced", SelectConfig(top_n=7), seeds=(3,))
    counts = json.loads((tmp_path / "balanced" / "seed-3" / "counts.json").read_text())
    assert {s: c["selected"] for s, c in counts.items()} == {"chat": 3, "cot": 2, "flan": 2}  # ties by name
    assert json.loads((tmp_path / "balanced" / "seed-3" / "selection.json").read_text())["quotas"] == {
        "chat": 3, "cot": 2, "flan": 2}
    with pytest.raises(OutputError, match="already exists"):
        random_baseline([pool], tmp_path / "random", SelectConfig(percent=20), seeds=(0,))
    for seeds in ((), (1, 1), (-1,)):
        with pytest.raises(ConfigError, match="seeds"):
            random_baseline([pool], tmp_path / "r2", seeds=seeds)
    assert not (tmp_path / "r2").exists()


# -- RDS+ representations ----------------------------------------------------------------------


def _examples(tmp_path, n, seed=0, name="pool"):
    return load_examples(write_jsonl(tmp_path / f"{name}.jsonl", toy_pool(n, seed=seed)))


def _rows(store: Datastore) -> np.ndarray:
    """Stored fp32 rows times their scales: the representation as computed."""
    from qless.quantize import dequantize

    codes = np.concatenate([np.array(c) for _, c, _ in store.blocks(1 << 20)])
    scales = np.concatenate([np.array(s) for _, _, s in store.blocks(1 << 20)])
    return dequantize(torch.from_numpy(codes), torch.from_numpy(scales), store.spec, store.k).double().numpy()


def test_position_weights_favour_later_tokens_and_ignore_padding():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float64).reshape(2, 4, 1)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    out = position_weighted_mean(hidden, mask)
    # row 0: tokens 0, 1, 2 weighted 1, 2, 3 (of 6); row 1 (left-padded): tokens 5, 6, 7 weighted 1, 2, 3
    assert out[:, 0].tolist() == pytest.approx([(0 * 1 + 1 * 2 + 2 * 3) / 6, (5 * 1 + 6 * 2 + 7 * 3) / 6])


def test_representations_equal_the_float64_reference(tmp_path, tiny_model_dir):
    """Batched (padded, longest first) float32 forward passes against a float64 copy of the model run
    one example at a time with the weighted sum written out token by token."""
    examples = _examples(tmp_path, 13)
    data = DataConfig(max_length=64)
    cfg = RepresentConfig(formats=("fp32", "sign1"), batch_size=4, max_batch_tokens=120, chunk_size=5)
    model_cfg = ModelConfig(model=str(tiny_model_dir))
    paths = Representer(tmp_path / "r", cfg, model_cfg, data, progress=False).run("pool", examples)
    store = Datastore.open(paths["fp32"])
    assert store.manifest["features"] == "hidden_state" and store.manifest["gradient"] == "none"
    assert store.manifest["projection"]["kind"] == "none" and store.k == 32
    assert [r["id"] for r in store.rows()] == [e.id for e in examples]
    model, tokenizer, _ = load_model(model_cfg)
    ref = representation_reference(model, tokenizer, examples, data)
    got = _rows(store)
    err = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert err.max() <= HIDDEN_STATE_RTOL, err.max()
    assert Datastore.open(paths["sign1"]).n_rows == 13


def test_interrupted_representations_resume_to_the_same_bytes(tmp_path, tiny_model_dir, monkeypatch):
    examples = _examples(tmp_path, 11)
    cfg = RepresentConfig(formats=("fp16",), batch_size=3, chunk_size=4)
    model_cfg = ModelConfig(model=str(tiny_model_dir))
    whole = Representer(tmp_path / "whole", cfg, model_cfg, progress=False).run("pool", examples)["fp16"]
    import qless.represent as represent

    real = represent.Representer.embed
    calls = {"n": 0}

    def stop_at_chunk_2(self, items):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, items)

    monkeypatch.setattr(represent.Representer, "embed", stop_at_chunk_2)
    with pytest.raises(KeyboardInterrupt):
        Representer(tmp_path / "cut", cfg, model_cfg, progress=False).run("pool", examples)
    monkeypatch.setattr(represent.Representer, "embed", real)
    cut = Representer(tmp_path / "cut", cfg, model_cfg, progress=False).run("pool", examples)["fp16"]
    shard = "shards/00000-of-00001"
    for name in ("codes.bin", "scales.bin", "rows.jsonl"):
        assert (cut / shard / name).read_bytes() == (whole / shard / name).read_bytes(), name


# -- RDS+ scores -------------------------------------------------------------------------------


def _targets(tmp_path):
    rows = [{"dataset": "qa", "id": f"q{i}", "subtask": f"s{i % 2}", "prompt": f"what is {i} plus two",
             "completion": " the answer is four"} for i in range(4)]
    rows += [{"dataset": "yn", "id": f"y{i}", "prompt": "hello world yes or no", "completion": " no" * (i + 1)}
             for i in range(3)]
    write_jsonl(tmp_path / "qa.jsonl", rows[:4])
    write_jsonl(tmp_path / "yn.jsonl", rows[4:])
    return [tmp_path / "qa.jsonl", tmp_path / "yn.jsonl"]


def test_rds_scores_and_selection_equal_the_float64_reference(tmp_path, tiny_model_dir):
    """RDS+ end to end: every task's score is the max over its target examples of the cosine, against
    cosines of the float64 reference representations; the selection is the top of those scores."""
    write_jsonl(tmp_path / "pool.jsonl", toy_pool(20))
    targets = _targets(tmp_path)
    model_cfg = ModelConfig(model=str(tiny_model_dir))
    data = DataConfig(max_length=64)
    summaries = rds_baseline([tmp_path / "pool.jsonl"], targets, tmp_path / "rds", SelectConfig(top_n=4),
                             RepresentConfig(formats=("fp32", "absmean4"), batch_size=4), model_cfg, data, progress=False)
    assert sorted(summaries) == ["qa", "yn"]
    model, tokenizer, _ = load_model(model_cfg)
    pool = load_examples(tmp_path / "pool.jsonl")
    unit = [r / np.linalg.norm(r, axis=1, keepdims=True) for r in
            (representation_reference(model, tokenizer, ex, data) for ex in (pool, *map(load_examples, targets)))]
    expected = {"qa": (unit[0] @ unit[1].T).max(axis=1), "yn": (unit[0] @ unit[2].T).max(axis=1)}
    from qless.scoring import read_scores

    manifest, values, rows = read_scores(tmp_path / "rds" / "scores" / "fp32")
    assert [r["id"] for r in rows] == [e.id for e in pool]
    assert manifest["config"]["target_groups"] == "example" and manifest["config"]["aggregation"] == "max"
    assert len(manifest["subtasks"]) == 7  # one group per target example
    for j, task in enumerate(manifest["tasks"]):
        np.testing.assert_allclose(values[:, j], expected[task], rtol=0, atol=EXACT_COSINE_ATOL)
        ranking = [json.loads(line) for line in open(tmp_path / "rds" / "selected" / task / "ranking.jsonl")]
        np.testing.assert_allclose([r["score"] for r in ranking], np.sort(expected[task])[::-1][:4], rtol=0,
                                   atol=EXACT_COSINE_ATOL)
        selected = [json.loads(line) for line in open(tmp_path / "rds" / "selected" / task / "selected.jsonl")]
        assert [s["id"] for s in selected] == [r["id"] for r in ranking]
    # the same stores, scores and selections when run again (representations reused, not recomputed)
    import qless.represent as represent

    real, represent.Representer.embed = represent.Representer.embed, None
    try:
        again = rds_baseline([tmp_path / "pool.jsonl"], targets, tmp_path / "rds", SelectConfig(top_n=4),
                             RepresentConfig(formats=("fp32", "absmean4"), batch_size=4), model_cfg, data, progress=False)
    finally:
        represent.Representer.embed = real
    assert again == summaries


def test_example_grouping_takes_the_max_over_a_tasks_examples(tmp_path):
    """Hand-made rows: with target_groups example and aggregation max a pool row's task score is its
    best cosine with any one target example (RDS+); grouped by subtask it is the mean (LESS)."""
    g = torch.Generator().manual_seed(0)
    pool, target = torch.randn(9, 16, generator=g, dtype=torch.float64), torch.randn(5, 16, generator=g, dtype=torch.float64)
    trows = [{"source": "t", "id": f"t{i}", "subtask": "all"} for i in range(5)]
    write_store(tmp_path / "p" / "c", pool.numpy(), "fp32", checkpoint="c", lr=1.0)
    write_store(tmp_path / "t" / "c", target.numpy(), "fp32", checkpoint="c", lr=1.0, rows=trows)
    cos = torch.nn.functional.normalize(pool, dim=1) @ torch.nn.functional.normalize(target, dim=1).T
    p, t = open_by_checkpoint([tmp_path / "p"]), open_by_checkpoint([tmp_path / "t"])
    by_example = score(p, t, ScoreConfig(target_groups="example", aggregation="max"), progress=False).aggregate("max")["t"]
    by_subtask = score(p, t, ScoreConfig(aggregation="max"), progress=False).aggregate("max")["t"]
    np.testing.assert_allclose(by_example, cos.max(dim=1).values.numpy(), rtol=0, atol=SCORE_ATOL)
    np.testing.assert_allclose(by_subtask, cos.mean(dim=1).numpy(), rtol=0, atol=SCORE_ATOL)
    assert np.abs(by_example - by_subtask).min() > 10 * SCORE_ATOL  # the two aggregations really differ here


def test_representation_and_gradient_stores_are_not_scored_together(tmp_path, tiny_model_dir, capsys):
    reps = Representer(tmp_path / "r", RepresentConfig(), ModelConfig(model=str(tiny_model_dir)), progress=False)
    hidden_pool = reps.run("pool", _examples(tmp_path, 6))["fp32"]
    hidden_target = reps.run("target", _examples(tmp_path, 3, seed=1, name="t"))["fp32"]
    g = torch.Generator().manual_seed(0)
    grad_pool = write_store(tmp_path / "g" / "pool" / "c", torch.randn(6, 32, generator=g), "fp32", checkpoint="c")
    grad_target = write_store(tmp_path / "g" / "t" / "c", torch.randn(3, 32, generator=g), "fp32", checkpoint="c")
    for pool, target, needle in ((grad_pool, hidden_target, "pool stores hold gradient rows and the target stores hidden_state"),
                                 (hidden_pool, grad_target, "pool stores hold hidden_state rows and the target stores gradient")):
        with pytest.raises(StoreMismatchError, match="manifest field 'features'") as e:
            score(open_by_checkpoint([pool]), open_by_checkpoint([target]), progress=False)
        assert needle in str(e.value)
        code = main(["score", "--pool", str(pool), "--target", str(target), "--out", str(tmp_path / "s")])
        err = " ".join(capsys.readouterr().err.split())
        assert code == 2 and "'features'" in err and "Traceback" not in err
    with pytest.raises(StoreMismatchError, match="features"):
        Datastore.open(grad_pool, hidden_pool)  # nor combined into one store
    assert len(score(open_by_checkpoint([hidden_pool]), open_by_checkpoint([hidden_target]), progress=False).values) == 6


def test_cli_baselines_round_trip_and_bad_input(tmp_path, tiny_model_dir, capsys):
    write_jsonl(tmp_path / "pool.jsonl", toy_pool(24))
    targets = [str(p) for p in _targets(tmp_path)]
    pool = ["--pool", str(tmp_path / "pool.jsonl")]
    assert main(["baseline", "random", *pool, "--percent", "25", "--seeds", "0", "1", "--out", str(tmp_path / "r")]) == 0
    assert main(["baseline", "balanced", *pool, "--top-n", "9", "--seeds", "7", "--out", str(tmp_path / "b")]) == 0
    rds = ["baseline", "rds", *pool, "--targets", *targets, "--model", str(tiny_model_dir), "--preset", "cpu",
           "--top-n", "3", "--formats", "fp16"]
    assert main([*rds, "--out", str(tmp_path / "rds")]) == 0
    out = capsys.readouterr().out
    assert "seed-1: selected 6 of 24 rows (random)" in out and "seed-7: selected 9 of 24 rows (balanced)" in out
    assert "qa: selected 3 of 24 rows (rds)" in out
    assert len(open(tmp_path / "rds" / "selected" / "yn" / "selected.jsonl").readlines()) == 3
    for bad, needle in ((["baseline", "random", *pool, "--seeds", "-1", "--out", str(tmp_path / "x")], "non-negative"),
                        (["baseline", "random", *pool, "--seeds", "2", "2", "--out", str(tmp_path / "x")], "repeats"),
                        (["baseline", "random", *pool, "--out", str(tmp_path / "r")], "already exists"),
                        (["baseline", "balanced", "--pool", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")],
                         "no such file"),
                        ([*rds, "--formats", "absmean4-global", "--out", str(tmp_path / "x")], "global-scale"),
                        ([*rds, "--max-length", "128", "--out", str(tmp_path / "rds")], "differ in tokenization")):
        code = main(bad)
        err = " ".join(capsys.readouterr().err.split())
        assert code == 2 and needle in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as e:
        main(["baseline", "random", *pool, "--seeds", "one", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert not (tmp_path / "x").exists()
