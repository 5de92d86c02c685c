"""Named tolerances and statistical oracles shared by the tests.

Every tolerance has a one-line reason. Statistical tests of the lossy paths (projection,
quantization) compare against a value from theory and build their band so that a correct
implementation fails the whole test with probability at most :data:`FAIL_PROB` (a union bound
over everything the test checks); the helpers below turn that probability into a band.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# -- Statistical tests ----------------------------------------------------------------------

# Chance that a correct implementation fails one statistical test: 1 in a million runs.
FAIL_PROB = 1e-6
# Extra standard deviations over the normal quantile for statistics that are smooth functions of
# k >= 4096 coordinate means: their skewness is c / sqrt(k), c a few times the per-coordinate
# skewness of g^2 (2.8), so below 0.2; that moves the quantile at z ~ 5.5 by at most
# (z^2 - 1) * 0.2 / 6 = 1 sd (Cornish-Fisher).
SKEW_MARGIN = 1.0

# -- Exact paths: fast code against a float64 reference --------------------------------------

# Per-example gradients, batched against the one-example loop (tests/test_gradients.py, test_extract.py):
# both in float64: they differ only in summation order.
FLOAT64_RTOL = 1e-10
# batched float32 against the float64 loop: float32 rounding (~1e-7) compounded through the layers and the sum over T.
FLOAT32_RTOL = 1e-4
# the same float32 computation in batches of other shapes: only matmul blocking (summation order) changes.
INVARIANCE_RTOL_FLOAT32 = 1e-5
# Hidden-state representations (RDS+), float32 forward passes batched with padding against a float64 copy of the model
# run one example at a time: float32 rounding compounded through the layers and the weighted sum over T, as FLOAT32_RTOL.
HIDDEN_STATE_RTOL = FLOAT32_RTOL
# bfloat16 base weights against the float64 loop: bf16 activations keep 8 significant bits (~4e-3) per op.
BF16_RTOL = 5e-2
# bitsandbytes base layers in float32 against the same quantized model run one example at a time:
# int8 activations are quantized per token, so only summation order and fp16 casts inside bnb differ.
QUANTIZED_RTOL = 1e-3
# adam_direction in float64 against the same formula written out element by element in float64.
ADAM_RTOL = 1e-12
# Extracted rows (float32 gradients, Adam direction and projection) against the float64 reference rows.
ROW_REL_TOL = FLOAT32_RTOL
# The same float32 extraction with another thread count: CPU kernels may sum in another order, which moves
# a row by float32 rounding (2^-24 ~ 6e-8 per operation, a few hundred operations deep).
THREADS_REL_TOL = 1e-5
# An NF4 model against a float32 model holding its dequantised weights: the same arithmetic up to the
# order in which bitsandbytes dequantises and multiplies.
NF4_DEQUANT_RTOL = 1e-4
# LLM.int8 against float32 logits (|logit| ~ 1): vector-wise 8-bit rounding of weights and activations gives
# about 1/127 relative error per dot product; 0.02 absolute allows a few of those to add up.
INT8_LOGIT_ATOL = 0.02
# A converted GGUF folder against the GGUF loaded by transformers: the same float32 tensors, only kernel noise.
GGUF_LOGIT_ATOL = 1e-4
# Answer loss of a float32 model in padded batches against the float64 one-example loop (qless.evaluate.loss):
# per-token log-probabilities carry float32 rounding through the layers, as the per-example gradients do.
ANSWER_LOSS_RTOL = FLOAT32_RTOL
# An option's log-likelihood (summed over <= 4 tokens, |value| ~ 10) from lm-eval on a float32 model against qless's float64
# computation: float32 logits and log-softmax rounding, 1e-4 relative, summed over a few tokens.
LOGLIKELIHOOD_ATOL = 1e-3

# Scores: float32 decode and matmul against float64; sums of cosines (|s| <= 1) over k <= 8192
# float32 products, rounding ~ sqrt(k) * 2^-24 ~ 1e-6: 1e-5 absolute is ample.
SCORE_ATOL = 1e-5
# Packed int8 scoring against float64: only the query's three int8 digits round (codes, products and norms are exact
# integers), which moves a score by at most sqrt(k) max|q| / (2 * 127 * 254^2) <= 5.5e-6 for k <= 8192 and |q| <= 1.
PACKED_SCORE_ATOL = 6e-6
# Exact scores (float32 model, float64 cosines of full gradients) against a float64 model run one example at a
# time: each gradient row is within FLOAT32_RTOL relative of the reference, and the cosine of two rows moves by at
# most about twice the sum of their relative errors; learning-rate weights sum to 1 and means and maxima do not grow it.
EXACT_COSINE_ATOL = 4 * FLOAT32_RTOL
# One integer code sitting on a rounding boundary may flip between two float32 computations of the same projected
# row (other batch shapes sum in another order). A flip moves one of k >= 64 coordinates by one step, which moves the
# row's cosine with any unit vector by at most about 2 / sqrt(k) of its norm share: 0.25 at k = 64 bounds it. Rows
# without a flip still agree to SCORE_ATOL, and flips are rare (~1e-6 per coordinate), so the median row does.
CODE_FLIP_ATOL = 0.25
# LoRIF: the stable Nystrom fit of an exactly low-rank PSD matrix (or at full rank) against eigh: exact but for the
# shift nu = sqrt(D) eps ||Y|| (~1e-14 relative) and float64 rounding in QR, Cholesky and SVD, amplified by the
# sketch's condition number (< 1e4 here).
NYSTROM_EXACT_RTOL = 1e-9
# LoRIF Woodbury in float64 against a dense solve of G^T G / N + lambda I: equal in exact arithmetic; the solve's
# rounding grows with cond(H) <= (lam_max + lambda) / lambda, a few hundred to a few thousand at damping 0.1.
WOODBURY_FLOAT64_RTOL = 1e-9
# LoRIF scores in float32 against float64: <g', g> and the rank-r correction each carry float32 rounding (2^-24 per
# operation over sums of a few hundred products: about 1e-6 of ||g'|| ||g||) before their difference is divided by
# lambda, so the error is bounded relative to ||g'|| ||g|| / lambda (cosine: (lam_max + lambda) / lambda), not to
# the possibly much smaller result.
LORIF_FLOAT32_TOL = 1e-6
# Projection: float32 accumulation over d <= 4096 terms of magnitude <= |x|: relative error well under 1e-5.
FP32_REL_TOL = 1e-5
# Projection with bfloat16 operands (8-bit mantissa) and per-chunk bf16 partial sums: about 0.3% relative error.
BF16_REL_TOL = 1.5e-2
# Projection outputs that cancel to near zero: float32 rounding of a few hundred O(1) terms.
PROJ_ATOL = 1e-6
# A stored float32 scale against its float64 reference: one float32 rounding, 2^-24 ~ 6e-8 relative.
SCALE_RTOL = 1e-6
# fp16 unit vectors: each coordinate rounded to 11 significant bits, 2^-11 ~ 4.9e-4 relative.
FP16_REL_TOL = 1e-3
# fp32 unit vectors: each coordinate rounded to 24 significant bits, 2^-24 ~ 6e-8 relative.
FP32_UNIT_REL_TOL = 1e-6
# Dequantized float32 ``code * (S / alpha)``: three float32 roundings (S, S / alpha, the product) of values <= S: 3 * 2^-24 * S.
DEQUANT_RTOL = 2.5e-7
# float64 angles from Kahan's formula (tests/utils.angle) against a geometric bound: exact to ~1e-15 rad.
ANGLE_ATOL = 1e-12
# 1 - cos of 8-bit absmax against the uniform rounding-error approximation step^2 / 24: truncation at S shifts it ~0.1%.
UNIFORM_ERROR_RTOL = 1e-2


# -- Bands from probability ------------------------------------------------------------------


def normal_quantile(fail_prob: float) -> float:
    """``z`` with ``P(|N(0, 1)| > z) = fail_prob`` (bisection on ``erfc``; 4.89 at 1e-6)."""
    lo, hi = 0.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.erfc(mid / math.sqrt(2)) > fail_prob else (lo, mid)
    return hi


def sd_band(fail_prob: float) -> float:
    """Half-width, in standard deviations, of a band that a nearly normal statistic (a smooth
    function of k >= 4096 coordinate means) leaves with probability at most ``fail_prob``."""
    return normal_quantile(fail_prob) + SKEW_MARGIN


def binomial_band(n: int, p: float, fail_prob: float) -> tuple[int, int]:
    """Integers ``lo <= hi`` with ``P(D < lo) + P(D > hi) <= fail_prob`` for ``D ~ Binomial(n, p)``,
    from the exact probability mass function (``fail_prob / 2`` in each tail)."""
    j = torch.arange(n + 1, dtype=torch.float64)
    log_pmf = (math.lgamma(n + 1) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1)
               + j * math.log(p) + (n - j) * math.log1p(-p))
    pmf = torch.exp(log_pmf).numpy()
    below = np.cumsum(pmf)  # P(D <= j)
    above = np.cumsum(pmf[::-1])[::-1]  # P(D >= j)
    lo = int(np.searchsorted(below, fail_prob / 2, side="right"))  # P(D < lo) = below[lo - 1] <= fail_prob / 2
    hi = int(np.nonzero(above > fail_prob / 2)[0][-1])  # P(D > hi) = above[hi + 1] <= fail_prob / 2
    return lo, hi


def jl_epsilon(k: int, fail_prob: float) -> float:
    """Smallest ``eps`` with ``2 exp(-k (eps^2/4 - eps^3/6)) <= fail_prob``: the Johnson-Lindenstrauss
    tail bound of ``P(| ||Rx||^2 / ||x||^2 - 1 | > eps)`` for Gaussian and Rademacher ``R / sqrt(k)``
    (Dasgupta and Gupta 2003; Achlioptas 2003, Lemma 5)."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 2 * math.exp(-k * (mid**2 / 4 - mid**3 / 6)) > fail_prob else (lo, mid)
    return hi


