"""Named settings: the one table of presets for every stage.

A preset is a partial run configuration (section -> fields, as in a ``qless run`` file) layered
under the file's and the command line's own values. Stage commands take their own section
(``qless warmup --preset cpu`` uses ``cpu``'s ``model``, ``adapter``, ``data`` and ``warmup``);
``qless data build`` takes the ``benchmark`` section.

* ``paper``: the QLESS paper's settings (every config's defaults): LoRA r 64, alpha 256 on
  q/k/v/o, 4 warmup epochs at lr 2e-5 with a cosine schedule, batch 128, 2,048 tokens, k 8192.
* ``less``: LESS's differences from it: LoRA r 128, alpha 512, a linear schedule, fp16 storage.
* ``cpu``: a laptop CPU (the demo): r 8, 256 tokens, 2 epochs at lr 2e-4, small batches, and a
  400-example benchmark pool.
"""

from __future__ import annotations

import copy
from typing import Any

from qless.errors import ConfigError

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "less": {
        "adapter": {"r": 128, "alpha": 512.0},
        "warmup": {"schedule": "linear"},
        "extract": {"formats": ["fp16"]},
        "select_format": "fp16",
    },
    "cpu": {
        # on a CPU larger batches buy no speed, only memory
        "adapter": {"r": 8, "alpha": 32.0},
        "data": {"max_length": 256},
        "target_data": {"max_length": 256, "truncation": "left"},
        "warmup": {"epochs": 2, "learning_rate": 2e-4, "batch_size": 8, "micro_batch_size": 2, "warmup_ratio": 0.1},
        "extract": {"batch_size": 4, "max_batch_tokens": 1024, "chunk_size": 128},
        "benchmark": {"pool_size": 400},
    },
}


def preset(name: Any, where: str = "preset") -> dict[str, Any]:
    """A copy of the named preset, or ConfigError listing the names."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"{where}: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def preset_section(name: str, section: str) -> Any:
    """One section of a preset ({} when the preset leaves it at the defaults)."""
    return preset(name).get(section, {})
