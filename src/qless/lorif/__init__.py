"""LoRIF (Li, Le, Xu, Salzmann 2026): low-rank influence functions on the qless pipeline.

Instead of one projected gradient vector per example, LoRIF keeps, per example and layer,
rank-c factors of the layer's two-sided projected gradient (:mod:`qless.lorif.factors`,
captured by :mod:`qless.lorif.capture` during extraction with ``projection.kind lorif``), so a
row holds ``c (k_out + k_in)`` numbers per layer instead of ``k_out k_in``. The rows go through
qless's quantizers and datastore like any other, so factors can be stored at 1 to 8 bits.
"""

from qless.lorif.factors import FactorLayout, factor_apply, factor_inner, factorize

__all__ = ["FactorLayout", "factor_apply", "factor_inner", "factorize"]