def chi2_upper(n: int, fail_prob: float) -> float:
    """``c`` with ``P(chi^2_n > c) <= fail_prob``: Laurent and Massart (2000), Lemma 1,
    ``P(chi^2_n >= n + 2 sqrt(n x) + 2 x) <= exp(-x)``."""
    x = math.log(1 / fail_prob)
    return n + 2 * math.sqrt(n * x) + 2 * x


# -- Quantization of a Gaussian coordinate ---------------------------------------------------


def _phi(x: float) -> float:
    return 0.0 if math.isinf(x) else math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _partial_moments(a: float, b: float) -> np.ndarray:
    """``[int_a^b g^n phi(g) dg for n = 0..4]`` for the standard normal density, in closed form
    (integration by parts: ``int g^n phi = -g^(n-1) phi + (n-1) int g^(n-2) phi``)."""
    pa, pb = _phi(a), _phi(b)
    fa = 0.0 if math.isinf(a) else a  # g^j phi(g) -> 0 at infinity
    fb = 0.0 if math.isinf(b) else b
    m0 = _cdf(b) - _cdf(a)
    m1 = pa - pb
    m2 = m0 + fa * pa - fb * pb
    m3 = 2 * m1 + fa**2 * pa - fb**2 * pb
    m4 = 3 * m2 + fa**3 * pa - fb**3 * pb
    return np.array([m0, m1, m2, m3, m4])


