"""Data-parallel K-FAC on a graph-path model (tiny GPT): 2 processes equal 1 (float64)."""

from __future__ import annotations

import warnings

import pytest
import torch

from curvkit.distributed.kfac import DistributedCommunicator
from curvkit.optim import KFAC
from tests.distributed.harness import run_workers
from tests.extraction.graph_models import problem

DT = torch.float64
N, STEPS = 8, 4
BASE = dict(damping=1e-2, T_inv=2, T1=2, factor_dtype=DT, fallback=None)
CASES = {
    "blockdiag-kflr-auto": dict(kind="kflr"),
    "tridiag-kflr-lr": dict(kind="kflr", structure="tridiagonal", lr=0.3),
    "ekfac-kflr-auto": dict(kind="kflr", ekfac=True),
}


def _data(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    X = torch.randint(0, 7, (N, 3), generator=gen)
    return X, torch.randint(0, 7, (N * 3,), generator=gen)


def _train(opt, model, loss_func, rank=None):
    for k in range(STEPS):
        X, y = _data(k)
        if rank is not None:  # half the sequences and their N·T/2 target rows
            X, y = (
                X[rank * N // 2 : (rank + 1) * N // 2],
                y[rank * 3 * N // 2 : (rank + 1) * 3 * N // 2],
            )
        opt.step(lambda X=X, y=y: loss_func(model(X), y))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _worker(rank, world, options):
    warnings.simplefilter("ignore")
    model, loss_func, _, _ = problem("gpt", "ce", n=2)
    opt = KFAC(model, loss_func, comm=DistributedCommunicator(), **{**BASE, **options})
    return {"theta": _train(opt, model, loss_func, rank), "damping": opt.damping}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_two_processes_equal_one_process(case):
    options = CASES[case]
    model, loss_func, _, _ = problem("gpt", "ce", n=2)
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    opt = KFAC(model, loss_func, **{**BASE, **options})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _train(opt, model, loss_func)
    assert float((reference - start).abs().max()) > 1e-3
    for r in run_workers(_worker, options):
        err = float((r["theta"] - reference).abs().max() / reference.abs().max())
        assert err <= 1e-8, err
        assert r["damping"] == pytest.approx(opt.damping, rel=1e-10)
