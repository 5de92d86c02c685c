"""Random projection of gradients, R^d -> R^k, fixed by a seed.

:class:`ProjectionConfig` says which matrix (kind, k, seed) and how it is computed (chunk size,
operand dtype); :func:`make_projector` builds the projector. Kinds:

* ``rademacher`` and ``gaussian``: dense matrices defined entry by entry by a counter-based hash
  of the seed (:mod:`qless.project.seeded`), generated in chunks and never materialised. Cost
  ``O(d k)`` per example.
* ``sparse``: a sparse Johnson-Lindenstrauss transform (CountSketch for ``nnz = 1``): each input
  coordinate lands in ``nnz`` hashed buckets, one per block of ``k / nnz`` outputs, with a hashed
  sign and weight ``1/sqrt(nnz)``. Cost ``O(d nnz)`` per example whatever ``k``, which is what makes
  ``k = 131072`` affordable. Inner products keep the dense sign projection's variance
  ``(||x||^2 ||y||^2 + <x, y>^2 - 2 sum_i x_i^2 y_i^2) / k``.
* ``none``: no projection (``k = d``): the exact gradients, for fidelity probes and small models.
* ``lorif``: LoRIF's rows (:mod:`qless.lorif`): rank-``rank`` factors of each whole layer's
  two-sided projected gradient; a store of its own method, scored by LoRIF's scorer only.
* ``logra``: a factorised per-layer projection (:mod:`qless.project.logra`): each LoRA factor's
  input and output side is projected to ``dim`` coordinates inside the gradient hooks, so the
  per-example gradient is never formed; k is the sum of the factors' ``[k_out, k_in]`` blocks.
  Plain (SGD) gradients only: the Adam direction does not factorise.

:mod:`qless.project.reference` builds every matrix densely in float64 for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from qless.config import Config, option
from qless.errors import ConfigError
from qless.project.reference import dense_reference, project_reference
from qless.project.seeded import KIND_TAG, Projector, matrix_rows, seed_key

ProjectionKind = Literal["rademacher", "gaussian", "sparse", "none", "logra", "lorif"]


@dataclass(frozen=True)
class ProjectionConfig(Config):
    """How gradients are projected. ``kind``, ``dim`` and ``seed`` define the matrix and are
    checked when stores are combined; ``chunk_size`` and ``compute_dtype`` only trade speed."""

    section = "projection"

    kind: ProjectionKind = option("rademacher", "rademacher (dense +-1), gaussian (dense), sparse (sparse JL / CountSketch: "
                                  "cost independent of k), none (no projection, k = d), logra (factorised per LoRA factor; "
                                  "plain gradients only) or lorif (rank-c factors of whole layers' projected gradients, "
                                  "scored by `qless score --method lorif`)")
    dim: int = option(8192, "projected dimension k (ignored by kind none, whose k is the gradient dimension d; for "
                      "logra the size s each side of each LoRA factor is projected to, k = sum of min(out, s) * min(in, s))")
    nnz: int = option(1, "sparse kind: non-zeros per input coordinate (1 = CountSketch); must divide dim")
    rank: int = option(4, "lorif: rank c of each layer's stored factors (c * (k_out + k_in) numbers per layer)")
    layers: Literal["lora", "all"] = option("lora", "lorif: layers whose gradients are factored: the LoRA-adapted ones, "
                                            "or every linear layer but the output head")
    seed: int = option(0, "seed of the projection matrix (the same seed gives the same matrix everywhere)")
    chunk_size: int = option(512, "rows of R generated at a time (memory and speed only; never changes R)")
    compute_dtype: Literal["float32", "bfloat16"] = option(
        "float32",
        "operand dtype of the projection matmul; bfloat16 is about 3x faster on CPUs with bf16 units "
        "and adds about 0.3% relative error (much less than the projection's own ~1/sqrt(k))",
    )

    def validate(self) -> None:
        if self.kind not in (*KIND_TAG, "none", "lorif"):
            raise ConfigError(f"projection.kind: {self.kind!r} is not one of {', '.join(KIND_TAG)}, none, lorif")
        if self.rank < 1:
            raise ConfigError(f"projection.rank must be a positive integer, got {self.rank}")
        if self.dim < 1:
            raise ConfigError(f"projection.dim must be a positive integer, got {self.dim}")
        if self.kind == "gaussian" and self.dim % 2:
            raise ConfigError(f"projection.dim must be even for gaussian projections (Box-Muller pairs), got {self.dim}")
        if self.nnz < 1 or self.dim % self.nnz:
            raise ConfigError(f"projection.nnz must be a positive divisor of projection.dim {self.dim}, got {self.nnz}")
        if self.nnz != 1 and self.kind != "sparse":
            raise ConfigError("projection.nnz applies to the sparse kind only; remove it or set projection.kind=sparse")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"projection.seed must be in [0, 2^63), got {self.seed}")
        if self.chunk_size < 1:
            raise ConfigError(f"projection.chunk_size must be positive, got {self.chunk_size}")

    def out_dim(self, input_dim: int) -> int:
        """k for ``input_dim``-dimensional inputs (``input_dim`` itself for kind none)."""
        if self.kind in ("logra", "lorif"):
            raise ConfigError(f"a {self.kind} projection's k depends on the layers' shapes, not on d alone: "
                              "see qless.project.logra.LograProjection and qless.lorif.capture.LayerCapture")
        return int(input_dim) if self.kind == "none" else self.dim

    def identity(self, input_dim: int) -> dict:
        """The fields that define the matrix, as written into datastore manifests."""
        out = {"kind": self.kind, "dim": self.out_dim(input_dim), "seed": self.seed, "input_dim": int(input_dim)}
        if self.kind == "sparse":
            out["nnz"] = self.nnz
        return out

def make_projector(cfg: ProjectionConfig, input_dim: int, device: torch.device | str = "cpu") -> Projector:
    """The projector of ``cfg`` for ``input_dim``-dimensional rows on ``device``."""
    return Projector(cfg, input_dim, device)


__all__ = ["ProjectionConfig", "Projector", "dense_reference", "make_projector", "matrix_rows", "project_reference",
           "seed_key"]
