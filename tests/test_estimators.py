"""Trace and diagonal estimators against exact values on explicit matrices (float64)."""

import math

import pytest
import torch
from reference import DEVICES

import curvkit as ck
from curvkit.errors import ShapeError
from curvkit.operators.base import CurvatureOperator

SEEDS = range(200)


class MatrixOperator(CurvatureOperator):
    """A matrix behind products only (no dense shortcut, every product counted)."""

    def __init__(self, M):
        super().__init__([M.shape[:1]], M.dtype, M.device)
        self.M = M

    def _matmat(self, X):
        return self.M @ X


def symmetric(eigs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    D = eigs.numel()
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
    return Q @ torch.diag(eigs.to(torch.float64)) @ Q.T


def low_rank_plus_noise(D=100, rank=10, seed=0):
    gen = torch.Generator().manual_seed(seed + 1)
    top = 10.0 / torch.arange(1, rank + 1, dtype=torch.float64).sqrt()
    return symmetric(
        torch.cat([top, 0.1 * torch.rand(D - rank, generator=gen, dtype=torch.float64)]), seed
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_trace_unbiased_and_stderr_calibrated(method, device):
    M = low_rank_plus_noise().to(device)
    op = MatrixOperator(M)
    ests = [ck.trace(op, method=method, num_matvecs=30, seed=s) for s in SEEDS]
    values = torch.tensor([e.value for e in ests], dtype=torch.float64)
    stderrs = torch.tensor([e.stderr for e in ests], dtype=torch.float64)
    true = float(torch.trace(M))
    spread = float(values.std())
    # unbiased: the mean over seeds lies within 4 standard errors of that mean
    assert abs(float(values.mean()) - true) < 4 * spread / math.sqrt(len(SEEDS))
    # the reported standard error matches the spread across seeds: E[se^2] = Var
    rms_stderr = float(stderrs.pow(2).mean().sqrt())
    assert 0.75 < rms_stderr / spread < 1.33, (rms_stderr, spread)
    assert all(e.matvecs == 30 for e in ests)


def test_hutchpp_and_xtrace_beat_hutchinson_on_low_rank_plus_noise():
    op = MatrixOperator(low_rank_plus_noise())
    spread = {
        m: torch.tensor(
            [ck.trace(op, method=m, num_matvecs=30, seed=s).value for s in range(60)]
        ).std()
        for m in ("hutchinson", "hutch++", "xtrace")
    }
    assert spread["hutch++"] < spread["hutchinson"] / 2
    assert spread["xtrace"] < spread["hutch++"]


@pytest.mark.parametrize(
    "method,num_matvecs", [("hutch++", 18), ("xtrace", 14)], ids=["hutch++", "xtrace"]
)
def test_sketching_estimators_exact_below_sketch_rank(method, num_matvecs):
    eigs = torch.zeros(60, dtype=torch.float64)
    eigs[:5] = torch.tensor([5.0, -3.0, 2.0, 1.5, 0.5])
    M = symmetric(eigs)
    est = ck.trace(MatrixOperator(M), method=method, num_matvecs=num_matvecs, seed=3)
    assert est.value == pytest.approx(float(torch.trace(M)), abs=1e-10)
    assert est.stderr < 1e-10


def test_exact_trace_uses_structured_trace_when_present():
    M = low_rank_plus_noise(D=40)

    class WithTrace(MatrixOperator):
        def trace(self):
            return torch.trace(self.M)

    plain = ck.trace(MatrixOperator(M), method="exact")
    structured = ck.trace(WithTrace(M), method="exact")
    assert plain.value == pytest.approx(float(torch.trace(M)), rel=1e-12)
    assert plain.matvecs == 40 and plain.stderr == 0.0
    assert structured.value == pytest.approx(float(torch.trace(M)), rel=1e-12)
    assert structured.matvecs == 0


@pytest.mark.parametrize("device", DEVICES)
def test_diagonal_hutchinson_unbiased_with_elementwise_stderr(device):
    M = low_rank_plus_noise(D=50).to(device)
    op = MatrixOperator(M)
    runs = [ck.diagonal(op, num_matvecs=20, seed=s) for s in range(100)]
    values = torch.stack([r.value for r in runs])
    stderrs = torch.stack([r.stderr for r in runs])
    true = torch.diagonal(M)
    z = (values.mean(0) - true) / (values.std(0) / 10)
    assert z.abs().max() < 4.5  # 50 entries, each within a few standard errors
    ratio = stderrs.pow(2).mean(0).sqrt() / values.std(0)
    assert 0.75 < float(ratio.median()) < 1.33
    assert runs[0].matvecs == 20


def test_diagonal_exact_from_products_or_structured():
    M = low_rank_plus_noise(D=30)

    class WithDiagonal(MatrixOperator):
        def diagonal(self):
            return torch.diagonal(self.M)

    plain = ck.diagonal(MatrixOperator(M), method="exact")
    structured = ck.diagonal(WithDiagonal(M), method="exact")
    torch.testing.assert_close(plain.value, torch.diagonal(M))
    torch.testing.assert_close(structured.value, torch.diagonal(M))
    assert (plain.matvecs, structured.matvecs) == (30, 0)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda op: ck.trace(op, method="nope"), "method='nope'"),
        (lambda op: ck.trace(op, method="hutch++", num_matvecs=5), "num_matvecs >= 6"),
        (lambda op: ck.trace(op, method="xtrace", num_matvecs=40), "num_matvecs/2 < D"),
        (lambda op: ck.trace(op.M, method="hutchinson"), "CurvatureOperator"),
        (lambda op: ck.diagonal(op, method="xdiag"), "method='xdiag'"),
        (lambda op: ck.diagonal(op, num_matvecs=1), "num_matvecs must be >= 2"),
    ],
    ids=[
        "trace-method",
        "hutchpp-budget",
        "xtrace-budget",
        "not-operator",
        "diag-method",
        "diag-budget",
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ShapeError, match=match):
        call(MatrixOperator(torch.eye(20, dtype=torch.float64)))
