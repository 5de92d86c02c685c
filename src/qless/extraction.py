"""Gradient extraction: the one place where gradient -> project -> quantize -> datastore is wired.

For every example set (the pool, each target task) and every warmup checkpoint: per-example
gradients of the mean response-token loss w.r.t. the LoRA parameters, many examples per
forward/backward (:class:`~qless.gradients.PerExampleGradients`); pool examples turned into
the checkpoint's Adam direction, target examples kept plain; projected to k dimensions; and
quantized into every requested format at once (the gradients are the expensive part).

Stores land in ``OUT/<format>/<set>/<checkpoint>/``. Examples are processed in fixed chunks
of ``chunk_size`` counted from the start of the shard; each chunk is committed to every
store in one append. An interrupted run resumes at the first uncommitted chunk of each store,
and since chunk boundaries and the batching inside a chunk are fixed, the resumed store is
byte-identical to an uninterrupted one. Per-example gradients are buffered up to
``buffer_mb`` before a projection pass, because generating the projection matrix is paid per
pass, not per example. Rows whose gradient is NaN or infinite are reported by id and recorded
in the store's ``skipped.jsonl`` instead of being stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from qless.config import Config, option, to_dict
from qless.console import progress_bar
from qless.data import DataConfig, Example, Tokenized, collate, examples_digest, tokenize_examples
from qless.errors import ConfigError, DataError, ModelError, StoreMismatchError
from qless.files import safe_name
from qless.gradients import PerExampleGradients, adam_direction
from qless.lorif.capture import LayerCapture
from qless.models import ModelConfig, adapter_identity, load_adapter, load_model, release_memory, set_adapter_weights
from qless.project import ProjectionConfig, Projector
from qless.quantize import QuantizerSpec, quantize
from qless.store import MANIFEST, ShardWriter, create_store, finalize, new_manifest, read_manifest
from qless.store.derive import derive_once
from qless.store.writer import complete_shard
from qless.training import Checkpoint

log = logging.getLogger(__name__)

DEFAULT_FORMATS = ("fp16", "absmax8", "absmean4", "absmean2", "sign1")


@dataclass(frozen=True)
class ExtractConfig(Config):
    """How gradients are computed and stored (the projection has its own config)."""

    section = "extract"

    formats: tuple[str, ...] = option(DEFAULT_FORMATS, "store formats written in one pass: fp32 fp16 absmax8/4/2 absmean8/4/2 "
                                      "sign1; '-global' variants (one scale per store) are derived from fp32")
    batch_size: int = option(16, "most examples per forward/backward pass")
    max_batch_tokens: int = option(8192, "most padded tokens per forward/backward pass")
    chunk_size: int = option(256, "examples per commit; a resumed run restarts at a chunk boundary")
    buffer_mb: int = option(1024, "per-example gradients buffered before one projection pass (MiB)")
    pool_gradient: Literal["adam", "sgd"] = option(
        "adam", "pool rows: the checkpoint's Adam direction (LESS, QLESS) or the plain gradient (sgd; the only one "
        "projection kind logra can project)")
    shard_index: int = option(0, "this process's shard (distributed extraction: one shard per process)")
    num_shards: int = option(1, "number of processes sharing the work; each takes a contiguous range")

    def validate(self) -> None:
        if not self.formats:
            raise ConfigError("extract.formats: give at least one format, e.g. absmean4")
        specs = [QuantizerSpec.parse(f) for f in self.formats]
        tags = [s.tag for s in specs]
        if len(set(tags)) != len(tags):
            raise ConfigError(f"extract.formats repeats a format: {list(self.formats)}")
        if any(s.scale == "global" for s in specs) and "fp32" not in tags:
            raise ConfigError("extract.formats: global-scale formats are derived from an fp32 store; add fp32 to the formats")
        for name in ("batch_size", "max_batch_tokens", "chunk_size", "buffer_mb", "num_shards"):
            if getattr(self, name) < 1:
                raise ConfigError(f"extract.{name} must be a positive integer, got {getattr(self, name)}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"extract.shard_index must be in [0, {self.num_shards}), got {self.shard_index}")

    @property
    def specs(self) -> list[QuantizerSpec]:
        return [QuantizerSpec.parse(f) for f in self.formats]

    @property
    def shard_name(self) -> str:
        return f"{self.shard_index:05d}-of-{self.num_shards:05d}"


def _fingerprint(inputs: Sequence[Example], upto: int, chunk_size: int) -> Any:
    """Running fingerprint of the first ``upto`` inputs: the chunk digests of their content
    chained, so that each commit extends it by one chunk's hash."""
    h = hashlib.sha256()
    for c0 in range(0, upto, chunk_size):
        h.update(bytes.fromhex(examples_digest(inputs[c0:min(c0 + chunk_size, upto)])))
    return h