def code_intervals(method: str, bits: int, s: float) -> list[tuple[float, float, int]]:
    """The quantizer of a coordinate ``g`` at scale ``s`` as ``(a, b, code)``: ``g`` in ``(a, b)``
    gets ``code``. absmax/absmean: ``clamp(round(alpha g / s), -alpha, alpha)``; sign: ``+-1``.
    Intervals never straddle 0 (so ``|g|`` is a polynomial on each)."""
    if method == "sign":
        return [(-math.inf, 0.0, -1), (0.0, math.inf, 1)]
    alpha = (1 << (bits - 1)) - 1
    edges = [-math.inf] + [(q + 0.5) * s / alpha for q in range(-alpha, alpha)] + [math.inf]
    out = []
    for q, (a, b) in zip(range(-alpha, alpha + 1), itertools.pairwise(edges)):
        if a < 0 < b:  # the zero bin
            out += [(a, 0.0, q), (0.0, b, q)]
        else:
            out.append((a, b, q))
    return out


@dataclass(frozen=True)
class CosineOracle:
    """Theory of ``cos(x, codes(x))`` for a row ``x`` of Gaussian coordinates (:func:`quantized_cosine`).

    ``mean`` is the expected cosine; over rows it fluctuates as the mean of ``n`` i.i.d. copies of
    the influence ``h(g)`` of one coordinate (delta method), ``h = p0 + p1 g + p2 g^2`` on each
    piece ``(a, b, p0, p1, p2)``, ``g ~ N(0, 1)`` conditioned on ``|g| < trunc`` when given."""

    mean: float
    n: int
    trunc: float | None
    pieces: tuple[tuple[float, float, float, float, float], ...]

    @property
    def sd(self) -> float:
        """Standard deviation of the row's cosine."""
        return combination_sd([self], [1.0])


