"""LoGra (factorised per-layer projection) against the float64 Kronecker reference on full gradients."""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch

from conftest import make_tiny_gpt2, make_tiny_llama
from qless.errors import ConfigError
from qless.gradients import PerExampleGradients, per_example_gradients_loop
from qless.project import ProjectionConfig
from qless.project.logra import logra_reference, plan_factors
from utils import BF16_RTOL, FLOAT32_RTOL, FLOAT64_RTOL, labelled_batch, lora_model

VOCAB = 320


def _lora(model: torch.nn.Module, targets: list[str], dtype: torch.dtype, **kw) -> peft.PeftModel:
    return lora_model(model, targets, dtype, **kw)


def _batch(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    return labelled_batch(lengths, VOCAB, label_from=3, seed=seed)


def _reference(fast: PerExampleGradients, cfg: ProjectionConfig, full: torch.Tensor) -> np.ndarray:
    slots = fast._slots
    return logra_reference(cfg, fast.logra.factors, full.double().numpy(), [s.weight_offset for s in slots],
                           [s.bias_offset for s in slots])


def _assert_rel(actual: torch.Tensor, expected: np.ndarray, rtol: float) -> None:
    err = np.abs(actual.double().numpy() - expected).max()
    scale = np.abs(expected).max()
    assert err <= rtol * scale, f"max error {err:.3e} > {rtol:.0e} * {scale:.3e}"


@pytest.mark.parametrize("side", [3, 8, 20])
def test_logra_rows_equal_kronecker_projection_of_the_float64_reference(side):
    # float64 model: the fast path and the reference differ only in summation order
    model = _lora(make_tiny_llama(VOCAB, dtype=torch.float64), ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
                  torch.float64)
    cfg = ProjectionConfig(kind="logra", dim=side, seed=5)
    batch = _batch([9, 14, 6])
    fast = PerExampleGradients(model, projection=cfg)
    rows, _ = fast(batch)
    full, _ = per_example_gradients_loop(model, batch)
    assert rows.shape == (3, fast.logra.out_dim) and fast.input_dim == full.shape[1]
    _assert_rel(rows, _reference(fast, cfg, full), FLOAT64_RTOL)


def test_logra_with_biases_and_gpt2_conv1d_in_float32():
    # lora_bias adds a trainable bias to lora_B; GPT-2's Conv1D layers keep Linear factors
    model = _lora(make_tiny_gpt2(VOCAB), ["c_attn", "c_proj"], torch.float32, lora_bias=True, fan_in_fan_out=True)
    cfg = ProjectionConfig(kind="logra", dim=6, seed=1)
    batch = _batch([12, 7])
    fast = PerExampleGradients(model, projection=cfg)
    assert any(f.bias for f in fast.logra.factors)
    rows, _ = fast(batch)
    full, _ = per_example_gradients_loop(model, batch)
    _assert_rel(rows, _reference(fast, cfg, full), FLOAT32_RTOL)


def test_bfloat16_side_operands_stay_within_bfloat16_rounding():
    model = _lora(make_tiny_llama(VOCAB), ["q_proj", "v_proj"], torch.float32)
    cfg = ProjectionConfig(kind="logra", dim=8, seed=0, compute_dtype="bfloat16")
    batch = _batch([10, 13])
    fast = PerExampleGradients(model, projection=cfg)
    rows, _ = fast(batch)
    full, _ = per_example_gradients_loop(model, batch)
    _assert_rel(rows, _reference(fast, cfg, full), BF16_RTOL)


def test_a_side_wider_than_every_layer_keeps_the_exact_gradient():
    # no side is projected: each factor's block is its [out, in] gradient in the parameters' own layout
    model = _lora(make_tiny_llama(VOCAB, dtype=torch.float64), ["q_proj", "o_proj"], torch.float64)
    batch = _batch([8, 11])
    rows, _ = PerExampleGradients(model, projection=ProjectionConfig(kind="logra", dim=10**6))(batch)
    full, _ = PerExampleGradients(model)(batch)
    torch.testing.assert_close(rows, full, rtol=0, atol=0)


def test_plan_projects_only_sides_longer_than_s_and_lays_factors_end_to_end():
    f = plan_factors([("a", 4, 64, False), ("b", 64, 4, True), ("c", 16, 16, False)], side=8)
    assert [(x.k_out, x.k_in, x.size) for x in f] == [(4, 8, 32), (8, 4, 40), (8, 8, 64)]
    assert [x.offset for x in f] == [0, 32, 72]
    # side matrices are consecutive row blocks of one seeded matrix: a.in, b.out, c.out, c.in
    assert [(x.out_row, x.in_row) for x in f] == [(-1, 0), (64, -1), (128, 144)]


def test_inner_products_are_unbiased_over_seeds():
    # E[(P_out (x) P_in)^T (P_out (x) P_in)] = I, so the mean of <Pa, Pb> over independent seeds
    # tends to <a, b>; Chebyshev with the sample variance bounds the deviation of the mean
    from qless.project.logra import Factor, LograProjection

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 24, 40, generator=gen, dtype=torch.float64)
    b = b + a  # correlated, so <a, b> is far from 0
    exact = float((a * b).sum())
    vals = []
    for seed in range(400):
        proj = LograProjection(ProjectionConfig(kind="logra", dim=6, seed=seed), [("w", 24, 40, False)], 960)
        f: Factor = proj.factors[0]
        pa = proj.side(f, "out", proj.side(f, "in", a, torch.float64).T, torch.float64)
        pb = proj.side(f, "out", proj.side(f, "in", b, torch.float64).T, torch.float64)
        vals.append(float((pa * pb).sum()))
    vals = np.array(vals)
    bound = vals.std(ddof=1) / np.sqrt(len(vals)) / np.sqrt(1e-3)  # Chebyshev at failure probability 1e-3
    assert abs(vals.mean() - exact) <= bound


def test_extraction_refuses_logra_with_adam_pool_rows(tmp_path):
    from qless.extraction import ExtractConfig, Extractor

    with pytest.raises(ConfigError, match="pool_gradient=sgd"):
        Extractor([], tmp_path, ExtractConfig(), ProjectionConfig(kind="logra", dim=8))


def test_run_config_refuses_logra_with_adam_up_front():
    from qless.pipeline import build_run_config

    with pytest.raises(ConfigError, match="logra"):
        build_run_config({"pool": ["p.jsonl"], "targets": ["t.jsonl"], "projection": {"kind": "logra", "dim": 8}}, "cpu")


def test_projector_and_manifest_identity_refuse_logra():
    from qless.project import Projector

    with pytest.raises(ConfigError, match="hooks"):
        Projector(ProjectionConfig(kind="logra", dim=8), 100)
    with pytest.raises(ConfigError, match="shapes"):
        ProjectionConfig(kind="logra", dim=8).identity(100)


def test_projecting_formed_gradients_equals_the_hooks():
    # the fidelity probe holds full gradient rows: project_rows must give what the hooks give
    from qless.project.logra import project_rows

    model = _lora(make_tiny_gpt2(VOCAB), ["c_attn", "c_proj"], torch.float32, lora_bias=True, fan_in_fan_out=True)
    cfg = ProjectionConfig(kind="logra", dim=5, seed=2)
    batch = _batch([9, 12, 5])
    hooked = PerExampleGradients(model, projection=cfg)
    rows, _ = hooked(batch)
    plain = PerExampleGradients(model)
    full, _ = plain(batch)
    layout = plain.layout()
    got = project_rows(hooked.logra, full, [r[4] for r in layout], [r[5] for r in layout])
    _assert_rel(got, rows.double().numpy(), FLOAT32_RTOL)