def _micro_batches(items: Sequence[Tokenized], cfg: ExtractConfig) -> list[list[int]]:
    """Indices of ``items`` grouped longest first, capped by examples and padded tokens."""
    order = sorted(range(len(items)), key=lambda i: (-len(items[i].input_ids), i))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            cur = batches[-1]
            longest = len(items[cur[0]].input_ids)
            if len(cur) < cfg.batch_size and longest * (len(cur) + 1) <= cfg.max_batch_tokens:
                cur.append(i)
                continue
        batches.append([i])
    return batches


def check_projection(projection: ProjectionConfig, cfg: ExtractConfig) -> None:
    """Refuse a projection the pool's preconditioning does not commute with, before any work."""
    if projection.kind in ("logra", "lorif") and cfg.pool_gradient == "adam":
        raise ConfigError(
            f"projection.kind {projection.kind} projects each layer's input and output separately and never forms the "
            "per-example gradient, so the Adam direction (elementwise on the whole gradient) cannot be taken: set "
            "extract.pool_gradient=sgd (plain gradients for the pool), or use a rademacher, gaussian or sparse projection")


class Extractor:
    """A loaded model with its adapter, ready to write gradient stores for example sets."""

    def __init__(self, checkpoints: Sequence[Checkpoint], out_dir: str | Path, cfg: ExtractConfig = ExtractConfig(),
                 projection: ProjectionConfig = ProjectionConfig(), model_cfg: ModelConfig = ModelConfig(),
                 data_cfg: DataConfig = DataConfig(), progress: bool = True,
                 warmup_checkpoints: Sequence[str] | None = None) -> None:
        check_projection(projection, cfg)
        if not checkpoints:
            raise ModelError("no warmup checkpoint given; run `qless warmup` first")
        self.checkpoints = list(checkpoints)
        for c in self.checkpoints:
            safe_name(c.name, "checkpoint name")
        # every checkpoint of the warmup, which scoring will require (extract the others later)
        self.warmup_checkpoints = list(warmup_checkpoints or [c.name for c in self.checkpoints])
        self.out_dir = Path(out_dir)
        self.cfg, self.projection, self.data_cfg, self.progress = cfg, projection, data_cfg, progress
        base, self.tokenizer, self.model_identity = load_model(model_cfg)
        self.model = load_adapter(base, self.checkpoints[0].path)
        # LoGra and LoRIF project inside the gradient hooks: the rows come out k wide, with nothing left to project
        self.grads: PerExampleGradients | LayerCapture
        if projection.kind == "lorif":
            self.grads = LayerCapture(self.model, projection)
        else:
            self.grads = PerExampleGradients(self.model, projection=projection if projection.kind == "logra" else None)
        self.adapter_identity = {k: v for k, v in adapter_identity(self.model).items() if k != "parameters"}
        self.device = self.grads.device
        if projection.kind in ("logra", "lorif"):
            self.projector, self.out_dim = None, self.grads.dim
            self.projection_identity = self.grads.identity() if projection.kind == "lorif" else self.grads.logra.identity()
        else:
            self.projector = Projector(projection, self.grads.dim, self.device)
            self.out_dim = self.projector.out_dim
            self.projection_identity = projection.identity(self.grads.dim)
        self.buffer_rows = max(1, min(cfg.chunk_size, cfg.buffer_mb * 2**20 // (4 * self.grads.dim)))
        log.info("LoRA gradient dimension d = %d; projecting to k = %d (%s%s), %d rows per projection pass",
                 self.grads.input_dim, self.out_dim, projection.kind,
                 f", nnz {projection.nnz}" if projection.kind == "sparse" else "", self.buffer_rows)

    # -- one set -------------------------------------------------------------------------------

    def run(self, name: str, examples: Sequence[Example], kind: Literal["pool", "target"],
            data_cfg: DataConfig | None = None) -> dict[str, list[Path]]:
        """Write ``OUT/<format>/<name>/<checkpoint>`` stores for ``examples`` (tokenized with
        ``data_cfg``, default the extractor's); returns the stores by format."""
        if kind not in ("pool", "target"):
            raise ConfigError(f"kind must be 'pool' or 'target', got {kind!r}")
        safe_name(name, "set name")
        data_cfg = data_cfg or self.data_cfg
        a, b = shard_range(len(examples), self.cfg.chunk_size, self.cfg.shard_index, self.cfg.num_shards)
        inputs = examples[a:b]
        out: dict[str, list[Path]] = {s.tag: [] for s in self.cfg.specs}
        for ckpt in self.checkpoints:
            for tag, path in self._run_checkpoint(name, inputs, kind, ckpt, data_cfg).items():
                out[tag].append(path)
        return derive_global(self.out_dir, name, out, self.cfg)

    def _manifest(self, spec: QuantizerSpec, ckpt: Checkpoint, kind: str, name: str, data_cfg: DataConfig) -> dict[str, Any]:
        return new_manifest(
            projection=self.projection_identity, quantizer=spec,
            checkpoint={"name": ckpt.name, "learning_rate": ckpt.learning_rate, "adapter_sha256": ckpt.adapter_sha256()},
            warmup_checkpoints=self.warmup_checkpoints, gradient=self._gradient(kind),
            model=self.model_identity, adapter=self.adapter_identity,
            tokenization={"template": data_cfg.template, "max_length": data_cfg.max_length, "truncation": data_cfg.truncation},
            # pool_gradient is the manifest's own "gradient" field
            extra={"set": name, "extraction": {k: v for k, v in to_dict(self.cfg).items()
                                               if k not in ("formats", "shard_index", "pool_gradient")},
                   "projection_compute": {"chunk_size": self.projection.chunk_size, "dtype": self.projection.compute_dtype}},
        )

    def _gradient(self, kind: str) -> str:
        return self.cfg.pool_gradient if kind == "pool" else "sgd"

    def _run_checkpoint(self, name: str, inputs: Sequence[Example], kind: str, ckpt: Checkpoint,
                        data_cfg: DataConfig) -> dict[str, Path]:
        specs = [s for s in self.cfg.specs if s.scale == "row"]
        paths = {s.tag: self.out_dir / s.tag / name / ckpt.name for s in specs}
        shard = self.cfg.shard_name
        manifests = {s.tag: self._manifest(s, ckpt, kind, name, data_cfg) for s in specs}
        full = _fingerprint(inputs, len(inputs), self.cfg.chunk_size).hexdigest()
        done = set()
        for tag, path in paths.items():
            if not (path / MANIFEST).exists():
                continue
            create_store(path, manifests[tag])  # an existing store must match this run's settings
            state = complete_shard(path, shard)  # a complete shard is verified, not assumed
            if state is not None:
                if state.input_digest != full or state.consumed != len(inputs):
                    raise StoreMismatchError(
                        f"{path}: holds a finished store of set {name!r} made from other input examples than this "
                        f"run's ({state.consumed} inputs, another fingerprint); write to a new output folder, or delete "
                        "it to extract again")
                done.add(tag)
        if len(done) == len(paths):
            log.info("set %s, %s: stores already complete", name, ckpt.name)
            for p in paths.values():
                _try_finalize(p, self.cfg.num_shards)
            return paths
        writers: dict[str, ShardWriter] = {}
        try:
            for tag in paths:
                if tag not in done:
                    writers[tag] = ShardWriter(paths[tag], manifests[tag], shard)
            self._write(writers, name, inputs, kind, ckpt, data_cfg)
        finally:
            for w in writers.values():
                w.close()
        release_memory()
        for p in paths.values():
            _try_finalize(p, self.cfg.num_shards)
        return paths

    def _write(self, writers: dict[str, ShardWriter], name: str, inputs: Sequence[Example], kind: str, ckpt: Checkpoint,
               data_cfg: DataConfig) -> None:
        """Compute the rows each writer still lacks, chunk by chunk, and finish the writers."""
        for w in writers.values():
            if w.consumed % self.cfg.chunk_size and w.consumed != len(inputs):
                raise StoreMismatchError(f"{w.dir}: {w.consumed} inputs committed, not a multiple of chunk_size "
                                         f"{self.cfg.chunk_size}; resume with the settings that wrote it")
            if w.consumed and w.state.input_digest != _fingerprint(inputs, w.consumed, self.cfg.chunk_size).hexdigest():
                raise StoreMismatchError(f"{w.dir}: was written from other input examples than this run's; "
                                         "write to a new output folder")
        set_adapter_weights(self.model, ckpt.path)
        moments = self._moments(ckpt) if self._gradient(kind) == "adam" else None
        start = min(w.consumed for w in writers.values())
        running = _fingerprint(inputs, start, self.cfg.chunk_size)
        n_skipped = 0
        bar = progress_bar(total=len(inputs), initial=start, desc=f"{name} {ckpt.name}", unit="ex", enabled=self.progress)
        t0 = time.perf_counter()
        for c0 in range(start, len(inputs), self.cfg.chunk_size):
            chunk = inputs[c0:c0 + self.cfg.chunk_size]
            # tokenized a chunk at a time, so that memory does not grow with the set
            items, dropped = tokenize_examples(chunk, self.tokenizer, data_cfg, progress=False, log_summary=False)
            rows, bad = self._chunk(items, moments)
            good = [i for i in range(len(items)) if i not in bad]
            table = [_row(items[i].example) for i in good]
            skip = [{**_row(s.example), "reason": s.reason} for s in dropped]
            skip += [{**_row(items[i].example), "reason": bad[i]} for i in sorted(bad)]
            n_skipped += len(skip)
            running.update(bytes.fromhex(examples_digest(chunk)))
            for tag, w in writers.items():
                if w.consumed != c0:
                    continue
                spec = QuantizerSpec.parse(tag)
                codes, scales = quantize(rows[good], spec)
                w.append(codes, scales, table, consumed=c0 + len(chunk), input_digest=running.hexdigest(), skipped=skip)
            bar.update(len(chunk))
        bar.close()
        rate = (len(inputs) - start) / max(time.perf_counter() - t0, 1e-9)
        log.info("set %s, %s: %d examples (%.2f examples/s)", name, ckpt.name, len(inputs) - start, rate)
        if n_skipped:
            log.warning("set %s, %s: %d examples left out (no response token within max_length %d, or a non-finite "
                        "gradient); listed in each store's shards/*/skipped.jsonl", name, ckpt.name, n_skipped,
                        data_cfg.max_length)
        if inputs and all(w.rows == 0 for w in writers.values()):
            raise DataError(f"set {name!r}: no example could be stored (see {next(iter(writers.values())).dir}/skipped.jsonl); "
                            f"raise max_length ({data_cfg.max_length}) or use truncation='left'")
        for w in writers.values():
            w.finish()

    def _moments(self, ckpt: Checkpoint) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """The checkpoint's Adam moments flattened in gradient order, and its Adam settings."""
        stored = ckpt.moments()
        tag = f".{self.model.active_adapter}."
        ms, vs = [], []
        for pname, p in self.grads.params:
            key = pname if pname in stored else pname.replace(tag, ".")
            if key not in stored:
                raise ModelError(f"{ckpt.path}: no Adam moments for parameter {pname}; the checkpoint belongs to another adapter")
            m, v = stored[key]
            if m.numel() != p.numel():
                raise ModelError(f"{ckpt.path}: moments of {pname} have {m.numel()} values, the parameter {p.numel()}")
            ms.append(m.reshape(-1))
            vs.append(v.reshape(-1))
        adam = json.loads((ckpt.path / "checkpoint.json").read_text()).get("adam", {})
        return torch.cat(ms).to(self.device), torch.cat(vs).to(self.device), adam

    def _chunk(self, chunk: Sequence[Tokenized], moments: tuple | None) -> tuple[torch.Tensor, dict[int, str]]:
        """Projected gradient rows ``[len(chunk), k]`` (CPU float32) in chunk order, and the
        indices of rows with a non-finite gradient (their rows are zero) with the reason."""
        out = torch.zeros(len(chunk), self.out_dim)
        bad: dict[int, str] = {}
        pending: list[tuple[list[int], torch.Tensor]] = []
        pending_rows = 0

        def flush() -> None:
            nonlocal pending, pending_rows
            if not pending:
                return
            idx = [i for ids, _ in pending for i in ids]
            g = torch.cat([x for _, x in pending]) if len(pending) > 1 else pending[0][1]
            out[idx] = (g if self.projector is None else self.projector(g)).cpu()
            pending, pending_rows = [], 0

        pad = self.tokenizer.pad_token_id
        for ids in _micro_batches(chunk, self.cfg):
            batch = collate([chunk[i] for i in ids], pad)
            g, _ = self.grads(batch)
            if moments is not None:
                m, v, adam = moments
                g = adam_direction(g, m, v, adam.get("beta1", 0.9), adam.get("beta2", 0.999), adam.get("eps", 1e-8))
            finite = torch.isfinite(g).all(dim=1)
            if not bool(finite.all()):
                for j in torch.nonzero(~finite).flatten().tolist():
                    ex = chunk[ids[j]].example
                    bad[ids[j]] = "non-finite gradient"
                    log.warning("non-finite gradient for %s/%s (%s); left out of the store", ex.source, ex.id, ex.origin)
                g = torch.where(finite[:, None], g, torch.zeros_like(g))
            if pending_rows + len(ids) > self.buffer_rows:
                flush()
            pending.append((ids, g))
            pending_rows += len(ids)
        flush()
        return out, bad


def shard_range(n: int, chunk_size: int, shard_index: int, num_shards: int) -> tuple[int, int]:
    """Examples ``[a, b)`` of shard ``shard_index`` of ``num_shards``: a contiguous range of whole
    chunks of ``chunk_size`` counted from the set's start. Chunk boundaries, and so the batches
    inside each chunk, do not depend on the number of shards: every example's row is computed in
    the same batch, giving the same bytes, whatever the number of processes."""
    chunks = -(-n // chunk_size)
    first, last = chunks * shard_index // num_shards, chunks * (shard_index + 1) // num_shards
    return min(first * chunk_size, n), min(last * chunk_size, n)


def _row(ex: Example) -> dict[str, Any]:
    row = {"source": ex.source, "id": ex.id}
    if ex.subtask is not None:
        row["subtask"] = ex.subtask
    return row


def derive_global(out_dir: Path, name: str, stores: dict[str, list[Path]], cfg: ExtractConfig) -> dict[str, list[Path]]:
    """Add the ``-global`` formats of set ``name`` to ``stores`` (format -> per-checkpoint
    stores), derived from its fp32 stores once all their shards are finished."""
    for spec in cfg.specs:
        if spec.scale == "global":
            for src in stores["fp32"]:
                dst = out_dir / spec.tag / name / src.name
                if derive_once(src, dst, spec):
                    if dst not in stores[spec.tag]:
                        stores[spec.tag].append(dst)
                else:
                    log.info("%s: derived once every shard of %s is finished (by the process finishing last)", dst, src)
    return stores


def finish_stores(out_dir: Path, result: dict[str, dict[str, list[Path]]], cfg: ExtractConfig) -> dict[str, dict[str, list[Path]]]:
    """After every shard is written (a launcher's barrier): finalise the row-scale stores and
    derive the global formats (what the process finishing last does without a launcher)."""
    for name, stores in result.items():
        for spec in cfg.specs:
            if spec.scale == "row":
                for path in stores[spec.tag]:
                    _try_finalize(path, cfg.num_shards)
                    if not read_manifest(path).get("complete"):
                        raise StoreMismatchError(f"{path}: a shard is still unfinished after every rank reported done; "
                                                 "run the same command again to complete it")
        derive_global(out_dir, name, stores, cfg)
    return result


def _try_finalize(store: Path, num_shards: int) -> None:
    """Finalise the store once all ``num_shards`` shards are complete (any process may do it)."""
    if read_manifest(store).get("complete"):
        return
    shards = [d for d in (store / "shards").iterdir() if d.is_dir()]
    if len(shards) == num_shards and all(complete_shard(store, d.name) is not None for d in shards):
        finalize(store)
    else:
        log.info("%s: waiting for the other shards before finalising", store)


def extract(sets: dict[str, tuple[Sequence[Example], Literal["pool", "target"]]], checkpoints: Sequence[Checkpoint],
            out_dir: str | Path, cfg: ExtractConfig = ExtractConfig(), projection: ProjectionConfig = ProjectionConfig(),
            model_cfg: ModelConfig = ModelConfig(), data_cfg: DataConfig = DataConfig(), *,
            target_data_cfg: DataConfig | None = None, progress: bool = True,
            warmup_checkpoints: Sequence[str] | None = None) -> dict[str, dict[str, list[Path]]]:
    """Extract gradient stores for every ``name -> (examples, kind)`` set with one loaded model;
    returns ``{set: {format: [store per checkpoint]}}``. Target sets are tokenized with
    ``target_data_cfg`` when given. See the module docstring."""
    ex = Extractor(checkpoints, out_dir, cfg, projection, model_cfg, data_cfg, progress, warmup_checkpoints)
    return {name: ex.run(name, examples, kind, target_data_cfg if kind == "target" else None)
            for name, (examples, kind) in sets.items()}