def combination_sd(oracles: Sequence[CosineOracle], weights: Sequence[float]) -> float:
    """Standard deviation of ``sum_i w_i cos_i`` when every ``cos_i`` is measured on the SAME row
    (e.g. the same row quantized at two bit widths): the influences add up coordinate by coordinate,
    integrated over the common refinement of their pieces."""
    n, trunc = oracles[0].n, oracles[0].trunc
    if any(o.n != n or o.trunc != trunc for o in oracles):
        raise ValueError("oracles of one row share the coordinate count and the conditioning")
    lim = math.inf if trunc is None else trunc
    cuts = sorted({-lim, lim} | {e for o in oracles for a, b, *_ in o.pieces for e in (a, b) if -lim < e < lim})
    mass = 1.0 if trunc is None else 2 * _cdf(trunc) - 1
    e_h2 = 0.0
    for a, b in itertools.pairwise(cuts):
        mid = b - 1.0 if math.isinf(a) else a + 1.0 if math.isinf(b) else (a + b) / 2
        p = np.zeros(3)
        for o, w in zip(oracles, weights):
            p += w * np.array(next(q[2:] for q in o.pieces if q[0] <= mid < q[1]))
        m = _partial_moments(a, b) / mass
        e_h2 += sum(p[i] * p[j] * m[i + j] for i in range(3) for j in range(3))
    return math.sqrt(max(e_h2, 0.0) / n)


def _moments(method: str, bits: int, s: float, trunc: float | None) -> list[tuple[float, float, int, np.ndarray]]:
    """Per interval ``(a, b, code, moments[0..4])`` for ``g ~ N(0, 1)`` (conditioned on ``|g| < trunc``)."""
    out = []
    mass = 1.0 if trunc is None else 2 * _cdf(trunc) - 1
    for a, b, c in code_intervals(method, bits, s):
        if trunc is not None:
            a, b = max(a, -trunc), min(b, trunc)
            if a >= b:
                continue
        out.append((a, b, c, _partial_moments(a, b) / mass))
    return out


def _abc(method: str, bits: int, s: float, trunc: float | None) -> tuple[float, float, float]:
    """``(E[g c], E[g^2], E[c^2])`` with ``c`` the code of ``g``."""
    ivs = _moments(method, bits, s, trunc)
    return (sum(c * m[1] for _, _, c, m in ivs), sum(m[2] for *_, m in ivs), sum(c * c * m[0] for _, _, c, m in ivs))


