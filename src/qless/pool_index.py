"""Pools larger than memory: an index of where each record lies, and records read when needed.

:func:`open_examples` reads what :func:`qless.data.load_examples` reads and gives the same
Examples (same ids, same order, same :func:`~qless.data.examples_digest`), as a lazy
``Sequence[Example]``. One pass over the data validates every record and keeps three int64
per record: its byte offset (a JSON Lines file) or row (a ``datasets`` folder or Hub dataset,
whose arrow table is memory-mapped already), its line, and a 64-bit hash of its
``(source, id)``. An access reads and parses the record again, so memory is 24 bytes per
record whatever the records hold.

Ids are resolved as ``load_examples`` resolves them, without a dict of every id: after the pass
the key hashes are sorted once, and only the records whose hash is shared (a repeated id, or a
repeated content hash that gets a ``#n`` suffix) are read again and claimed in file order by
the same ``_claim_id``, together with every record holding a ``#n`` key that a suffix probes.
The first bad record in file order is reported, as ``load_examples`` reports it.

With ``index_dir`` the index is kept: ``NAME.npy`` ([n, 3] int64: offset or row, line, key
hash) and ``NAME.json`` (the file's path, size, mtime and SHA-256, the settings, the renamed
ids). It is reused while the file is unchanged; a changed file is indexed again (the same size
and content under a new mtime is recognised by its SHA-256). A file that changes while an open
index reads it is refused. A ``.json`` array file is decoded whole by the JSON parser anyway
and stays in memory: give large pools as JSON Lines.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import operator
import os
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qless.console import progress_bar
from qless.data import (
    DataConfig,
    Example,
    _BadRecord,
    _claim_id,
    _to_example,
    check_counts,
    jsonl_lines,
    load_examples,
    parse_jsonl_line,
    resolve_spec,
)
from qless.errors import DataError
from qless.files import atomic_write_json, output_errors

logger = logging.getLogger(__name__)

INDEX_FORMAT = "qless-pool-index"
INDEX_VERSION = 1


def key_hash(source: str, example_id: str) -> int:
    """A 64-bit hash of an example's ``(source, id)`` (equal keys, equal hashes; collisions are checked)."""
    key = f"{source}\x00{example_id}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little", signed=True)


