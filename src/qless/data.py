"""Instruction data: load records, render conversations, tokenize with a response-only loss.

Records come in the tulu / open-instruct form ``{"dataset", "id", "messages": [{"role",
"content"}, ...]}`` or as ``{"prompt", "completion"}`` (read as one user and one assistant turn),
from a ``.jsonl`` / ``.json`` file, a ``datasets.save_to_disk`` folder or a Hub dataset id.
Every record becomes an :class:`Example` that keeps the raw record (selections are written back
in the pool's own format) and its origin (``file:line``) for error messages.

Tokenization renders a conversation either in LESS's format or with the tokenizer's own chat
template and takes the loss on assistant tokens only: a token is labelled iff its first
character lies inside an assistant span. Gradients are taken of that loss, so the mask decides
what "similar" means for selection; it is built from character offsets of one tokenization of
the whole text, never by re-tokenizing pieces (which can split tokens differently).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from qless.config import Config, option
from qless.console import progress_bar
from qless.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of tokens that take no loss (PyTorch's cross-entropy default ``ignore_index``)."""
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class DataConfig(Config):
    """How records are rendered, cut to length, and what happens to malformed ones."""

    section = "data"

    template: Literal["less", "chat_template"] = option(
        "less",
        "conversation format: 'less' (<|user|>/<|assistant|> headers, as LESS and open-instruct) "
        "or 'chat_template' (the tokenizer's own chat template)",
    )
    max_length: int = option(2048, "maximum tokens per example; longer examples are cut")
    truncation: Literal["right", "left"] = option(
        "right", "which end of an over-long example is cut: right (LESS) or left (keeps the final response, "
        "e.g. for few-shot targets whose long prompt would otherwise leave no response token)"
    )
    on_bad_record: Literal["error", "skip"] = option(
        "error", "a malformed record: 'error' stops with its file and line, 'skip' logs it and leaves it out"
    )

    def validate(self) -> None:
        if self.template not in ("less", "chat_template"):
            raise ConfigError(f"template: {self.template!r} is not one of 'less', 'chat_template'")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1:
            raise ConfigError(f"max_length: expected a positive integer, got {self.max_length!r}")
        if self.truncation not in ("right", "left"):
            raise ConfigError(f"truncation: {self.truncation!r} is not one of 'right', 'left'")
        if self.on_bad_record not in ("error", "skip"):
            raise ConfigError(f"on_bad_record: {self.on_bad_record!r} is not one of 'error', 'skip'")


@dataclass(frozen=True)
class Example:
    """One instruction example. ``(source, id)`` identifies it across the whole pipeline."""

    source: str
    id: str
    messages: tuple[tuple[str, str], ...]  # (role, content), role in ROLES
    subtask: str | None
    record: Mapping[str, Any] = field(hash=False, repr=False)  # the raw record exactly as read
    origin: str  # "file.jsonl:LINE" or "dataset[split]#INDEX"


@dataclass
class Tokenized:
    """Token ids of one example; ``labels`` is ``IGNORE_INDEX`` where no loss is taken."""

    example: Example
    input_ids: list[int]
    labels: list[int]
    truncated: bool


@dataclass(frozen=True)
class Skipped:
    """An example left out of tokenization, with the reason."""

    example: Example
    reason: str


class _BadRecord(Exception):
    """A record-level problem; becomes a DataError at its origin, or a logged skip."""


# --------------------------------------------------------------------------- loading


def load_examples(
    spec: str | Path, *, source: str | None = None, split: str = "train", cfg: DataConfig = DataConfig()
) -> list[Example]:
    """Read instruction records from ``spec`` and validate them into Examples, in input order.

    ``spec`` is a ``.jsonl`` file (one record per line, blank lines allowed), a ``.json`` file
    (one array of records), a folder written by ``datasets.save_to_disk``, or a Hugging Face Hub
    dataset id (loaded with ``datasets.load_dataset(spec, split=split)``). An example's source is
    the record's ``"dataset"`` field, else ``source``, else the file stem / folder name / id.
    Raises :class:`DataError` on malformed input (or, with ``on_bad_record="skip"``, logs and
    drops bad records and raises only if none is left).
    """
    rows, where, default_source = _open(spec, split)
    default_source = source or default_source
    examples: list[Example] = []
    taken: dict[tuple[str, str], str] = {}  # (source, id) -> origin that holds it
    total = bad = renamed = 0
    for origin, raw, error in rows:
        total += 1
        try:
            if error is not None:
                raise _BadRecord(error)
            example = _to_example(raw, origin, default_source)
            claimed, was_renamed = _claim_id(example, taken)
        except _BadRecord as exc:
            if cfg.on_bad_record == "error":
                raise DataError(f"{origin}: {exc}") from None
            logger.warning("skipping bad record %s: %s", origin, exc)
            bad += 1
            continue
        if was_renamed:
            logger.info("%s: same messages as %s; id %s", origin, taken[(example.source, example.id)], claimed.id)
        renamed += was_renamed
        examples.append(claimed)
    check_counts(where, total, bad, len(examples), renamed)
    return examples


