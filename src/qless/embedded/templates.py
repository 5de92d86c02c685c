"""Instruction templates that turn NLP and math datasets into FLAN-like and CoT-like chat turns.

LESS's pool mixes Flan v2 and its chain-of-thought collection, where every task is phrased
through several instruction templates. These are templates in that spirit, written per task:
each is a ``(user, assistant)`` pair of :meth:`str.format` strings over the fields that the task's
reader in :mod:`qless.embedded.pool` provides. One template is drawn per example with the seed,
so a task is not tied to one surface form. The whole table is recorded in the manifest.

Multiple-choice readers provide ``options_dashed`` ("- a\\n- b"), ``options_lettered``
("(A) a\\n(B) b"), ``options_inline`` ("a, b or c"), ``answer`` (the option's text) and
``letter`` (its letter).
"""

from __future__ import annotations

Template = tuple[str, str]

_MCQ: tuple[Template, ...] = (
    ("{question}\n\nOPTIONS:\n{options_dashed}", "{answer}"),
    ("Question: {question}\n{options_lettered}\nAnswer with the letter of the correct option.", "{letter}"),
    ("{question}\nPick the correct answer from the following: {options_inline}.", "The correct answer is {answer}."),
    ("Answer this multiple-choice question.\n\n{question}\n{options_lettered}", "({letter}) {answer}"),
)

_CLOSED_QA: tuple[Template, ...] = (
    ("Answer the following question. {question}", "{answer}"),
    ("Q: {question}\nA:", "{answer}"),
    ("Please answer this question: {question}", "The answer is {answer}."),
    ("Trivia question: {question}\nWhat is the answer?", "{answer}"),
)

FLAN_TEMPLATES: dict[str, tuple[Template, ...]] = {
    "arc_challenge": _MCQ,
    "arc_easy": _MCQ,
    "openbookqa": _MCQ,
    "commonsense_qa": _MCQ,
    "sciq": _MCQ,
    "boolq": (
        ("{passage}\n\nCan we conclude that {question}?\n\nOPTIONS:\n- no\n- yes", "{answer}"),
        ("Read the passage and answer the question with yes or no.\n\nPassage: {passage}\nQuestion: {question}?",
         "{answer}"),
        ("{passage}\n\nBased on the text above, {question}?", "{answer_sentence}"),
    ),
    "rte": (
        ("{premise}\n\nBased on the paragraph above can we conclude that \"{hypothesis}\"?\n\nOPTIONS:\n"
         "{options_dashed}", "{answer}"),
        ("Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the hypothesis?\n{options_dashed}",
         "{answer}"),
        ("{premise}\nQuestion: Does this imply that \"{hypothesis}\"? {options_inline}", "{answer}"),
    ),
    "cb": (
        ("{premise}\n\nBased on the paragraph above can we conclude that \"{hypothesis}\"?\n\nOPTIONS:\n"
         "{options_dashed}", "{answer}"),
        ("Premise: {premise}\nHypothesis: {hypothesis}\nIs the hypothesis entailed by the premise?\n"
         "{options_dashed}", "{answer}"),
        ("Read the text and decide whether the sentence below follows from it.\n\n{premise}\n\n"
         "Sentence: {hypothesis}\nOptions: {options_inline}", "{answer}"),
    ),
    "mrpc": (
        ("Do the following two sentences mean the same thing?\n{sentence1}\n{sentence2}\n\nOPTIONS:\n- no\n- yes",
         "{answer}"),
        ("Sentence 1: {sentence1}\nSentence 2: {sentence2}\nAre these two sentences paraphrases of each other?",
         "{answer}"),
        ("\"{sentence1}\"\n\"{sentence2}\"\nDo these two sentences say the same thing? Answer yes or no.",
         "{answer}"),
    ),
    "sst2": (
        ("Review: {sentence}\nIs this movie review sentence negative or positive?\nOPTIONS:\n- negative\n- positive",
         "{answer}"),
        ("What is the sentiment of the following sentence?\n{sentence}", "{answer}"),
        ("\"{sentence}\"\nHow would the sentiment of this sentence be perceived?", "The sentiment is {answer}."),
    ),
    "copa": (
        ("{premise} What was the {question}?\n\nOPTIONS:\n{options_dashed}", "{answer}"),
        ("Premise: {premise}\nWhat is the more likely {question}?\n{options_lettered}", "({letter}) {answer}"),
        ("Choose the more plausible {question} of the following situation.\n\"{premise}\"\nOptions: "
         "{options_inline}", "{answer}"),
    ),
    "piqa": (
        ("Goal: {goal}\n\nWhich of the following methods is more reasonable for accomplishing this goal?\n\n"
         "OPTIONS:\n{options_dashed}", "{answer}"),
        ("How would someone do this: {goal}\n{options_lettered}", "({letter}) {answer}"),
        ("{goal}\nChoose the better solution:\n{options_dashed}", "{answer}"),
    ),
    "hellaswag": (
        ("What happens next?\n\n{context}\n\nOPTIONS:\n{options_dashed}", "{answer}"),
        ("{activity}: {context}\nHow does the description most likely continue?\n{options_lettered}",
         "({letter}) {answer}"),
        ("Complete the following text with the most plausible ending.\n\n{context}", "{answer}"),
    ),
    "winogrande": (
        ("Fill in the blank.\n\n{sentence}\n\nOPTIONS:\n{options_dashed}", "{answer}"),
        ("{sentence}\nWhich option best replaces the _ in the sentence above? {options_inline}", "{answer}"),
        ("Complete the sentence by choosing the right word for the blank.\n{sentence}\n{options_lettered}",
         "{completed}"),
    ),
    "social_iqa": (
        ("{context}\n\nQuestion: {question}\n\nOPTIONS:\n{options_dashed}", "{answer}"),
        ("Context: {context}\nQuestion: {question}\nWhich one of these answers best answers the question "
         "according to the context?\n{options_lettered}", "({letter}) {answer}"),
        ("{context}\n\nGiven the context: {question}", "{answer}"),
    ),
    "trivia_qa": _CLOSED_QA,
    "nq_open": _CLOSED_QA,
}
"""FLAN-like task -> its templates."""

COT_TEMPLATES: dict[str, tuple[Template, ...]] = {
    "gsm8k": (
        ("{question}", "{reasoning}\nThe answer is {answer}."),
        ("Solve the following math problem step by step.\n{question}", "{reasoning}\nSo the answer is {answer}."),
        ("Q: {question}\nA: Let's think step by step.", "{reasoning}\nTherefore, the answer is {answer}."),
        ("Question: {question}\nGive your reasoning before the final answer.", "{reasoning}\nFinal answer: {answer}"),
    ),
    "math": (
        ("{problem}", "{solution}"),
        ("Solve the following problem. Show your work.\n\n{problem}",
         "{solution}\nThe final answer is ${answer}$."),
        ("Problem:\n{problem}\n\nSolution:", "{solution}"),
        ("Work out the answer to this {subject} problem step by step.\n{problem}", "{solution}"),
    ),
}
"""Chain-of-thought task -> its templates (the assistant turn carries the worked solution)."""


def render(template: Template, fields: dict[str, str]) -> tuple[str, str]:
    """The (user, assistant) texts of ``template`` filled with ``fields``, stripped."""
    user, assistant = template
    return user.format(**fields).strip(), assistant.format(**fields).strip()
