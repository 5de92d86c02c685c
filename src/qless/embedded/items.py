"""Benchmark items and their content keys, the basis of the no-overlap guarantee.

An :class:`Item` is one row of an output file plus the set of normalised-text hashes that
identify its content. Two items from different parts of the benchmark (pool, a target, an
evaluation set) that share a key are the same example seen twice, whatever template wraps them:
keys are taken from the underlying question / passage / conversation, not from the rendered
text alone.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qless.errors import DataError

MIN_KEY_WORDS = 8
"""A question alone becomes a key only from this many words up: short stems such as "Which of the
following is true?" recur across unrelated items and would raise false overlaps."""

class _SpaceNonAlnum(dict):
    """A :meth:`str.translate` table mapping every non-alphanumeric character to a space, filled
    on first sight of each character (a regex substitution is twice as slow on long texts)."""

    def __missing__(self, code: int) -> int:
        value = code if chr(code).isalnum() else 32
        self[code] = value
        return value


_TABLE = _SpaceNonAlnum()


def normalize(text: str) -> str:
    """Lower-case, NFKC-folded text with punctuation removed and whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().translate(_TABLE).split())


def _digest(normalized: str) -> str:
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).hexdigest()


def text_hash(text: str) -> str:
    """Hash of the normalised text (128-bit BLAKE2b, hex)."""
    return _digest(normalize(text))


def content_keys(main: str, *extra: str) -> frozenset[str]:
    """Keys of an item whose identifying text is ``main`` plus ``extra`` (options, passage, ...).

    The whole text always gives a key; ``main`` alone gives one too when it is long enough to be
    specific, so a question re-used with shuffled or different options is still caught.
    """
    head = normalize(main)
    whole = " ".join(p for p in (head, *map(normalize, extra)) if p)  # == normalize of the joined text
    keys = {_digest(whole)}
    if head.count(" ") + 1 >= MIN_KEY_WORDS:
        keys.add(_digest(head))
    return frozenset(keys)


def rendered_text(row: Mapping[str, Any]) -> str:
    """Everything a model reads or is trained on in a row (chat messages or prompt + completion)."""
    if "messages" in row:
        return "\n".join(m["content"] for m in row["messages"])
    return f"{row['prompt']}{row['completion']}"


@dataclass(frozen=True)
class Item:
    """One output row (``row`` is written as is) and the content keys that identify it.

    ``keys`` holds the keys of the underlying content (see :func:`content_keys`) and the hash of
    the rendered text; build items with :func:`make_item`.
    """

    row: Mapping[str, Any]
    keys: frozenset[str]

    @property
    def id(self) -> str:
        return str(self.row["id"])


def make_item(row: Mapping[str, Any], keys: frozenset[str]) -> Item:
    """An :class:`Item` whose keys are ``keys`` plus the hash of the row's rendered text."""
    return Item(row=row, keys=keys | {text_hash(rendered_text(row))})


def drop_overlapping(items: Sequence[Item], seen: set[str]) -> tuple[list[Item], int]:
    """Items sharing no key with ``seen``, and how many were dropped; ``seen`` then takes the
    kept items' keys, so that later parts are kept clear of these in turn."""
    kept = [item for item in items if not item.keys & seen]
    for item in kept:
        seen.update(item.keys)
    return kept, len(items) - len(kept)


def check_disjoint(parts: Mapping[str, Sequence[Item]]) -> None:
    """Raise :class:`DataError` if any two parts share an example (by content key).

    ``parts`` maps a part name (``"pool"``, ``"targets/mmlu"``, ``"eval/squad"``, ...) to its items.
    Duplicates inside one part are allowed; across parts they would leak evaluation data into
    training or selection, so the first few offending pairs are named in the message.
    """
    owner: dict[str, tuple[str, str]] = {}
    clashes: list[str] = []
    for part, items in parts.items():
        local: dict[str, str] = {}
        for item in items:
            for key in item.keys:
                local.setdefault(key, item.id)
        for key, item_id in local.items():
            if key in owner and owner[key][0] != part:
                other_part, other_id = owner[key]
                clashes.append(f"{part}:{item_id} = {other_part}:{other_id}")
            else:
                owner.setdefault(key, (part, item_id))
    if clashes:
        shown = "; ".join(sorted(set(clashes))[:10])
        raise DataError(
            f"the benchmark would share {len(set(clashes))} example(s) between parts that must be disjoint "
            f"({shown}). This is a bug in qless.embedded or a change in the asset data; "
            "report it with the asset package versions from the manifest."
        )