def quantized_cosine(method: str, bits: int, k: int, s: float | None = None) -> CosineOracle:
    """Theory of ``cos(x, codes(x))`` for ``x`` of ``k`` i.i.d. ``N(0, 1)`` coordinates.

    * absmean: the scale ``S = mean|g|`` is replaced by its expectation ``sqrt(2/pi)``; its
      fluctuation enters the variance (a term ``d cos / d S * (|g| - E|g|)`` per coordinate).
    * absmax: pass the row's own ``s = max|g|``. Given it, one coordinate is ``+-s`` (code
      ``+-alpha``) and the other ``k - 1`` are ``N(0, 1)`` conditioned on ``|g| < s``.
    * sign: the codes are ``sign(g)``; the expected cosine is ``E|g| / sqrt(E g^2) = sqrt(2/pi)``.

    ``cos = (n a + u) / sqrt((n b + v)(n c + w))`` with ``(a, b, c)`` the means of
    ``(g code, g^2, code^2)`` over the ``n`` random coordinates and ``(u, v, w)`` the fixed
    coordinate's terms; the influence of one coordinate is the gradient of that expression
    (times ``n``) applied to the coordinate's centred terms."""
    trunc, fixed, n = None, (0.0, 0.0, 0.0), k
    if method == "absmax":
        if s is None:
            raise ValueError("absmax needs the row's own scale s = max|g|")
        alpha = (1 << (bits - 1)) - 1
        trunc, fixed, n = s, (s * alpha, s * s, float(alpha * alpha)), k - 1
    elif method == "absmean":
        s = math.sqrt(2 / math.pi)
    elif method == "sign":
        s = 1.0
    else:
        raise ValueError(f"no oracle for {method}")

    def cos_at(scale: float) -> float:
        a, b, c = _abc(method, bits, scale, trunc)
        return (n * a + fixed[0]) / math.sqrt((n * b + fixed[1]) * (n * c + fixed[2]))

    a, b, c = _abc(method, bits, s, trunc)
    dot, xx, cc = n * a + fixed[0], n * b + fixed[1], n * c + fixed[2]  # <x, codes>, ||x||^2, ||codes||^2
    cos = dot / math.sqrt(xx * cc)
    f_a, f_b, f_c = n / math.sqrt(xx * cc), -cos * n / (2 * xx), -cos * n / (2 * cc)  # d cos / d(a, b, c)
    # the estimated scale (absmean only): d cos / dS by a central difference of the smooth expectation
    d_s = (cos_at(s * (1 + 1e-5)) - cos_at(s * (1 - 1e-5))) / (2e-5 * s) if method == "absmean" else 0.0
    const = f_a * a + f_b * b + f_c * c + d_s * math.sqrt(2 / math.pi)
    # h(g) = f_a (g c - a) + f_b (g^2 - b) + f_c (c^2 - c) + d_s (|g| - E|g|) = p0 + p1 g + p2 g^2
    pieces = tuple((lo, hi, f_c * code * code - const, f_a * code + d_s * (1.0 if lo >= 0 else -1.0), f_b)
                   for lo, hi, code, _ in _moments(method, bits, s, trunc))
    return CosineOracle(cos, n, trunc, pieces)


def zero_bin_probability(bits: int, s: float, trunc: float | None = None) -> float:
    """``P(code = 0) = P(|g| < s / (2 alpha))`` for ``g ~ N(0, 1)`` at scale ``s`` (conditioned on
    ``|g| < trunc`` when given)."""
    alpha = (1 << (bits - 1)) - 1
    mass = 1.0 if trunc is None else 2 * _cdf(trunc) - 1
    return (2 * _cdf(s / (2 * alpha)) - 1) / mass


def cosine(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Cosines between the rows of ``u`` and ``v``, in float64."""
    u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
    return (u * v).sum(-1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1))


def angle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Angles in radians between the rows of ``u`` and ``v``, in float64, by Kahan's
    ``2 atan2(||u^ - v^||, ||u^ + v^||)`` (accurate for tiny angles, where arccos is not)."""
    u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
    u = u / np.linalg.norm(u, axis=-1, keepdims=True)
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    return 2 * np.arctan2(np.linalg.norm(u - v, axis=-1), np.linalg.norm(u + v, axis=-1))


def rows_at_angles(d: int, angles: Sequence[float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A unit vector ``t [d]`` and unit rows ``p [len(angles), d]`` with ``angle(p_j, t) = angles[j]``
    exactly (up to float64 rounding): ``p_j = cos(a_j) t + sin(a_j) u_j``, ``u_j`` orthonormal and
    orthogonal to ``t`` (a QR of a seeded Gaussian matrix)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, len(angles) + 1)))
    t, u = q[:, 0], q[:, 1:].T
    a = np.asarray(angles, dtype=np.float64)[:, None]
    return t, np.cos(a) * t[None, :] + np.sin(a) * u


