"""Tests of qless.evaluate: metric functions, agreement with lm-eval, the answer loss, the CLI.

Runs on a tiny random Llama and a small synthetic benchmark folder (the embedded benchmark's
file layout and fields), so nothing here needs the asset packages except the BBH evaluation-set
check (bigbench) and the slow integration test on the real SmolLM2.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import requires_assets, write_jsonl
from qless.cli import main
from qless.data import DataConfig, load_examples, tokenize_examples
from qless.embedded.heldout import MMLU_PROMPT
from qless.errors import ConfigError
from qless.evaluate import EvaluateConfig, evaluate, harness, loss, metrics
from qless.evaluate.tasks import write_mmlu, write_squad
from qless.models import ModelConfig
from utils import ANSWER_LOSS_RTOL, LOGLIKELIHOOD_ATOL

pytest.importorskip("lm_eval.evaluator", reason="qless evaluate needs the eval extra: pip install -e '.[eval]'")

LETTERS = "ABCD"
QUESTIONS = ["what is two plus two?", "hello world this is a test", "the answer is four", "is this physics?"]
CHOICES = [["four", "five", "six", "seven"], ["yes", "no", "maybe", "test"], ["one", "two", "three", "four"],
           ["yes", "no", "maybe", "small"]]


def _mmlu_row(subject: str, i: int, split: str) -> dict:
    q, choices = QUESTIONS[i % 4], CHOICES[i % 4]
    options = "\n".join(f"{LETTERS[j]}. {c}" for j, c in enumerate(choices))
    letter = LETTERS[(i * 3 + len(subject)) % 4]
    row = {"dataset": "mmlu", "id": f"mmlu_{split}/{subject}/{i}", "subtask": subject,
           "prompt": MMLU_PROMPT.format(subject=subject.replace("_", " "), question=q, options=options),
           "completion": f" {letter}"}
    return row | ({"choices": choices, "answer": letter} if split != "dev" else {})


def make_benchmark(root: Path, *, bbh: bool = True) -> Path:
    """A benchmark folder with the embedded benchmark's files and fields, small enough for a tiny model."""
    subjects = ["alpha_beta", "gamma"]
    write_jsonl(_mkdir(root / "eval") / "mmlu_test.jsonl", [_mmlu_row(s, i, "test") for s in subjects for i in range(3)])
    write_jsonl(_mkdir(root / "targets") / "mmlu.jsonl", [_mmlu_row(s, i, "dev") for s in subjects for i in range(5)])
    squad = []
    for i, (title, passage, answers) in enumerate([("Doc_A", "the answer is four", ["four", "the four"]),
                                                   ("Doc_A", "hello world", ["hello world"]),
                                                   ("Doc_B", "this is a small test", ["a small test", "test"])]):
        squad.append({"dataset": "squad", "id": f"squad/{i}", "subtask": title, "answers": answers,
                      "prompt": f"Passage: {passage}\nQuestion: what is it?\nAnswer:", "completion": " " + answers[0]})
    write_jsonl(root / "eval" / "squad.jsonl", squad)
    if bbh:
        rows = [("sports_understanding", 'Is the following sentence plausible? "Joe kicked the ball."', "yes"),
                ("sports_understanding", 'Is the following sentence plausible? "Ann threw a touchdown."', "no"),
                ("navigate", "If you follow these instructions, do you return to the starting point? Turn left.\n"
                 "Options:\n- Yes\n- No", "No")]
        write_jsonl(root / "eval" / "bbh.jsonl", [
            {"dataset": "bbh", "id": f"bbh_eval/{t}/{i}", "subtask": t, "input": q, "target": a,
             "prompt": f"Q: {q}\nA: Let's think step by step.\n", "completion": a} for i, (t, q, a) in enumerate(rows)])
    return root


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- metric functions, by hand


def test_choice_accuracy_from_known_loglikelihoods() -> None:
    scores = [[-1.0, -0.5, -3.0], [-2.0, -2.0, -9.0], [-0.1, -5.0, -0.2]]
    assert metrics.choice_accuracy(scores, [1, 0, 0]) == 1.0
    assert metrics.choice_accuracy(scores, [1, 1, 2]) == pytest.approx(1 / 3)  # the tie goes to option 0
    with pytest.raises(ValueError):
        metrics.choice_accuracy(scores, [0])


