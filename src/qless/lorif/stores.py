"""LoRIF factor stores as the datastore holds them: which stores are factor stores, their layout, their rows.

A LoRIF store is an ordinary qless datastore whose manifest says ``projection.kind = "lorif"``;
its rows are the concatenated per-layer factors of :class:`~qless.lorif.factors.FactorLayout`,
quantized like any other row. The LoRIF maths needs the factors themselves (not only their
direction), so rows are read back as ``code x scale`` (:func:`qless.quantize.dequantize`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from qless.errors import StoreError, StoreMismatchError
from qless.lorif.factors import FactorLayout
from qless.quantize import dequantize
from qless.store import Datastore


def is_factor_store(store: Datastore) -> bool:
    return store.manifest.get("projection", {}).get("kind") == "lorif"


def refuse_factor_stores(stores: Sequence[Datastore]) -> None:
    """For the LESS/QLESS cosine: a LoRIF factor store is not a gradient vector, so refuse it by name."""
    for store in stores:
        if is_factor_store(store):
            raise StoreMismatchError(f"{store.path}: a LoRIF factor store; score it with --method lorif (its rows are "
                                     "rank-c factors, projection.kind lorif, not gradient vectors to take cosines of)")


def require_factor_stores(stores: Sequence[Datastore], what: str) -> None:
    """For LoRIF: refuse any store that does not hold factor rows, naming it and its projection kind."""
    for store in stores:
        if not is_factor_store(store):
            kind = store.manifest.get("projection", {}).get("kind")
            raise StoreMismatchError(
                f"{store.path}: a LESS/QLESS gradient store (projection.kind {kind}), not a LoRIF factor store; "
                f"{what} needs stores extracted with projection.kind lorif and extract.pool_gradient sgd (score this "
                "one with --method less)")


def store_layout(store: Datastore) -> FactorLayout:
    """The factor layout a LoRIF store's manifest records (``layer_list``, ``rank``), checked against its row width."""
    proj = store.manifest["projection"]
    layers, rank = proj.get("layer_list"), proj.get("rank")
    if not isinstance(layers, list) or not isinstance(rank, int) or not all(
            isinstance(x, list) and len(x) == 3 and isinstance(x[0], str) and all(isinstance(v, int) for v in x[1:])
            for x in layers):
        raise StoreError(f"{store.path}/manifest.json: projection.layer_list ([[name, k_out, k_in], ...]) and "
                         "projection.rank (an integer) are required in a LoRIF store; extract it again")
    layout = FactorLayout([tuple(x) for x in layers], rank)
    if layout.width != store.k:
        raise StoreError(f"{store.path}/manifest.json: projection.dim {store.k} is not the width "
                         f"{layout.width} of its layer_list at rank {rank}; the manifest is corrupt, extract it again")
    return layout


def factor_rows(store: Datastore, block_rows: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first_row, rows [m, width])`` in row order: the stored factors, decoded codes times the
    row scale, in ``dtype`` on ``device``."""
    for first, codes, scales in store.blocks(block_rows):
        rows = dequantize(torch.from_numpy(np.array(codes)), torch.from_numpy(np.array(scales)), store.spec, store.k)
        yield first, rows.to(device=device, dtype=dtype)


def all_factor_rows(store: Datastore, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Every row of a (small) store at once, as :func:`factor_rows`."""
    parts = [rows for _, rows in factor_rows(store, 1 << 16, device, dtype)]
    return torch.cat(parts) if parts else torch.zeros(0, store.k, dtype=dtype, device=device)


__all__ = ["all_factor_rows", "factor_rows", "is_factor_store", "refuse_factor_stores", "require_factor_stores",
           "store_layout"]
