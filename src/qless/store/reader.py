"""Reading stores: memory-mapped, read-only, refused when incomplete, truncated or corrupt.

Readers memory-map the arrays read-only, so reading a store never needs RAM proportional to
its size (only an 8-byte offset per row for the row table). Several compatible stores (the
same checkpoint of one extraction written in parts) open as one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qless.errors import StoreError
from qless.quantize import QuantizerSpec, decode_codes
from qless.store.layout import COMBINE_FIELDS, MANIFEST, STATE, ShardState, read_manifest, require_same


@dataclass
class _Shard:
    dir: Path
    rows: int
    rows_bytes: int
    skipped: int
    codes: np.ndarray | None
    scales: np.ndarray | None
    _offsets: np.ndarray | None = field(default=None, repr=False)

    def offsets(self) -> np.ndarray:
        """Byte offset of each row's line in rows.jsonl (plus the end), built on first use."""
        if self._offsets is None:
            if self.rows == 0:
                self._offsets = np.zeros(1, dtype=np.int64)
            else:
                text = np.memmap(self.dir / "rows.jsonl", dtype=np.uint8, mode="r", shape=(self.rows_bytes,))
                ends = np.flatnonzero(text == ord("\n")).astype(np.int64) + 1
                if len(ends) != self.rows:
                    raise StoreError(f"{self.dir / 'rows.jsonl'}: {len(ends)} lines for {self.rows} rows; the shard is corrupt")
                self._offsets = np.concatenate([[0], ends])
        return self._offsets

    def row(self, i: int) -> dict[str, Any]:
        off = self.offsets()
        with open(self.dir / "rows.jsonl", "rb") as f:
            f.seek(int(off[i]))
            return parse_row(f.read(int(off[i + 1] - off[i])), self.dir / "rows.jsonl", i + 1)

    def table(self) -> Iterator[dict[str, Any]]:
        """Every committed row's table entry, in order."""
        if self.rows == 0:
            return
        with open(self.dir / "rows.jsonl", "rb") as f:
            for lineno, line in enumerate(f.read(self.rows_bytes).splitlines(), start=1):
                yield parse_row(line, self.dir / "rows.jsonl", lineno)


def parse_row(line: bytes, path: Path, lineno: int,
              fix: str = "the store is corrupt: delete it and re-run the extraction that wrote it") -> dict[str, Any]:
    """One ``rows.jsonl`` line: a JSON object with ``source`` and ``id`` strings, else StoreError."""
    try:
        row = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        row, why = None, f"not valid JSON ({e})"
    else:
        why = "not an object with 'source' and 'id' strings"
    if isinstance(row, dict) and isinstance(row.get("source"), str) and isinstance(row.get("id"), str):
        return row
    raise StoreError(f"{path}:{lineno}: {why}; {fix}")


