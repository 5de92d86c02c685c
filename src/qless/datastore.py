"""The gradient datastore: quantized projected gradients on disk, self-describing, memory-mapped.

One store holds one checkpoint's gradients of one set of examples in one format. Layout::

    STORE/
      manifest.json            what the rows are: format version, projection (kind, seed, k, d),
                               quantizer (method, bits, scale mode), checkpoint (name, learning
                               rate), gradient kind, model, adapter and tokenization identity;
                               once finalised also the row count and the shard list
      shards/NAME/
        codes.bin              rows x row_bytes packed codes (uint8), row-major
        scales.bin             rows x float32 (little-endian): the scale S of each row
        rows.jsonl             one JSON object per row: {"source", "id", ...}
        skipped.jsonl          inputs left out of the store, with the reason
        state.json             the committed position: rows, byte sizes, inputs consumed

A store is written by appending batches to a shard; several processes write several shards
of one store side by side (each with its own name). Each append writes the data first and
then replaces ``state.json`` atomically, so an interrupted writer leaves at most an
uncommitted tail that the next writer truncates: nothing is lost and nothing is duplicated.
When every shard is complete, :func:`finalize` records the shard list and row count in the
manifest. Readers memory-map the arrays read-only, so reading a store never needs RAM
proportional to its size (only an 8-byte offset per row for the row table).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qless import __version__
from qless.errors import StoreError, StoreMismatchError
from qless.quantize import QuantizerSpec, compute_scale, decode_codes, global_scale, quantize

log = logging.getLogger(__name__)

FORMAT = "qless-datastore"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = "state.json"

#: Manifest fields that must agree for two stores to be combined into one.
COMBINE_FIELDS = ("format_version", "projection", "quantizer", "checkpoint", "gradient", "model", "adapter", "tokenization")
#: Fields that must agree between pool and target stores of one checkpoint for scoring.
SCORE_FIELDS = ("projection", "checkpoint", "model", "adapter")


# ---------------------------------------------------------------------------------------------
# Manifests


def new_manifest(
    *,
    projection: Mapping[str, Any],
    quantizer: QuantizerSpec,
    checkpoint: Mapping[str, Any],
    gradient: str,
    model: Mapping[str, Any] | None = None,
    adapter: Mapping[str, Any] | None = None,
    tokenization: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A manifest for a new store. ``projection`` is :meth:`ProjectionConfig.identity`;
    ``checkpoint`` has ``name`` and ``learning_rate``; ``gradient`` is ``"adam"`` or ``"sgd"``."""
    for key in ("kind", "dim", "seed", "input_dim"):
        if key not in projection:
            raise ValueError(f"projection identity lacks {key!r}")
    if "name" not in checkpoint or "learning_rate" not in checkpoint:
        raise ValueError("checkpoint needs 'name' and 'learning_rate'")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "projection": dict(projection),
        "quantizer": {"method": quantizer.method, "bits": quantizer.bits, "scale": quantizer.scale},
        "row_bytes": quantizer.row_bytes(int(projection["dim"])),
        "checkpoint": {"name": str(checkpoint["name"]), "learning_rate": float(checkpoint["learning_rate"])},
        "gradient": gradient,
        "model": dict(model or {}),
        "adapter": dict(adapter or {}),
        "tokenization": dict(tokenization or {}),
        "extra": dict(extra or {}),
        "created_with": f"qless {__version__}",
    }


def differences(a: Mapping[str, Any], b: Mapping[str, Any], fields: Sequence[str], prefix: str = "") -> list[str]:
    """Dotted paths of the listed fields (recursively) where ``a`` and ``b`` differ."""
    out: list[str] = []
    for name in fields:
        va, vb = a.get(name), b.get(name)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += differences(va, vb, sorted(set(va) | set(vb)), f"{prefix}{name}.")
        elif va != vb:
            out.append(f"{prefix}{name}")
    return out


