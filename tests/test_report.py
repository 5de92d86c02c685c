"""Report helpers: rank agreement measures (the plots are exercised by the pipeline test)."""

from __future__ import annotations

import numpy as np
import pytest

from qless.report import spearman, top_overlap


def test_spearman_known_values():
    a = np.array([0.1, 0.4, 0.2, 0.9, 0.5])
    assert spearman(a, a * 3 + 1) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ranks (0, 2, 1, 4, 3) vs (0, 1, 2, 3, 4): d^2 = 0+1+1+1+1 -> 1 - 6*4/(5*24) = 0.8
    assert spearman(a, np.arange(5.0)) == pytest.approx(0.8)


def test_top_overlap():
    a = np.array([5.0, 4, 3, 2, 1])
    b = np.array([5.0, 1, 3, 2, 4])
    assert top_overlap(a, b, 2) == 0.5 and top_overlap(a, a, 3) == 1.0 and top_overlap(a, b, 5) == 1.0
