"""Extraction under a launcher: ``torchrun`` or ``accelerate launch`` start one process per GPU
(or CPU worker) on one or several nodes and tell each its ``RANK`` and ``WORLD_SIZE``.

Each rank writes its own shard of the same stores (a contiguous range of whole chunks, see
:func:`qless.extraction.shard_range`); ranks meet at a barrier of the launcher's process group
(NCCL between GPUs, gloo between CPU processes) once every shard is written, and rank 0 then
finalises each store and derives the ``-global`` formats. Without a launcher
(``WORLD_SIZE`` unset or 1) nothing here changes anything.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

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
    """``cfg`` (an ExtractConfig) with this rank's shard; ConfigError when the user set other shards."""
    if launch is None:
        return cfg
    if cfg.num_shards != 1 and (cfg.num_shards, cfg.shard_index) != (launch.world_size, launch.rank):
        raise ConfigError(f"extract.num_shards={cfg.num_shards} / shard_index={cfg.shard_index} conflict with the launcher's "
                          f"WORLD_SIZE={launch.world_size} / RANK={launch.rank}; leave them unset under torchrun")
    return replace(cfg, shard_index=launch.rank, num_shards=launch.world_size)


def device_for(spec: str, launch: Launch | None) -> str:
    """``auto`` or ``cuda`` becomes this rank's GPU ``cuda:LOCAL_RANK`` under a launcher."""
    if launch is not None and spec in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{launch.local_rank}"
    return spec


@contextmanager
def process_group(launch: Launch | None) -> Iterator[None]:
    """The launcher's process group for the duration (created here unless one exists)."""
    if launch is None:
        yield
        return
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(launch.local_rank)
        dist.init_process_group(backend)
        log.info("rank %d of %d joined the %s process group", launch.rank, launch.world_size, backend)
    try:
        yield
    finally:
        if own:
            dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