@pytest.mark.parametrize(("text", "answer"), [
    ("A is true. So the answer is (B).", "(B)"),
    ("So the answer is valid.\nQ: next question. So the answer is invalid.", "valid"),  # the first one counts
    ("so the answer is yes.", "yes"),
    ("Thus the answer is 12.", "12"),
    ("So the answer is (C)", "(C"),  # no final period: the last character goes, as in lm-eval
    ("So The Answer Is (A).", metrics.NO_ANSWER),  # case matters
    ("the answer is", metrics.NO_ANSWER),  # nothing after it
    ("no conclusion here", metrics.NO_ANSWER),
    ("So the answer is  ] } ].", "] } ]"),
])
def test_cot_answer_extraction(text: str, answer: str) -> None:
    assert metrics.extract_cot_answer(text) == answer


def test_qa_f1_and_exact_match_by_hand() -> None:
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]: P 1, R 2/3, F1 0.8
    assert metrics.qa_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert metrics.qa_f1("Paris!", "paris") == 1.0 and metrics.qa_exact_match("  The Paris. ", "paris") == 1.0
    assert metrics.qa_f1("london", "paris") == 0.0 and metrics.qa_exact_match("london", "paris") == 0.0
    assert metrics.qa_f1("«Paris»", "paris") == 1.0  # Unicode punctuation is removed too
    assert metrics.qa_f1("Paris—France", "paris france") == 0.0  # removed, not replaced by a space: "parisfrance"
    assert metrics.qa_f1("", "paris") == 0.0
    assert metrics.best_over_answers(metrics.qa_f1, "cat sat", ["dog", "the cat sat down"]) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        metrics.best_over_answers(metrics.qa_f1, "x", [])


# ---------------------------------------------------------------- agreement with lm-eval's own functions

GENERATIONS = ["Paris", "the Paris.", "«Paris»—France", "in 1887 and 1888", "  an  apple ", "", "Obama, Barack",
               "¿Qué?", "U.S.A.", "a cat sat on the mat"]
GOLD = [["Paris"], ["Paris", "France"], ["Paris, France"], ["1887"], ["apple", "an apple pie"], ["x"],
        ["Barack Obama"], ["qué"], ["USA"], ["the cat", "mat"]]


def test_qa_metrics_agree_with_lm_eval() -> None:
    from lm_eval.tasks.tydiqa.utils import process_results_en

    for generation, answers in zip(GENERATIONS, GOLD):
        theirs = process_results_en({"answers": answers}, [generation])
        assert metrics.best_over_answers(metrics.qa_f1, generation.strip(), answers) == theirs["f1"]
        assert metrics.best_over_answers(metrics.qa_exact_match, generation.strip(), answers) == float(theirs["exact_match"])


def test_cot_extraction_agrees_with_lm_eval_filter() -> None:
    from lm_eval.filters.extraction import RegexFilter

    from qless.evaluate.tasks import bbh_settings

    setting = bbh_settings()["sports_understanding"]
    step = setting["filter_list"][0]["filter"][0]
    assert step["function"] == "regex" and step["regex_pattern"] == metrics.COT_ANSWER.pattern
    texts = ["So the answer is yes.", "So the answer is (C)", "the answer is", "x. So the answer is  ] } ].\nmore",
             "So the answer is a. Then the answer is b.", "nothing"]
    theirs = RegexFilter(step["regex_pattern"]).apply([[t] for t in texts], [{}] * len(texts))
    assert [metrics.extract_cot_answer(t) for t in texts] == [r[0] for r in theirs]


# ---------------------------------------------------------------- the same tasks run both ways


@pytest.fixture(scope="module")
def tiny_lm(tiny_tokenizer):
    from conftest import make_tiny_llama

    model = make_tiny_llama(len(tiny_tokenizer))
    return model, harness.make_lm(model, tiny_tokenizer, batch_size=4)


