"""Deriving stores from a float store: other formats, and the global scale mode of the QLESS code."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from qless.errors import StoreError, StoreMismatchError
from qless.files import atomic_folder, locked
from qless.quantize import QuantizerSpec, compute_scale, decode_codes, global_scale, quantize
from qless.store.layout import MANIFEST, STATE, ShardState, read_manifest
from qless.store.reader import Datastore
from qless.store.writer import ShardWriter, finalize


def requantize(src: Datastore, dst: str | Path, spec: QuantizerSpec, *, block_rows: int = 8192) -> Datastore:
    """Write ``src`` (a float store) to ``dst`` in format ``spec``, computing a global scale
    first when ``spec.scale == "global"``. Row table and shard structure are kept."""
    if not src.spec.impl.lossless_source:
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
    manifest["extra"] = {**manifest.get("extra", {}), "requantized_from": str(src.path), "global_scale": scale,
                         "source_digest": content_digest(src)}
    with atomic_folder(dst, what="the requantized store") as tmp:
        for shard in src.shards:
            w = ShardWriter(tmp, manifest, shard.dir.name)
            rows_text = (shard.dir / "rows.jsonl").read_bytes()[: shard.rows_bytes].splitlines()
            for a in range(0, shard.rows, block_rows):
                b = min(a + block_rows, shard.rows)
                codes, scales = quantize(rows_of(shard.codes[a:b], shard.scales[a:b]), spec, scale)
                w.append(codes, scales, [json.loads(t) for t in rows_text[a:b]], consumed=w.consumed + (b - a))
            w.finish()
        finalize(tmp)
    return Datastore.open(dst)


def content_digest(store: Datastore) -> str:
    """SHA-256 naming what a store holds: each shard's name, rows and input fingerprint."""
    parts = []
    for shard in store.shards:
        state = ShardState.read(shard.dir / STATE)
        parts.append([shard.dir.name, state.rows, state.input_digest])
    return hashlib.sha256(json.dumps([store.manifest["checkpoint"], parts]).encode()).hexdigest()


def derive_once(src: Path, dst: Path, spec: QuantizerSpec) -> bool:
    """Make ``dst`` from the float store ``src`` unless it exists; False while ``src`` is unfinished.

    Run by every process of a sharded extraction: the first to find ``src`` finalised derives
    it, under a lock; an existing ``dst`` must have been derived from this ``src``."""
    if not read_manifest(src).get("complete"):
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    with locked(dst.parent / f".{dst.name}.lock", f"the derivation of {dst}", wait=600):
        source = Datastore.open(src)
        if (dst / MANIFEST).exists():
            made_from = read_manifest(dst).get("extra", {}).get("source_digest")
            if made_from != content_digest(source):
                raise StoreMismatchError(f"{dst}: was derived from other data than {src} holds now; delete {dst} "
                                         "to derive it again")
            return True
        requantize(source, dst, spec)
    return True
