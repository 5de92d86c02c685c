"""The gradient datastore: quantized projected gradients on disk, self-describing, memory-mapped.

* :mod:`~qless.store.layout`: the manifest and each shard's committed state
* :mod:`~qless.store.writer`: :class:`ShardWriter` (append, resume), :func:`finalize`
* :mod:`~qless.store.reader`: :class:`Datastore` (memory-mapped, read-only), :func:`open_by_checkpoint`
* :mod:`~qless.store.derive`: :func:`requantize` (other formats and the global scale from a float store)
"""

from qless.store.derive import requantize
from qless.store.layout import (
    COMBINE_FIELDS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SCORE_FIELDS,
    STATE,
    ShardState,
    new_manifest,
    read_manifest,
    require_same,
)
from qless.store.reader import Datastore, open_by_checkpoint
from qless.store.writer import ShardWriter, create_store, finalize

__all__ = [
    "COMBINE_FIELDS",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "SCORE_FIELDS",
    "STATE",
    "Datastore",
    "ShardState",
    "ShardWriter",
    "create_store",
    "finalize",
    "new_manifest",
    "open_by_checkpoint",
    "read_manifest",
    "requantize",
    "require_same",
]