def test_mmlu_accuracy_agrees_with_lm_eval(tmp_path, tiny_tokenizer, tiny_lm) -> None:
    model, lm = tiny_lm
    bench = make_benchmark(tmp_path / "bench", bbh=False)
    folder = _mkdir(tmp_path / "tasks")
    files = write_mmlu(bench, folder, split="test", shots=1, limit=0)
    summary, samples = harness.run(lm, folder, files)
    assert summary["n"] == 6 and set(summary["subtasks"]) == {"alpha_beta", "gamma"}
    ours, gold = [], []
    for s in samples:
        (context, _), *_ = s["arguments"]
        doc = s["doc"]
        row = next(r for r in files.rows if r["id"] == doc["id"])
        header = f"The following are multiple choice questions (with answers) about {doc['subtask'].replace('_', ' ')}.\n\n"
        shot = next(r for r in json.loads("[" + ",".join((bench / "targets/mmlu.jsonl").read_text().splitlines()) + "]")
                    if r["subtask"] == doc["subtask"])
        assert context == header + shot["prompt"][len(header):] + shot["completion"] + "\n\n" + row["prompt"][len(header):]
        assert len(tiny_tokenizer(context)["input_ids"]) < 500  # within the tiny model's positions: no truncation
        mine = [loss.continuation_loglikelihood(model, tiny_tokenizer, context, f" {letter}") for letter in LETTERS]
        np.testing.assert_allclose(mine, [r[0] for r in s["filtered_resps"]], atol=LOGLIKELIHOOD_ATOL, rtol=0)
        ours.append(mine)
        gold.append(LETTERS.index(row["answer"]))
    assert metrics.choice_accuracy(ours, gold) == summary["value"]
    for subject, value in summary["subtasks"].items():
        picked = [i for i, s in enumerate(samples) if s["doc"]["subtask"] == subject]
        assert metrics.choice_accuracy([ours[i] for i in picked], [gold[i] for i in picked]) == value["value"]


def test_squad_f1_agrees_with_lm_eval_run(tmp_path, tiny_lm) -> None:
    _, lm = tiny_lm
    bench = make_benchmark(tmp_path / "bench", bbh=False)
    folder = _mkdir(tmp_path / "tasks")
    files = write_squad(bench, folder, limit=0, max_new_tokens=6)
    summary, samples = harness.run(lm, folder, files)
    f1 = [metrics.best_over_answers(metrics.qa_f1, s["filtered_resps"][0].strip(), s["doc"]["answers"]) for s in samples]
    em = [metrics.best_over_answers(metrics.qa_exact_match, s["filtered_resps"][0].strip(), s["doc"]["answers"])
          for s in samples]
    assert [s["f1"] for s in samples] == f1 and summary["value"] == pytest.approx(sum(f1) / len(f1), abs=1e-12)
    assert summary["exact_match"]["value"] == pytest.approx(sum(em) / len(em), abs=1e-12)
    assert summary["subtasks"]["Doc_B"]["n"] == 1 and summary["subtasks"]["Doc_A"]["value"] == pytest.approx((f1[0] + f1[1]) / 2)


# ---------------------------------------------------------------- the answer loss


def test_answer_loss_matches_float64_loop(tmp_path, tiny_tokenizer) -> None:
    from conftest import make_tiny_llama

    bench = make_benchmark(tmp_path / "bench")
    examples = load_examples(bench / "eval" / "squad.jsonl") + load_examples(bench / "eval" / "bbh.jsonl")
    items, skipped = tokenize_examples(examples, tiny_tokenizer, DataConfig(), progress=False)
    assert not skipped and len({len(i.input_ids) for i in items}) > 1  # padding is exercised
    model = make_tiny_llama(len(tiny_tokenizer)).train()  # answer_losses must switch dropout off itself
    fast = loss.answer_losses(model, items, tiny_tokenizer.pad_token_id, batch_size=2, progress=False)
    reference = loss.answer_losses_reference(copy.deepcopy(model).double(), items)
    np.testing.assert_allclose(fast, reference, rtol=ANSWER_LOSS_RTOL)
    assert not model.training
    np.testing.assert_allclose(loss.answer_losses(model, items, tiny_tokenizer.pad_token_id, batch_size=5, progress=False),
                               reference, rtol=ANSWER_LOSS_RTOL)
    summary = loss.summarize_losses(items, fast)
    assert summary["n"] == len(items) and summary["value"] == pytest.approx(float(np.mean(fast)))
    assert summary["subtasks"]["Doc_A"]["n"] == 2 and math.isfinite(summary["subtasks"]["navigate"]["value"])


