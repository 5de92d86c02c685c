"""qless's own metric functions: plain Python, written from the tasks' definitions.

lm-evaluation-harness computes the reported numbers; these are the independent references the
tests hold it to (the task files qless writes must make lm-eval score what is claimed), and
what ``qless evaluate`` uses where lm-eval reports no per-subtask value (SQuAD's articles).

- Multiple choice (MMLU): the prediction is the option whose answer string (" A", " B", ...)
  has the highest log-likelihood after the prompt; ties go to the first option, as ``argmax``.
- BBH chain of thought: the answer is what follows the first "the answer is " on its line, less
  the line's last character (the closing period of "So the answer is (B)."), the convention of
  lm-eval's ``bbh/cot_fewshot`` filter; exact match against the target.
- Extractive QA: SQuAD's F1 and exact match after its normalisation (lower case, punctuation
  and English articles removed, whitespace collapsed), punctuation being every Unicode ``P*``
  character as in the MLQA / TyDiQA-GoldP evaluation scripts (a superset of ASCII punctuation);
  the best over all gold answers.
"""

from __future__ import annotations

import functools
import re
import string
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence

COT_ANSWER = re.compile(r"(?<=the answer is )(.*)(?=.)")
"""lm-eval's ``bbh/cot_fewshot`` answer pattern (``regex_pattern`` of its ``get-answer`` filter)."""
NO_ANSWER = "[invalid]"
"""What an unparseable generation is scored as (lm-eval's regex filter fallback): never a target."""


def choice_accuracy(loglikelihoods: Sequence[Sequence[float]], gold: Sequence[int]) -> float:
    """Fraction of items whose highest-log-likelihood option is the gold one.

    ``loglikelihoods[i][j]`` is log p(option j | prompt i) summed over the option's tokens;
    ``gold[i]`` the index of the correct option. The first of tied maxima is the prediction.
    """
    if len(loglikelihoods) != len(gold) or not gold:
        raise ValueError(f"need one gold index per item and at least one item, got {len(loglikelihoods)} and {len(gold)}")
    hits = 0
    for scores, answer in zip(loglikelihoods, gold):
        best = max(range(len(scores)), key=lambda j: (scores[j], -j))
        hits += best == answer
    return hits / len(gold)


def extract_cot_answer(generation: str) -> str:
    """The answer of a chain of thought that ends "So the answer is X.": ``X``.

    Only the first "the answer is " counts (later restatements are ignored); the match runs to
    the end of its line, drops that line's last character whatever it is (so an answer written
    without the final period loses its own last character, as in lm-eval) and is stripped of
    surrounding spaces. Returns :data:`NO_ANSWER` when there is no "the answer is " followed by
    at least one character on its line.
    """
    match = COT_ANSWER.search(generation)
    return match.group(1).strip() if match else NO_ANSWER


def cot_exact_match(generation: str, target: str) -> float:
    """1.0 if the extracted answer equals ``target`` exactly (case and spacing count), else 0.0."""
    return float(extract_cot_answer(generation) == target)


@functools.cache
def _punctuation() -> frozenset[str]:
    """Every Unicode punctuation character and ASCII's ``string.punctuation`` (built once, 0.3 s)."""
    return frozenset({chr(i) for i in range(sys.maxunicode + 1) if unicodedata.category(chr(i)).startswith("P")}
                     | set(string.punctuation))


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    punctuation = _punctuation()
    text = "".join(ch for ch in text.lower() if ch not in punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def qa_f1(prediction: str, gold: str) -> float:
    """Token F1 of the normalised prediction against one normalised gold answer (0 with no overlap)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_exact_match(prediction: str, gold: str) -> float:
    """1.0 if prediction and gold are equal after normalisation."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def best_over_answers(metric: Callable[[str, str], float], prediction: str, answers: Sequence[str]) -> float:
    """The best ``metric(prediction, a)`` over every gold answer ``a`` (SQuAD keeps all annotators')."""
    if not answers:
        raise ValueError("no gold answers to compare with")
    return max(metric(prediction, a) for a in answers)