def check_counts(where: str, total: int, bad: int, kept: int, renamed: int) -> None:
    """The file-level verdict on a loaded file: DataError when nothing is left, else the summary lines."""
    if total == 0:
        raise DataError(f"{where}: no records found; give a file or dataset with at least one record")
    if bad:
        logger.warning("%s: skipped %d of %d records as malformed (on_bad_record='skip')", where, bad, total)
    if not kept:
        raise DataError(f"{where}: none of the {total} records is valid (each reason is in the log); fix the data")
    if renamed:
        logger.info("%s: %d records repeat an earlier record's messages; their ids got a #n suffix", where, renamed)


_Row = tuple[str, Any, "str | None"]  # origin, raw record, parse error


def _open(spec: str | Path, split: str) -> tuple[Iterator[_Row], str, str]:
    """Rows of ``spec``, a name for it in messages, and its default source name."""
    kind, found, where, default_source = resolve_spec(spec, split)
    if kind == "jsonl":
        return _read_jsonl(found), where, default_source
    if kind == "json":
        return _read_json(found), where, default_source
    return _read_dataset(found, where), where, default_source


def resolve_spec(spec: str | Path, split: str) -> tuple[Literal["jsonl", "json", "dataset"], Any, str, str]:
    """What ``spec`` names: ``(kind, path or loaded dataset, name in messages, default source name)``."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix in (".jsonl", ".json"):
            return ("jsonl" if path.suffix == ".jsonl" else "json"), path, str(path), path.stem
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; give a .jsonl or .json file")
    if path.is_dir():
        return "dataset", _load_from_disk(path, split), str(path), path.name
    text = str(spec)
    hub_like = re.fullmatch(r"[\w-][\w.-]*(/[\w-][\w.-]*)?", text) and path.suffix not in (".json", ".jsonl")
    if isinstance(spec, Path) or not hub_like:
        raise DataError(f"{text}: no such file or folder; give a .jsonl/.json file, a save_to_disk folder or a Hub id")
    return "dataset", _load_hub(text, split), f"{text}[{split}]", text


def _read_jsonl(path: Path) -> Iterator[_Row]:
    """Stream the records of a JSON Lines file; a line that is not valid UTF-8 JSON is a bad record
    (each line is decoded on its own, so an error names the line that holds it)."""
    for _, lineno, record, error in jsonl_lines(path):
        yield f"{path}:{lineno}", record, error


def jsonl_lines(path: Path, digest: Any = None) -> Iterator[tuple[int, int, Any, str | None]]:
    """``(byte offset, line number, record, parse error)`` of each non-blank line of a JSON Lines
    file; ``digest`` (a hashlib object), when given, is fed every byte of the file."""
    try:
        with path.open("rb") as lines:
            offset = 0
            for lineno, raw in enumerate(lines, start=1):
                start, offset = offset, offset + len(raw)
                if digest is not None:
                    digest.update(raw)
                parsed = parse_jsonl_line(raw, lineno)
                if parsed is not None:
                    yield start, lineno, parsed[0], parsed[1]
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


def parse_jsonl_line(raw: bytes, lineno: int) -> tuple[Any, str | None] | None:
    """``(record, None)`` of one line of a JSON Lines file, ``(None, error)`` when it is not UTF-8
    JSON, ``None`` when it is blank."""
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text (byte {exc.start + 1} of the line); save the file as UTF-8"
    if not line.strip():
        return None
    try:
        return json.loads(line), None
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON ({exc}); each line of a .jsonl file must be one JSON object"


def _read_json(path: Path) -> Iterator[_Row]:
    """The records of a file holding one JSON array, with the line each starts on."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the file ({exc}); it must be readable UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{exc.lineno}: invalid JSON ({exc}); a .json file must hold one array of records "
            "(for one record per line, name the file .jsonl)"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got a JSON {type(data).__name__}")
    yield from ((f"{path}:{line}", record, None) for line, record in zip(_element_lines(text), data))


def _element_lines(text: str) -> Iterator[int]:
    """1-based line on which each element of the (valid) top-level JSON array in ``text`` starts."""
    decoder, ws = json.JSONDecoder(), re.compile(r"[\s,]*")
    pos = ws.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    while pos < len(text) and text[pos] != "]":
        line, counted = line + text.count("\n", counted, pos), pos
        yield line
        pos = ws.match(text, decoder.raw_decode(text, pos)[1]).end()


def _load_from_disk(path: Path, split: str) -> Any:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a folder written by datasets.save_to_disk ({exc})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{path}: no split {split!r}; it has {', '.join(data)} (choose one with split=...)")
        return data[split]
    return data


