"""Blocked symmetric Gram products against plain products."""

import pytest
import torch

from curvkit.extraction.gram import (
    GRAM_BLOCK,
    assemble_homogeneous,
    gram,
    homogeneous_cross,
    homogeneous_gram,
)
from tests.reference import DEVICES, assert_allclose_report

WIDTHS = [1, 7, 2 * GRAM_BLOCK - 1, 2 * GRAM_BLOCK, 2 * GRAM_BLOCK + 3, 3 * GRAM_BLOCK + 1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", WIDTHS, ids=lambda d: f"d={d}")
def test_gram_blocked_matches_plain(d, device):
    X = torch.randn(37, d, dtype=torch.float64, device=device)
    G = gram(X, 0.3)
    assert_allclose_report(G, 0.3 * X.T @ X, 1e-12, 1e-12, "gram")
    assert_allclose_report(G, G.T, 1e-13, 1e-13, "symmetry")


def test_homogeneous_helpers():
    a, b = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    abar = torch.cat([a, torch.ones(9, 1, dtype=torch.float64)], 1)
    bbar = torch.cat([b, torch.ones(9, 1, dtype=torch.float64)], 1)
    assert_allclose_report(homogeneous_gram(a, 0.5, True), 0.5 * abar.T @ abar, 1e-13, 1e-14)
    assert_allclose_report(homogeneous_gram(a, 0.5, False), 0.5 * a.T @ a, 1e-13, 1e-14)
    assembled = assemble_homogeneous(a.T @ a, a.sum(0), 9, 0.5)
    assert_allclose_report(assembled, 0.5 * abar.T @ abar, 1e-13, 1e-14)
    assert_allclose_report(homogeneous_cross(a, b, 2.0, True, False), 2 * abar.T @ b, 1e-13, 1e-14)
    assert_allclose_report(homogeneous_cross(a, b, 2.0, False, True), 2 * a.T @ bbar, 1e-13, 1e-14)
