"""The model's loss on held-out answers, and the log-likelihood of an answer after a prompt.

Answer loss is computed the way qless trains and extracts: examples tokenized by
:func:`qless.data.tokenize_examples` (labels ``-100`` on the prompt), the loss taken on the
completion tokens only (in the ``less`` template also the end-of-turn token). An example's loss
is the mean negative log-likelihood (nats per token) over its labelled tokens; a subtask's is the
mean over its examples, and a task's the mean over all its examples.

:func:`answer_losses` runs batches (right-padded, sorted by length so that little is padding,
the model in eval mode); :func:`answer_losses_reference` is the obvious loop, one example at a
time on a float64 copy of the model, that the tests hold it to.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from qless.console import progress_bar
from qless.data import IGNORE_INDEX, Tokenized, collate


@torch.no_grad()
def answer_losses(model: Any, items: Sequence[Tokenized], pad_token_id: int, *, batch_size: int = 8,
                  progress: bool = True) -> np.ndarray:
    """Mean completion-token NLL of each item, ``[len(items)]`` float64, in the items' order.

    Logits are upcast to float32 before the log-softmax; the model is put in eval mode (dropout
    off) and left there.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    out = np.zeros(len(items), dtype=np.float64)
    starts = range(0, len(order), batch_size)
    for start in progress_bar(starts, enabled=progress, desc="answer loss", unit="batch", leave=False):
        index = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([items[i] for i in index], pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                                reduction="none")  # [B, T-1]
        counts = (labels != IGNORE_INDEX).sum(1)
        out[index] = (nll.sum(1).double() / counts.double()).cpu().numpy()
    return out


@torch.no_grad()
def answer_losses_reference(model64: Any, items: Sequence[Tokenized]) -> np.ndarray:
    """:func:`answer_losses` one example at a time, no padding, on a float64 model, summing each
    labelled token's ``-log_softmax`` explicitly."""
    model64.eval()
    out = np.zeros(len(items), dtype=np.float64)
    for row, item in enumerate(items):
        ids = torch.tensor([item.input_ids])
        logp = torch.log_softmax(model64(input_ids=ids).logits[0].double(), dim=-1)
        terms = [-float(logp[t - 1, label]) for t, label in enumerate(item.labels) if t > 0 and label != IGNORE_INDEX]
        out[row] = sum(terms) / len(terms)
    return out


def summarize_losses(items: Sequence[Tokenized], losses: np.ndarray) -> dict[str, Any]:
    """``{"value": mean over examples, "n", "subtasks": {subtask: {"value", "n"}}}``."""
    by_subtask: dict[str, list[float]] = defaultdict(list)
    for item, loss in zip(items, losses):
        by_subtask[item.example.subtask or "(none)"].append(float(loss))
    return {
        "value": float(np.mean(losses)) if len(losses) else math.nan,
        "n": len(losses),
        "subtasks": {s: {"value": float(np.mean(v)), "n": len(v)} for s, v in sorted(by_subtask.items())},
    }


@torch.no_grad()
def continuation_loglikelihood(model: Any, tokenizer: Any, context: str, continuation: str) -> float:
    """log p(continuation | context), summed over the continuation's tokens, in float64 logits.

    Tokenized as lm-evaluation-harness does for causal models: trailing spaces of the context
    move to the continuation, the whole text is encoded once and split at the length of the
    context's own encoding (no special tokens added).
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    split = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([whole[:-1]], device=device)).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[t - 1, whole[t]] for t in range(split, len(whole))))