# ---------------------------------------------------------------- the whole command


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_model_dir):
    """One `qless evaluate` of the tiny model on every task (limit 1 per subtask), its output folder and exit code."""
    root = tmp_path_factory.mktemp("evaluate")
    bench = make_benchmark(root / "bench")
    out = root / "out"
    args = ["-q", "evaluate", "--benchmark", str(bench), "--out", str(out), "--model", str(tiny_model_dir),
            "--limit", "2", "--mmlu-shots", "1", "--bbh-max-new-tokens", "4", "--squad-max-new-tokens", "4",
            "--batch-size", "2"]
    return bench, out, args, main(args)


def test_cli_writes_eval_json_and_md(cli_run) -> None:
    _, out, _, code = cli_run
    assert code == 0
    report = json.loads((out / "eval.json").read_text())
    assert set(report["tasks"]) == {"mmlu", "bbh", "squad"} and not report["missing"]
    mmlu, bbh, squad = (report["tasks"][t] for t in ("mmlu", "bbh", "squad"))
    assert mmlu["n"] == 4 and set(mmlu["subtasks"]) == {"alpha_beta", "gamma"}  # the first 2 of each subject
    assert bbh["metric"] == "exact_match" and bbh["n"] == 3 and set(bbh["subtasks"]) == {"sports_understanding", "navigate"}
    assert squad["n"] == 3 and "exact_match" in squad and 0 <= squad["value"] <= 1
    for result in report["tasks"].values():
        assert result["answer_loss"]["n"] == result["n"] and result["answer_loss"]["value"] > 0
    assert report["settings"]["versions"]["lm_eval"] == "0.4.13" and report["adapter"] is None
    assert "| mmlu | acc |" in (out / "eval.md").read_text()
    assert len((out / "samples" / "bbh.jsonl").read_text().splitlines()) == 3
    import yaml  # the task files lm-eval read stay usable: their data files are where they say

    for path in (out / "lm_eval_tasks").rglob("qless_*.yaml"):
        config = yaml.safe_load(path.read_text().split("process_results:")[0])
        assert all(Path(f).is_file() for f in config.get("dataset_kwargs", {}).get("data_files", {}).values())


def test_cli_reuses_a_finished_result_and_refuses_other_settings(cli_run, capsys) -> None:
    _, out, args, _ = cli_run
    before = (out / "eval.json").read_bytes()
    assert main(args) == 0 and (out / "eval.json").read_bytes() == before
    assert main([*args, "--limit", "1"]) == 2
    assert "other settings" in capsys.readouterr().err and (out / "eval.json").read_bytes() == before


def test_interrupted_run_keeps_finished_targets(tmp_path, tiny_model_dir, monkeypatch) -> None:
    bench = make_benchmark(tmp_path / "bench", bbh=False)
    cfg = EvaluateConfig(tasks=("mmlu", "squad"), limit=1, mmlu_shots=1, squad_max_new_tokens=2, answer_loss=False)
    model = ModelConfig(model=str(tiny_model_dir))
    calls = []
    real_run = harness.run

    def run_then_stop(lm, folder, files):
        calls.append(files.target)
        if files.target == "squad" and calls.count("squad") == 1:
            raise KeyboardInterrupt
        return real_run(lm, folder, files)

    monkeypatch.setattr(harness, "run", run_then_stop)
    with pytest.raises(KeyboardInterrupt):
        evaluate(bench, tmp_path / "out", cfg, model, progress=False)
    assert (tmp_path / "out" / "parts" / "mmlu.json").is_file() and not (tmp_path / "out" / "eval.json").exists()
    report = evaluate(bench, tmp_path / "out", cfg, model, progress=False)
    assert calls == ["mmlu", "squad", "squad"] and set(report["tasks"]) == {"mmlu", "squad"}


