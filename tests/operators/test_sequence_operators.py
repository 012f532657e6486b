"""Exact operators on outputs with extra dimensions: ``[N, V, T]`` logits, ``[N, T, C]`` outputs.

References: dense float64 matrices from :mod:`torch.func` (the Hessian of the loss
in the parameters; the GGN from the output Jacobian and the Hessian of the loss the
user wrote in the whole output; per-sequence gradients for the empirical Fisher)
and curvlinops' ``HessianLinearOperator``, ``GGNLinearOperator`` and
``FisherMCLinearOperator`` (same labels for the same seed).
"""

from __future__ import annotations

import pytest
import torch
from curvlinops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
)
from torch import nn
from torch.func import hessian

import curvkit as ck
from curvkit.errors import ConfigError, ShapeError
from tests.extraction.test_sequence_outputs import _flat, lm_problem, references, token_problem
from tests.reference import assert_allclose_report

DT = torch.float64


def _problem(name, reduction="mean", ignore=False):
    if name == "lm":
        return lm_problem(reduction, ignore)
    model, lf, X, y = token_problem(name, reduction)
    if name == "bce":
        y = (y > 0.5).to(DT)  # curvlinops' Monte Carlo sampler needs binary targets
    return model, lf, X, y


def _curvlinops(cls, model, lf, X, y, **kw):
    params = [p for p in model.parameters() if p.requires_grad]
    op = cls(model, lf, params, [(X, y)], check_deterministic=False, **kw)
    return op @ torch.eye(sum(p.numel() for p in params), dtype=DT)


def _close(a, b, msg=""):
    assert_allclose_report(a, b, 1e-9, 1e-12 * float(b.abs().max()), msg)


CASES = [("lm", "mean"), ("lm", "sum"), ("mse", "mean"), ("mse", "sum"), ("bce", "mean")]


@pytest.mark.parametrize("name,reduction", CASES)
def test_hessian_and_ggn_match_references_and_curvlinops(name, reduction):
    model, lf, X, y = _problem(name, reduction)
    theta, out, _ = _flat(model)
    H = ck.hessian(model, lf, (X, y)).to_dense()
    if name == "lm":
        # reverse-over-reverse; torch.func.hessian (forward-over-reverse), and with it
        # curvlinops' HessianLinearOperator, gives an asymmetric matrix on this model
        H_ref = torch.autograd.functional.hessian(lambda t: lf(out(t, X), y), theta)
        _close(H, H_ref, "hessian")
        for i in (10, 32, 150):  # columns checked against central differences

            def grad(t):
                t = t.detach().requires_grad_(True)
                return torch.autograd.grad(lf(out(t, X), y), t)[0]

            e = torch.zeros_like(theta)
            e[i] = 1e-5
            fd = (grad(theta + e) - grad(theta - e)) / 2e-5
            assert_allclose_report(H[:, i], fd, 1e-5, 1e-8, f"column {i}")
    else:
        _close(H, hessian(lambda t: lf(out(t, X), y))(theta), "hessian")
        _close(H, _curvlinops(HessianLinearOperator, model, lf, X, y), "hessian vs curvlinops")
    G_ref = references(model, lf, X, y)[0]
    G = ck.ggn(model, lf, (X, y)).to_dense()
    _close(G, G_ref, "ggn")
    _close(G, _curvlinops(GGNLinearOperator, model, lf, X, y), "ggn vs curvlinops")
    _close(ck.fisher(model, lf, (X, y)).to_dense(), G_ref, "type-2 fisher")


@pytest.mark.parametrize("name,reduction", CASES)
def test_mc_fisher_equals_curvlinops_for_the_same_seed(name, reduction):
    model, lf, X, y = _problem(name, reduction)
    for M, seed in ((1, 0), (3, 7)):
        F = ck.fisher(model, lf, (X, y), mc_samples=M, seed=seed).to_dense()
        ref = _curvlinops(FisherMCLinearOperator, model, lf, X, y, mc_samples=M, seed=seed)
        _close(F, ref, f"M={M}")


@pytest.mark.parametrize("ignore", [False, True], ids=["all", "ignore_index"])
def test_mc_fisher_converges_to_ggn(ignore):
    model, lf, X, y = _problem("lm", "mean", ignore)
    G = references(model, lf, X, y)[0]
    errors = []
    for M in (4, 4096):
        F = ck.fisher(model, lf, (X, y), mc_samples=M, seed=3).to_dense()
        errors.append(float((F - G).norm() / G.norm()))
    assert errors[1] < 0.05, errors
    assert errors[1] < errors[0] / 8, errors


