"""LoRIF's rows: per-layer capture and rank-c factors, against float64 references."""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch

from conftest import make_tiny_gpt2, make_tiny_llama
from qless.errors import ModelError
from qless.lorif.capture import LayerCapture, capture_layers
from qless.lorif.factors import FactorLayout, factor_apply, factor_inner, factorize
from qless.project import ProjectionConfig
from qless.project.logra import logra_reference
from utils import FLOAT32_RTOL, FLOAT64_RTOL, labelled_batch, layer_gradients, lora_model

VOCAB = 320


def _lora(model: torch.nn.Module, targets: list[str], dtype: torch.dtype = torch.float64) -> peft.PeftModel:
    return lora_model(model, targets, dtype)


def _batch(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    return labelled_batch(lengths, VOCAB, label_from=2, seed=seed)


def _projected_reference(cap: LayerCapture, model, batch) -> np.ndarray:
    """The two-sided projected per-layer gradients ``[B, D]`` from the float64 reference."""
    names = [n for n, _, _, _ in cap.layers]
    full = layer_gradients(model, names, batch)
    offsets = np.cumsum([0] + [o * i for _, _, o, i in cap.layers])[:-1]
    return logra_reference(cap.sides.cfg, cap.sides.factors, full, list(offsets), [-1] * len(names))


@pytest.mark.parametrize("which", ["lora", "all"])
def test_factors_reconstruct_the_projected_layer_gradients_when_c_covers_the_rank(which):
    # every example has at most 14 tokens, so each layer gradient has rank <= 14 <= c
    model = _lora(make_tiny_llama(VOCAB), ["q_proj", "k_proj", "v_proj", "o_proj"])
    cfg = ProjectionConfig(kind="lorif", dim=16, rank=16, layers=which, seed=2)
    batch = _batch([14, 9, 11])
    cap = LayerCapture(model, cfg)
    if which == "all":
        assert any(n.endswith("up_proj") for n, _, _, _ in cap.layers)
    rows, _ = cap(batch)
    want = _projected_reference(cap, model, batch)
    got = cap.layout.reconstruct(rows.double()).numpy()
    assert np.abs(got - want).max() <= FLOAT32_RTOL * np.abs(want).max()


def test_truncated_factors_are_the_best_rank_c_approximation():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(5, 12, 9, generator=gen, dtype=torch.float64)
    u, v = factorize(g, 3)
    for b in range(5):
        s = torch.linalg.svdvals(g[b])
        err = torch.linalg.matrix_norm(g[b] - u[b] @ v[b].T)
        # Eckart-Young: the error of the best rank-3 approximation is the norm of the other singular values
        assert abs(float(err) - float(s[3:].norm())) <= FLOAT64_RTOL * float(s.norm())
        # balanced: both sides carry sqrt of the singular values
        torch.testing.assert_close(u[b].norm(dim=0), v[b].norm(dim=0), rtol=FLOAT64_RTOL, atol=0)


def test_factorize_pads_when_c_exceeds_the_matrix_rank_and_is_exact():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(2, 6, 1, generator=gen, dtype=torch.float64) @ torch.randn(2, 1, 4, generator=gen, dtype=torch.float64)
    u, v = factorize(g, 7)
    assert u.shape == (2, 6, 7) and v.shape == (2, 4, 7)
    torch.testing.assert_close(u @ v.transpose(1, 2), g, rtol=0, atol=FLOAT64_RTOL * float(g.abs().max()))


def test_inner_products_from_factors_equal_those_of_reconstructed_matrices():
    gen = torch.Generator().manual_seed(2)
    layout = FactorLayout([("a", 5, 7), ("b", 3, 4)], rank=2)
    x = torch.randn(4, layout.width, generator=gen, dtype=torch.float64)
    y = torch.randn(3, layout.width, generator=gen, dtype=torch.float64)
    got = sum(factor_inner(u, v, u2, v2) for (u, v), (u2, v2) in zip(layout.split(x), layout.split(y)))
    want = layout.reconstruct(x) @ layout.reconstruct(y).T
    torch.testing.assert_close(got, want, rtol=FLOAT64_RTOL, atol=0)
    basis = torch.randn(6, 5, 7, generator=gen, dtype=torch.float64)
    u, v = layout.split(x)[0]
    torch.testing.assert_close(factor_apply(u, v, basis), layout.reconstruct(x)[:, :35] @ basis.reshape(6, -1).T,
                               rtol=FLOAT64_RTOL, atol=0)


def test_layout_split_join_round_trip_and_sizes():
    layout = FactorLayout([("a", 5, 7), ("b", 3, 4)], rank=2)
    assert layout.width == 2 * (5 + 7) + 2 * (3 + 4) and layout.dim == 35 + 12
    rows = torch.arange(3 * layout.width, dtype=torch.float64).reshape(3, -1)
    torch.testing.assert_close(layout.join(layout.split(rows)), rows, rtol=0, atol=0)


def test_gpt2_layers_and_refusals():
    model = _lora(make_tiny_gpt2(VOCAB), ["c_attn"], torch.float32)
    with pytest.raises(ModelError, match="Linear"):  # GPT-2's Conv1D base layers are not nn.Linear
        capture_layers(model, "lora")
    llama = _lora(make_tiny_llama(VOCAB), ["o_proj"])
    # with LoRA on o_proj only, layer 0's q_proj output does not depend on any trainable parameter
    cap = LayerCapture(llama, ProjectionConfig(kind="lorif", dim=8, rank=2, layers="all"))
    with pytest.raises(ModelError, match="q_proj"):
        cap(_batch([6, 5]))


def test_identity_records_the_layers_rank_side_and_seed():
    model = _lora(make_tiny_llama(VOCAB), ["q_proj"])
    cap = LayerCapture(model, ProjectionConfig(kind="lorif", dim=8, rank=3, seed=7))
    ident = cap.identity()
    assert ident["kind"] == "lorif" and ident["rank"] == 3 and ident["side"] == 8 and ident["seed"] == 7
    assert ident["dim"] == cap.layout.width == sum(3 * (o + i) for _, o, i in ident["layer_list"])
    assert len(ident["layer_list"]) == 2 and ident["input_dim"] == 2 * 32 * 32