def test_bbh_missing_runs_the_others_then_exits_2(tmp_path, tiny_model_dir, capsys) -> None:
    bench = make_benchmark(tmp_path / "bench", bbh=False)
    code = main(["-q", "evaluate", "--benchmark", str(bench), "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir),
                 "--tasks", "squad", "bbh", "--limit", "1", "--squad-max-new-tokens", "2", "--no-answer-loss"])
    err = capsys.readouterr().err
    assert code == 2 and "bigbench" in err and "pip install" in err
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert set(report["tasks"]) == {"squad"} and "bbh" in report["missing"]


@pytest.mark.parametrize("case", ["missing_file", "unknown_task", "bad_field"])
def test_bad_inputs_exit_2(tmp_path, tiny_model_dir, capsys, case) -> None:
    bench = make_benchmark(tmp_path / "bench", bbh=False)
    args = ["-q", "evaluate", "--benchmark", str(bench), "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir),
            "--limit", "1", "--tasks", "squad"]
    if case == "missing_file":
        (bench / "eval" / "squad.jsonl").unlink()
        expected = "squad.jsonl: no such file"
    elif case == "unknown_task":
        args += ["tydiqa"]
        expected = "'tydiqa'; choose from mmlu, bbh, squad"
    else:
        rows = [json.loads(line) for line in (bench / "eval" / "squad.jsonl").read_text().splitlines()]
        rows[1].pop("answers")
        write_jsonl(bench / "eval" / "squad.jsonl", rows)
        expected = "squad.jsonl:2: field 'answers' is missing"
    assert main(args) == 2
    assert expected in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out" / "eval.json").exists()


def test_adapter_of_another_base_model_exits_2(tmp_path, tiny_tokenizer, tiny_model_dir, capsys) -> None:
    import peft

    from conftest import make_tiny_gpt2

    bench = make_benchmark(tmp_path / "bench", bbh=False)
    other = peft.get_peft_model(make_tiny_gpt2(len(tiny_tokenizer)), peft.LoraConfig(r=2, target_modules=["c_attn"]))
    other.save_pretrained(tmp_path / "gpt2-adapter")
    args = ["-q", "evaluate", "--benchmark", str(bench), "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir),
            "--limit", "1", "--tasks", "squad", "--adapter"]
    assert main([*args, str(tmp_path / "gpt2-adapter")]) == 2
    assert "does not fit this base model" in " ".join(capsys.readouterr().err.split())
    # same architecture, but a qless record beside it names another model
    from conftest import make_tiny_llama

    same_shape = peft.get_peft_model(make_tiny_llama(len(tiny_tokenizer)), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    same_shape.save_pretrained(tmp_path / "warmup" / "checkpoint-1")
    (tmp_path / "warmup" / "warmup.json").write_text(json.dumps({"model": {"model": "other-model", "source": "other-model"}}))
    assert main([*args, str(tmp_path / "warmup" / "checkpoint-1")]) == 2
    assert "trained on another base model" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out" / "eval.json").exists()


def test_adapter_changes_the_model_and_is_identified(tmp_path, tiny_tokenizer, tiny_model_dir) -> None:
    import peft

    from conftest import make_tiny_llama

    bench = make_benchmark(tmp_path / "bench", bbh=False)
    lora = peft.get_peft_model(make_tiny_llama(len(tiny_tokenizer)), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)  # a trained adapter: B != 0
    lora.save_pretrained(tmp_path / "adapter")
    cfg = EvaluateConfig(tasks=("squad",), squad_max_new_tokens=2)
    model = ModelConfig(model=str(tiny_model_dir))
    base = evaluate(bench, tmp_path / "base", cfg, model, progress=False)
    tuned = evaluate(bench, tmp_path / "tuned", cfg, model, tmp_path / "adapter", progress=False)
    assert tuned["adapter"]["r"] == 2 and len(tuned["adapter"]["sha256"]) == 64
    assert tuned["tasks"]["squad"]["answer_loss"]["value"] != base["tasks"]["squad"]["answer_loss"]["value"]


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="choose from"):
        EvaluateConfig(tasks=("mmlu", "hellaswag"))
    with pytest.raises(ConfigError, match="twice"):
        EvaluateConfig(tasks=("mmlu", "mmlu"))
    with pytest.raises(ConfigError, match="mmlu_shots"):
        EvaluateConfig(mmlu_shots=6)
    with pytest.raises(ConfigError, match="limit"):
        EvaluateConfig(limit=-1)


