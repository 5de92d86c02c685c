"""The datastore's on-disk layout: its manifest and each shard's committed state.

One store holds one checkpoint's gradients of one set of examples in one format (or, with
``features: "hidden_state"``, the base model's pooled hidden states: :mod:`qless.represent`)::

    STORE/
      manifest.json            what the rows are: format version, features (gradient or
                               hidden_state), projection (kind, seed, k, d),
                               quantizer (method, bits, scale mode), checkpoint (name, learning
                               rate), gradient kind, model, adapter and tokenization identity;
                               once finalised also the row count and the shard list
      shards/NAME/
        codes.bin              rows x row_bytes packed codes (uint8), row-major
        scales.bin             rows x float32 (little-endian): the scale S of each row
        rows.jsonl             one JSON object per row: {"source", "id", ...}
        skipped.jsonl          inputs left out of the store, with the reason
        state.json             the committed position: rows, byte sizes, inputs consumed
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from qless import __version__
from qless.config import describe_differences, differences
from qless.errors import QlessError, StoreError, StoreMismatchError
from qless.files import atomic_write_json, read_json
from qless.quantize import QuantizerSpec

FORMAT = "qless-datastore"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = "state.json"
DATA_FILES = ("codes.bin", "scales.bin", "rows.jsonl", "skipped.jsonl")

#: What a store's rows are: LoRA gradients, or hidden-state representations (qless.represent).
#: Manifests written before the field existed hold gradients.
FEATURES = ("gradient", "hidden_state")

#: Manifest fields that must agree for two stores to be combined into one.
COMBINE_FIELDS = ("format_version", "features", "projection", "quantizer", "checkpoint", "warmup", "gradient", "model", "adapter",
                  "tokenization")
#: Fields that must agree between pool and target stores of one checkpoint for scoring.
SCORE_FIELDS = ("features", "projection", "checkpoint", "warmup", "model", "adapter")


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
    warmup_checkpoints: Sequence[str] | None = None,
    features: str = "gradient",
) -> dict[str, Any]:
    """A manifest for a new store. ``projection`` is :meth:`ProjectionConfig.identity`;
    ``checkpoint`` has ``name`` and ``learning_rate`` (and the ``adapter_sha256`` of its
    weights when it comes from a warmup); ``gradient`` is ``"adam"`` or ``"sgd"``;
    ``warmup_checkpoints`` lists every checkpoint of the warmup, all of which scoring requires
    (default: this checkpoint alone); ``features`` is ``"gradient"`` or ``"hidden_state"``
    (then ``gradient`` is ``"none"``)."""
    if features not in FEATURES:
        raise ValueError(f"features {features!r}: use one of {', '.join(FEATURES)}")
    for key in ("kind", "dim", "seed", "input_dim"):
        if key not in projection:
            raise ValueError(f"projection identity lacks {key!r}")
    if "name" not in checkpoint or "learning_rate" not in checkpoint:
        raise ValueError("checkpoint needs 'name' and 'learning_rate'")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "features": features,
        "projection": dict(projection),
        "quantizer": {"method": quantizer.method, "bits": quantizer.bits, "scale": quantizer.scale},
        "row_bytes": quantizer.row_bytes(int(projection["dim"])),
        "checkpoint": {"name": str(checkpoint["name"]), "learning_rate": float(checkpoint["learning_rate"]),
                       **({"adapter_sha256": str(checkpoint["adapter_sha256"])} if "adapter_sha256" in checkpoint else {})},
        "warmup": {"checkpoints": [str(c) for c in (warmup_checkpoints or [checkpoint["name"]])]},
        "gradient": gradient,
        "model": dict(model or {}),
        "adapter": dict(adapter or {}),
        "tokenization": dict(tokenization or {}),
        "extra": dict(extra or {}),
        "created_with": f"qless {__version__}",
    }


def require_same(a: Mapping[str, Any], b: Mapping[str, Any], fields: Sequence[str], what_a: str, what_b: str, fix: str) -> None:
    """Raise StoreMismatchError naming the first differing field (in ``fields`` order), both values and the fix."""
    diff = [path for name in fields for path in differences(a.get(name), b.get(name), f"{name}.")]
    if diff:
        raise StoreMismatchError(f"{what_a} and {what_b} differ in {describe_differences(a, b, diff)}. {fix}")


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and validate ``STORE/manifest.json``: every field qless uses has the right type."""
    mpath = Path(path) / MANIFEST
    if not Path(path).is_dir():
        raise StoreError(f"{path}: no such datastore directory; give the folder that holds {MANIFEST}")
    if not mpath.is_file():
        raise StoreError(f"{mpath}: manifest missing; this folder is not a qless datastore (or its write never started)")
    m = read_json(mpath, StoreError, "the store is corrupt, re-run the extraction that wrote it")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise StoreError(f"{mpath}: not a qless datastore manifest (field 'format' must be {FORMAT!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"{mpath}: format_version {m.get('format_version')!r} is not supported by qless {__version__} "
            f"(it reads version {FORMAT_VERSION}); use the qless version that wrote it"
        )
    m.setdefault("features", "gradient")  # written before hidden-state stores existed
    for key in ("projection", "quantizer", "row_bytes", "checkpoint", "gradient"):
        if key not in m:
            raise StoreError(f"{mpath}: field {key!r} missing; the manifest is corrupt, re-run the extraction that wrote it")
    _check_manifest_fields(m, mpath)
    try:
        spec = QuantizerSpec(**m["quantizer"])
    except (TypeError, ValueError, QlessError) as e:
        raise StoreError(f"{mpath}: field 'quantizer' is invalid ({e})") from None
    k = m["projection"]["dim"]
    if spec.row_bytes(k) != m["row_bytes"]:
        raise StoreError(f"{mpath}: row_bytes {m['row_bytes']} does not match {spec.tag} at k={k}; the manifest is corrupt")
    return m


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_MANIFEST_FIELDS: list[tuple[str, Callable[[Any], bool], str, bool]] = [
    # dotted field, check, what it must be, required
    ("projection", lambda v: isinstance(v, dict), "an object", True),
    ("projection.kind", lambda v: isinstance(v, str), "a string", True),
    ("projection.dim", lambda v: _is_int(v, 1), "a positive integer", True),
    ("projection.seed", _is_int, "a non-negative integer", True),
    ("projection.input_dim", lambda v: _is_int(v, 1), "a positive integer", True),
    ("quantizer", lambda v: isinstance(v, dict), "an object", True),
    ("row_bytes", lambda v: _is_int(v, 1), "a positive integer", True),
    ("checkpoint", lambda v: isinstance(v, dict), "an object", True),
    ("checkpoint.name", lambda v: isinstance(v, str) and v != "", "a non-empty string", True),
    ("checkpoint.learning_rate", _is_number, "a finite number", True),
    ("features", lambda v: v in FEATURES, "'gradient' or 'hidden_state'", True),
    ("gradient", lambda v: v in ("adam", "sgd", "none"), "'adam', 'sgd' or 'none' (hidden states)", True),
    ("warmup", lambda v: isinstance(v, dict), "an object", False),
    ("warmup.checkpoints", lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v), "a list of names", False),
    ("model", lambda v: isinstance(v, dict), "an object", False),
    ("adapter", lambda v: isinstance(v, dict), "an object", False),
    ("tokenization", lambda v: isinstance(v, dict), "an object", False),
    ("extra", lambda v: isinstance(v, dict), "an object", False),
    ("rows", _is_int, "a non-negative integer", False),
    ("complete", lambda v: isinstance(v, bool), "true or false", False),
    ("shards", lambda v: isinstance(v, list) and all(
        isinstance(s, dict) and isinstance(s.get("name"), str) and _is_int(s.get("rows")) and _is_int(s.get("skipped"))
        for s in v), "a list of {name, rows, skipped}", False),
]