class _JsonlFile:
    """The records of a JSON Lines file, read at byte offsets; refused once the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        st = path.stat()
        self.stamp = (st.st_size, st.st_mtime_ns)
        self._file: Any = None
        self._pid = -1

    def __del__(self) -> None:
        if self._file is not None:
            self._file.close()

    def identity(self) -> dict[str, Any]:
        return {"kind": "jsonl", "path": str(self.path.resolve()), "size": self.stamp[0], "mtime_ns": self.stamp[1]}

    def origin(self, line: int) -> str:
        return f"{self.path}:{line}"

    def scan(self, digest: Any) -> Iterator[tuple[int, int, Any, str | None]]:
        yield from jsonl_lines(self.path, digest)
        st = self.path.stat()
        if (st.st_size, st.st_mtime_ns) != self.stamp:
            raise DataError(f"{self.path}: changed while it was being indexed; run again once nothing writes to it")

    def read(self, pos: int, line: int) -> tuple[Any, str | None]:
        if self._file is None or self._pid != os.getpid():  # a forked process opens its own
            self._file, self._pid = open(self.path, "rb"), os.getpid()  # kept open for the index's life
        st = os.fstat(self._file.fileno())
        if (st.st_size, st.st_mtime_ns) != self.stamp:
            raise DataError(f"{self.path}: changed since it was indexed; run again (a changed file is indexed anew), "
                            "and do not edit a pool file while qless reads it")
        self._file.seek(pos)
        parsed = parse_jsonl_line(self._file.readline(), line)
        return parsed if parsed is not None else (None, "blank line where the index has a record")


class _ArrowTable:
    """The rows of a ``datasets.Dataset`` (memory-mapped arrow), read by row number."""

    def __init__(self, dataset: Any, where: str) -> None:
        self.dataset, self.where = dataset, where

    def identity(self) -> dict[str, Any]:
        return {"kind": "dataset", "fingerprint": getattr(self.dataset, "_fingerprint", None), "rows": len(self.dataset)}

    def origin(self, line: int) -> str:
        return f"{self.where}#{line}"

    def scan(self, digest: Any) -> Iterator[tuple[int, int, Any, str | None]]:
        for row, record in enumerate(self.dataset):
            yield row, row, record, None

    def read(self, pos: int, line: int) -> tuple[Any, str | None]:
        return self.dataset[pos], None


_Records = _JsonlFile | _ArrowTable


class PoolIndex:
    """The valid records of one data file: ``table[i] = (offset or row, line, key hash)`` of
    example ``i``, and ``renames`` (example -> its ``#n`` id) for repeated content hashes."""

    def __init__(self, records: _Records, table: np.ndarray, renames: dict[int, str], default_source: str) -> None:
        self.records, self.table, self.renames, self.default_source = records, table, renames, default_source
        self._order: np.ndarray | None = None
        self._sorted: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.table)

    def example(self, i: int) -> Example:
        """Example ``i``, read from the file."""
        pos, line, _ = self.table[i].tolist()
        return self._read(i, pos, line)

    def examples(self, start: int, stop: int) -> Iterator[Example]:
        """Examples ``start`` to ``stop - 1``, read in file order."""
        for i, (pos, line, _) in enumerate(self.table[start:stop].tolist(), start=start):
            yield self._read(i, pos, line)

    def lookup(self, source: str, example_id: str) -> Example | None:
        """The example with this ``(source, id)``, or None: a binary search in the sorted key
        hashes, each candidate read and compared exactly."""
        if self._order is None:
            self._order = np.argsort(self.table[:, 2], kind="stable")
            self._sorted = self.table[self._order, 2]
        assert self._sorted is not None
        h = key_hash(source, example_id)
        lo, hi = np.searchsorted(self._sorted, h, "left"), np.searchsorted(self._sorted, h, "right")
        for j in self._order[lo:hi].tolist():
            ex = self.example(j)
            if ex.source == source and ex.id == example_id:
                return ex
        return None

    def _read(self, i: int, pos: int, line: int) -> Example:
        origin = self.records.origin(line)
        raw, error = self.records.read(pos, line)
        try:
            if error is not None:
                raise _BadRecord(error)
            ex = _to_example(raw, origin, self.default_source)
        except _BadRecord as exc:
            raise DataError(f"{origin}: {exc}; the record was valid when the file was indexed, so the file changed: "
                            "run again to index it anew") from None
        new_id = self.renames.get(i)
        return ex if new_id is None else dataclasses.replace(ex, id=new_id)


def build_index(records: _Records, where: str, default_source: str, cfg: DataConfig,
                progress: bool = True) -> tuple[PoolIndex, dict[str, Any]]:
    """Validate every record of ``records`` in one pass and index the valid ones; returns the
    index and what was counted (``total``, ``bad``, ``sha256`` of a JSON Lines file).

    Raises DataError at the first bad record in file order (``on_bad_record='error'``), as
    :func:`~qless.data.load_examples` does; with ``'skip'`` logs and leaves out bad records."""
    flat = array("q")
    total = bad = 0
    stop = None  # the first malformed record, where 'error' stops reading
    digest = hashlib.sha256() if isinstance(records, _JsonlFile) else None
    for pos, line, raw, error in progress_bar(records.scan(digest), enabled=progress, desc="index", unit="rec",
                                              mininterval=1.0):
        total += 1
        origin = records.origin(line)
        try:
            if error is not None:
                raise _BadRecord(error)
            ex = _to_example(raw, origin, default_source)
        except _BadRecord as exc:
            if cfg.on_bad_record == "error":
                stop = f"{origin}: {exc}"
                break
            logger.warning("skipping bad record %s: %s", origin, exc)
            bad += 1
            continue
        flat.extend((pos, line, key_hash(ex.source, ex.id)))
    table = np.frombuffer(flat, dtype=np.int64).reshape(-1, 3) if flat else np.zeros((0, 3), dtype=np.int64)
    plain = PoolIndex(records, table, {}, default_source)
    renames, rejects = resolve_ids(table[:, 2], plain.example)
    if rejects and cfg.on_bad_record == "error":
        first = min(rejects)
        raise DataError(f"{records.origin(int(table[first, 1]))}: {rejects[first]}")
    if stop is not None:
        raise DataError(stop)
    for i in sorted(rejects):
        logger.warning("skipping bad record %s: %s", records.origin(int(table[i, 1])), rejects[i])
    keep = np.ones(len(table), dtype=bool)
    keep[list(rejects)] = False
    if rejects:
        table = table[keep]
    new_index = np.cumsum(keep) - 1
    kept_renames = {}
    for i, (source, new_id, first) in renames.items():
        logger.info("%s: same messages as %s; id %s", records.origin(int(plain.table[i, 1])), first, new_id)
        kept_renames[int(new_index[i])] = new_id
        table[new_index[i], 2] = key_hash(source, new_id)
    bad += len(rejects)
    check_counts(where, total, bad, len(table), len(renames))
    counts = {"total": total, "bad": bad, "sha256": digest.hexdigest() if digest is not None else None}
    return PoolIndex(records, table, kept_renames, default_source), counts