def _lookup(m: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        m = m.get(part) if isinstance(m, Mapping) else None  # type: ignore[assignment]
    return m


def require_same(a: Mapping[str, Any], b: Mapping[str, Any], fields: Sequence[str], what_a: str, what_b: str, fix: str) -> None:
    """Raise StoreMismatchError naming the first differing field, both values and the fix."""
    diff = differences(a, b, fields)
    if diff:
        first = diff[0]
        more = f" (and {len(diff) - 1} more: {', '.join(diff[1:4])}{'...' if len(diff) > 4 else ''})" if len(diff) > 1 else ""
        raise StoreMismatchError(
            f"{what_a} and {what_b} differ in {first}: {_lookup(a, first)!r} vs {_lookup(b, first)!r}{more}. {fix}"
        )


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and validate ``STORE/manifest.json``."""
    mpath = Path(path) / MANIFEST
    if not Path(path).is_dir():
        raise StoreError(f"{path}: no such datastore directory; give the folder that holds {MANIFEST}")
    if not mpath.is_file():
        raise StoreError(f"{mpath}: manifest missing; this folder is not a qless datastore (or its write never started)")
    try:
        m = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{mpath}: manifest is not valid JSON ({e}); the store is corrupt, re-run the extraction that wrote it") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise StoreError(f"{mpath}: not a qless datastore manifest (field 'format' must be {FORMAT!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"{mpath}: format_version {m.get('format_version')!r} is not supported by qless {__version__} "
            f"(it reads version {FORMAT_VERSION}); use the qless version that wrote it"
        )
    for key in ("projection", "quantizer", "row_bytes", "checkpoint", "gradient"):
        if key not in m:
            raise StoreError(f"{mpath}: field {key!r} missing; the manifest is corrupt, re-run the extraction that wrote it")
    try:
        spec = QuantizerSpec(**m["quantizer"])
        k = int(m["projection"]["dim"])
    except Exception as e:  # noqa: BLE001 - any malformed field is a corrupt manifest
        raise StoreError(f"{mpath}: field 'quantizer' or 'projection' is invalid ({e})") from None
    if spec.row_bytes(k) != m["row_bytes"]:
        raise StoreError(f"{mpath}: row_bytes {m['row_bytes']} does not match {spec.tag} at k={k}; the manifest is corrupt")
    return m


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def create_store(path: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Create the store folder with ``manifest``, or check an existing one agrees with it.

    Safe when several processes create the same store at once: the manifest appears
    atomically and exactly one of them writes it."""
    path = Path(path)
    (path / "shards").mkdir(parents=True, exist_ok=True)
    mpath = path / MANIFEST
    if not mpath.exists():
        tmp = path / f".{MANIFEST}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(dict(manifest), f, indent=2, sort_keys=True)
            f.write("\n")
        try:
            os.link(tmp, mpath)  # fails if another process got there first
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    existing = read_manifest(path)
    fields = [f for f in sorted(set(existing) | set(manifest)) if f not in ("created_with", "rows", "shards", "complete")]
    require_same(existing, dict(manifest), fields, f"existing store {path}", "this run's settings",
                 "Write to a new folder, or delete the old store if it is no longer wanted.")
    return path


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class _State:
    rows: int = 0
    rows_bytes: int = 0
    skipped: int = 0
    skipped_bytes: int = 0
    consumed: int = 0
    input_digest: str = ""
    complete: bool = False

    @classmethod
    def read(cls, path: Path) -> "_State":
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise StoreError(f"{path}: shard state unreadable ({e}); delete this shard folder and re-run its extraction") from None


class ShardWriter:
    """Appends rows to one shard of a store, resuming where a previous writer stopped.

    ``append`` writes data, then commits; ``consumed`` is the caller's position in its input
    stream (where a resumed run starts again) and ``input_digest`` is the caller's fingerprint of
    those inputs, so that a resumed run can check it is fed the same data.
    """

    def __init__(self, store: str | Path, manifest: Mapping[str, Any], shard: str = "00000") -> None:
        if not shard or "/" in shard or shard.startswith("."):
            raise ValueError(f"invalid shard name {shard!r}")
        self.store = create_store(store, manifest)
        self.manifest = read_manifest(self.store)
        self.row_bytes = int(self.manifest["row_bytes"])
        self.dir = self.store / "shards" / shard
        self.dir.mkdir(parents=True, exist_ok=True)
        state_path = self.dir / STATE
        self.state = _State.read(state_path) if state_path.exists() else _State()
        if self.manifest.get("complete"):
            raise StoreError(f"{self.store}: the store is finalised; write to a new store folder")
        if self.state.complete:
            raise StoreError(f"{self.dir}: shard is already complete; write to a new store folder or delete this one")
        # drop any uncommitted tail left by an interrupted writer
        for name, size in (("codes.bin", self.state.rows * self.row_bytes), ("scales.bin", self.state.rows * 4),
                           ("rows.jsonl", self.state.rows_bytes), ("skipped.jsonl", self.state.skipped_bytes)):
            p = self.dir / name
            if not p.exists():
                if size:
                    raise StoreError(f"{p}: missing but the shard state counts {size} committed bytes; delete the shard and re-run")
                p.touch()
            elif p.stat().st_size < size:
                raise StoreError(f"{p}: truncated ({p.stat().st_size} bytes, {size} committed); delete the shard and re-run")
            else:
                os.truncate(p, size)
        if state_path.exists() and self.state.rows + self.state.skipped:
            log.info("resuming shard %s at row %d (%d inputs consumed)", self.dir, self.state.rows, self.state.consumed)

    @property
    def rows(self) -> int:
        return self.state.rows

    @property
    def consumed(self) -> int:
        return self.state.consumed

    def append(self, codes: np.ndarray | torch.Tensor, scales: np.ndarray | torch.Tensor, rows: Sequence[Mapping[str, Any]],
               *, consumed: int, input_digest: str = "", skipped: Sequence[Mapping[str, Any]] = ()) -> None:
        """Append ``len(rows)`` rows and commit. ``consumed`` is the new total of inputs processed."""
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
        self.state = _State(rows=s.rows + n, rows_bytes=s.rows_bytes + len(row_text), skipped=s.skipped + len(skipped),
                            skipped_bytes=s.skipped_bytes + len(skip_text), consumed=consumed, input_digest=input_digest)
        _write_json_atomic(self.dir / STATE, self.state.__dict__)

    def finish(self) -> None:
        """Mark the shard complete; no more rows can be appended."""
        self.state.complete = True
        _write_json_atomic(self.dir / STATE, self.state.__dict__)


def _as_numpy(x: np.ndarray | torch.Tensor, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=dtype)


def finalize(store: str | Path) -> dict[str, Any]:
    """Record the shard list and total row count in the manifest once every shard is complete."""
    store = Path(store)
    manifest = read_manifest(store)
    shards = []
    for d in sorted((store / "shards").iterdir()) if (store / "shards").is_dir() else []:
        if not d.is_dir():
            continue
        st = _State.read(d / STATE) if (d / STATE).exists() else None
        if st is None or not st.complete:
            raise StoreError(f"{d}: shard is not complete; finish (or resume) its extraction before finalising {store}")
        shards.append({"name": d.name, "rows": st.rows, "skipped": st.skipped})
    if not shards:
        raise StoreError(f"{store}: no shards to finalise; the extraction wrote nothing")
    manifest["shards"] = shards
    manifest["rows"] = sum(s["rows"] for s in shards)
    manifest["complete"] = True
    _write_json_atomic(store / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading


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
            return json.loads(f.read(int(off[i + 1] - off[i])))


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
    def open(cls, *paths: str | Path, allow_incomplete: bool = False, allow_empty: bool = False) -> "Datastore":
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
        ``m <= block_rows``; arrays are read-only memory-mapped views."""
        for shard, start in zip(self.shards, self._starts[:-1]):
            if shard.rows == 0:
                continue
            for a in range(0, shard.rows, block_rows):
                b = min(a + block_rows, shard.rows)
                yield int(start) + a, shard.codes[a:b], shard.scales[a:b]  # type: ignore[index]

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
            if shard.rows == 0:
                continue
            with open(shard.dir / "rows.jsonl", "rb") as f:
                for line in f.read(shard.rows_bytes).splitlines():
                    yield json.loads(line)

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
        raise StoreError(f"{path}: shard folders {[d.name for d in dirs]} do not match the manifest's {sorted(listed)}; the store is corrupt")
    shards = []
    for d in dirs:
        if not (d / STATE).exists():
            if allow_incomplete:
                continue
            raise StoreError(f"{d / STATE}: missing; the shard is corrupt, delete it and re-run its extraction")
        st = _State.read(d / STATE)
        if d.name in listed and listed[d.name]["rows"] != st.rows:
            raise StoreError(f"{d}: state says {st.rows} rows, manifest says {listed[d.name]['rows']}; the store is corrupt")
        for name, need in (("codes.bin", st.rows * row_bytes), ("scales.bin", st.rows * 4), ("rows.jsonl", st.rows_bytes)):
            p = d / name
            have = p.stat().st_size if p.exists() else -1
            if have < need or (st.complete and have != need):
                raise StoreError(
                    f"{p}: holds {max(have, 0)} bytes but {st.rows} committed rows need {need}; the file is "
                    f"{'missing' if have < 0 else 'truncated' if have < need else 'longer than committed'}. "
                    f"Delete this shard folder and re-run its extraction"
                )
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


# ---------------------------------------------------------------------------------------------
# Deriving stores


def requantize(src: Datastore, dst: str | Path, spec: QuantizerSpec, *, block_rows: int = 8192) -> Datastore:
    """Write ``src`` (a float store) to ``dst`` in format ``spec``, computing a global scale
    first when ``spec.scale == "global"``. Row table and shard structure are kept."""
    if src.spec.method != "float":
        raise StoreError(f"{src.path}: requantizing needs a float (fp16/fp32) source store, not {src.spec.tag}")
    dst = Path(dst)
    if dst.exists():
        raise StoreError(f"{dst}: already exists; choose a new folder for the requantized store")

    def rows_of(codes: np.ndarray, scales: np.ndarray) -> torch.Tensor:
        x = decode_codes(torch.from_numpy(np.array(codes)), src.spec, src.k)
        return x * torch.from_numpy(np.array(scales))[:, None]

    scale = None
    if spec.scale == "global":
        stats = torch.cat([compute_scale(rows_of(c, s), spec) for _, c, s in src.blocks(block_rows)])
        scale = global_scale(stats, spec, src.k)
    manifest = dict(src.manifest)
    for key in ("shards", "rows", "complete"):
        manifest.pop(key, None)
    manifest["quantizer"] = {"method": spec.method, "bits": spec.bits, "scale": spec.scale}
    manifest["row_bytes"] = spec.row_bytes(src.k)
    manifest["extra"] = {**manifest.get("extra", {}), "requantized_from": str(src.path), "global_scale": scale}
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent if dst.parent.exists() else None))
    try:
        for shard in src.shards:
            w = ShardWriter(tmp, manifest, shard.dir.name)
            rows_text = (shard.dir / "rows.jsonl").read_bytes()[: shard.rows_bytes].splitlines()
            for a in range(0, shard.rows, block_rows):
                b = min(a + block_rows, shard.rows)
                codes, scales = quantize(rows_of(shard.codes[a:b], shard.scales[a:b]), spec, scale)
                w.append(codes, scales, [json.loads(t) for t in rows_text[a:b]], consumed=w.consumed + (b - a))
            w.finish()
        finalize(tmp)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Datastore.open(dst)
