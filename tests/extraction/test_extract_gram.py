"""Blocked symmetric Gram products against plain products."""

import pytest
import torch

from curvkit.extraction.gram import (
    GRAM_BLOCK,
    GRAM_BLOCK_THREADED,
    GRAM_MIN_ROWS,
    GRAM_MIN_ROWS_THREADED,
    _block_size,
    assemble_homogeneous,
    gram,
    homogeneous_cross,
    homogeneous_gram,
)
from tests.reference import DEVICES, assert_allclose_report


def _widths(size):
    return [1, 7, 2 * size - 1, 2 * size, 2 * size + 3, 3 * size + 1]


@pytest.fixture(
    params=[(1, GRAM_BLOCK, GRAM_MIN_ROWS), (2, GRAM_BLOCK_THREADED, GRAM_MIN_ROWS_THREADED)],
    ids=["1-thread", "2-threads"],
)
def threads(request):
    """Runs the test with 1 or 2 threads; yields the CPU path's block size and fewest rows."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param[0])
    yield request.param[1:]
    torch.set_num_threads(before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("extra_rows", [-1, 3])
@pytest.mark.parametrize("k", range(6), ids=lambda k: f"width{k}")
def test_gram_blocked_matches_plain(k, extra_rows, device, threads):
    size, min_rows = threads
    d, rows = _widths(size)[k], min_rows + extra_rows
    X = torch.randn(rows, d, dtype=torch.float64, device=device)
    blocked = device == "cpu" and rows >= min_rows and d >= 2 * size
    assert _block_size(X) == (size if blocked else None)
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
