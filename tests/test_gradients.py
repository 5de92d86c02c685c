"""Batched per-example LoRA gradients against the one-example-at-a-time float64 reference."""

from __future__ import annotations

import importlib.util
import weakref

import peft
import pytest
import torch

from conftest import make_tiny_gpt2, make_tiny_llama
from qless.errors import ModelError
from qless.gradients import (
    IGNORE_INDEX,
    PerExampleGradients,
    adam_direction,
    lora_parameters,
    per_example_gradients_loop,
)
from utils import ADAM_RTOL, BF16_RTOL, FLOAT32_RTOL, FLOAT64_RTOL, INVARIANCE_RTOL_FLOAT32, QUANTIZED_RTOL

VOCAB = 320

LLAMA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
LLAMA_ALL = LLAMA_ATTN + ["gate_proj", "up_proj", "down_proj"]


def _assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """max |actual - expected| <= rtol * max |expected| (per-example gradients span many scales)."""
    assert actual.shape == expected.shape
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3e} > {rtol:.0e} * {scale:.3e}"


def _lora(model: torch.nn.Module, targets: list[str], dtype: torch.dtype = torch.float32, **kw) -> peft.PeftModel:
    """LoRA r=4 with random (not zero) lora_B, so both factors have non-zero gradients."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets, init_lora_weights=False, **kw)
    torch.manual_seed(1)
    return peft.get_peft_model(model, cfg).to(dtype).eval()


def _batch(lengths: list[int], seed: int = 0, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """Right-padded batch; example b has lengths[b] tokens, labels on a middle-to-end span only."""
    gen = torch.Generator().manual_seed(seed)
    bsz, t = len(lengths), max(lengths)
    ids = torch.randint(0, vocab, (bsz, t), generator=gen)
    mask = torch.zeros(bsz, t, dtype=torch.long)
    labels = torch.full((bsz, t), IGNORE_INDEX)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        start = n // 3 + b  # a prompt of varying length takes no loss
        stop = n - (b % 2)  # some examples end with an unlabelled token
        labels[b, start:stop] = ids[b, start:stop]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _rows(batch: dict[str, torch.Tensor], idx: list[int]) -> dict[str, torch.Tensor]:
    """Sub-batch of rows idx, trimmed to its own longest example."""
    t = int(batch["attention_mask"][idx].sum(dim=1).max())
    return {k: v[idx, :t] for k, v in batch.items()}


LENGTHS = [23, 9, 17, 30, 12]

MODELS = {
    "llama-attn": lambda dt: _lora(make_tiny_llama(VOCAB), LLAMA_ATTN, dt),
    "llama-all-linear": lambda dt: _lora(make_tiny_llama(VOCAB), LLAMA_ALL, dt),
    "gpt2": lambda dt: _lora(make_tiny_gpt2(VOCAB), ["c_attn", "c_proj", "c_fc"], dt, fan_in_fan_out=True),
    # LoRA on the output head: the [B, T, V] logits path (a frozen head gets only label positions)
    "llama-lm-head": lambda dt: _lora(make_tiny_llama(VOCAB), ["q_proj", "lm_head"], dt),
    "gpt2-lora-bias": lambda dt: _lora(
        make_tiny_gpt2(VOCAB), ["c_attn", "c_proj"], dt, fan_in_fan_out=True, lora_bias=True
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_batched_equals_loop_float64(name: str) -> None:
    model = MODELS[name](torch.float64)
    batch = _batch(LENGTHS)
    grads, losses = PerExampleGradients(model)(batch)
    ref_grads, ref_losses = per_example_gradients_loop(model, batch)
    d = sum(p.numel() for _, p in lora_parameters(model))
    assert grads.dtype == torch.float64 and grads.shape == (len(LENGTHS), d)
    _assert_rel_close(grads, ref_grads, FLOAT64_RTOL)
    _assert_rel_close(losses, ref_losses, FLOAT64_RTOL)
    for b in range(len(LENGTHS)):  # every example has its own, non-trivial gradient
        assert ref_grads[b].norm() > 0
        _assert_rel_close(grads[b], ref_grads[b], 10 * FLOAT64_RTOL)


@pytest.mark.parametrize("name", ["llama-attn", "gpt2"])
def test_batched_float32_close_to_float64_loop(name: str) -> None:
    model = MODELS[name](torch.float32)
    batch = _batch(LENGTHS, seed=3)
    grads, losses = PerExampleGradients(model)(batch)
    ref_grads, ref_losses = per_example_gradients_loop(model, batch, dtype=torch.float64)
    assert grads.dtype == torch.float32 and losses.dtype == torch.float32
    _assert_rel_close(grads, ref_grads, FLOAT32_RTOL)
    _assert_rel_close(losses, ref_losses, FLOAT32_RTOL)


@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_base(lora_dtype: torch.dtype) -> None:
    """bf16 base weights with float32 LoRA factors (peft's default) or bf16 factors: float32 gradients."""
    base = make_tiny_llama(VOCAB, dtype=torch.bfloat16)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_ATTN, init_lora_weights=False)
    torch.manual_seed(1)
    model = peft.get_peft_model(base, cfg, autocast_adapter_dtype=lora_dtype == torch.float32).eval()
    assert {p.dtype for _, p in lora_parameters(model)} == {lora_dtype}
    batch = _batch(LENGTHS)
    grads, losses = PerExampleGradients(model)(batch)
    ref_grads, ref_losses = per_example_gradients_loop(model, batch, dtype=torch.float64)
    assert grads.dtype == torch.float32
    _assert_rel_close(grads, ref_grads, BF16_RTOL)
    _assert_rel_close(losses, ref_losses, BF16_RTOL)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, FLOAT64_RTOL), (torch.float32, INVARIANCE_RTOL_FLOAT32)])