def _load_hub(dataset_id: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # the Hub client raises many unrelated types; all mean "not loadable"
        raise DataError(
            f"{dataset_id}: no local file or folder of that name, and it could not be loaded as a Hugging Face "
            f"Hub dataset (split {split!r}): {str(exc).rstrip('.')}. Without network access, give a local "
            ".jsonl/.json file or a save_to_disk folder instead."
        ) from exc


def _read_dataset(dataset: Any, where: str) -> Iterator[_Row]:
    for index, row in enumerate(dataset):
        yield f"{where}#{index}", row, None


# --------------------------------------------------------------------------- validation


def _to_example(raw: Any, origin: str, default_source: str) -> Example:
    """Validate one raw record into an Example (id not yet made unique), or raise _BadRecord."""
    if not isinstance(raw, dict):
        raise _BadRecord(
            f"record is a JSON {type(raw).__name__}, not an object; each record must be an object with "
            "'messages' (a list of {role, content}) or 'prompt' and 'completion'"
        )
    if raw.get("messages") is not None:
        messages = _parse_messages(raw["messages"])
    elif raw.get("prompt") is not None or raw.get("completion") is not None:
        messages = _parse_prompt_completion(raw)
    else:
        raise _BadRecord(
            f"record has neither 'messages' nor 'prompt'/'completion' (its fields: {', '.join(map(repr, raw))}); "
            "give 'messages': [{\"role\": ..., \"content\": ...}, ...] or 'prompt' and 'completion' strings"
        )
    source = _optional_str(raw, "dataset") or default_source
    subtask = _optional_str(raw, "subtask")
    if raw.get("id") is not None:
        if isinstance(raw["id"], bool) or not isinstance(raw["id"], (str, int)):
            raise _BadRecord(f"'id' must be a string or an integer, got {type(raw['id']).__name__} {raw['id']!r:.60}")
        example_id = str(raw["id"])
        if not example_id.strip():
            raise _BadRecord("'id' is empty; give a non-empty id or drop the field to use a content hash")
    else:
        canonical = json.dumps([list(m) for m in messages], ensure_ascii=False, separators=(",", ":"))
        example_id = "sha1:" + hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:16]
    return Example(source, example_id, messages, subtask, raw, origin)