def _check_manifest_fields(m: dict[str, Any], mpath: Path) -> None:
    for dotted, ok, what, required in _MANIFEST_FIELDS:
        node: Any = m
        present = True
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                present = False
                break
            node = node[part]
        if not present:
            if required:
                raise StoreError(f"{mpath}: field {dotted!r} missing; the manifest is corrupt, re-run the extraction that wrote it")
            continue
        if not ok(node):
            raise StoreError(f"{mpath}: field {dotted!r} must be {what}, got {node!r:.80}; the manifest is corrupt, "
                             "re-run the extraction that wrote it")


def write_manifest(store: Path, manifest: Mapping[str, Any]) -> None:
    """Replace ``STORE/manifest.json`` atomically."""
    atomic_write_json(Path(store) / MANIFEST, dict(manifest))


@dataclass
class ShardState:
    """A shard's committed position (``state.json``): rows and byte sizes of the data files that
    count, inputs consumed, the running fingerprint of those inputs, and whether it is complete."""

    rows: int = 0
    rows_bytes: int = 0
    skipped: int = 0
    skipped_bytes: int = 0
    consumed: int = 0
    input_digest: str = ""
    complete: bool = False

    @classmethod
    def read(cls, path: Path) -> ShardState:
        fix = "delete this shard folder and re-run its extraction"
        data = read_json(path, StoreError, fix)
        if not isinstance(data, dict) or set(data) != {f.name for f in fields(cls)}:
            raise StoreError(f"{path}: shard state must be an object with fields {', '.join(f.name for f in fields(cls))}; {fix}")
        for f in fields(cls):
            value = data[f.name]
            good = {"int": _is_int(value), "str": isinstance(value, str), "bool": isinstance(value, bool)}[f.type]
            if not good:
                raise StoreError(f"{path}: field {f.name!r} must be of type {f.type}, got {value!r:.80}; {fix}")
        return cls(**data)

    def write(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))

    def sizes(self, row_bytes: int) -> dict[str, int]:
        """Committed byte size of each data file."""
        return {"codes.bin": self.rows * row_bytes, "scales.bin": self.rows * 4, "rows.jsonl": self.rows_bytes,
                "skipped.jsonl": self.skipped_bytes}

    def check_files(self, shard_dir: Path, row_bytes: int, exact: bool | None = None) -> None:
        """Raise StoreError unless each data file holds at least its committed bytes (exactly
        that many when ``exact``, default: when the shard is complete)."""
        exact = self.complete if exact is None else exact
        for name, need in self.sizes(row_bytes).items():
            p = shard_dir / name
            have = p.stat().st_size if p.exists() else -1
            if have < 0 and need == 0 and not exact:
                continue  # not written yet: nothing committed
            if have < need or (exact and have != need):
                state = "missing" if have < 0 else "truncated" if have < need else "longer than committed"
                raise StoreError(
                    f"{p}: holds {max(have, 0)} bytes but {self.rows} committed rows need {need}; the file is {state}. "
                    f"The store is corrupt: delete this shard folder (or the whole store) and re-run its extraction"
                )