# ---------------------------------------------------------------- the BBH evaluation set


@pytest.mark.skipif(importlib.util.find_spec("bigbench") is None, reason="needs the optional bigbench package (README: qless evaluate)")
@requires_assets
def test_bbh_eval_set_from_bigbench_is_clear_of_exemplars() -> None:
    from qless.embedded import heldout
    from qless.evaluate.tasks import bbh_settings

    held, report = heldout.bbh_eval()
    settings = bbh_settings()
    assert set(report["tasks"]) | set(report["without_items"]) == set(settings)
    exemplars = {heldout._question_key(t, s["input"]) for t, st in settings.items() for s in st["fewshot_config"]["samples"]}
    by_task: dict[str, list[dict]] = {}
    for item in held.items:
        row = item.row
        by_task.setdefault(row["subtask"], []).append(row)
        assert heldout._question_key(row["subtask"], row["input"]) not in exemplars
        if "\nOptions:\n(" in row["input"]:  # lettered options: the target is one of them
            letters = [line[1] for line in row["input"].split("\nOptions:\n")[1].splitlines()]
            assert row["target"][1] in letters and row["target"] == f"({row['target'][1]})"
    assert all(0 < len(rows) <= heldout.BBH_EVAL_PER_TASK for rows in by_task.values()) and len(by_task) == 24
    # the BIG-bench order puts the right date first; after the shuffle the letters are spread
    assert len({r["target"] for r in by_task["date_understanding"]}) >= 5
    assert sum(r["target"] == "(A)" for r in by_task["temporal_sequences"]) < len(by_task["temporal_sequences"]) / 2


def test_exemplar_question_key_ignores_option_order_except_for_stem_tasks() -> None:
    from qless.embedded.heldout import _question_key

    a = "Tomorrow is 11/12/2019. What is the date?\nOptions:\n(A) 01/02/2019\n(B) 11/11/2018"
    b = "Tomorrow is 11/12/2019.  What is the date?\nOptions:\n(A) 11/11/2018\n(B) 12/12/2019"
    assert _question_key("date_understanding", a) == _question_key("date_understanding", b)
    s1 = "Which statement is sarcastic?\nOptions:\n(A) Good job\n(B) Bad job"
    s2 = "Which statement is sarcastic?\nOptions:\n(A) Great work\n(B) Bad job"
    assert _question_key("snarks", s1) != _question_key("snarks", s2)
    assert _question_key("snarks", s1) == _question_key("snarks", s1.replace("(A) Good job\n(B) Bad job", "(A) Bad job.\n(B) Good job"))
    dyck = "Complete the rest of the sequence, making sure that the parentheses are closed properly. Input: [ {"
    assert _question_key("dyck_languages", dyck) != _question_key("dyck_languages", dyck.replace("[ {", "( <"))


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
@requires_assets
def test_real_smollm2_quick_run(tmp_path) -> None:
    from qless.embedded import BenchmarkConfig, build_benchmark

    bench = tmp_path / "bench"
    build_benchmark(bench, BenchmarkConfig(pool_size=50))
    report = evaluate(bench, tmp_path / "out", EvaluateConfig(tasks=("mmlu", "squad"), limit=1, mmlu_shots=1),
                      ModelConfig(model="embedded"), progress=False)
    assert report["tasks"]["mmlu"]["n"] == 57 and report["tasks"]["squad"]["n"] > 0
    assert 0 <= report["tasks"]["mmlu"]["value"] <= 1 and report["tasks"]["squad"]["answer_loss"]["value"] > 0