@pytest.mark.parametrize("ignore", [False, True], ids=["all", "ignore_index"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ggn_and_empirical_fisher_per_sequence_with_ignore_index(reduction, ignore):
    """GGN closed form with ignored targets; empirical Fisher per sequence (not per token)."""
    model, lf, X, y = _problem("lm", reduction, ignore)
    G_ref, pe, R, _ = references(model, lf, X, y)
    _close(ck.ggn(model, lf, (X, y)).to_dense(), G_ref, "ggn")
    E = ck.empirical_fisher(model, lf, (X, y)).to_dense()
    _close(E, pe.T @ pe / R, "empirical fisher")
    if not ignore:  # curvlinops' EF takes one outer product per token: a different matrix
        per_token = _curvlinops(EFLinearOperator, model, lf, X, y)
        assert float((per_token - E).norm() / E.norm()) > 1e-3


@pytest.mark.parametrize("name", ["lm", "mse"])
def test_batches_of_sequences_equal_the_whole_batch(name):
    model, lf, X, y = _problem(name, "mean")
    batches = [(X[:1], y[:1]), (X[1:], y[1:])]
    for make in (ck.ggn, ck.hessian, ck.empirical_fisher):
        _close(make(model, lf, batches).to_dense(), make(model, lf, (X, y)).to_dense())


def test_sequence_errors():
    model, lf, X, y = _problem("lm")
    with pytest.raises(ShapeError, match=r"class indices \[N, d1, ...\]"):
        ck.fisher(model, lf, (X, y[:, :2]), mc_samples=1) @ torch.zeros(
            sum(p.numel() for p in model.parameters()), dtype=DT
        )
    with pytest.raises(ConfigError, match="every target in y equals ignore_index"):
        ck.fisher(model, lf, (X, torch.full_like(y, -100)), mc_samples=1).to_dense()


# -- the character transformer end to end ---------------------------------------------


def _char_transformer():
    from curvkit.problems import char_transformer

    p = char_transformer(context=6, d_model=8, n_layers=1, n_heads=2, n_train=6, n_test=2,
                         dtype=DT)  # fmt: skip
    return p.model.eval(), p.loss_func, *p.train


class _Flattened(nn.Module):
    """The same model with its logits flattened to ``[N*T, V]`` (targets ``[N*T]``)."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, x):
        return self.m(x).transpose(1, 2).reshape(-1, self.m.head.out_features)


def test_char_transformer_records_equal_flattened_and_curvlinops():
    """``[N, V, T]`` logits: Kronecker products equal the flattened model's and curvlinops'."""
    from curvlinops import KFACLinearOperator

    from curvkit.extraction import extract
    from tests.reference import kron_block

    model, lf, X, y = _char_transformer()
    rec = extract(model, lf, X, y, ("kflr",))
    assert rec.batch_size == X.shape[0]
    flat = extract(_Flattened(model), lf, X, y.flatten(), ("kflr",))
    assert [r.name for r in rec] == [r.name.removeprefix("m.") for r in flat]
    for a, b in zip(rec, flat):
        if a.A is not None:
            _close(kron_block(a.G["kflr"], a.A), kron_block(b.G["kflr"], b.A), a.name)
        for key in a.dense:
            _close(a.dense[key], b.dense[key], a.name)
    head = {r.name: r for r in rec}["head"]
    K = KFACLinearOperator(model, lf, [model.head.weight, model.head.bias], [(X, y)],
                           fisher_type="type-2", separate_weight_and_bias=False,
                           check_deterministic=False)  # fmt: skip
    ref = K @ torch.eye(K.shape[0], dtype=DT)  # [W, b] order; ours is joint [W | b] per row
    V, d = model.head.weight.shape
    idx = torch.tensor([o * d + k if k < d else V * d + o for o in range(V) for k in range(d + 1)])
    _close(kron_block(head.G["kflr"], head.A), ref[idx][:, idx], "head")


def test_char_transformer_kfac_operator():
    """``ck.kfac`` on ``[N, V, T]`` logits: the flattened model's operator; head = curvlinops."""
    from curvlinops import KFACLinearOperator

    model, lf, X, y = _char_transformer()
    try:
        K = ck.kfac(model, lf, (X, y), kind="kflr")
    except ShapeError as err:
        if "not a G ⊗ A" in str(err):
            pytest.skip("the Kronecker operators do not take graph records of every block yet")
        raise
    D = K.to_dense()
    _close(D, ck.kfac(_Flattened(model), lf, (X, y.flatten()), kind="kflr").to_dense())
    i = K.block_names.index("head")
    off, size = sum(K.block_sizes[:i]), K.block_sizes[i]
    C = KFACLinearOperator(model, lf, [model.head.weight, model.head.bias], [(X, y)],
                           fisher_type="type-2", separate_weight_and_bias=False,
                           check_deterministic=False)  # fmt: skip
    _close(D[off : off + size, off : off + size], C @ torch.eye(C.shape[0], dtype=DT), "head")
