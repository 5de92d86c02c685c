"""LoRA training: the warmup (a random p% of the pool, one checkpoint per epoch) and the
fine-tuning of the base model on a selection, one training loop for both.

The gradient features of the later stages are taken at the warmup's checkpoints, and the pool's
features use each checkpoint's Adam moments, so a checkpoint keeps:

    OUT/checkpoint-E/
      adapter_config.json, adapter_model.safetensors   the LoRA adapter (peft layout)
      optimizer.safetensors   "<param>.exp_avg" / "<param>.exp_avg_sq" keyed by parameter NAME
      rng_state.safetensors   the RNG state, so that dropout draws continue exactly on resume
      checkpoint.json         epoch, optimizer step, the learning rate that weights the
                              checkpoint (the mean lr over its epoch, as LESS), Adam settings,
                              the epoch's mean loss, and the training state for resuming
    OUT/warmup.json           settings, model and adapter identity, the subset, the checkpoints

The subset is drawn from the whole pool with the user's seed (a different seed draws a
different subset). The loss of a step is the mean over all response tokens of its effective
batch, accumulated over micro-batches, so the micro-batch size changes memory, not the maths.
An interrupted warmup resumes from its last complete epoch (adapter, moments, scheduler
position and data order restored), repeating no finished epoch.

:func:`train` runs the same loop with the same recipe (:class:`TrainingRecipe`) on examples the
caller gives (a selection, a baseline, any data file) and writes::

    OUT/adapter/              the final LoRA adapter (peft layout, safetensors)
    OUT/train.json            settings, the data's digest, losses and learning rates per step and
                              epoch, wall time
    OUT/checkpoint-E/         as above: the last finished epoch's (for resuming), or every epoch's
                              with ``save_epochs``

Trained on the warmup's subset with the warmup's recipe, it gives the warmup's last adapter byte
for byte (tests/test_train.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from qless import __version__
from qless.config import Config, describe_differences, option, to_dict
from qless.console import progress_bar
from qless.data import IGNORE_INDEX, DataConfig, Example, Tokenized, collate, examples_digest, tokenize_examples
from qless.errors import ConfigError, DataError, ModelError, StoreError
from qless.files import atomic_folder, atomic_write_json, dumps, locked, read_json, safe_name
from qless.gradients import lora_parameters
from qless.models import AdapterConfig, ModelConfig, adapter_identity, attach_lora, load_model, set_adapter_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingRecipe(Config):
    """How LoRA training runs, shared by the warmup and :func:`train`; the defaults are the QLESS paper's."""

    section = "recipe"

    seed: int = option(0, "seed of the data order and the LoRA initialisation")
    epochs: int = option(4, "epochs")
    learning_rate: float = option(2e-5, "peak learning rate")
    schedule: Literal["cosine", "linear"] = option("cosine", "decay after warmup: cosine (QLESS) or linear (LESS)")
    warmup_ratio: float = option(0.03, "fraction of all steps spent warming the learning rate up linearly")
    weight_decay: float = option(0.0, "AdamW weight decay")
    batch_size: int = option(128, "effective batch size (examples per optimizer step)")
    micro_batch_size: int = option(8, "examples per forward/backward pass (memory only)")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: off)")
    adam_beta1: float = option(0.9, "Adam beta1")
    adam_beta2: float = option(0.999, "Adam beta2")
    adam_eps: float = option(1e-8, "Adam epsilon")

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{self.section}.{name} must be a positive integer, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"{self.section}.learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{self.section}.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


def recipe_of(cfg: TrainingRecipe) -> dict[str, Any]:
    """The recipe fields of a warmup or train config, e.g. to train with a warmup's recipe:
    ``TrainConfig(**recipe_of(warmup_cfg))``."""
    return {f.name: getattr(cfg, f.name) for f in fields(TrainingRecipe)}


@dataclass(frozen=True)
class WarmupConfig(TrainingRecipe):
    """Warmup training settings: the recipe and the share of the pool it trains on."""

    section = "warmup"

    seed: int = option(0, "seed of the subset draw, the data order and the LoRA initialisation")
    epochs: int = option(4, "epochs; one checkpoint is kept per epoch")
    percent: float = option(5.0, "percent of the pool drawn for warmup training")

    def validate(self) -> None:
        if not 0 < self.percent <= 100:
            raise ConfigError(f"warmup.percent must be in (0, 100], got {self.percent}")
        super().validate()


