"""Progress bars and log lines that do not trample each other.

Long loops show a tqdm bar unless turned off: by the caller (``progress=False``), by the
``--quiet`` flag, or by the environment (``TQDM_DISABLE=1``, tqdm's own switch). Log lines
printed while a bar is on screen go through the bar (:func:`bars_and_logs`), so they start on
a line of their own instead of being glued to the bar.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm

_TRUE = ("1", "true", "yes", "on")


def bars_disabled() -> bool:
    """Whether the environment turns progress bars off (``TQDM_DISABLE``)."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in _TRUE


def quiet_libraries() -> None:
    """Turn off the bars of transformers (``Loading weights``) when qless's bars are off."""
    if bars_disabled():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar, shown unless ``enabled`` is false or the environment turns bars off."""
    return tqdm(iterable, disable=not enabled or bars_disabled(), **kwargs)


@contextmanager
def bars_and_logs(level: int = logging.INFO, *, quiet: bool = False) -> Iterator[None]:
    """For one CLI command: log to stderr at ``level`` with log lines written through tqdm (so
    they never glue onto a bar), and no bars at all when ``quiet``. Restores everything after."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    old_level, old_env = root.level, os.environ.get("TQDM_DISABLE")
    root.addHandler(handler)
    root.setLevel(level)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        with logging_redirect_tqdm([root]):
            yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        if quiet:
            if old_env is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = old_env
