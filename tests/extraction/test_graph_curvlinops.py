"""Graph path K-FAC-expand/-reduce of Linear layers with weight sharing against curvlinops.

A sequence model applies its Linear layers to ``[N, T, d]`` and flattens the
output to ``[N*T, C]`` for the loss, as researchers write it. curvlinops'
``KFACLinearOperator`` (Eschenhagen et al. 2023) defines both approximations;
the Kronecker products ``G ⊗ A`` must equal its blocks in float64. The one
scaling difference: curvlinops' empirical Fisher of ``MSELoss(reduction="mean")``
is ``C`` (output entries) times ours, since its per-example gradients are those of
the loss averaged over the batch only; ours are of the loss the user wrote.
"""

import pytest
import torch
from curvlinops import KFACLinearOperator
from torch import nn

from curvkit.extraction import extract
from tests.reference import (
    assert_allclose_report,
    curvlinops_kron_blocks,
    joint_permutation,
    kron_block,
)

DT = torch.float64
N, T, C = 4, 3, 5


class SeqNet(nn.Module):
    """Two Linear layers on ``[N, T, d]`` (one without bias), output flattened over tokens."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 4)
        self.l2 = nn.Linear(4, 4, bias=False)
        self.l3 = nn.Linear(4, C)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        return self.l3(torch.sigmoid(self.l2(h))).flatten(0, 1)


def _problem(loss, reduction):
    torch.manual_seed(0)
    model = SeqNet().to(DT)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(N, T, 3, generator=gen, dtype=DT)
    if loss == "ce":
        return model, nn.CrossEntropyLoss(reduction=reduction), X, torch.randint(0, C, (N * T,))
    return model, nn.MSELoss(reduction=reduction), X, torch.randn(N * T, C, dtype=DT)


def _dense(model, loss_func, X, y, fisher_type, approx, separate, **kwargs):
    K = KFACLinearOperator(
        model,
        loss_func,
        list(model.parameters()),
        [(X, y)],
        fisher_type=fisher_type,
        kfac_approx=approx,
        separate_weight_and_bias=separate,
        check_deterministic=False,
        **kwargs,
    )
    return K @ torch.eye(K.shape[0], dtype=DT)


def _joint_blocks(model, dense, separate):
    """Per layer: its block of ``dense`` in joint ``[W | b]`` order (weight only if separate)."""
    blocks, off = [], 0
    for m in (model.l1, model.l2, model.l3):
        n_out, K = m.weight.shape
        has_bias = m.bias is not None
        idx = off + joint_permutation(n_out, K, has_bias and not separate)
        blocks.append(dense[idx][:, idx])
        off += n_out * K + (n_out if has_bias else 0)
    return blocks


@pytest.mark.parametrize("separate", [False, True], ids=["joint", "separate"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_kflr_and_empirical_match_curvlinops(loss, reduction, approx, separate):
    model, loss_func, X, y = _problem(loss, reduction)
    rec = extract(
        model, loss_func, X, y, ("kflr", "empirical"), kfac_approx=approx, separate_bias=separate
    )
    assert rec.batch_size == N * T and rec.reduction_factor == (
        1 / (N * T) if reduction == "mean" else 1.0
    )
    for fisher_type, kind in (("type-2", "kflr"), ("empirical", "empirical")):
        dense = _dense(model, loss_func, X, y, fisher_type, approx, separate)
        scale = C if (kind == "empirical" and loss == "mse" and reduction == "mean") else 1.0
        for r, block in zip(rec, _joint_blocks(model, dense, separate)):
            assert r.A.shape[0] == r.in_features + int(r.joint)
            ours = kron_block(r.G[kind], r.A) * scale
            assert_allclose_report(ours, block, 1e-10, 1e-13, f"{r.name} {kind} {approx}")
            if separate and r.has_bias:
                bias_block = dense[-C:, -C:] if r.name == "l3" else None
                if bias_block is not None:
                    assert_allclose_report(
                        r.G[kind] * r.bias_scale * scale, bias_block, 1e-10, 1e-13, "bias"
                    )


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_monte_carlo_factors_agree_with_curvlinops_mc(approx):
    """Both estimate the same expectation (curvlinops draws its own labels): compare statistically.

    (With "reduce" on a flattened sequence output the expectation differs from
    type-2: sampled labels of different tokens are independent, while a column of
    the loss Hessian's square root spans all tokens at once; the same holds for
    curvlinops.)
    """
    model, loss_func, X, y = _problem("ce", "mean")
    gen = torch.Generator().manual_seed(0)
    M = 2000
    rec = extract(
        model, loss_func, X, y, ("kfac",), mc_samples=M, generator=gen, kfac_approx=approx
    )
    dense = _dense(model, loss_func, X, y, "mc", approx, False, mc_samples=M)
    for r, block in zip(rec, _joint_blocks(model, dense, False)):
        ours = kron_block(r.G["kfac"], r.A)
        rel = float((ours - block).norm() / block.norm())
        assert rel < 0.1, f"{r.name}: relative difference {rel:.3f} with {M} samples each"


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_transformer_linear_layers_match_curvlinops(approx):
    """Tiny decoder-only transformer (causal attention mixes tokens): the Linear blocks."""
    from tests.extraction.graph_models import problem

    model, loss_func, X, y = problem("gpt", "ce", n=3)
    rec = extract(model, loss_func, X, y, ("kflr", "empirical"), kfac_approx=approx)
    linear = [r for r in rec if isinstance(r.module, nn.Linear)]
    assert [r.name for r in linear] == ["q", "k", "v", "proj", "mlp", "head"]
    for fisher_type, kind in (("type-2", "kflr"), ("empirical", "empirical")):
        blocks = curvlinops_kron_blocks(model, loss_func, X, y, linear, fisher_type, approx)
        for r, block in zip(linear, blocks):
            ours = kron_block(r.G[kind], r.A)
            assert_allclose_report(ours, block, 1e-10, 1e-13, f"{r.name} {kind} {approx}")