@dataclass(frozen=True)
class TrainConfig(TrainingRecipe):
    """Fine-tuning settings (``qless train``): the recipe, and which checkpoints to keep."""

    section = "train"

    save_epochs: bool = option(False, "keep every epoch's checkpoint (adapter and Adam moments), not only the final "
                               "adapter")


def train_preset(name: str) -> TrainConfig:
    """The fine-tuning settings of a named preset: its warmup recipe (the paper fine-tunes with the
    warmup's recipe), under the preset's own ``train`` section when it has one."""
    from qless.config import from_dict
    from qless.presets import preset_section

    warm = from_dict(WarmupConfig, preset_section(name, "warmup"), f"preset {name}: warmup")
    return from_dict(TrainConfig, {**recipe_of(warm), **preset_section(name, "train")}, f"preset {name}: train")


@dataclass(frozen=True)
class Checkpoint:
    """One warmup checkpoint: its folder, name and the learning rate that weights it."""

    path: Path
    name: str
    learning_rate: float
    epoch: int
    step: int

    def adapter_sha256(self) -> str:
        """SHA-256 of the adapter weights: which training produced the checkpoint."""
        h = hashlib.sha256()
        with open(self.path / "adapter_model.safetensors", "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        return h.hexdigest()

    def moments(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``param name -> (exp_avg, exp_avg_sq)`` from ``optimizer.safetensors``."""
        from safetensors.torch import load_file

        path = self.path / "optimizer.safetensors"
        if not path.is_file():
            raise ModelError(f"{path}: missing; the checkpoint holds no Adam moments (re-run `qless warmup`)")
        flat = load_file(str(path))
        names = {k.rsplit(".", 1)[0] for k in flat}
        return {n: (flat[f"{n}.exp_avg"], flat[f"{n}.exp_avg_sq"]) for n in names}


def draw_subset(n_pool: int, percent: float, seed: int) -> np.ndarray:
    """Sorted indices of ``ceil(n_pool * percent / 100)`` pool examples drawn with ``seed``."""
    n = max(1, min(n_pool, math.ceil(n_pool * percent / 100 - 1e-9)))
    return np.sort(np.random.default_rng(seed).choice(n_pool, size=n, replace=False))


WARMUP_FORMAT = "qless-warmup"


def read_warmup(warmup_dir: str | Path) -> dict[str, Any]:
    """``warmup.json`` of a warmup folder, checked: settings, checkpoints with safe names and numbers."""
    warmup_dir = Path(warmup_dir)
    path = warmup_dir / "warmup.json"
    if not path.is_file():
        raise ModelError(f"{warmup_dir}: no warmup.json; run `qless warmup` first (or give its output folder)")
    fix = "the warmup folder is damaged or not a qless warmup: run `qless warmup` into a new folder"
    info = read_json(path, StoreError, fix)
    if not isinstance(info, dict) or info.get("format") != WARMUP_FORMAT:
        raise StoreError(f"{path}: not a qless warmup record (field 'format' must be {WARMUP_FORMAT!r}); {fix}")
    settings = info.get("settings")
    if not isinstance(settings, dict) or not all(isinstance(settings.get(k), dict) for k in ("warmup", "model", "adapter", "data")):
        raise StoreError(f"{path}: field 'settings' must hold the warmup, model, adapter and data sections; {fix}")
    checkpoints = info.get("checkpoints")
    if not isinstance(checkpoints, list):
        raise StoreError(f"{path}: field 'checkpoints' must be a list; {fix}")
    for i, c in enumerate(checkpoints):
        where = f"{path}: checkpoints[{i}]"
        if not isinstance(c, dict):
            raise StoreError(f"{where} must be an object; {fix}")
        safe_name(c.get("name"), f"{where}.name")
        for key in ("epoch", "step"):
            if not isinstance(c.get(key), int) or isinstance(c.get(key), bool):
                raise StoreError(f"{where}.{key} must be an integer, got {c.get(key)!r:.40}; {fix}")
        lr = c.get("learning_rate")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr < 0:
            raise StoreError(f"{where}.learning_rate must be a finite number >= 0, got {lr!r:.40}; {fix}")
    return info


def read_checkpoints(warmup_dir: str | Path, *, finished: bool = False) -> list[Checkpoint]:
    """The complete checkpoints of a warmup folder, in epoch order. ``finished=True`` also
    requires every epoch of the warmup to be done (extraction needs them all)."""
    warmup_dir = Path(warmup_dir)
    info = read_warmup(warmup_dir)
    out = []
    for c in info["checkpoints"]:
        path = warmup_dir / c["name"]
        if not (path / "checkpoint.json").is_file():
            raise ModelError(f"{path}: checkpoint listed in warmup.json is missing; re-run `qless warmup`")
        out.append(Checkpoint(path, c["name"], float(c["learning_rate"]), int(c["epoch"]), int(c["step"])))
    if not out:
        raise ModelError(f"{warmup_dir}: warmup has no finished checkpoint yet; run (or resume) `qless warmup`")
    epochs = info["settings"]["warmup"].get("epochs")
    if finished and isinstance(epochs, int) and len(out) < epochs:
        raise ModelError(f"{warmup_dir}: the warmup is unfinished ({len(out)} of {epochs} epochs); resume it with the "
                         "same `qless warmup` command before extracting (scores need every checkpoint)")
    return out


def _schedule(optimizer: torch.optim.Optimizer, cfg: TrainingRecipe, total_steps: int):
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    warm = math.ceil(cfg.warmup_ratio * total_steps)
    make = {"cosine": get_cosine_schedule_with_warmup, "linear": get_linear_schedule_with_warmup}[cfg.schedule]
    return make(optimizer, num_warmup_steps=warm, num_training_steps=total_steps)


def _step_tokens(batch: Sequence[Tokenized]) -> int:
    """Labels a step's loss is averaged over: positions 1..T-1 (position 0 predicts nothing),
    counted as extraction counts them."""
    return sum(sum(1 for lab in t.labels[1:] if lab != IGNORE_INDEX) for t in batch)


def _micro_batches(items: Sequence[Tokenized], size: int) -> list[list[Tokenized]]:
    """Split a step's examples into micro-batches of similar length (less padding)."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i].input_ids))
    return [[items[i] for i in order[a:a + size]] for a in range(0, len(order), size)]


def _save_checkpoint(model: Any, optimizer: torch.optim.Optimizer, params: list[tuple[str, torch.nn.Parameter]],
                     path: Path, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    with atomic_folder(path, replace=True, what="the checkpoint") as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        flat = {}
        for name, p in params:
            state = optimizer.state.get(p, {})
            flat[f"{name}.exp_avg"] = state["exp_avg"].detach().float().cpu().contiguous()
            flat[f"{name}.exp_avg_sq"] = state["exp_avg_sq"].detach().float().cpu().contiguous()
        save_file(flat, str(tmp / "optimizer.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / "rng_state.safetensors"))  # dropout draws continue exactly on resume
        (tmp / "checkpoint.json").write_text(dumps(meta))


def _restore(model: Any, optimizer: torch.optim.Optimizer, params: list[tuple[str, torch.nn.Parameter]], ckpt: Path) -> dict:
    """Load adapter weights, Adam state and RNG state of a finished epoch into the live objects."""
    from safetensors.torch import load_file

    set_adapter_weights(model, ckpt)
    rng = load_file(str(ckpt / "rng_state.safetensors"))
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    fix = f"delete {ckpt} and run the same command again (it resumes from the epoch before)"
    meta = read_json(ckpt / "checkpoint.json", StoreError, fix)
    try:
        step, epoch = int(meta["step"]), int(meta["epoch"])
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{ckpt / 'checkpoint.json'}: field {e} is missing or not a number; {fix}") from None
    meta.update(step=step, epoch=epoch)
    moments = Checkpoint(ckpt, ckpt.name, 0.0, 0, 0).moments()
    for name, p in params:
        m, v = moments[name]
        optimizer.state[p] = {"step": torch.tensor(float(meta["step"])), "exp_avg": m.to(p.device, p.dtype),
                              "exp_avg_sq": v.to(p.device, p.dtype)}
    return meta


@dataclass
class EpochLog:
    """What one epoch did: per optimizer step the learning rate used and the loss, and its wall time."""

    epoch: int
    step: int  # optimizer steps taken since the start of training, this epoch's included
    learning_rates: list[float]
    losses: list[float]
    seconds: float

    @property
    def mean_learning_rate(self) -> float:
        return float(np.mean(self.learning_rates))

    @property
    def mean_loss(self) -> float:
        return float(np.mean(self.losses))


class Trainer:
    """The training loop of the warmup and of :func:`train`: the base model with a fresh LoRA
    adapter (seeded), AdamW and the recipe's schedule over the tokenized examples.

    The caller runs it epoch by epoch (:meth:`epoch`), saves a checkpoint after each
    (:meth:`save`) and, after an interruption, restores the last one (:meth:`resume`), which
    continues byte for byte as if nothing had stopped: the data order of an epoch depends only on
    the seed and the epoch, and the RNG state is restored with the adapter and moments."""

    def __init__(self, examples: Sequence[Example], recipe: TrainingRecipe, model_cfg: ModelConfig,
                 adapter_cfg: AdapterConfig, data_cfg: DataConfig, *, what: str, progress: bool = True) -> None:
        self.recipe, self.what = recipe, what
        model, self.tokenizer, self.model_identity = load_model(model_cfg)
        self.items, self.skipped = tokenize_examples(examples, self.tokenizer, data_cfg, progress=progress)
        if not self.items:
            raise DataError(f"no {what} example has a response token left after truncation; raise max_length")
        torch.manual_seed(recipe.seed)
        self.model = attach_lora(model, adapter_cfg)
        self.params = lora_parameters(self.model)
        self.optimizer = torch.optim.AdamW([p for _, p in self.params], lr=recipe.learning_rate,
                                           betas=(recipe.adam_beta1, recipe.adam_beta2), eps=recipe.adam_eps,
                                           weight_decay=recipe.weight_decay)
        self.steps_per_epoch = math.ceil(len(self.items) / recipe.batch_size)
        self.scheduler = _schedule(self.optimizer, recipe, self.steps_per_epoch * recipe.epochs)
        self.step = 0

    def resume(self, checkpoint: Path) -> dict[str, Any]:
        """Restore the adapter, Adam state, RNG state and schedule position saved by :meth:`save`."""
        meta = _restore(self.model, self.optimizer, self.params, checkpoint)
        with warnings.catch_warnings():  # replaying the schedule without optimizer steps is intended
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(meta["step"]):
                self.scheduler.step()
        self.step = meta["step"]
        log.info("resuming %s after epoch %d (step %d)", self.what, meta["epoch"], meta["step"])
        return meta

    def epoch(self, epoch: int, progress: bool = True) -> EpochLog:
        """Train one epoch (1-based) over the examples in the seed's order for that epoch."""
        cfg = self.recipe
        device = next(p for _, p in self.params).device
        pad = self.tokenizer.pad_token_id
        self.model.train()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(self.items))
        lrs, losses = [], []
        bar = progress_bar(range(self.steps_per_epoch), desc=f"{self.what} epoch {epoch}/{cfg.epochs}", unit="step",
                           enabled=progress)
        start = time.perf_counter()
        for s in bar:
            batch = [self.items[i] for i in order[s * cfg.batch_size:(s + 1) * cfg.batch_size]]
            n_tokens = _step_tokens(batch)
            total = 0.0
            for micro in _micro_batches(batch, cfg.micro_batch_size):
                tensors = {k: v.to(device) for k, v in collate(micro, pad).items()}
                logits = self.model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tensors["labels"][:, 1:].flatten(),
                                                         ignore_index=IGNORE_INDEX, reduction="sum") / n_tokens
                loss.backward()
                total += float(loss.detach())
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for _, p in self.params], cfg.max_grad_norm)
            lrs.append(self.scheduler.get_last_lr()[0])
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            self.step += 1
            bar.set_postfix(loss=f"{total:.3f}", lr=f"{lrs[-1]:.2e}")
        bar.close()
        return EpochLog(epoch, self.step, lrs, losses, time.perf_counter() - start)

    def save(self, path: Path, done: EpochLog) -> dict[str, Any]:
        """Write the checkpoint of the epoch just finished (adapter, named moments, RNG state,
        ``checkpoint.json``) to ``path``; returns ``checkpoint.json``'s content."""
        cfg = self.recipe
        meta = {"epoch": done.epoch, "step": done.step, "learning_rate": done.mean_learning_rate,
                "mean_loss": done.mean_loss, "adam": {"beta1": cfg.adam_beta1, "beta2": cfg.adam_beta2, "eps": cfg.adam_eps},
                "parameters": [n for n, _ in self.params], "seconds": done.seconds}
        _save_checkpoint(self.model, self.optimizer, self.params, path, meta)
        return meta

    def skipped_rows(self) -> list[dict[str, str]]:
        return [{"source": s.example.source, "id": s.example.id, "reason": s.reason} for s in self.skipped]


def warmup(pool: Sequence[Example], out_dir: str | Path, cfg: WarmupConfig = WarmupConfig(),
           model_cfg: ModelConfig = ModelConfig(), adapter_cfg: AdapterConfig = AdapterConfig(),
           data_cfg: DataConfig = DataConfig(), *, progress: bool = True) -> list[Checkpoint]:
    """Train a LoRA adapter on a random ``cfg.percent`` of ``pool``; return the checkpoints.

    Resumes from the last finished epoch in ``out_dir`` if the settings match."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with locked(out_dir / ".warmup.lock", f"the warmup in {out_dir}"):
        return _warmup(pool, out_dir, cfg, model_cfg, adapter_cfg, data_cfg, progress)


def _warmup(pool: Sequence[Example], out_dir: Path, cfg: WarmupConfig, model_cfg: ModelConfig, adapter_cfg: AdapterConfig,
            data_cfg: DataConfig, progress: bool) -> list[Checkpoint]:
    subset_idx = draw_subset(len(pool), cfg.percent, cfg.seed)
    subset = [pool[i] for i in subset_idx]
    settings = {"warmup": to_dict(cfg), "model": to_dict(model_cfg), "adapter": to_dict(adapter_cfg), "data": to_dict(data_cfg),
                "pool_size": len(pool), "pool_sha256": examples_digest(pool)}
    info_path = out_dir / "warmup.json"
    info = read_warmup(out_dir) if info_path.is_file() else None
    if info is not None and info["settings"] != settings:
        raise ConfigError(f"{out_dir}: holds a warmup with other settings or of another pool; they differ in "
                          f"{describe_differences(info['settings'], settings)}. Use a new folder, or delete this one")
    done = info["checkpoints"] if info else []
    if len(done) >= cfg.epochs:
        log.info("warmup in %s already finished (%d checkpoints)", out_dir, len(done))
        return read_checkpoints(out_dir)

    trainer = Trainer(subset, cfg, model_cfg, adapter_cfg, data_cfg, what="warmup", progress=progress)
    items = trainer.items
    info = info or {"format": WARMUP_FORMAT, "created_with": f"qless {__version__}", "settings": settings,
                    "model": trainer.model_identity, "adapter": adapter_identity(trainer.model), "subset_size": len(items),
                    "subset_skipped": trainer.skipped_rows(), "steps_per_epoch": trainer.steps_per_epoch, "checkpoints": []}
    atomic_write_json(info_path, info)
    (out_dir / "subset.jsonl").write_text("".join(json.dumps({"source": t.example.source, "id": t.example.id}) + "\n" for t in items))
    if done:
        trainer.resume(out_dir / done[-1]["name"])
    for epoch in range(len(done) + 1, cfg.epochs + 1):
        result = trainer.epoch(epoch, progress)
        name = f"checkpoint-{epoch}"
        meta = trainer.save(out_dir / name, result)
        info["checkpoints"].append({"name": name, "epoch": epoch, "step": result.step, "learning_rate": meta["learning_rate"],
                                    "mean_loss": meta["mean_loss"]})
        atomic_write_json(info_path, info)
        log.info("epoch %d: mean loss %.4f, mean lr %.3g, %.1f s -> %s", epoch, meta["mean_loss"], meta["learning_rate"],
                 meta["seconds"], out_dir / name)
    trainer.model.eval()
    return read_checkpoints(out_dir)


# ---------------------------------------------------------------------------------------------
# Fine-tuning on given data (qless train)

TRAIN_FORMAT = "qless-train"
ADAPTER_DIR = "adapter"
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def read_train(out_dir: str | Path) -> dict[str, Any]:
    """``train.json`` of a training folder, checked: format, settings, the epochs done."""
    path = Path(out_dir) / "train.json"
    fix = "the folder is damaged or not a qless training: train into a new folder"
    record = read_json(path, StoreError, fix)
    if not isinstance(record, dict) or record.get("format") != TRAIN_FORMAT:
        raise StoreError(f"{path}: not a qless training record (field 'format' must be {TRAIN_FORMAT!r}); {fix}")
    if not isinstance(record.get("settings"), dict):
        raise StoreError(f"{path}: field 'settings' must be an object; {fix}")
    epochs = record.get("epochs")
    if not isinstance(epochs, list) or not all(isinstance(e, dict) and e.get("epoch") == i
                                               for i, e in enumerate(epochs, start=1)):
        raise StoreError(f"{path}: field 'epochs' must list the finished epochs 1, 2, ... in order; {fix}")
    if not isinstance(record.get("finished"), bool):
        raise StoreError(f"{path}: field 'finished' must be true or false; {fix}")
    return record


def train(data: Sequence[Example], out_dir: str | Path, cfg: TrainConfig = TrainConfig(),
          model_cfg: ModelConfig = ModelConfig(), adapter_cfg: AdapterConfig = AdapterConfig(),
          data_cfg: DataConfig = DataConfig(), *, progress: bool = True,
          source: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """LoRA-train the base model on ``data`` (all of it, in the seed's order) with the recipe of
    ``cfg``; returns ``train.json``'s content. ``source`` (e.g. the files or selection the data
    came from) is recorded as is.

    Resumes from the last finished epoch in ``out_dir`` when the settings and data match; a
    finished training is returned without loading a model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with locked(out_dir / ".train.lock", f"the training in {out_dir}"):
        return _train(data, out_dir, cfg, model_cfg, adapter_cfg, data_cfg, progress, dict(source or {}))


def _train(data: Sequence[Example], out_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig, adapter_cfg: AdapterConfig,
           data_cfg: DataConfig, progress: bool, source: dict[str, Any]) -> dict[str, Any]:
    settings = {"train": to_dict(cfg), "model": to_dict(model_cfg), "adapter": to_dict(adapter_cfg), "data": to_dict(data_cfg),
                "data_size": len(data), "data_sha256": examples_digest(data)}
    path = out_dir / "train.json"
    record = read_train(out_dir) if path.is_file() else None
    if record is not None and record["settings"] != settings:
        raise ConfigError(f"{out_dir}: holds a training with other settings or of other data; they differ in "
                          f"{describe_differences(record['settings'], settings)}. Use a new folder, or delete this one")
    if record is not None and record["finished"]:
        log.info("training in %s already finished", out_dir)
        _drop_checkpoints(out_dir, cfg, keep=None)
        return record
    done = len(record["epochs"]) if record else 0
    if done < cfg.epochs:
        trainer = Trainer(data, cfg, model_cfg, adapter_cfg, data_cfg, what="training", progress=progress)
        record = record or {"format": TRAIN_FORMAT, "created_with": f"qless {__version__}", "settings": settings,
                            "source": source, "model": trainer.model_identity, "adapter": adapter_identity(trainer.model),
                            "examples": len(trainer.items), "skipped": trainer.skipped_rows(),
                            "steps_per_epoch": trainer.steps_per_epoch, "epochs": [], "seconds": 0.0, "finished": False}
        atomic_write_json(path, record)
        if done:
            trainer.resume(out_dir / f"checkpoint-{done}")
        for epoch in range(done + 1, cfg.epochs + 1):
            result = trainer.epoch(epoch, progress)
            trainer.save(out_dir / f"checkpoint-{epoch}", result)
            record["epochs"].append({"epoch": epoch, "step": result.step, "mean_loss": result.mean_loss,
                                     "mean_learning_rate": result.mean_learning_rate, "seconds": result.seconds,
                                     "losses": result.losses, "learning_rates": result.learning_rates})
            record["seconds"] = sum(e["seconds"] for e in record["epochs"])
            atomic_write_json(path, record)  # the epoch counts once its checkpoint and this record are written
            _drop_checkpoints(out_dir, cfg, keep=epoch)
            log.info("epoch %d: mean loss %.4f, mean lr %.3g, %.1f s", epoch, result.mean_loss, result.mean_learning_rate,
                     result.seconds)
        trainer.model.eval()
    assert record is not None
    last = out_dir / f"checkpoint-{cfg.epochs}"
    with atomic_folder(out_dir / ADAPTER_DIR, replace=True, what="the adapter") as tmp:
        for name in _ADAPTER_FILES:  # the final adapter is the last epoch's, byte for byte
            shutil.copyfile(last / name, tmp / name)
    record.update(finished=True, adapter=ADAPTER_DIR)
    atomic_write_json(path, record)
    _drop_checkpoints(out_dir, cfg, keep=None)
    log.info("trained on %d examples for %d epochs (%.1f s): adapter in %s", record["examples"], cfg.epochs,
             record["seconds"], out_dir / ADAPTER_DIR)
    return record


def _drop_checkpoints(out_dir: Path, cfg: TrainConfig, keep: int | None) -> None:
    """Without ``save_epochs``, remove every epoch checkpoint but ``checkpoint-<keep>`` (the one a
    resumed run needs; ``None``: all, once the final adapter is written)."""
    if cfg.save_epochs:
        return
    for epoch in range(1, cfg.epochs + 1):
        if epoch != keep and (out_dir / f"checkpoint-{epoch}").is_dir():
            shutil.rmtree(out_dir / f"checkpoint-{epoch}")
