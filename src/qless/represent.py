"""Hidden-state representations for RDS+ (Ivison et al. 2025): forward passes of the base model only.

An example's representation is the position-weighted mean of the base model's final hidden
states (after its final norm, as ``hidden_states[-1]`` of transformers) over the example's tokens:

    e = sum_{t=1..T} w_t h_t,   w_t = t / (1 + 2 + ... + T)

so later tokens, which have seen more of the text, weigh more (SGPT's weighted mean, Muennighoff
2022, which RDS+ adopts; its code's ``weighted_mean`` pooling). The text is the whole example,
prompt and response, rendered by the data template and cut to ``max_length`` exactly as for
gradient extraction (:class:`~qless.data.DataConfig`); examples that truncation leaves without a
response token are skipped as there, so both kinds of store hold the same pool rows. The weights
run over the example's own tokens only: in a padded batch, RDS+'s code spreads them over the
padded length (pads included), so its representations depend on the batch; with batch size 1, as
its runs, the two agree.

The representations are written in the datastore format, one store per format at
``OUT/<format>/<set>/base`` (the base model is the only "checkpoint", weight 1), with manifest
fields ``features: "hidden_state"``, ``gradient: "none"`` and projection kind ``none`` (k = the
hidden size). Every quantizer and the scorer apply to them unchanged, and the scorer refuses to
pair them with gradient stores (field ``features``). Batching, chunked commits, resuming an
interrupted run and recording skipped examples use extraction's helpers, so an interrupted run
resumes at its first uncommitted chunk with the same bytes.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from qless.config import Config, option
from qless.console import progress_bar
from qless.data import DataConfig, Example, Tokenized, collate, examples_digest, tokenize_examples
from qless.errors import ConfigError, DataError, StoreMismatchError
from qless.extraction import _fingerprint, _micro_batches, _row, _try_finalize
from qless.files import safe_name
from qless.models import ModelConfig, load_model, release_memory
from qless.quantize import QuantizerSpec, quantize
from qless.store import MANIFEST, ShardWriter, create_store, new_manifest
from qless.store.writer import complete_shard

log = logging.getLogger(__name__)

#: The one "checkpoint" of a representation store: the base model, weight 1.
CHECKPOINT = "base"
SHARD = "00000-of-00001"
#: What the rows are, recorded in every representation store's manifest.
POOLING = {"layer": "final (after the final norm)", "pooling": "position-weighted mean, w_t = t / sum(1..T)",
           "text": "the whole example (prompt and response) as rendered by the data template"}


@dataclass(frozen=True)
class RepresentConfig(Config):
    """How hidden-state representations are computed and stored."""

    section = "represent"

    formats: tuple[str, ...] = option(("fp32",), "store formats written in one pass: fp32 fp16 absmax8/4/2 "
                                      "absmean8/4/2 sign1 (fp32 keeps the representation exactly)")
    batch_size: int = option(16, "most examples per forward pass")
    max_batch_tokens: int = option(8192, "most padded tokens per forward pass")
    chunk_size: int = option(256, "examples per commit; a resumed run restarts at a chunk boundary")

    def validate(self) -> None:
        if not self.formats:
            raise ConfigError("represent.formats: give at least one format, e.g. fp32")
        specs = [QuantizerSpec.parse(f) for f in self.formats]
        if len({s.tag for s in specs}) != len(specs):
            raise ConfigError(f"represent.formats repeats a format: {list(self.formats)}")
        if any(s.scale == "global" for s in specs):
            raise ConfigError("represent.formats: global-scale formats are not written for representations; use the "
                              "per-row format (e.g. absmean4 instead of absmean4-global)")
        for name in ("batch_size", "max_batch_tokens", "chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"represent.{name} must be a positive integer, got {getattr(self, name)}")

    @property
    def specs(self) -> list[QuantizerSpec]:
        return [QuantizerSpec.parse(f) for f in self.formats]


def position_weighted_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, H]``: per row, ``sum_t w_t hidden[t]`` with ``w_t = t / sum(1..T)`` over the row's
    tokens (``mask [B, T]`` is 1 on them, 0 on padding, on either side); float64 for float64
    input, else float32."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    mask = mask.to(torch.long)
    position = torch.cumsum(mask, dim=1) * mask  # 1..T on the row's tokens, 0 on padding
    weights = position.to(dtype) / position.sum(dim=1, keepdim=True).to(dtype)
    return torch.einsum("bth,bt->bh", hidden.to(dtype), weights)


class Representer:
    """A loaded base model, ready to write representation stores for example sets."""

    def __init__(self, out_dir: str | Path, cfg: RepresentConfig = RepresentConfig(), model_cfg: ModelConfig = ModelConfig(),
                 data_cfg: DataConfig = DataConfig(), progress: bool = True) -> None:
        self.out_dir, self.cfg, self.data_cfg, self.progress = Path(out_dir), cfg, data_cfg, progress
        self.model, self.tokenizer, self.model_identity = load_model(model_cfg)
        self.body = self.model.base_model  # the transformer without its LM head: hidden states, no logits
        self.dim = int(self.model.config.hidden_size)
        self.device = next(self.model.parameters()).device

    def run(self, name: str, examples: Sequence[Example], data_cfg: DataConfig | None = None) -> dict[str, Path]:
        """Write ``OUT/<format>/<name>/base`` for ``examples``; returns the store of each format."""
        safe_name(name, "set name")
        data_cfg = data_cfg or self.data_cfg
        paths = {s.tag: self.out_dir / s.tag / name / CHECKPOINT for s in self.cfg.specs}
        manifests = {s.tag: self._manifest(s, name, data_cfg) for s in self.cfg.specs}
        full = _fingerprint(examples, len(examples), self.cfg.chunk_size).hexdigest()
        writers: dict[str, ShardWriter] = {}
        try:
            for tag, path in paths.items():
                if (path / MANIFEST).exists():
                    create_store(path, manifests[tag])  # an existing store must match these settings
                    state = complete_shard(path, SHARD)
                    if state is not None:
                        if state.input_digest != full or state.consumed != len(examples):
                            raise StoreMismatchError(f"{path}: holds a finished store of set {name!r} made from other "
                                                     "examples; write to a new output folder, or delete it")
                        continue
                writers[tag] = ShardWriter(path, manifests[tag], SHARD)
            if writers:
                self._write(writers, name, examples, data_cfg)
        finally:
            for w in writers.values():
                w.close()
        for path in paths.values():
            _try_finalize(path, 1)
        return paths

    def _manifest(self, spec: QuantizerSpec, name: str, data_cfg: DataConfig) -> dict[str, Any]:
        return new_manifest(
            projection={"kind": "none", "dim": self.dim, "seed": 0, "input_dim": self.dim}, quantizer=spec,
            checkpoint={"name": CHECKPOINT, "learning_rate": 1.0}, gradient="none", features="hidden_state",
            model=self.model_identity, adapter={},
            tokenization={"template": data_cfg.template, "max_length": data_cfg.max_length, "truncation": data_cfg.truncation},
            extra={"set": name, "representation": POOLING,
                   "extraction": {"batch_size": self.cfg.batch_size, "max_batch_tokens": self.cfg.max_batch_tokens,
                                  "chunk_size": self.cfg.chunk_size}},
        )

    def _write(self, writers: dict[str, ShardWriter], name: str, inputs: Sequence[Example], data_cfg: DataConfig) -> None:
        """Compute the rows each writer still lacks, chunk by chunk, and finish the writers."""
        chunk_size = self.cfg.chunk_size
        for w in writers.values():
            if w.consumed % chunk_size and w.consumed != len(inputs):
                raise StoreMismatchError(f"{w.dir}: {w.consumed} inputs committed, not a multiple of chunk_size "
                                         f"{chunk_size}; resume with the settings that wrote it")
            if w.consumed and w.state.input_digest != _fingerprint(inputs, w.consumed, chunk_size).hexdigest():
                raise StoreMismatchError(f"{w.dir}: was written from other examples than this run's; write to a new "
                                         "output folder")
        start = min(w.consumed for w in writers.values())
        running = _fingerprint(inputs, start, chunk_size)
        bar = progress_bar(total=len(inputs), initial=start, desc=f"{name} representations", unit="ex",
                           enabled=self.progress)
        t0 = time.perf_counter()
        for c0 in range(start, len(inputs), chunk_size):
            chunk = inputs[c0:c0 + chunk_size]
            items, dropped = tokenize_examples(chunk, self.tokenizer, data_cfg, progress=False, log_summary=False)
            rows = self.embed(items)
            finite = torch.isfinite(rows).all(dim=1)
            good = [i for i in range(len(items)) if finite[i]]
            skip = [{**_row(s.example), "reason": s.reason} for s in dropped]
            skip += [{**_row(items[i].example), "reason": "non-finite hidden state"} for i in range(len(items)) if not finite[i]]
            running.update(bytes.fromhex(examples_digest(chunk)))
            for tag, w in writers.items():
                if w.consumed != c0:
                    continue
                codes, scales = quantize(rows[good], QuantizerSpec.parse(tag))
                w.append(codes, scales, [_row(items[i].example) for i in good], consumed=c0 + len(chunk),
                         input_digest=running.hexdigest(), skipped=skip)
            bar.update(len(chunk))
        bar.close()
        log.info("set %s: %d representations (%.2f examples/s)", name, len(inputs) - start,
                 (len(inputs) - start) / max(time.perf_counter() - t0, 1e-9))
        if inputs and all(w.rows == 0 for w in writers.values()):
            raise DataError(f"set {name!r}: no example could be stored (see {next(iter(writers.values())).dir}/skipped.jsonl); "
                            f"raise max_length ({data_cfg.max_length}) or use truncation='left'")
        for w in writers.values():
            w.finish()

    @torch.no_grad()
    def embed(self, items: Sequence[Tokenized]) -> torch.Tensor:
        """``[len(items), H]`` float32 (CPU) representations, batched longest first."""
        out = torch.zeros(len(items), self.dim)
        pad = self.tokenizer.pad_token_id
        for ids in _micro_batches(items, self.cfg):  # type: ignore[arg-type]  # reads batch_size, max_batch_tokens
            batch = collate([items[i] for i in ids], pad)
            mask = batch["attention_mask"].to(self.device)
            hidden = self.body(input_ids=batch["input_ids"].to(self.device), attention_mask=mask).last_hidden_state
            out[ids] = position_weighted_mean(hidden, mask).float().cpu()
        return out


def represent(sets: Mapping[str, tuple[Sequence[Example], Literal["pool", "target"]]], out_dir: str | Path,
              cfg: RepresentConfig = RepresentConfig(), model_cfg: ModelConfig = ModelConfig(),
              data_cfg: DataConfig = DataConfig(), *, target_data_cfg: DataConfig | None = None,
              progress: bool = True) -> dict[str, dict[str, Path]]:
    """Representation stores of every ``name -> (examples, kind)`` set with one loaded model:
    ``{set: {format: store}}``. Target sets are tokenized with ``target_data_cfg`` when given."""
    r = Representer(out_dir, cfg, model_cfg, data_cfg, progress)
    out = {name: r.run(name, examples, target_data_cfg if kind == "target" else None)
           for name, (examples, kind) in sets.items()}
    del r
    release_memory()
    return out


def representation_reference(model: Any, tokenizer: Any, examples: Sequence[Example], data_cfg: DataConfig) -> np.ndarray:
    """Slow float64 reference of the representations (tests): a float64 copy of ``model`` run on
    one example at a time, without padding, and the weighted sum written out token by token.
    Returns ``[n, H]`` for the examples tokenization keeps."""
    model64 = copy.deepcopy(model).to(torch.float64).eval()
    items, _ = tokenize_examples(examples, tokenizer, data_cfg, progress=False)
    rows = []
    with torch.no_grad():
        for item in items:
            hidden = model64.base_model(input_ids=torch.tensor([item.input_ids])).last_hidden_state[0]
            n = len(item.input_ids)
            total = n * (n + 1) / 2
            acc = torch.zeros(hidden.shape[1], dtype=torch.float64)
            for t in range(n):
                acc += (t + 1) / total * hidden[t]
            rows.append(acc.numpy())
    return np.stack(rows)