def _parse_messages(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise _BadRecord("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise _BadRecord(f"messages[{i}] must be an object with 'role' and 'content', got {message!r:.80}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise _BadRecord(f"messages[{i}].role is {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise _BadRecord(f"messages[{i}].content is a {type(content).__name__}, not a string")
        if role == "assistant" and not content.strip():
            raise _BadRecord(f"messages[{i}] (assistant) has empty content; give the response text or drop the record")
        messages.append((role, content))
    if not any(role == "assistant" for role, _ in messages):
        raise _BadRecord("'messages' has no assistant turn, so there is no response to take the loss on; add one")
    return tuple(messages)


def _parse_prompt_completion(raw: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    for key in ("prompt", "completion"):
        if key not in raw or raw[key] is None:
            raise _BadRecord(f"record has 'prompt' or 'completion' but no {key!r}; give both as strings")
        if not isinstance(raw[key], str):
            raise _BadRecord(f"{key!r} is a {type(raw[key]).__name__}, not a string")
    if not raw["completion"].strip():
        raise _BadRecord("'completion' is empty; give the response text or drop the record")
    return (("user", raw["prompt"]), ("assistant", raw["completion"]))


def _optional_str(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise _BadRecord(f"{key!r} must be a non-empty string, got {value!r:.80}")
    return value


def _claim_id(example: Example, taken: dict[tuple[str, str], str]) -> tuple[Example, bool]:
    """Register ``example``'s id within its source; a repeated content hash gets a ``#n`` suffix
    (the first free ``n`` from 2). ``taken`` maps each id claimed so far to its origin."""
    key = (example.source, example.id)
    if key not in taken:
        taken[key] = example.origin
        return example, False
    if example.record.get("id") is not None:
        raise _BadRecord(
            f"id {example.id!r} of source {example.source!r} is already used at {taken[key]}; "
            "ids must be unique within a source (fix one, or drop the 'id' fields to use content hashes)"
        )
    n = 2
    while (example.source, f"{example.id}#{n}") in taken:
        n += 1
    new_id = f"{example.id}#{n}"
    taken[(example.source, new_id)] = example.origin
    return Example(example.source, new_id, example.messages, example.subtask, example.record, example.origin), True


def examples_digest(examples: Sequence[Example]) -> str:
    """SHA-256 of what the examples are (source, id, subtask, every message), in order."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.source, ex.id, ex.subtask, ex.messages], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------- tokenization


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Any, cfg: DataConfig, *, progress: bool = True, log_summary: bool = True
) -> tuple[list[Tokenized], list[Skipped]]:
    """Token ids and response-only labels of each example, in order, cut to ``cfg.max_length``.

    Examples left with no labelled token (a prompt longer than ``max_length``) are returned as
    :class:`Skipped` instead: they have no loss, hence no gradient to score. ``log_summary=False``
    leaves the summary lines to a caller that tokenizes in pieces.
    """
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"tokenizer {name!r} is a slow tokenizer; the loss mask needs character offsets, which only "
            "fast tokenizers give: load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    if cfg.template == "less" and not tokenizer.eos_token:
        raise ConfigError(f"tokenizer {name!r} has no eos token, which the 'less' template ends each response with")
    if cfg.template == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"tokenizer {name!r} has no chat template; use template='less' or set its chat_template")

    done: list[Tokenized] = []
    skipped: list[Skipped] = []
    for example in progress_bar(examples, enabled=progress, desc="tokenize", unit="ex"):
        input_ids, labels = _tokenize_one(example, tokenizer, cfg.template, name)
        truncated = len(input_ids) > cfg.max_length
        keep = slice(None, cfg.max_length) if cfg.truncation == "right" else slice(len(input_ids) - cfg.max_length, None)
        item = Tokenized(example, input_ids[keep] if truncated else input_ids, labels[keep] if truncated else labels, truncated)
        if any(label != IGNORE_INDEX for label in item.labels):
            done.append(item)
            continue
        reason = "no response token"
        if truncated:
            reason += f" within max_length={cfg.max_length} (the example has {len(input_ids)} tokens)"
        logger.info("skipping %s: %s", example.origin, reason)
        skipped.append(Skipped(example, reason))
    if skipped and log_summary:
        logger.warning(
            "skipped %d of %d examples with no response token left (each at INFO); raise max_length to keep them",
            len(skipped),
            len(examples),
        )
    n_truncated = sum(item.truncated for item in done)
    if n_truncated and log_summary:
        logger.info("%d of %d examples truncated to max_length=%d", n_truncated, len(done), cfg.max_length)
    return done, skipped


def _tokenize_one(example: Example, tokenizer: Any, template: str, name: str) -> tuple[list[int], list[int]]:
    """Token ids of one whole conversation and its labels: the id where the token starts in a response span."""
    if template == "less":
        text, spans = _render_less(example.messages, tokenizer.eos_token)
    else:
        text, spans = _render_chat(example, tokenizer, name)
    # the LESS text gets the model's BOS (if any) from the tokenizer; a chat template writes its own
    enc = tokenizer(text, add_special_tokens=template == "less", return_offsets_mapping=True)
    input_ids = list(enc["input_ids"])
    labels = [
        token if seq is not None and any(a <= start < b for a, b in spans) else IGNORE_INDEX  # seq None: added token
        for token, seq, (start, _end) in zip(input_ids, enc.sequence_ids(0), enc["offset_mapping"])
    ]
    return input_ids, labels


def _render_less(messages: Sequence[tuple[str, str]], eos: str) -> tuple[str, list[tuple[int, int]]]:
    """LESS / open-instruct text and the character spans that take the loss (content + eos + newline)."""
    text, spans = "", []
    for role, content in messages:
        text += f"<|{role}|>\n"
        body = content + (eos if role == "assistant" else "") + "\n"
        if role == "assistant":
            spans.append((len(text), len(text) + len(body)))
        text += body
    return text, spans


def _render_chat(example: Example, tokenizer: Any, name: str) -> tuple[str, list[tuple[int, int]]]:
    """Chat-template text and its assistant spans, found by rendering each prefix of the conversation.

    An assistant turn ``i`` spans from the end of ``messages[:i]`` rendered with the generation
    prompt to the end of ``messages[:i+1]``; both renders must be prefixes of the full one.
    """
    conversation = [{"role": role, "content": content} for role, content in example.messages]

    def render(messages: list[dict[str, str]], prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        except Exception as exc:  # a Jinja template can raise anything, e.g. on a role order it rejects
            raise DataError(f"{example.origin}: the chat template of {name!r} failed to render ({exc})") from exc

    full = render(conversation, False)
    spans = []
    for i, (role, _) in enumerate(example.messages):
        if role != "assistant":
            continue
        before, upto = render(conversation[:i], True), render(conversation[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError(
                f"{example.origin}: the chat template of {name!r} is not prefix-consistent (the conversation "
                f"rendered up to message {i} is not a prefix of the whole rendering), so the response tokens "
                "cannot be located; use template='less'"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def collate(items: Sequence[Tokenized], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` (IGNORE_INDEX on padding), [B, T].

    T is the longest item's length.
    """
    if not items:
        raise ValueError("collate needs at least one item")
    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(item.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
