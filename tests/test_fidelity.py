"""`qless fidelity`: agreement metrics on hand-computed cases, the stratified probe, exact scores
against a one-example-at-a-time float64 computation, settings against the scorer on real
stores, the recommendation on a constructed case, and the CLI round trip."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import toy_pool, write_jsonl
from qless.cli import main
from qless.config import from_dict
from qless.data import DataConfig, Example, load_examples
from qless.errors import ConfigError
from qless.fidelity import FidelityConfig, _measured, fidelity
from qless.fidelity.metrics import bootstrap, jaccard_at, kendall, metric_functions, ndcg_at, recall_at, spearman, top_rows
from qless.fidelity.probe import exact_scores, open_probe, probe_sample, rows_as_tensor
from qless.fidelity.recommend import plot, read_recommendation, recommend, settings_config
from qless.fidelity.settings import project_side, projections, setting_scores
from qless.models import ModelConfig, load_adapter, load_model, set_adapter_weights
from qless.pipeline import build_run_config, run
from qless.project import ProjectionConfig, make_projector
from qless.quantize import QuantizerSpec
from qless.scoring import read_scores
from qless.scoring.aggregate import checkpoint_weights, target_groups
from qless.store import Datastore
from qless.training import read_checkpoints
from utils import CODE_FLIP_ATOL, EXACT_COSINE_ATOL, SCORE_ATOL, reference_gradients

# -- metrics -----------------------------------------------------------------------------------


def test_rank_correlations_on_hand_computed_cases():
    # no ties: one swapped adjacent pair among 5 -> 9 concordant, 1 discordant pair; sum d^2 = 2
    a, b = np.array([1.0, 2, 3, 4, 5]), np.array([1.0, 3, 2, 4, 5])
    assert kendall(a, b) == pytest.approx((9 - 1) / 10)
    assert spearman(a, b) == pytest.approx(1 - 6 * 2 / (5 * 24))
    # ties get average ranks: b's ranks are (1.5, 1.5, 3, 4); Pearson of (1,2,3,4) with them
    a, b = np.array([1.0, 2, 3, 4]), np.array([7.0, 7, 8, 9])
    rb = np.array([1.5, 1.5, 3, 4])
    ra = np.arange(1, 5.0)
    expected = np.corrcoef(ra, rb)[0, 1]
    assert spearman(a, b) == pytest.approx(expected)
    # tau-b with one tie in b: 5 concordant, 0 discordant, ties only in b: (5 - 0) / sqrt(6 * 5)
    assert kendall(a, b) == pytest.approx(5 / math.sqrt(6 * 5))
    assert spearman(a, -a) == pytest.approx(-1) and kendall(a, -a) == pytest.approx(-1)


def test_top_sets_recall_jaccard_and_ndcg_on_known_inputs():
    exact = np.array([10.0, 9, 8, 7, 6, 5, 4, 3, 2, 1])
    approx = np.array([9.0, 10, 1, 7, 6, 5, 4, 3, 2, 8])  # top 3: rows 1, 0, 9; exact top 3: 0, 1, 2
    assert list(top_rows(approx, 3)) == [1, 0, 9]
    assert list(top_rows(np.array([1.0, 2, 2, 0]), 2)) == [1, 2]  # ties by row order, as the selection
    assert recall_at(exact, approx, 30) == pytest.approx(2 / 3)
    assert jaccard_at(exact, approx, 30) == pytest.approx(2 / 4)
    # gains exact - 1 = 9, 8, 7 ideal; approx order rows 1, 0, 9 has gains 8, 9, 0
    ideal = 9 / math.log2(2) + 8 / math.log2(3) + 7 / math.log2(4)
    got = 8 / math.log2(2) + 9 / math.log2(3) + 0 / math.log2(4)
    assert ndcg_at(exact, approx, 30) == pytest.approx(got / ideal)
    assert ndcg_at(exact, exact, 30) == 1.0 and recall_at(exact, exact, 5) == 1.0
    # the top-p count is the selection's: ceil(10 * 5 / 100) = 1 row
    assert recall_at(exact, approx, 5) == 0.0


def test_bootstrap_interval_contains_the_value_and_is_paired():
    rng = np.random.default_rng(0)
    exact = rng.normal(size=300)
    approx = exact + rng.normal(scale=0.5, size=300)
    draws = np.random.default_rng(1).integers(0, 300, size=(100, 300))
    out = bootstrap(exact, approx, metric_functions([5.0], 5.0), draws, 0.9)
    for m in out.values():
        assert m["low"] <= m["high"]
    # Spearman of y = x + N(0, 0.5^2) for normal x: (6/pi) asin(rho/2) with rho = 1/sqrt(1.25); the interval holds it
    rho = 1 / math.sqrt(1.25)
    theory = 6 / math.pi * math.asin(rho / 2)
    assert out["spearman"]["low"] - 0.02 <= theory <= out["spearman"]["high"] + 0.02
    assert bootstrap(exact, approx, metric_functions([5.0], 5.0), draws[:0], 0.9)["spearman"].keys() == {"value"}


def test_probe_sample_is_stratified_and_seeded():
    pool = [Example(source=s, id=f"{s}{i}", messages=[{"role": "user", "content": "x"}], origin="t", subtask=None, record={})
            for s, n in (("a", 600), ("b", 300), ("c", 90), ("d", 10)) for i in range(n)]
    idx = probe_sample(pool, 100, seed=3)
    assert len(idx) == 100 and idx == sorted(idx) and len(set(idx)) == 100
    counts = {s: sum(pool[i].source == s for i in idx) for s in "abcd"}
    assert counts == {"a": 60, "b": 30, "c": 9, "d": 1}
    assert probe_sample(pool, 100, seed=3) == idx and probe_sample(pool, 100, seed=4) != idx
    assert probe_sample(pool, 5000, seed=0) == list(range(1000))
    # a source too small for its share still gets one row when the size allows
    assert sum(pool[i].source == "d" for i in probe_sample(pool, 10, seed=0)) == 1


# -- a tiny run ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("fidelity")
    write_jsonl(root / "pool.jsonl", toy_pool(24))
    write_jsonl(root / "mmlu.jsonl", [
        {"dataset": "mmlu", "id": f"m{i}", "subtask": f"s{i % 2}", "prompt": f"question {i} what is", "completion": " yes"}
        for i in range(4)])
    write_jsonl(root / "qa.jsonl", [{"dataset": "qa", "id": f"q{i}", "prompt": f"hello world {i}", "completion": " four"}
                                    for i in range(2)])
    cfg = build_run_config({
        "run_dir": str(root / "run"), "pool": [str(root / "pool.jsonl")],
        "targets": [str(root / "mmlu.jsonl"), str(root / "qa.jsonl")],
        "model": {"model": str(tiny_model_dir), "dtype": "float32"}, "adapter": {"r": 4, "alpha": 16},
        "warmup": {"percent": 40, "epochs": 2, "batch_size": 4, "learning_rate": 1e-2},
        "projection": {"dim": 256, "seed": 0}, "extract": {"formats": ["fp32", "absmean4", "sign1"], "chunk_size": 16},
        "select_format": "absmean4",
    }, preset="cpu")
    run(cfg, progress=False)
    fcfg = FidelityConfig(dims=(64, 256), kinds=("rademacher", "sparse"), dense_max_dim=256, bootstrap=20,
                          formats=("fp32", "absmean4", "sign1", "absmax2-global"), model_dtypes=("float32",),
                          criterion="recall@10", threshold=0.5)
    report = fidelity(root / "run", root / "fid", fcfg, progress=False)
    return root, cfg, fcfg, report


def test_exact_scores_equal_a_one_example_at_a_time_float64_computation(tiny_run):
    root, cfg, _, _ = tiny_run
    pool = load_examples(root / "pool.jsonl")
    targets = {"mmlu": load_examples(root / "mmlu.jsonl"), "qa": load_examples(root / "qa.jsonl")}
    side_pool, side_targets, rates = open_probe(root / "fid" / "probe" / "float32", ["mmlu", "qa"])
    got, groups = exact_scores(side_pool, side_targets, rates, "lr", "max", memory_mb=1)  # tiny blocks: many slices
    base, tok, _ = load_model(ModelConfig(model=cfg.model.model, dtype="float32"))
    ckpts = read_checkpoints(root / "run" / "warmup")
    model = load_adapter(base, ckpts[0].path)
    eta = np.array([c.learning_rate for c in ckpts]) / sum(c.learning_rate for c in ckpts)
    all_targets = targets["mmlu"] + targets["qa"]
    subtasks = [("mmlu", "s0"), ("mmlu", "s1"), ("qa", "qa")]
    key = [("mmlu", f"s{i % 2}") for i in range(4)] + [("qa", "qa")] * 2
    total = np.zeros((len(pool), len(subtasks)))
    for c, w in zip(ckpts, eta):
        set_adapter_weights(model, c.path)
        gp = reference_gradients(model, tok, pool, c, "pool", DataConfig(max_length=256))
        gt = reference_gradients(model, tok, all_targets, c, "target", DataConfig(max_length=256))
        for i in range(len(pool)):
            for j, sub in enumerate(subtasks):
                cos = [gp[i] @ gt[r] / np.linalg.norm(gp[i]) / np.linalg.norm(gt[r]) for r in range(len(key)) if key[r] == sub]
                total[i, j] += w * np.mean(cos)
    expected = {"mmlu": total[:, :2].max(axis=1), "qa": total[:, 2]}
    assert groups.subtasks == subtasks
    for task in ("mmlu", "qa"):
        np.testing.assert_allclose(got[task], expected[task], rtol=0, atol=EXACT_COSINE_ATOL)


def test_settings_equal_the_scorer_on_stores_of_that_setting(tiny_run):
    """The run extracted dense rademacher k = 256 stores (fp32, absmean4, sign1) with the float32
    model; the fidelity path (probe -> projection -> quantize -> score) must give the scores
    `qless score` wrote from them, for every pool row (the probe is the whole pool)."""
    root, _, fcfg, _ = tiny_run
    pool, targets, rates = open_probe(root / "fid" / "probe" / "float32", ["mmlu", "qa"])
    projection = next(p for p in projections(fcfg, pool.d) if p.kind == "rademacher" and p.dim == 256)
    xs = {c: project_side(pool, c, projection, 64) for c in pool.checkpoints}
    ts = {c: project_side(targets, c, projection, 64) for c in targets.checkpoints}
    groups = target_groups(targets.rows)
    weights = checkpoint_weights(rates, "lr")
    for fmt in ("fp32", "absmean4", "sign1"):
        got = setting_scores(xs, ts, QuantizerSpec.parse(fmt), [24], [4, 2], groups, weights, "max")
        manifest, values, rows = read_scores(root / "run" / "scores" / fmt)
        assert [r["id"] for r in rows] == [r["id"] for r in pool.rows]
        for j, task in enumerate(manifest["tasks"]):
            diff = np.abs(got[task] - np.asarray(values[:, j], dtype=np.float64))
            if fmt == "fp32":
                assert diff.max() <= SCORE_ATOL
            else:
                assert np.median(diff) <= SCORE_ATOL and diff.max() <= CODE_FLIP_ATOL


def test_logra_is_measured_on_plain_pool_gradients(tiny_run):
    """kinds logra needs a probe of plain pool gradients (its own folder); its k follows from the
    adapter's layers; the run's own (Adam) stores are not compared; a logra recommendation
    carries the side and extract.pool_gradient."""
    from qless.fidelity.settings import logra_layout

    root, cfg, _, _ = tiny_run
    fcfg = FidelityConfig(kinds=("logra", "sparse"), logra_sides=(2, 4), dims=(64,), pool_gradient="sgd", bootstrap=0,
                          formats=("fp32", "sign1"), model_dtypes=("float32",), criterion="recall@10", threshold=0.0)
    report = fidelity(root / "run", root / "fid-sgd", fcfg, progress=False)
    assert (root / "fid-sgd" / "probe" / "float32-sgd").is_dir()
    store = Datastore.open(next((root / "fid-sgd" / "probe" / "float32-sgd" / "fp32" / "pool").iterdir()))
    assert store.manifest["gradient"] == "sgd"
    layout = logra_layout(cfg, root / "run" / "warmup")
    logra = [e for e in report["settings"] if e["projection"] == "logra"]
    assert sorted({(e["side"], e["k"]) for e in logra}) == [
        (s, layout.projection(ProjectionConfig(kind="logra", dim=s)).out_dim) for s in (2, 4)]
    assert report["run_stores"] == []
    rec = report["recommendation"]
    assert rec["met"] and rec["config"]["extract"]["pool_gradient"] == "sgd"
    if rec["setting"]["projection"] == "logra":  # the fewest bytes at threshold 0: side 2
        assert rec["config"]["projection"]["dim"] == 2
    # the agreement plot draws the logra settings as their own series
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.plot
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **kw: drawn.append(kw.get("label")) or original(ax, *a, **kw))
        plot(report, fcfg, root / "fid-sgd" / "replot.png")
    assert {"fp32 logra", "sign1 logra", "fp32 sparse", "sign1 sparse"} <= set(drawn)


def test_sparse_nnz_is_measured_and_recommended_with_its_nnz(tiny_run):
    """fidelity.sparse_nnz adds a sparse setting per nnz that divides k, projected exactly as
    make_projector projects with that nnz; tables name it; a recommendation carries nnz into
    the projection section; a fidelity.json written before the field existed measured nnz 1 and
    is reused for the default."""
    root, _, fcfg, report = tiny_run
    nnz_cfg = replace(fcfg, kinds=("sparse",), dims=(64, 256), sparse_nnz=(1, 4, 128), formats=("fp32", "sign1"),
                      bootstrap=0, criterion="spearman", threshold=-1.0)
    assert [(p.dim, p.nnz) for p in projections(nnz_cfg, 1792)[1:]] == [(64, 1), (64, 4), (256, 1), (256, 4), (256, 128)]
    pool, _, _ = open_probe(root / "fid" / "probe" / "float32", ["mmlu", "qa"])
    four = next(p for p in projections(nnz_cfg, pool.d) if p.nnz == 4 and p.dim == 64)
    got = project_side(pool, pool.checkpoints[0], four, 64)
    rows = torch.cat([x for _, x in rows_as_tensor(pool, pool.checkpoints[0], scaled=True, block_rows=64)])
    torch.testing.assert_close(got, make_projector(four, pool.d).project(rows), rtol=0, atol=0)
    out = fidelity(root / "run", root / "fid-nnz", nnz_cfg, progress=False)
    labels = {(e["projection"], e.get("nnz"), e["k"]) for e in out["settings"]}
    assert labels == {("none", None, 1792), ("sparse", 1, 64), ("sparse", 4, 64), ("sparse", 1, 256), ("sparse", 4, 256),
                      ("sparse", 128, 256)}
    assert "| float32 | sparse nnz 4 | 64 | sign1 |" in (root / "fid-nnz" / "fidelity.md").read_text()
    entry = next(e for e in out["settings"] if e.get("nnz") == 4 and e["k"] == 64 and e["format"] == "sign1")
    assert settings_config(entry, 0)["projection"] == {"kind": "sparse", "dim": 64, "seed": 0, "nnz": 4}
    assert settings_config({**entry, "nnz": 1}, 0)["projection"]["nnz"] == 1  # written, so a config file's nnz is not kept
    # an older fidelity.json (no sparse_nnz in its config) holds nnz-1 measurements: reused for the default
    original = (root / "fid" / "fidelity.json").read_text()
    saved = json.loads(original)
    assert saved["config"]["sparse_nnz"] == [1]
    del saved["config"]["sparse_nnz"]
    for e in saved["settings"]:
        e.pop("nnz", None)
    (root / "fid" / "fidelity.json").write_text(json.dumps(saved))
    assert _measured(root / "fid", fcfg) is not None
    assert _measured(root / "fid", replace(fcfg, sparse_nnz=(2,))) is None
    old = fidelity(root / "run", root / "fid", replace(fcfg, criterion="spearman", threshold=-1.0), progress=False)
    assert "nnz" not in old["settings"][1] and "| float32 | sparse | 64 | sign1 |" in (root / "fid" / "fidelity.md").read_text()
    assert old["recommendation"]["config"]["projection"].get("nnz", 1) == 1
    (root / "fid" / "fidelity.json").write_text(original)
    fidelity(root / "run", root / "fid", fcfg, progress=False)  # the outputs as the other tests expect them


def test_fidelity_outputs(tiny_run):
    root, _, fcfg, report = tiny_run
    out = root / "fid"
    for name in ("fidelity.json", "fidelity.md", "agreement.png", "recommendation.json"):
        assert (out / name).is_file()
    assert (out / "agreement.png").stat().st_size > 10_000
    none = next(e for e in report["settings"] if e["projection"] == "none")
    assert none["k"] == report["probe"]["gradient_dim"] == 1792 and none["bytes_per_example"] == 4 * 1792 + 4
    for task in ("mmlu", "qa"):
        assert none["tasks"][task]["spearman"]["value"] == pytest.approx(1.0)  # float32 unprojected is the reference
    kinds = {(e["projection"], e["k"]) for e in report["settings"]}
    assert kinds == {("none", 1792), ("rademacher", 64), ("rademacher", 256), ("sparse", 64), ("sparse", 256)}
    assert len(report["settings"]) == 1 + 4 * 4
    # the run's own stores measured too: the setting it used (float32 model, rademacher k = 256)
    own = {e["format"]: e for e in report["run_stores"]}
    assert set(own) == {"fp32", "absmean4", "sign1"}
    for e in own.values():
        assert (e["model_dtype"], e["projection"], e["k"], e["rows"]) == ("float32", "rademacher", 256, 24)
        assert e["tasks"].keys() == {"mmlu", "qa"}
    sign = next(e for e in report["settings"] if e["projection"] == "sparse" and e["k"] == 256 and e["format"] == "sign1")
    assert sign["bytes_per_example"] == 256 // 8 + 4
    text = (out / "fidelity.md").read_text()
    assert "Matched bytes" not in text or "16,388" in text
    assert "| float32 | sparse | 256 | sign1 | 36 |" in text
    # the run's report shows the recommendation and the plot once the run folder holds a fidelity folder
    import shutil

    from qless.pipeline import run_report

    shutil.copytree(out, root / "run" / "fidelity", ignore=shutil.ignore_patterns("probe"))
    run_report(root / "run")
    assert "## Fidelity against exact scores" in (root / "run" / "report" / "report.md").read_text()
    assert (root / "run" / "report" / "fidelity.png").stat().st_size == (out / "agreement.png").stat().st_size
    shutil.rmtree(root / "run" / "fidelity")
    # a second call reuses the probe: no store is written again
    stamps = {p: p.stat().st_mtime_ns for p in (out / "probe").rglob("codes.bin")}
    fidelity(root / "run", out, fcfg, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (out / "probe").rglob("codes.bin")} == stamps


def test_a_new_rule_recommends_again_without_measuring(tiny_run, monkeypatch):
    root, _, fcfg, report = tiny_run
    import qless.fidelity.settings as settings

    monkeypatch.setattr(settings, "evaluate_settings", lambda *a, **kw: pytest.fail("measured again"))
    again = fidelity(root / "run", root / "fid", replace(fcfg, criterion="spearman",
                     threshold=0.0), progress=False)
    assert again["settings"] == report["settings"]
    assert again["recommendation"]["rule"] == "spearman >= 0 on every task"
    assert again["recommendation"]["setting"]["bytes_per_example"] == min(e["bytes_per_example"] for e in report["settings"])
    fidelity(root / "run", root / "fid", fcfg, progress=False)  # back to the fixture's rule for the other tests


def test_recommendation_round_trip_through_run_and_extract(tiny_run, capsys):
    root, cfg, _, report = tiny_run
    rec = report["recommendation"]
    assert rec["met"], rec
    setting = read_recommendation(root / "fid")
    assert setting["extract"]["formats"][0] == rec["setting"]["format"]
    config = root / "run.json"
    config.write_text(json.dumps({"run_dir": str(root / "run2"), "pool": [str(root / "pool.jsonl")],
                                  "targets": [str(root / "qa.jsonl")], "model": {"model": cfg.model.model}}))
    assert main(["run", str(config), "--dry-run", "--from-recommendation", str(root / "fid" / "recommendation.json")]) == 0
    printed = capsys.readouterr().out
    assert f"kind: {setting['projection']['kind']}" in printed and f"select_format: {setting['select_format']}" in printed
    # extraction takes it too: the stores carry the recommended projection and format
    assert main(["extract", "--warmup", str(root / "run" / "warmup"), "--data", str(root / "qa.jsonl"), "--name", "qa",
                 "--kind", "target", "--out", str(root / "rec-grads"), "--preset", "cpu",
                 "--from-recommendation", str(root / "fid")]) == 0
    fmt = setting["extract"]["formats"][0]
    manifest = json.loads(next((root / "rec-grads" / fmt / "qa").glob("*/manifest.json")).read_text())
    assert manifest["projection"]["kind"] == setting["projection"]["kind"]
    assert manifest["projection"]["dim"] == rec["setting"]["k"]


def _entry(fmt, k, kind, values, dtype="bfloat16"):
    spec = QuantizerSpec.parse(fmt)
    return {"model_dtype": dtype, "projection": kind, "k": k, "format": spec.tag, "method": spec.method, "bits": spec.bits,
            "scale": spec.scale, "bytes_per_example": spec.row_bytes(k) + 4,
            "tasks": {t: {"recall@5": {"value": v, "low": v - 0.1, "high": v + 0.05}, "spearman": {"value": v}}
                      for t, v in zip(("a", "b"), values)}}


def test_recommend_picks_the_cheapest_setting_that_passes_on_every_task():
    cfg = FidelityConfig(criterion="recall@5", threshold=0.9)
    results = [
        _entry("fp16", 8192, "rademacher", (0.95, 0.97)),      # passes, 16388 bytes
        _entry("sign1", 131072, "sparse", (0.93, 0.91)),       # passes, 16388 bytes, cheaper compute
        _entry("sign1", 32768, "sparse", (0.95, 0.85)),        # fails on task b
        _entry("absmean2", 16384, "sparse", (0.92, 0.90)),     # passes, 4100 bytes: the cheapest
        _entry("absmean2", 16384, "sparse", (0.99, 0.99), "float32"),  # same bytes, float32 model costs more
        _entry("sign1", 8192, "rademacher", (0.5, 0.95)),      # cheaper but fails
    ]
    rec = recommend(results, cfg, ["a", "b"])
    assert rec["met"] and rec["setting"]["format"] == "absmean2" and rec["setting"]["k"] == 16384
    assert rec["setting"]["model_dtype"] == "bfloat16" and rec["setting"]["worst_task_value"] == 0.90
    assert rec["config"] == {"model": {"dtype": "bfloat16"}, "projection": {"kind": "sparse", "dim": 16384, "seed": 0, "nnz": 1},
                             "extract": {"formats": ["absmean2"]}, "select_format": "absmean2"}
    # against the interval's lower end only the float32 absmean2 (0.89) ... fails; nothing passes at 0.9
    strict = recommend(results, FidelityConfig(criterion="recall@5", threshold=0.88, bound="low"), ["a", "b"])
    assert strict["met"] and strict["setting"]["model_dtype"] == "float32"
    # a -global format also costs the fp32 store it is derived from: an equal row-scale format wins
    glob = recommend([_entry("absmean2-global", 16384, "sparse", (0.99, 0.99)), *results], cfg, ["a", "b"])
    assert glob["setting"]["format"] == "absmean2"
    assert recommend([_entry("absmean2-global", 16384, "sparse", (0.99, 0.99))], cfg, ["a", "b"])["config"]["extract"] == \
        {"formats": ["absmean2-global", "fp32"]}
    # when only the unprojected gradients pass, the closest projected setting is named
    unprojected = {**_entry("fp32", 1024, "none", (1.0, 1.0)), "bytes_per_example": 4 * 1024 + 4}
    only = recommend([*results, unprojected], FidelityConfig(criterion="recall@5", threshold=0.995), ["a", "b"])
    assert only["setting"]["projection"] == "none" and only["best_projected"]["worst_task_value"] == 0.99
    none = recommend(results, FidelityConfig(criterion="recall@5", threshold=0.999), ["a", "b"])
    assert not none["met"] and none["best"]["worst_task_value"] == 0.99


def test_bad_recommendation_files_are_refused(tmp_path, capsys):
    bad = {
        "garbage.json": "{not json",
        "unmet.json": json.dumps({"met": False, "rule": "recall@5 >= 0.9 on every task"}),
        "foreign.json": json.dumps({"met": True, "config": {"run_dir": "/etc"}}),
        "typed.json": json.dumps({"met": True, "config": {"projection": {"kind": "sparse", "dim": 64, "evil": 1}}}),
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=name):
            read_recommendation(tmp_path / name)
    (tmp_path / "c.json").write_text(json.dumps({"pool": ["p.jsonl"], "targets": ["t.jsonl"]}))
    assert main(["run", str(tmp_path / "c.json"), "--dry-run", "--from-recommendation", str(tmp_path / "foreign.json")]) == 2
    assert "foreign.json" in capsys.readouterr().err


def test_fidelity_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="criterion"):
        FidelityConfig(criterion="recall@3")
    with pytest.raises(ConfigError, match="bootstrap above 0"):
        FidelityConfig(bound="low", bootstrap=0)
    with pytest.raises(ConfigError, match="ndcg_percent"):
        FidelityConfig(ndcg_percent=0)
    with pytest.raises(ConfigError, match="dims"):
        FidelityConfig(dims=(100,))
    with pytest.raises(ConfigError, match="kinds"):
        FidelityConfig(kinds=("none",))
    with pytest.raises(ConfigError, match="pool-gradient sgd"):
        FidelityConfig(kinds=("logra",))
    with pytest.raises(ConfigError, match="absmax: 3 bits"):
        FidelityConfig(formats=("absmax3",))
    with pytest.raises(ConfigError, match="sparse_nnz must be positive"):
        FidelityConfig(sparse_nnz=(0,))
    with pytest.raises(ConfigError, match="add sparse to --kinds"):
        FidelityConfig(kinds=("rademacher",), sparse_nnz=(1, 4))
    with pytest.raises(ConfigError, match="3 divides none of fidelity.dims"):
        FidelityConfig(dims=(64, 256), sparse_nnz=(1, 3))
    assert from_dict(FidelityConfig, {"percents": "1,2", "criterion": "recall@2"}).percents == (1.0, 2.0)
    assert FidelityConfig(model_dtypes=("bfloat16",)).dtypes == ["float32", "bfloat16"]
    with pytest.raises(ConfigError, match="config.json"):
        fidelity(tmp_path, progress=False)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        fidelity(tmp_path, progress=False)
