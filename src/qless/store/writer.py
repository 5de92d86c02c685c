"""Writing a store: shards appended batch by batch, resumable, then finalised.

A store is written by appending batches to a shard; several processes write several shards
of one store side by side (each with its own name). Each append writes the data first and
then replaces ``state.json`` atomically, so an interrupted writer leaves at most an
uncommitted tail that the next writer truncates: nothing is lost and nothing is duplicated.
When every shard is complete, :func:`finalize` records the shard list and row count in the
manifest.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qless.errors import StoreError
from qless.files import create_json_once, hold_lock, locked, safe_name
from qless.store.layout import MANIFEST, STATE, ShardState, read_manifest, require_same, write_manifest

log = logging.getLogger(__name__)


def create_store(path: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Create the store folder with ``manifest``, or check an existing one agrees with it.

    Safe when several processes create the same store at once: the manifest appears
    atomically and exactly one of them writes it."""
    path = Path(path)
    (path / "shards").mkdir(parents=True, exist_ok=True)
    if not (path / MANIFEST).exists():
        create_json_once(path / MANIFEST, dict(manifest))
    existing = read_manifest(path)
    fields = [f for f in sorted(set(existing) | set(manifest)) if f not in ("created_with", "rows", "shards", "complete")]
    require_same(existing, dict(manifest), fields, f"existing store {path}", "this run's settings",
                 "Write to a new folder, or delete the old store if it is no longer wanted.")
    return path


class ShardWriter:
    """Appends rows to one shard of a store, resuming where a previous writer stopped.

    ``append`` writes data, then commits; ``consumed`` is the caller's position in its input
    stream (where a resumed run starts again) and ``input_digest`` is the caller's fingerprint of
    those inputs, so that a resumed run can check it is fed the same data.
    """

    def __init__(self, store: str | Path, manifest: Mapping[str, Any], shard: str = "00000") -> None:
        self._lock: Any = None
        safe_name(shard, "shard name")
        self.store = create_store(store, manifest)
        self.manifest = read_manifest(self.store)
        self.row_bytes = int(self.manifest["row_bytes"])
        if self.manifest.get("complete"):
            raise StoreError(f"{self.store}: the store is finalised; write to a new store folder")
        self.dir = self.store / "shards" / shard
        # one writer per shard: a second process is refused at once, not interleaved
        self._lock = hold_lock(self.store / "shards" / f".{shard}.lock", f"shard {shard} of {self.store}")
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        state_path = self.dir / STATE
        self.state = ShardState.read(state_path) if state_path.exists() else ShardState()
        if self.state.complete:
            raise StoreError(f"{self.dir}: shard is already complete; write to a new store folder or delete this one")
        # drop any uncommitted tail left by an interrupted writer
        self.state.check_files(self.dir, self.row_bytes, exact=False)
        for name, size in self.state.sizes(self.row_bytes).items():
            p = self.dir / name
            if not p.exists():
                p.touch()
            os.truncate(p, size)
        if state_path.exists() and self.state.rows + self.state.skipped:
            log.info("resuming shard %s at row %d (%d inputs consumed)", self.dir, self.state.rows, self.state.consumed)

    def close(self) -> None:
        """Release the shard's lock (the writer can no longer append)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def rows(self) -> int:
        return self.state.rows

    @property
    def consumed(self) -> int:
        return self.state.consumed

    def append(self, codes: np.ndarray | torch.Tensor, scales: np.ndarray | torch.Tensor, rows: Sequence[Mapping[str, Any]],
               *, consumed: int, input_digest: str = "", skipped: Sequence[Mapping[str, Any]] = ()) -> None:
        """Append ``len(rows)`` rows and commit. ``consumed`` is the new total of inputs processed."""
        if self._lock is None:
            raise StoreError(f"{self.dir}: this writer is closed")
        codes = _as_numpy(codes, np.uint8)
        scales = _as_numpy(scales, np.float32).astype("<f4", copy=False)
        consumed = int(consumed)
        n = len(rows)
        if codes.shape != (n, self.row_bytes) or scales.shape != (n,):
            raise ValueError(f"expected codes [{n}, {self.row_bytes}] and scales [{n}], got {codes.shape} and {scales.shape}")
        for r in rows:
            if "source" not in r or "id" not in r:
                raise ValueError("every row needs 'source' and 'id'")
        if consumed < self.state.consumed:
            raise ValueError(f"consumed cannot go back ({self.state.consumed} -> {consumed})")
        row_text = "".join(json.dumps(dict(r), sort_keys=True, ensure_ascii=False) + "\n" for r in rows).encode()
        skip_text = "".join(json.dumps(dict(r), sort_keys=True, ensure_ascii=False) + "\n" for r in skipped).encode()
        for name, data in (("codes.bin", codes.tobytes()), ("scales.bin", scales.tobytes()),
                           ("rows.jsonl", row_text), ("skipped.jsonl", skip_text)):
            if data:
                with open(self.dir / name, "ab") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
        s = self.state
        self.state = ShardState(rows=s.rows + n, rows_bytes=s.rows_bytes + len(row_text), skipped=s.skipped + len(skipped),
                                skipped_bytes=s.skipped_bytes + len(skip_text), consumed=consumed, input_digest=input_digest)
        self.state.write(self.dir / STATE)

    def finish(self) -> None:
        """Mark the shard complete (no more rows can be appended) and release it."""
        if self._lock is None:
            raise StoreError(f"{self.dir}: this writer is closed")
        self.state.complete = True
        self.state.write(self.dir / STATE)
        self.close()


def _as_numpy(x: np.ndarray | torch.Tensor, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=dtype)


def complete_shard(store: Path, shard: str) -> ShardState | None:
    """The state of ``shard`` if it is complete, with its files checked; None if unfinished.

    A shard that claims to be complete but whose files disagree is corrupt: StoreError."""
    d = Path(store) / "shards" / shard
    if not (d / STATE).is_file():
        return None
    state = ShardState.read(d / STATE)
    if not state.complete:
        return None
    state.check_files(d, int(read_manifest(Path(store))["row_bytes"]), exact=True)
    return state


def finalize(store: str | Path) -> dict[str, Any]:
    """Record the shard list and total row count in the manifest once every shard is complete
    (each one's files checked). Concurrent callers are serialised by a lock."""
    store = Path(store)
    with locked(store / ".finalize.lock", f"the finalisation of {store}", wait=60):
        manifest = read_manifest(store)
        if manifest.get("complete"):
            return manifest
        shards = []
        for d in sorted((store / "shards").iterdir()) if (store / "shards").is_dir() else []:
            if not d.is_dir():
                continue
            st = complete_shard(store, d.name)
            if st is None:
                raise StoreError(f"{d}: shard is not complete; finish (or resume) its extraction before finalising {store}")
            shards.append({"name": d.name, "rows": st.rows, "skipped": st.skipped})
        if not shards:
            raise StoreError(f"{store}: no shards to finalise; the extraction wrote nothing")
        manifest["shards"] = shards
        manifest["rows"] = sum(s["rows"] for s in shards)
        manifest["complete"] = True
        write_manifest(store, manifest)
    return manifest