class Datastore:
    """A read-only view of one store, or of several compatible stores concatenated.

    Attributes: ``manifest`` (of the first store), ``spec`` (:class:`QuantizerSpec`), ``k``,
    ``row_bytes``, ``n_rows``, ``paths``."""

    def __init__(self, paths: list[Path], manifest: dict[str, Any], shards: list[_Shard]) -> None:
        self.paths = paths
        self.manifest = manifest
        self.spec = QuantizerSpec(**manifest["quantizer"])
        self.k = int(manifest["projection"]["dim"])
        self.row_bytes = int(manifest["row_bytes"])
        self.shards = shards
        self._starts = np.cumsum([0] + [s.rows for s in shards])
        self.n_rows = int(self._starts[-1])

    @property
    def path(self) -> Path:
        return self.paths[0]

    @property
    def checkpoint(self) -> str:
        return self.manifest["checkpoint"]["name"]

    @property
    def learning_rate(self) -> float:
        return float(self.manifest["checkpoint"]["learning_rate"])

    @classmethod
    def open(cls, *paths: str | Path, allow_incomplete: bool = False, allow_empty: bool = False) -> Datastore:
        """Open one store, or several as one (they must agree on every field in COMBINE_FIELDS)."""
        if not paths:
            raise ValueError("give at least one store path")
        manifests, shards = [], []
        for p in map(Path, paths):
            m = read_manifest(p)
            if manifests:
                require_same(manifests[0], m, COMBINE_FIELDS, f"store {paths[0]}", f"store {p}",
                             "Only stores written with the same settings can be combined.")
            manifests.append(m)
            shards += _open_shards(p, m, allow_incomplete)
        store = cls([Path(p) for p in paths], manifests[0], shards)
        if store.n_rows == 0 and not allow_empty:
            raise StoreError(f"{', '.join(map(str, paths))}: the store holds no rows (every input was skipped? see shards/*/skipped.jsonl)")
        return store

    def blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield ``(first_row, codes [m, row_bytes] uint8, scales [m] float32)`` in row order,
        ``m <= block_rows``; arrays are read-only memory-mapped views. Each block's codes are a
        mapping of their own, unmapped once the caller drops them, so a pass over the store does
        not leave every page it read resident in the process."""
        for shard, start in zip(self.shards, self._starts[:-1]):
            if shard.rows == 0:
                continue
            for a in range(0, shard.rows, block_rows):
                b = min(a + block_rows, shard.rows)
                codes = np.memmap(shard.dir / "codes.bin", dtype=np.uint8, mode="r", offset=a * self.row_bytes,
                                  shape=(b - a, self.row_bytes))
                yield int(start) + a, codes, shard.scales[a:b]  # type: ignore[index]

    def decoded(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start..stop`` decoded to float32 codes (no scale), for small reads."""
        parts = []
        for first, codes, _ in self.blocks(1 << 16):
            a, b = max(start, first), min(stop, first + len(codes))
            if a < b:
                parts.append(decode_codes(torch.from_numpy(np.array(codes[a - first:b - first])), self.spec, self.k))
        return torch.cat(parts) if parts else torch.zeros(0, self.k)

    def row(self, i: int) -> dict[str, Any]:
        """The row table entry (``source``, ``id``, ...) of row ``i``."""
        if not 0 <= i < self.n_rows:
            raise IndexError(i)
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        return self.shards[s].row(i - int(self._starts[s]))

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every row's table entry in order (streamed from disk)."""
        for shard in self.shards:
            yield from shard.table()

    @property
    def nbytes(self) -> int:
        """Bytes of codes plus scales."""
        return self.n_rows * (self.row_bytes + 4)

    def summary(self) -> dict[str, Any]:
        """What ``qless inspect`` prints."""
        m = self.manifest
        return {
            "paths": [str(p) for p in self.paths],
            "quantizer": self.spec.tag,
            "bits_per_coordinate": self.row_bytes * 8 / self.k,
            "projection": m["projection"],
            "checkpoint": m["checkpoint"],
            "gradient": m["gradient"],
            "rows": self.n_rows,
            "skipped": sum(s.skipped for s in self.shards),
            "shards": len(self.shards),
            "row_bytes": self.row_bytes,
            "bytes_per_row_with_scale": self.row_bytes + 4,
            "codes_bytes": self.n_rows * self.row_bytes,
            "total_bytes": self.nbytes,
            "model": m.get("model", {}),
            "adapter": {k: v for k, v in m.get("adapter", {}).items() if k != "parameters"},
            "complete": bool(m.get("complete")),
        }


def _open_shards(path: Path, manifest: dict[str, Any], allow_incomplete: bool) -> list[_Shard]:
    row_bytes = int(manifest["row_bytes"])
    listed = {s["name"]: s for s in manifest.get("shards", [])}
    if not manifest.get("complete") and not allow_incomplete:
        raise StoreError(
            f"{path}: the store is incomplete (its extraction was interrupted or is still running); "
            f"resume the extraction to finish it"
        )
    shard_root = path / "shards"
    dirs = sorted(d for d in shard_root.iterdir() if d.is_dir()) if shard_root.is_dir() else []
    if listed and sorted(listed) != [d.name for d in dirs]:
        raise StoreError(f"{path}: shard folders {[d.name for d in dirs]} do not match the manifest's {sorted(listed)}; "
                         "the store is corrupt")
    shards = []
    for d in dirs:
        if not (d / STATE).exists():
            if allow_incomplete:
                continue
            raise StoreError(f"{d / STATE}: missing; the shard is corrupt, delete it and re-run its extraction")
        st = ShardState.read(d / STATE)
        if d.name in listed and listed[d.name]["rows"] != st.rows:
            raise StoreError(f"{d}: state says {st.rows} rows, manifest says {listed[d.name]['rows']}; the store is corrupt")
        st.check_files(d, row_bytes)
        codes = np.memmap(d / "codes.bin", dtype=np.uint8, mode="r", shape=(st.rows, row_bytes)) if st.rows else None
        scales = np.memmap(d / "scales.bin", dtype="<f4", mode="r", shape=(st.rows,)) if st.rows else None
        shards.append(_Shard(d, st.rows, st.rows_bytes, st.skipped, codes, scales))
    return shards


def open_by_checkpoint(paths: Sequence[str | Path], **kw: Any) -> list[Datastore]:
    """Stores (or folders of stores) grouped by checkpoint: one combined store per checkpoint,
    in order of first appearance. Several paths holding the same checkpoint (a pool extracted
    in parts, or several target tasks) are concatenated in the order given."""
    groups: dict[str, list[Path]] = {}
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise StoreError(f"{path}: no such datastore folder; check the path")
        if (path / MANIFEST).exists():
            subs = [path]
        else:
            subs = sorted(q for q in path.iterdir() if (q / MANIFEST).exists()) if path.is_dir() else []
        if not subs:
            raise StoreError(f"{path}: neither a datastore nor a folder of datastores (no {MANIFEST} found in it or its subfolders)")
        for sub in subs:
            groups.setdefault(str(read_manifest(sub)["checkpoint"]["name"]), []).append(sub)
    return [Datastore.open(*group, **kw) for group in groups.values()]