def block_pairs(cosines: Sequence[float], block: int, seed: int,
                heavy_tailed: Sequence[bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows ``x, y [n, n * block]`` with ``<x_i, y_i> = cosines[i]``, pair ``i`` supported on
    input coordinates ``[i * block, (i + 1) * block)``. Disjoint supports meet disjoint rows of a
    projection matrix, so the pairs' projections are independent for any i.i.d. matrix. Pairs
    flagged in ``heavy_tailed`` have entries scaled by exponential draws (a few large coordinates)."""
    rng = np.random.default_rng(seed)
    n = len(cosines)
    heavy = heavy_tailed if heavy_tailed is not None else [False] * n
    x, y = np.zeros((n, n * block)), np.zeros((n, n * block))
    for i, (c, h) in enumerate(zip(cosines, heavy, strict=True)):
        a, b = rng.standard_normal((2, block))
        if h:
            a, b = a * rng.exponential(size=block), b * rng.exponential(size=block)
        a /= np.linalg.norm(a)
        b -= (a @ b) * a
        b /= np.linalg.norm(b)
        x[i, i * block:(i + 1) * block] = a
        y[i, i * block:(i + 1) * block] = c * a + math.sqrt(1 - c * c) * b
    return x, y


# -- Reference rows ----------------------------------------------------------------------------


def reference_gradients(model, tokenizer, examples, checkpoint, kind: str, data_cfg=None) -> np.ndarray:
    """float64 per-example gradients of ``examples`` one at a time (the slow reference), turned into
    the checkpoint's Adam direction for ``kind == "pool"``: the rows extraction must reproduce."""
    from qless.data import DataConfig, collate, tokenize_examples
    from qless.gradients import adam_direction, per_example_gradients_loop

    items, _ = tokenize_examples(examples, tokenizer, data_cfg or DataConfig(), progress=False)
    g, _ = per_example_gradients_loop(model, collate(items, tokenizer.pad_token_id), dtype=torch.float64)
    if kind == "pool":
        mom = checkpoint.moments()
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        m = torch.cat([mom[n][0].reshape(-1) for n in names]).double()
        v = torch.cat([mom[n][1].reshape(-1) for n in names]).double()
        g = adam_direction(g, m, v)
    return g.numpy()


def layer_gradients(model, names: list[str], batch) -> np.ndarray:
    """float64 per-example gradients of the captured layers' weights (the base weight of a LoRA
    layer), one unpadded example at a time: ``[B, sum out * in]`` in layer order."""
    import copy

    from qless.gradients import _mean_label_losses

    ref = copy.deepcopy(model).double().eval()
    modules = dict(ref.named_modules())
    weights = []
    for n in names:
        m = modules[n]
        w = m.get_base_layer().weight if hasattr(m, "get_base_layer") else m.weight
        w.requires_grad_(True)
        weights.append(w)
    rows = []
    for b in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        logits = ref(input_ids=batch["input_ids"][b:b + 1, :n], use_cache=False).logits
        loss = _mean_label_losses(logits, batch["labels"][b:b + 1, :n])[0]
        grads = torch.autograd.grad(loss, weights)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).numpy()


def lora_model(model, targets: list[str], dtype=torch.float64, **kw):
    """LoRA r=4 without dropout and with random (not zero) lora_B, so both factors have gradients."""
    import peft

    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False, **kw)
    torch.manual_seed(1)
    return peft.get_peft_model(model, cfg).to(dtype).eval()


def labelled_batch(lengths: list[int], vocab: int, label_from: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded random batch; example b has lengths[b] tokens, labels on its last
    ``n - n // label_from`` tokens (the prompt before them takes no loss)."""
    from qless.gradients import IGNORE_INDEX

    gen = torch.Generator().manual_seed(seed)
    bsz, t = len(lengths), max(lengths)
    ids = torch.randint(0, vocab, (bsz, t), generator=gen)
    mask = torch.zeros(bsz, t, dtype=torch.long)
    labels = torch.full((bsz, t), IGNORE_INDEX)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        labels[b, n // label_from:n] = ids[b, n // label_from:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
