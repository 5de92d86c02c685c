"""Extraction under a launcher: ``torchrun`` or ``accelerate launch`` start one process per GPU
(or CPU worker) on one or several nodes and tell each its ``RANK`` and ``WORLD_SIZE``.

Each rank writes its own shard of the same stores (a contiguous range of whole chunks, see
:func:`qless.extraction.shard_range`); ranks meet at a barrier of the launcher's process group
(gloo, which needs no GPU collective) once every shard is written, and rank 0 then
finalises each store and derives the ``-global`` formats. Without a launcher
(``WORLD_SIZE`` unset or 1) nothing here changes anything.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta

import torch

from qless.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int


def launch_info() -> Launch | None:
    """The launcher's rank and world size from the environment, or None outside a launcher."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return None
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as e:
        raise ConfigError(f"the launcher's environment is incomplete or not numeric ({e}): WORLD_SIZE, RANK and "
                          "LOCAL_RANK are set by torchrun and accelerate launch") from None
    if not 0 <= rank < world:
        raise ConfigError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return Launch(rank, world, local)


def shard_config(cfg, launch: Launch | None):
    """``cfg`` (an ExtractConfig) with this rank's shard; ConfigError (on every rank alike) when the
    user set shards too."""
    if launch is None:
        return cfg
    if cfg.num_shards != 1 or cfg.shard_index != 0:
        raise ConfigError(f"extract.num_shards={cfg.num_shards} / shard_index={cfg.shard_index} are set while the launcher "
                          f"gives WORLD_SIZE={launch.world_size}; under torchrun or accelerate launch leave them unset")
    return replace(cfg, shard_index=launch.rank, num_shards=launch.world_size)


def device_for(spec: str, launch: Launch | None) -> str:
    """``auto`` or ``cuda`` becomes this rank's GPU ``cuda:LOCAL_RANK`` under a launcher."""
    if launch is not None and spec in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{launch.local_rank}"
    return spec


BARRIER_TIMEOUT = timedelta(hours=72)
"""How long a rank that finished its shard waits for the slowest one (shards differ in length)."""


@contextmanager
def process_group(launch: Launch | None) -> Iterator[None]:
    """A gloo process group over the launcher's ranks for the duration (created here unless one
    exists). Ranks only exchange one flag at the end, so gloo serves GPU ranks too, with a timeout
    long enough for uneven shards."""
    if launch is None:
        yield
        return
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
        log.info("rank %d of %d joined the process group", launch.rank, launch.world_size)
    try:
        yield
    finally:
        if own:
            dist.destroy_process_group()


def all_succeeded(ok: bool) -> bool:
    """Wait for every rank and tell whether all of them succeeded (True without a process group).
    A rank that failed calls this too, so that the others stop waiting and fail with it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
