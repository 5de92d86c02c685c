"""qless compare on a tiny random model and a toy benchmark in the embedded layout: every row of the
table, the statistics over seeds against the evaluations on disk, resuming without redoing work,
refusals with exit code 2, and the self-contained HTML report."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from conftest import toy_pool, write_jsonl, write_store
from qless.cli import main
from qless.compare import Setting, _stats, _summarize, build_compare_config, fmt_stat
from qless.errors import ConfigError, OutputError
from qless.report_html import bin_occupancy, render_page
from qless.selection import SelectConfig

HEADER = "The following are multiple choice questions (with answers) about {s}.\n\n"


def _mmlu(split, i, subject):
    return {"dataset": "mmlu", "id": f"mmlu_{split}/{subject}/{i}", "subtask": subject,
            "prompt": HEADER.format(s=subject) + f"what is {i} plus two?\nA. one\nB. two\nC. four\nD. maybe\nAnswer:",
            "completion": " C", "choices": ["one", "two", "four", "maybe"], "answer": "C"}


def _squad(i, article):
    return {"dataset": "squad", "id": f"squad/{article}/{i}", "subtask": article, "answers": ["four", "4"],
            "prompt": f"Answer the question.\n\nPassage: the answer is four ({i}).\nQuestion: what is it?\nAnswer:",
            "completion": " four"}


def _bbh(i, split):
    return {"dataset": "bbh", "id": f"{split}/boolean_expressions/{i}", "subtask": "boolean_expressions",
            "prompt": f"Q: not True and {i % 2 == 0} is\nA: Let's think step by step.", "completion": " So the answer is False.",
            "input": f"not True and {i % 2 == 0} is", "target": "False"}


def toy_benchmark(root, pool_size=30, bbh_eval=True):
    """A benchmark folder in the embedded layout: pool.jsonl, targets/, eval/, manifest.json."""
    (root / "targets").mkdir(parents=True)
    (root / "eval").mkdir()
    write_jsonl(root / "pool.jsonl", toy_pool(pool_size))
    write_jsonl(root / "targets" / "mmlu.jsonl", [_mmlu("dev", i, s) for s in ("physics", "world") for i in range(5)])
    write_jsonl(root / "eval" / "mmlu_test.jsonl", [_mmlu("test", i, s) for s in ("physics", "world") for i in range(2)])
    write_jsonl(root / "targets" / "squad.jsonl", [_squad(i, a) for a in ("Alps", "Nile") for i in range(2)])
    write_jsonl(root / "eval" / "squad.jsonl", [_squad(10 + i, a) for a in ("Alps", "Nile") for i in range(2)])
    write_jsonl(root / "targets" / "bbh.jsonl", [_bbh(i, "bbh") for i in range(3)])
    if bbh_eval:
        write_jsonl(root / "eval" / "bbh.jsonl", [_bbh(i, "bbh_eval") for i in range(2)])
    sources = {"flan": "flan", "chat": "chat", "cot": "cot"}
    (root / "manifest.json").write_text(json.dumps({"format": "qless-embedded-benchmark", "pool": {
        "sources": {s: {"kind": k} for s, k in sources.items()}}}))
    return root


def _args(bench, out, model, *extra):
    # overrides last, in one block (a list flag before them hands them back)
    flags, overrides = [x for x in extra if "=" not in x], [x for x in extra if "=" in x]
    return ["-q", "compare", "--benchmark", str(bench), "--out", str(out), "--preset", "cpu", *flags,
            f"model.model={model}", "adapter.r=4", "adapter.alpha=16", "warmup.percent=40", "warmup.batch_size=4",
            "warmup.learning_rate=1e-3", "projection.dim=128", "extract.chunk_size=16", "evaluate.limit=1",
            "evaluate.mmlu_shots=1", "evaluate.bbh_max_new_tokens=4", "evaluate.squad_max_new_tokens=4",
            "evaluate.batch_size=4", *overrides]


def _mtimes(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _counting(monkeypatch, module, name, calls):
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def test_compare_every_row_resume_and_report(tmp_path, tiny_model_dir, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    import qless.evaluate.harness as harness
    import qless.training as training

    bench, out = toy_benchmark(tmp_path / "bench"), tmp_path / "cmp"
    args = _args(bench, out, tiny_model_dir, "--settings", "random", "rds", "sign1", "--seeds", "0", "1",
                 "--targets", "mmlu", "squad", "--percents", "10", "warmup.epochs=1")  # one checkpoint; fine-tunes of 1 epoch
    calls: list[str] = []
    _counting(monkeypatch, harness, "run", calls)
    _counting(monkeypatch, training, "Trainer", calls)
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "compare.json").read_text())

    # every setting has a row with each target's metric, the average and the answer loss
    assert [r["setting"] for r in result["rows"]] == ["random", "rds", "sign1"]
    for row in result["rows"]:
        assert set(row["tasks"]) == {"mmlu", "squad"} and row["percent"] == 10
        for t in ("mmlu", "squad"):
            assert 0 <= row["tasks"][t]["mean"] <= 1 and np.isfinite(row["tasks"][t]["answer_loss"]["mean"])
        seeded = row["setting"] == "random"
        assert row["n"] == (2 if seeded else 1) and (row["average"]["std"] is not None) == seeded
        assert row["seconds"]["training"] > 0 and row["seconds"]["evaluation"] > 0
        assert row["label"] in printed
    # statistics over seeds recomputed from the two fine-tunes' own eval.json files
    random = result["rows"][0]
    for t in ("mmlu", "squad"):
        values = []
        for key in random["units"]:
            (folder,) = (out / "units" / key / "eval").glob(f"{t}-*")
            values.append(json.loads((folder / "eval.json").read_text())["tasks"][t]["value"])
        assert random["tasks"][t]["mean"] == pytest.approx(np.mean(values))
        assert random["tasks"][t]["std"] == pytest.approx(np.std(values, ddof=1))
    # what each selector stores per example: one checkpoint of k / 8 + 4 bytes at 1 bit; RDS+ one fp32 hidden state
    assert {r["setting"]: r["bytes_per_example"] for r in result["rows"]} == {
        "random": 0, "rds": 32 * 4 + 4, "sign1": 128 // 8 + 4}
    assert json.loads((out / "units" / random["units"][0] / "train" / "train.json").read_text())["settings"]["train"][
        "epochs"] == 1  # the warmup's recipe
    assert result["base"]["n"] == 1 and set(result["base"]["tasks"]) == {"mmlu", "squad"}
    # the table: a row per setting and the base model, mean ± std for random only
    md = (out / "compare.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and " | 10 | " in line]
    assert len(table) >= 3 and any("Random" in line and "±" in line for line in table)
    assert not any("±" in line for line in table if "Random" not in line)
    assert "Base model" in md

    # the HTML page: self-contained, every section present
    page = (out / "compare.html").read_text()
    for section in ("Comparison", "What each selector cost", "Source composition", "Overlap between", "Scores and examples",
                    "Which subtask chose", "Provenance", "Quantization-bin occupancy"):
        assert section in page, section
    images = re.findall(r"<img [^>]*src=\"([^\"]*)\"", page)
    assert len(images) >= 8 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "<link" not in page and "<script" not in page

    # a second run reuses everything: no training, no evaluation, no file rewritten under the work folders
    before = {d: _mtimes(out / d) for d in ("warmup", "grads", "represent", "units", "base")}
    assert calls.count("Trainer") >= 4 and calls.count("run") >= 8
    calls.clear()
    assert main(args) == 0
    assert calls == [] and {d: _mtimes(out / d) for d in before} == before
    assert json.loads((out / "compare.json").read_text())["rows"] == result["rows"]


@pytest.mark.slow
def test_compare_the_paper_settings_sweep_and_a_new_setting(tmp_path, tiny_model_dir, monkeypatch):
    """Every default setting, all three targets, two percentages; then one more setting trains only its own units."""
    pytest.importorskip("lm_eval")
    import qless.training as training

    bench, out = toy_benchmark(tmp_path / "bench"), tmp_path / "cmp"
    assert main(_args(bench, out, tiny_model_dir, "--seeds", "0", "1", "--percents", "10", "20")) == 0
    result = json.loads((out / "compare.json").read_text())
    settings = ["random", "balanced", "rds", "fp16", "absmax8", "absmax4", "absmax2", "absmean8", "absmean4", "absmean2", "sign1"]
    assert [(r["setting"], r["percent"]) for r in result["rows"]] == [(s, p) for p in (10, 20) for s in settings]
    assert all(set(r["tasks"]) == {"mmlu", "bbh", "squad"} for r in result["rows"])
    assert (out / "figures" / "sweep.png").stat().st_size > 1000 and (out / "figures" / "bins.png").stat().st_size > 1000
    calls: list[str] = []
    _counting(monkeypatch, training, "Trainer", calls)
    stable = {d: _mtimes(out / d) for d in ("warmup", "represent", "base")}
    assert main(_args(bench, out, tiny_model_dir, "--settings", *settings, "fp32", "--seeds", "0", "1",
                      "--percents", "10", "20")) == 0
    assert len(calls) <= 6 and {d: _mtimes(out / d) for d in stable} == stable  # fp32's 3 targets x 2 percents at most


def test_bad_config_is_refused_with_exit_2(tmp_path, tiny_model_dir, capsys):
    bench = toy_benchmark(tmp_path / "bench", bbh_eval=False)
    cases = [
        (["--settings", "random", "absmean5"], "absmean5"),
        (["--settings", "random", "random"], "twice"),
        (["--settings", "absmean4@int4"], "int4"),
        (["--seeds", "1", "1"], "seeds"),
        (["--percents", "0"], "percents"),
        (["--targets", "tydiqa"], "tydiqa"),
        (["score.method=lorif"], "score.method"),
        (["evaluate.limit=-1"], "limit"),
        (["warmup.epochs=0"], "epochs"),
    ]
    for extra, needle in cases:
        assert main(_args(bench, tmp_path / "out", tiny_model_dir, "--dry-run", *extra)) == 2, extra
        assert needle in capsys.readouterr().err, extra
    # found when running, before any work: a missing benchmark, BBH without its evaluation set
    assert main(_args(tmp_path / "nowhere", tmp_path / "out", tiny_model_dir, "--targets", "mmlu")) == 2
    assert "qless data build" in capsys.readouterr().err
    assert main(_args(bench, tmp_path / "out", tiny_model_dir, "--targets", "bbh")) == 2
    assert "bigbench" in capsys.readouterr().err and not (tmp_path / "out").exists()
    config = tmp_path / "compare.yaml"
    config.write_text("benchmark: x\nsettngs: [random]\n")
    assert main(["compare", "--config", str(config), "--dry-run"]) == 2
    assert "settngs" in capsys.readouterr().err


def test_config_file_flags_and_train_recipe(tmp_path, capsys):
    config = tmp_path / "compare.yaml"
    config.write_text("preset: cpu\nbenchmark: bench\nwarmup: {epochs: 3, learning_rate: 0.001}\ntrain: {epochs: 1}\n")
    assert main(["compare", "--config", str(config), "--dry-run", "--settings", "random", "fp16@nf4", "evaluate.limit=2"]) == 0
    import yaml

    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["settings"] == ["random", "fp16@nf4"] and cfg["evaluate"]["limit"] == 2
    # the fine-tune takes the warmup's recipe (as the paper) unless its own section says otherwise
    assert cfg["train"]["learning_rate"] == 0.001 and cfg["train"]["epochs"] == 1 and cfg["adapter"]["r"] == 8
    built = build_compare_config({"benchmark": "b", "settings": ["absmean4-global", "sign1@int8"]}, preset="cpu")
    assert built.precisions() == ["none", "int8"]
    assert built.extract_config("none").formats == ("fp32", "absmean4-global")  # global formats derive from fp32
    with pytest.raises(ConfigError, match="benchmark"):
        build_compare_config({}, preset="cpu")


def test_settings_parse_and_label():
    assert Setting.parse("fp16").label == "LESS (fp16)"
    assert Setting.parse("absmax2").label == "QLESS absmax 2-bit"
    s = Setting.parse("sign1@nf4")
    assert (s.kind, s.format, s.precision, s.label) == ("gradient", "sign1", "nf4", "QLESS sign 1-bit, nf4 model")
    assert Setting.parse("random").seeded and not Setting.parse("rds").seeded
    for text, name, fmt, precision in (("lorif", "lorif", "fp16", "none"), ("lorif-fp16", "lorif", "fp16", "none"),
                                       ("lorif-sign1@int8", "lorif-sign1@int8", "sign1", "int8")):
        s = Setting.parse(text)
        assert (s.name, s.kind, s.format, s.precision, s.stored) == (name, "lorif", fmt, precision, True)
    assert Setting.parse("lorif-absmax8").label == "LoRIF (absmax8 factors)"
    with pytest.raises(ConfigError, match="lorif-bogus"):
        Setting.parse("lorif-bogus")


def test_compare_lorif_rows(tmp_path, tiny_model_dir, monkeypatch):
    """LoRIF as settings of the comparison: its own extraction of plain-gradient factor stores, a curvature per
    format, influence scores equal to `qless score --method lorif` on them, and rows in the table."""
    pytest.importorskip("lm_eval")
    from qless.scoring import read_scores
    from qless.stages import run_score

    bench, out = toy_benchmark(tmp_path / "bench"), tmp_path / "cmp"
    args = _args(bench, out, tiny_model_dir, "--settings", "fp16", "lorif", "lorif-sign1", "--targets", "squad",
                 "--percents", "10", "--no-base-model", "warmup.epochs=1", "lorif.side=8", "lorif.rank=2",
                 "curvature.rank=6", "lorif.normalize=cosine")
    assert main(args) == 0
    result = json.loads((out / "compare.json").read_text())
    rows = {r["setting"]: r for r in result["rows"]}
    assert set(rows) == {"fp16", "lorif", "lorif-sign1"}
    for name, fmt in (("lorif", "fp16"), ("lorif-sign1", "sign1")):
        row = rows[name]
        assert row["kind"] == "lorif" and 0 <= row["tasks"]["squad"]["mean"] <= 1
        assert row["seconds"]["curvature"] > 0 and row["seconds"]["extraction"] > 0
        grads = out / "lorif" / "none" / "grads" / fmt
        manifest = json.loads((grads / "pool" / "checkpoint-1" / "manifest.json").read_text())
        assert manifest["projection"]["kind"] == "lorif" and manifest["gradient"] == "sgd"
        curvature = out / "lorif" / "none" / "curvature" / fmt
        assert json.loads((curvature / "checkpoint-1" / "curvature.json").read_text())["rank"] == 6
        scores, values, _ = read_scores(out / "scores" / name)
        assert scores["config"]["method"] == "lorif" and scores["config"]["normalize"] == "cosine"
        from qless.config import from_dict
        from qless.scoring import ScoreConfig

        again = run_score([grads / "pool"], [grads / "squad"], tmp_path / f"again-{name}",
                          from_dict(ScoreConfig, scores["config"], "scores"), progress=False)
        assert (read_scores(again["path"])[1] == values).all()
    # bytes per example: 12 layers... whatever the layout, c (k_out + k_in) numbers per layer, fewer at 1 bit
    assert 0 < rows["lorif-sign1"]["bytes_per_example"] < rows["lorif"]["bytes_per_example"]
    # the LESS store of the same run is untouched by the LoRIF pass, and the page names LoRIF's settings
    assert json.loads((out / "grads" / "none" / "fp16" / "pool" / "checkpoint-1" / "manifest.json").read_text())[
        "gradient"] == "adam"
    page = (out / "compare.html").read_text()
    assert "LoRIF (fp16 factors)" in page and "rank-2 factors" in page


def test_statistics_by_hand():
    # two seeds: mean 0.6, sample standard deviation sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.1414
    s = _stats([0.5, 0.7])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.02 ** 0.5) and s["n"] == 2
    assert _stats([0.4])["std"] is None and fmt_stat(_stats([0.4])) == "40.0"
    assert fmt_stat(s) == "60.0 ± 14.1" and fmt_stat(_stats([None])) == "n/a"
    # the average over targets is taken per seed, then over seeds
    seeds = [{"a": {"metric": "acc", "value": 0.2, "answer_loss": 1.0}, "b": {"metric": "f1", "value": 0.6, "answer_loss": 3.0}},
             {"a": {"metric": "acc", "value": 0.4, "answer_loss": 2.0}, "b": {"metric": "f1", "value": 0.4, "answer_loss": 2.0}}]
    row = _summarize(seeds, ["a", "b"])
    assert row["average"]["values"] == pytest.approx([0.4, 0.4]) and row["average"]["std"] == pytest.approx(0.0)
    assert row["answer_loss"]["mean"] == pytest.approx(2.0) and row["tasks"]["a"]["mean"] == pytest.approx(0.3)


@pytest.mark.parametrize("tag", ["absmax2", "absmean4", "absmax8", "sign1"])
def test_bin_occupancy_counts_the_integer_codes(tmp_path, tag):
    """Bin shares read from a store's packed bytes equal a histogram of the quantizer's integer codes."""
    from qless.quantize import QuantizerSpec, compute_scale, integer_codes
    from qless.store import Datastore

    spec = QuantizerSpec.parse(tag)
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(0)) ** 3  # heavy tails: absmax's zero bin fills
    store = Datastore.open(write_store(tmp_path / tag, x, spec))
    occ = bin_occupancy(store, max_rows=40)
    q = integer_codes(x[:40].double(), spec, compute_scale(x[:40].double(), spec)).numpy().ravel()
    expected = {c: np.mean(q == c) for c in occ["codes"]}
    assert occ["rows"] == 40 and occ["coordinates"] == 40 * 64
    assert occ["share"] == pytest.approx([expected[c] for c in occ["codes"]])
    if spec.method == "sign":
        assert occ["codes"] == [-1, 1]
    else:
        assert occ["codes"] == list(range(-spec.alpha, spec.alpha + 1))


def test_page_embeds_images_and_refuses_missing_ones(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    fig.savefig(tmp_path / "a.png")
    plt.close(fig)
    page = render_page("# t\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![plot](a.png)\n", tmp_path, "t")
    assert "<table>" in page and '<img src="data:image/png;base64,' in page and "a.png" not in page.split("alt=")[0]
    with pytest.raises(OutputError, match="missing.png"):
        render_page("![x](missing.png)", tmp_path, "t")
    with pytest.raises(OutputError, match="http"):
        render_page("![x](http://example.com/x.png)", tmp_path, "t")


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    """Chat text may hold U+2028/U+2029, which str.splitlines() would split a record at."""
    from qless.compare import read_jsonl

    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "one\u2028two\u2029three"}, {"text": "x"}])
    assert read_jsonl(path) == [{"text": "one\u2028two\u2029three"}, {"text": "x"}]


def test_run_report_is_also_one_html_page(tmp_path):
    """`qless report` (write_report) writes report.html beside report.md, every plot embedded."""
    from qless.report import write_report
    from qless.stages import run_score, run_select

    rng = np.random.default_rng(0)
    pool = [{"source": ["flan", "cot"][i % 2], "id": str(i)} for i in range(40)]
    target = [{"source": "mmlu", "id": f"t{i}", "subtask": f"s{i % 2}"} for i in range(6)]
    scores = {}
    for tag in ("fp32", "sign1"):
        write_store(tmp_path / tag / "pool", rng.standard_normal((40, 64)), tag, rows=pool)
        write_store(tmp_path / tag / "mmlu", rng.standard_normal((6, 64)), tag, rows=target, gradient="sgd")
        run_score([tmp_path / tag / "pool"], [tmp_path / tag / "mmlu"], tmp_path / "scores" / tag)
        scores[tag] = tmp_path / "scores" / tag
    run_select(scores["sign1"], tmp_path / "selected" / "mmlu", SelectConfig(percent=10))
    write_report(tmp_path / "report", scores, "sign1", {"mmlu": tmp_path / "selected" / "mmlu"}, None, 10, 64)
    page = (tmp_path / "report" / "report.html").read_text()
    images = re.findall(r"<img [^>]*src=\"([^\"]*)\"", page)
    assert len(images) == len(list((tmp_path / "report").glob("*.png"))) >= 3
    assert all(src.startswith("data:image/png;base64,") for src in images) and "<table>" in page
