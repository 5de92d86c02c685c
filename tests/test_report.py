"""The report's rank agreement measures (the plots are exercised by the pipeline test)."""

from __future__ import annotations

import numpy as np
import pytest

from qless.fidelity.metrics import recall_at, spearman


def test_spearman_known_values():
    a = np.array([0.1, 0.4, 0.2, 0.9, 0.5])
    assert spearman(a, a * 3 + 1) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ranks (0, 2, 1, 4, 3) vs (0, 1, 2, 3, 4): d^2 = 0+1+1+1+1 -> 1 - 6*4/(5*24) = 0.8
    assert spearman(a, np.arange(5.0)) == pytest.approx(0.8)


def test_top_overlap():
    a = np.array([5.0, 4, 3, 2, 1])
    b = np.array([5.0, 1, 3, 2, 4])
    # top 40% of 5 rows = 2 rows: {0, 1} against {0, 4}
    assert recall_at(a, b, 40) == 0.5 and recall_at(a, a, 60) == 1.0 and recall_at(a, b, 100) == 1.0