def test_batch_composition_invariance(dtype: torch.dtype, rtol: float) -> None:
    model = MODELS["llama-attn"](dtype)
    batch = _batch([14, 30, 6, 14])
    pe = PerExampleGradients(model)
    alone, loss_alone = pe(_rows(batch, [0]))
    for idx in ([0, 1], [0, 2], [2, 0, 1], [0, 3]):  # longer, shorter, other positions, equal-length neighbour
        grads, losses = pe(_rows(batch, idx))
        row = idx.index(0)
        _assert_rel_close(grads[row : row + 1], alone, rtol)
        _assert_rel_close(losses[row : row + 1], loss_alone, rtol)


def test_losses_are_mean_label_token_losses() -> None:
    model = MODELS["llama-attn"](torch.float64)
    batch = _batch(LENGTHS, seed=5)
    _, losses = PerExampleGradients(model)(batch)
    for b, n in enumerate(LENGTHS):
        ids, labels = batch["input_ids"][b : b + 1, :n], batch["labels"][b : b + 1, :n]
        logits = model(input_ids=ids).logits[0, :-1]
        target = labels[0, 1:]
        keep = target != IGNORE_INDEX
        by_hand = -torch.log_softmax(logits[keep], dim=-1).gather(1, target[keep, None]).mean()
        assert abs(losses[b].item() - by_hand.item()) <= FLOAT64_RTOL * by_hand.item()
        # transformers computes its own loss in float32 (it casts logits with .float())
        assert abs(losses[b].item() - model(input_ids=ids, labels=labels).loss.item()) <= FLOAT32_RTOL * by_hand.item()


def test_lora_parameters_order_and_layout() -> None:
    model = MODELS["gpt2"](torch.float32)
    params = lora_parameters(model)
    expected = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, _ in params] == expected
    assert all(".lora_A." in n or ".lora_B." in n for n in expected)
    pe = PerExampleGradients(model)
    assert pe.dim == sum(p.numel() for _, p in params)
    grads, _ = pe(_batch([8, 5]))
    blocks = pe.blocks(grads)
    assert list(blocks) == expected
    for name, p in params:
        assert blocks[name].shape == (2, *p.shape)
        assert blocks[name].data_ptr() == grads[:, pe.param_slices[name]].data_ptr()  # a view, not a copy


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    return model.requires_grad_(False)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: _frozen(make_tiny_llama(VOCAB)), "no trainable LoRA"),
        (lambda: make_tiny_llama(VOCAB), "not a LoRA factor"),
        (lambda: _lora(make_tiny_llama(VOCAB), LLAMA_ATTN, modules_to_save=["lm_head"]), "not a LoRA factor"),
        (lambda: _lora(make_tiny_llama(VOCAB), LLAMA_ATTN, use_dora=True), "DoRA"),
        (lambda: _lora(make_tiny_llama(VOCAB), ["embed_tokens", "q_proj"]), "unsupported LoRA form"),
    ],
    ids=["no-lora", "full-finetune", "modules-to-save", "dora", "embedding-lora"],
)
def test_lora_parameters_rejects_unsupported(build, match: str) -> None:
    model = build()
    with pytest.raises(ModelError, match=match):
        lora_parameters(model)
    with pytest.raises(ModelError, match=match):
        PerExampleGradients(model)


def test_merged_adapter_rejected() -> None:
    model = MODELS["llama-attn"](torch.float32)
    model.merge_adapter()
    with pytest.raises(ModelError, match="merged"):
        PerExampleGradients(model)


def test_training_mode_rejected() -> None:
    model = MODELS["llama-attn"](torch.float32).train()
    with pytest.raises(ModelError, match="eval"):
        PerExampleGradients(model)(_batch([6, 7]))


def test_runs_under_no_grad_but_not_inference_mode() -> None:
    model = MODELS["llama-attn"](torch.float32)
    pe = PerExampleGradients(model)
    batch = _batch([6, 9])
    expected, _ = pe(batch)
    with torch.no_grad():
        grads, _ = pe(batch)
    assert torch.equal(grads, expected)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        pe(batch)