def resolve_ids(hashes: np.ndarray, example_at: Callable[[int], Example]
                ) -> tuple[dict[int, tuple[str, str, str]], dict[int, str]]:
    """Ids claimed exactly as :func:`~qless.data.load_examples` claims them in file order, reading
    only the examples whose key hash is shared. Returns ``{example: (source, new id, origin of
    the first holder)}`` for renamed examples and ``{example: reason}`` for rejected ones."""
    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    shared = np.zeros(len(hashes), dtype=bool)
    if len(hashes) > 1:
        same = ordered[1:] == ordered[:-1]
        shared[1:] |= same
        shared[:-1] |= same
    involved = set(order[shared].tolist())

    def holders(source: str, example_id: str) -> list[int]:
        h = key_hash(source, example_id)
        return order[np.searchsorted(ordered, h, "left"):np.searchsorted(ordered, h, "right")].tolist()

    while True:
        # claim the involved examples in order; a #n suffix probes keys that other examples may
        # hold: those join the claim and it is redone, until no probe reaches a new example
        taken: dict[tuple[str, str], str] = {}
        renames: dict[int, tuple[str, str, str]] = {}
        rejects: dict[int, str] = {}
        more: set[int] = set()
        for i in sorted(involved):
            ex = example_at(i)
            try:
                claimed, was_renamed = _claim_id(ex, taken)
            except _BadRecord as exc:
                rejects[i] = str(exc)
                continue
            if was_renamed:
                renames[i] = (ex.source, claimed.id, taken[(ex.source, ex.id)])
                for n in range(2, int(claimed.id.rsplit("#", 1)[1]) + 1):
                    more.update(j for j in holders(ex.source, f"{ex.id}#{n}") if j not in involved)
        if not more:
            return renames, rejects
        involved |= more


def open_index(records: _Records, where: str, default_source: str, cfg: DataConfig, index_dir: str | Path | None,
               progress: bool = True) -> PoolIndex:
    """The index of ``records``: reused from ``index_dir`` when saved there for the same file
    content and settings, else built (and saved there)."""
    identity = records.identity()
    what = identity.get("path", identity.get("fingerprint"))  # a dataset without a fingerprint is not kept
    if index_dir is None or what is None:
        return build_index(records, where, default_source, cfg, progress)[0]
    settings = {"default_source": default_source, "on_bad_record": cfg.on_bad_record}
    name = hashlib.sha256(json.dumps([what, settings]).encode()).hexdigest()
    stem = f"{Path(where).stem or 'data'}-{name[:16]}"
    table_path, meta_path = Path(index_dir) / f"{stem}.npy", Path(index_dir) / f"{stem}.json"
    meta = _saved_meta(meta_path, settings)
    if meta is not None:
        if meta["records"] != identity and not _same_content(records, meta):
            logger.info("%s: changed since it was indexed; indexing it again", where)
        else:
            try:
                table = np.load(table_path, allow_pickle=False)
            except (OSError, ValueError):
                table = None
            if table is not None and table.dtype == np.int64 and table.shape == (meta["rows"], 3):
                logger.info("%s: %d records, index reused from %s", where, len(table), table_path)
                check_counts(where, meta["total"], meta["bad"], len(table), len(meta["renames"]))
                if meta["records"] != identity:  # same content, new mtime: remember the new one
                    atomic_write_json(meta_path, {**meta, "records": identity})
                return PoolIndex(records, table, {int(i): v for i, v in meta["renames"].items()}, default_source)
    index, counts = build_index(records, where, default_source, cfg, progress)
    with output_errors(index_dir):
        Path(index_dir).mkdir(parents=True, exist_ok=True)
        tmp = table_path.with_name(f".{table_path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, index.table, allow_pickle=False)
        os.replace(tmp, table_path)
        atomic_write_json(meta_path, {"format": INDEX_FORMAT, "format_version": INDEX_VERSION, "records": identity,
                                      **settings, "rows": len(index), "renames": {str(i): v for i, v in index.renames.items()},
                                      **counts})
    return index


def _saved_meta(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """A saved index's description if readable, of this format and these settings, else None."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    wanted = {"format": INDEX_FORMAT, "format_version": INDEX_VERSION, **settings}
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in wanted.items()):
        return None
    if not all(k in meta for k in ("records", "rows", "renames", "total", "bad", "sha256")):
        return None
    return meta


def _same_content(records: _Records, meta: dict[str, Any]) -> bool:
    """Whether a JSON Lines file whose mtime changed still holds the indexed bytes (same size and SHA-256)."""
    if not isinstance(records, _JsonlFile) or meta["records"].get("size") != records.stamp[0] or not meta["sha256"]:
        return False
    digest = hashlib.sha256()
    with open(records.path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest() == meta["sha256"]


class PoolExamples(Sequence[Example]):
    """The examples of one or more data files as one lazy sequence: ``len``, integer and slice
    indexing (a slice is another lazy view) and iteration, reading records as they are needed.
    ``parts`` are :class:`PoolIndex` objects or in-memory lists of Examples."""

    def __init__(self, parts: Sequence[PoolIndex | Sequence[Example]], positions: range | None = None) -> None:
        self.parts = list(parts)
        self._starts = [0]
        for part in self.parts:
            self._starts.append(self._starts[-1] + len(part))
        self.positions = range(self._starts[-1]) if positions is None else positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return PoolExamples(self.parts, self.positions[i])
        return self._at(self.positions[operator.index(i)])

    def __iter__(self) -> Iterator[Example]:
        r = self.positions
        if r.step != 1:
            yield from (self._at(g) for g in r)
            return
        for k, part in enumerate(self.parts):
            a, b = max(r.start, self._starts[k]) - self._starts[k], min(r.stop, self._starts[k + 1]) - self._starts[k]
            if a < b:
                yield from (part.examples(a, b) if isinstance(part, PoolIndex) else iter(part[a:b]))

    def __repr__(self) -> str:
        return f"PoolExamples({len(self)} examples from {len(self.parts)} part(s))"

    @property
    def whole(self) -> bool:
        """Whether this is every example of its parts (not a slice of them)."""
        return self.positions == range(self._starts[-1])

    def _at(self, g: int) -> Example:
        k = bisect.bisect_right(self._starts, g) - 1
        part = self.parts[k]
        return part.example(g - self._starts[k]) if isinstance(part, PoolIndex) else part[g - self._starts[k]]


class PoolRecords(Mapping[tuple[str, str], Mapping[str, Any]]):
    """``(source, id) -> the pool record as read``, looked up on demand: through each file's key
    hashes for a whole :class:`PoolExamples` (no dict of every record), a dict otherwise.
    A key held by several files maps to the last one's record, as a dict built in order would."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = examples
        if isinstance(examples, PoolExamples) and examples.whole:
            parts = examples.parts
        else:
            parts = [examples]
        self._parts: list[PoolIndex | dict[tuple[str, str], Mapping[str, Any]]] = [
            p if isinstance(p, PoolIndex) else {(e.source, e.id): e.record for e in p} for p in parts]

    def __getitem__(self, key: tuple[str, str]) -> Mapping[str, Any]:
        for part in reversed(self._parts):
            if isinstance(part, PoolIndex):
                found = part.lookup(*key)
                if found is not None:
                    return found.record
            elif key in part:
                return part[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return ((e.source, e.id) for e in self.examples)

    def __len__(self) -> int:
        return len(self.examples)


def open_examples(spec: str | Path, *, source: str | None = None, split: str = "train", cfg: DataConfig = DataConfig(),
                  index_dir: str | Path | None = None, progress: bool = True) -> PoolExamples:
    """The examples of ``spec`` as :func:`~qless.data.load_examples` reads them, as a lazy
    :class:`PoolExamples` (module docstring); the index is kept in ``index_dir`` when given."""
    kind, found, where, default_source = resolve_spec(spec, split)
    if kind == "json":
        return PoolExamples([load_examples(spec, source=source, split=split, cfg=cfg)])
    records: _Records = _JsonlFile(found) if kind == "jsonl" else _ArrowTable(found, where)
    return PoolExamples([open_index(records, where, source or default_source, cfg, index_dir, progress)])