def test_batch_errors_name_the_example() -> None:
    pe = PerExampleGradients(MODELS["llama-attn"](torch.float32))
    batch = _batch([10, 8, 9])
    batch["labels"][2] = IGNORE_INDEX
    batch["labels"][2, 0] = 5  # a label on position 0 is never predicted: still zero label tokens
    with pytest.raises(ValueError, match="example 2 has no label tokens"):
        pe(batch)
    left = _batch([10, 8])
    left["attention_mask"][1] = left["attention_mask"][1].flip(0)
    with pytest.raises(ValueError, match="example 1 is not right-padded"):
        pe(left)
    with pytest.raises(ValueError, match="lacks labels"):
        pe({k: v for k, v in _batch([4]).items() if k != "labels"})


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_hooks_removed_and_no_state_kept() -> None:
    model = MODELS["llama-attn"](torch.float32)
    before = _hooks(model)
    batch = _batch(LENGTHS)
    seen: list[weakref.ref] = []
    lora_a = model.get_base_model().model.layers[1].self_attn.v_proj.lora_A["default"]
    with PerExampleGradients(model) as pe:
        spy = lora_a.register_forward_hook(lambda m, i, o: seen.extend([weakref.ref(i[0]), weakref.ref(o)]))
        grads, _ = pe(batch)
        spy.remove()
        assert _hooks(model) == before
        assert all(p.grad is None for _, p in lora_parameters(model))  # .grad is never written
        assert len(seen) == 2 and all(r() is None for r in seen)  # activations freed, without waiting for gc
        pe(batch)
    assert _hooks(model) == before


def test_hooks_removed_after_error() -> None:
    model = MODELS["llama-attn"](torch.float32)
    before = _hooks(model)

    def boom(module, inputs, output):
        raise RuntimeError("boom")

    handle = model.get_base_model().lm_head.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        PerExampleGradients(model)(_batch([6, 9]))
    handle.remove()
    assert _hooks(model) == before


def test_self_check_catches_weight_used_outside_its_linear() -> None:
    """A LoRA layer that also reads lora_B.weight directly breaks the hook path; the first call says so."""
    model = MODELS["llama-attn"](torch.float32)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    original = layer.forward

    def leaky(x, *args, **kwargs):
        return original(x, *args, **kwargs) + 0.1 * layer.lora_B["default"].weight.sum()

    layer.forward = leaky
    with pytest.raises(ModelError, match="q_proj.lora_B.default.weight"):
        PerExampleGradients(model)(_batch([6, 9]))


def test_non_finite_gradients_are_returned() -> None:
    model = MODELS["llama-attn"](torch.float32)
    with torch.no_grad():
        model.get_base_model().model.layers[1].self_attn.o_proj.lora_B["default"].weight.fill_(float("inf"))
    grads, _ = PerExampleGradients(model)(_batch([6, 9]))
    assert not torch.isfinite(grads).all()


needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_base_layers(bits: int, tmp_path) -> None:
    import transformers

    cfg = transformers.LlamaConfig(  # 4-bit blocks need in_features >= 64
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    if bits == 4:
        quant = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    else:
        quant = transformers.BitsAndBytesConfig(load_in_8bit=True)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    model = _lora(base, LLAMA_ATTN)
    assert "bnb" in type(model.get_base_model().model.layers[0].self_attn.q_proj).__module__
    batch = _batch([11, 7, 15])
    grads, losses = PerExampleGradients(model)(batch)
    ref_grads, ref_losses = per_example_gradients_loop(model, batch, dtype=None)
    _assert_rel_close(grads, ref_grads, QUANTIZED_RTOL)
    _assert_rel_close(losses, ref_losses, QUANTIZED_RTOL)


def test_adam_direction_matches_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(3, 50, generator=gen, dtype=torch.float64) * 1e-4
    grads[0, :5] = 0.0  # where g and v are ~0, eps dominates
    m = torch.randn(50, generator=gen, dtype=torch.float64) * 1e-4
    v = torch.rand(50, generator=gen, dtype=torch.float64) * 1e-8
    m[:5] = 0.0
    v[:5] = 0.0
    b1, b2, eps = 0.8, 0.99, 1e-7
    out = adam_direction(grads, m, v, beta1=b1, beta2=b2, eps=eps)
    assert out.dtype == torch.float64 and out.shape == grads.shape
    for i in range(3):
        for j in range(50):
            g = grads[i, j].item()
            mm = b1 * m[j].item() + (1 - b1) * g
            vv = b2 * v[j].item() + (1 - b2) * g * g
            expected = mm / (vv**0.5 + eps)
            assert abs(out[i, j].item() - expected) <= ADAM_RTOL * max(abs(expected), 1e-30)
    assert torch.equal(out[0, :5], torch.zeros(5, dtype=torch.float64))  # g = m = v = 0 gives 0, not NaN
    out32 = adam_direction(grads.float(), m.float(), v.float())
    assert out32.dtype == torch.float32
    assert grads.dtype == torch.float64 and grads[0, 5] != 0  # inputs untouched
    with pytest.raises(ValueError, match="flat"):
        adam_direction(grads, m[:10], v)
