"""K-FAC, EKFAC and diagonal operators on graph-path records of every block layout.

References are independent of the operators' layout code: dense matrices built
entry by entry from the records with the index maps of ``docs/conventions.md``
(grouped rows, flipped/transposed weights, ``diag(A_diag) ⊗ G``, dense blocks),
curvlinops' ``KFACLinearOperator`` (float64), dense GGN / empirical Fisher by
autograd, and cases where K-FAC is exact.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from curvlinops import KFACLinearOperator
from torch import nn

import curvkit as ck
from curvkit.errors import ConfigError
from curvkit.extraction import extract
from tests.extraction.graph_models import (
    dense_ef,
    dense_ggn,
    flat_index,
    problem,
)
from tests.reference import assert_allclose_report

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-12)


class TransposedNet(nn.Module):
    """A grouped strided ConvTranspose2d, a ConvTranspose1d and a Linear head."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.up1 = nn.ConvTranspose1d(6, 2, 2, bias=False)
        self.fc = nn.Linear(2 * 10, 3)

    def forward(self, x):
        h = torch.tanh(self.up(x))  # [N, 6, 3, 3]
        h = torch.sigmoid(self.up1(h.flatten(2)))  # [N, 2, 10]
        return self.fc(h.flatten(1))


def make(name: str, loss: str = "ce", n: int = 4):
    if name != "transposed":
        return problem(name, loss, n=n)
    torch.manual_seed(0)
    model = TransposedNet().to(DT)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(n, 4, 2, 2, generator=gen, dtype=DT)
    if loss == "mse":
        return model, nn.MSELoss(), X, torch.randn(n, 3, generator=gen, dtype=DT)
    return model, nn.CrossEntropyLoss(), X, torch.randint(0, 3, (n,), generator=gen)


MODELS = ["cnn", "resnet", "gpt", "transposed"]


# -- reference built from the records ---------------------------------------------------


def _groups(M, G):
    return [M] if M.dim() == 2 else list(M)


def _reference_blocks(rec, kind, off):
    """``(flat indices, block)`` pairs of one record, flat offset ``off``."""
    if rec.block == "dense":
        return [(torch.arange(off, off + rec.numel), rec.dense[kind])]
    W = rec.params[0]
    if rec.block == "embedding":
        return [
            (torch.arange(off, off + W.numel()), torch.kron(torch.diag(rec.A_diag), rec.G[kind]))
        ]
    nW = W.numel()
    Gs, As = _groups(rec.G[kind], None), _groups(rec.A, None)
    og = Gs[0].shape[0]
    if rec.block == "kron_transposed":
        c_in, _, *kernel = W.shape
        cg = c_in // len(Gs)
        kn = int(torch.tensor(kernel).prod())
        strides = [int(torch.tensor(kernel[j + 1 :]).prod()) for j in range(len(kernel))]

        def weight_row(g, o):  # W'_g[o, i, κ] = W[g cg + i, o, κ_max − κ]
            idx = []
            for i in range(cg):
                for kappa in itertools.product(*(range(k) for k in kernel)):
                    flipped = sum((k - 1 - a) * s for a, k, s in zip(kappa, kernel, strides))
                    idx.append(off + ((g * cg + i) * og + o) * kn + flipped)
            return idx
    else:
        K = W[0].numel()

        def weight_row(g, o):
            return [off + (g * og + o) * K + k for k in range(K)]

    out = []
    for g, (Gg, Ag) in enumerate(zip(Gs, As)):
        w_idx, j_idx, b_idx = [], [], []
        for o in range(og):
            row = weight_row(g, o)
            w_idx += row
            j_idx += row + ([off + nW + g * og + o] if rec.has_bias else [])
            b_idx.append(off + nW + g * og + o)
        if rec.joint or not rec.has_bias:
            out.append((torch.tensor(j_idx), torch.kron(Gg, Ag)))
        else:
            out.append((torch.tensor(w_idx), torch.kron(Gg, Ag)))
            out.append((torch.tensor(b_idx), Gg * rec.bias_scale))
    return out


def reference(records, kind):
    n = sum(r.numel for r in records)
    ref = torch.zeros(n, n, dtype=DT)
    off = 0
    for rec in records:
        for idx, block in _reference_blocks(rec, kind, off):
            ref[idx[:, None], idx[None, :]] = block
        off += rec.numel
    return ref


# -- block-diagonal K-FAC ---------------------------------------------------------------


@pytest.mark.parametrize("separate", [False, True], ids=["joint", "separate"])
@pytest.mark.parametrize("kind", ["kflr", "empirical"])
@pytest.mark.parametrize("name", MODELS)
def test_kfac_to_dense_matches_records(name, kind, separate):
    model, loss_func, X, y = make(name)
    rec = extract(model, loss_func, X, y, (kind,), separate_bias=separate)
    blocks = {r.block for r in rec}
    K = ck.kfac(model, loss_func, (X, y), kind=kind, separate_bias=separate)
    assert K.block_names == [r.name for r in rec]
    assert_allclose_report(K.to_dense(), reference(rec, kind), **TOL)
    if name == "gpt":
        assert {"embedding", "dense", "kron"} <= blocks
    if name == "transposed":
        assert blocks == {"kron_transposed", "kron"}
    # the products of matvec and matmat agree with the dense matrix
    v = torch.randn(K.shape[0], 3, dtype=DT)
    assert_allclose_report(K @ v, reference(rec, kind) @ v, **TOL)
    assert_allclose_report(K.trace(), torch.trace(reference(rec, kind)), **TOL)


@pytest.mark.parametrize("name", MODELS)
def test_inverse_logdet_and_damping_modes(name):
    model, loss_func, X, y = make(name)
    K = ck.kfac(model, loss_func, (X, y), kind="kflr")
    D = K.to_dense()
    eye = torch.eye(D.shape[0], dtype=DT)
    lam = 1e-3
    inv = K.inverse(lam).to_dense()
    assert_allclose_report(inv @ (D + lam * eye), eye, rtol=0, atol=1e-8)
    assert_allclose_report(K.logdet(lam), torch.logdet(D + lam * eye), rtol=1e-10, atol=1e-9)
    # factored damping: dense blocks damped exactly, Kronecker pairs as (G + δ_G)⁻¹ ⊗ (A + δ_A)⁻¹
    fac = K.inverse(lam, damping_mode="factored").to_dense()
    off = 0
    for layer in K.layers:
        idx = torch.arange(off, off + layer.numel)
        if layer.block == "dense":
            expected = torch.linalg.inv(D[idx][:, idx] + lam * torch.eye(len(idx), dtype=DT))
            assert_allclose_report(fac[idx][:, idx], expected, rtol=1e-9, atol=1e-9)
        off += layer.numel
    assert torch.allclose(fac, fac.T, atol=1e-8)
    assert torch.linalg.eigvalsh(fac).min() > 0


def test_single_linear_mse_one_datum_is_exact():
    """N = 1, MSE, one Linear layer (graph path): KFLR equals the GGN exactly."""
    torch.manual_seed(0)

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x)

    model = One().to(DT)
    X, y = torch.randn(1, 4, dtype=DT), torch.randn(1, 3, dtype=DT)
    for reduction in ("mean", "sum"):
        loss_func = nn.MSELoss(reduction=reduction)
        K = ck.kfac(model, loss_func, (X, y), kind="kflr")
        assert_allclose_report(K.to_dense(), dense_ggn(model, loss_func, X, y), **TOL)


def test_embedding_linear_mse_one_token_blocks_are_exact():
    """One token per example, Embedding -> Linear, MSE: each diagonal block is the GGN's."""
    torch.manual_seed(0)

    class EmbLin(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.lin = nn.Linear(3, 2)

        def forward(self, idx):
            return self.lin(self.emb(idx))

    model = EmbLin().to(DT)
    X, y = torch.tensor([0, 3, 3, 1, 0, 2]), torch.randn(6, 2, dtype=DT)
    loss_func = nn.MSELoss()
    K = ck.kfac(model, loss_func, (X, y), kind="kflr")
    assert [layer.block for layer in K.layers] == ["embedding", "kron"]
    ggn = dense_ggn(model, loss_func, X, y)
    D = K.to_dense()
    emb = torch.arange(15)
    assert_allclose_report(D[emb][:, emb], ggn[emb][:, emb], **TOL)
    lin = torch.arange(15, 23)
    # the Linear block over [W, b] in flat order [W.flatten(), b]
    assert_allclose_report(D[lin][:, lin], ggn[lin][:, lin], **TOL)
    assert float(D[emb][:, lin].abs().max()) == 0.0


@pytest.mark.parametrize("kind", ["kflr", "empirical"])
def test_norm_blocks_are_the_exact_blocks(kind):
    """ResNet block in eval mode: the BatchNorm blocks of ck.kfac are the exact GGN / EF blocks."""
    model, loss_func, X, y = make("resnet")
    K = ck.kfac(model, loss_func, (X, y), kind=kind)
    exact = (dense_ggn if kind == "kflr" else dense_ef)(model, loss_func, X, y)
    rec = extract(model, loss_func, X, y, (kind,))
    assert K.block_names == [r.name for r in rec]
    flat = flat_index(model, rec.params)  # operator order -> model order
    D, off, checked = K.to_dense(), 0, 0
    for layer in K.layers:
        idx = torch.arange(off, off + layer.numel)
        if layer.block == "dense":
            assert_allclose_report(D[idx][:, idx], exact[flat[idx]][:, flat[idx]], **TOL)
            checked += 1
        off += layer.numel
    assert checked == 3


# -- curvlinops ---------------------------------------------------------------------------


@pytest.mark.parametrize("separate", [False, True], ids=["joint", "separate"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", ["gpt", "resnet"])
def test_matches_curvlinops_on_its_layers(name, approx, separate):
    """params= the Linear/Conv2d parameters: the operator equals curvlinops' (float64)."""
    model, loss_func, X, y = make(name, n=3)
    rec = extract(model, loss_func, X, y, ("kflr",))
    params = [p for r in rec if isinstance(r.module, (nn.Linear, nn.Conv2d)) for p in r.params]
    for fisher_type, kind in (("type-2", "kflr"), ("empirical", "empirical")):
        ours = ck.kfac(
            model, loss_func, (X, y), kind=kind, kfac_approx=approx, separate_bias=separate,
            params=params,
        ).to_dense()  # fmt: skip
        theirs = KFACLinearOperator(
            model, loss_func, params, [(X, y)], fisher_type=fisher_type, kfac_approx=approx,
            separate_weight_and_bias=separate, check_deterministic=False,
        )  # fmt: skip
        theirs = theirs @ torch.eye(theirs.shape[0], dtype=DT)
        assert_allclose_report(ours, theirs, 1e-10, 1e-13, f"{name} {kind} {approx}")


# -- params= ------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [0, 1])
@pytest.mark.parametrize("separate", [False, True], ids=["joint", "separate"])
@pytest.mark.parametrize("name", MODELS)
def test_params_subset_is_the_sub_block(name, separate, pattern):
    model, loss_func, X, y = make(name)
    rec = extract(model, loss_func, X, y, ("kflr",))
    full = ck.kfac(model, loss_func, (X, y), kind="kflr", separate_bias=separate)
    D = full.to_dense()
    offsets, off = {}, 0
    for p in rec.params:
        offsets[id(p)] = off
        off += p.numel()
    # the last layer first, then every other layer's weight alone, biases alone elsewhere
    chosen = list(rec[-1].params)
    for k, r in enumerate(rec.layers[:-1]):
        chosen += r.params[:1] if (k + pattern) % 2 == 0 or len(r.params) == 1 else r.params[1:]
    sub = ck.kfac(model, loss_func, (X, y), kind="kflr", separate_bias=separate, params=chosen)
    idx = torch.cat([torch.arange(offsets[id(p)], offsets[id(p)] + p.numel()) for p in chosen])
    assert sub.shape == (len(idx), len(idx))
    S = sub.to_dense()
    assert_allclose_report(S, D[idx][:, idx], **TOL)
    lam = 1e-2
    eye = torch.eye(len(idx), dtype=DT)
    assert_allclose_report(sub.inverse(lam).to_dense() @ (S + lam * eye), eye, rtol=0, atol=1e-9)
    E = ck.ekfac(model, loss_func, (X, y), kind="kflr", params=chosen)
    assert E.shape == sub.shape


def test_params_errors():
    model, loss_func, X, y = make("gpt")
    data = (X, y)
    with pytest.raises(ConfigError, match="weight first"):
        ck.kfac(model, loss_func, data, params=[model.q.bias, model.q.weight])
    with pytest.raises(ConfigError, match="next to each other"):
        ck.kfac(model, loss_func, data, params=[model.q.weight, model.k.weight, model.q.bias])
    with pytest.raises(ConfigError, match="'q.weight' twice"):
        ck.kfac(model, loss_func, data, params=[model.q.weight, model.q.weight])
    with pytest.raises(ConfigError, match="empty"):
        ck.kfac(model, loss_func, data, params=[])
    with pytest.raises(ConfigError, match="list of the model's parameters"):
        ck.kfac(model, loss_func, data, params=model.q.weight)
    with pytest.raises(ConfigError, match="unsupported="):
        ck.kfac(model, loss_func, data, unsupported="skip")
    with pytest.raises(ConfigError, match="unsupported="):
        ck.ekfac(model, loss_func, data, unsupported="skip")
    stranger = nn.Parameter(torch.zeros(3, dtype=DT))
    with pytest.raises(ConfigError, match="no Kronecker block"):
        ck.kfac(model, loss_func, data, params=[stranger])


class _Scaler(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.ones(4, dtype=DT))

    def forward(self, x):
        return x * self.s


class WithUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.scale = _Scaler()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.scale(self.lin(x))))


def test_unsupported_gradient_skips_the_module():
    torch.manual_seed(0)
    model = WithUnsupported().to(DT)
    X, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    loss_func = nn.CrossEntropyLoss()
    with pytest.raises(ck.UnsupportedModuleError, match="scale"):
        ck.kfac(model, loss_func, (X, y))
    K = ck.kfac(model, loss_func, (X, y), kind="kflr", unsupported="gradient")
    assert K.block_names == ["lin", "out"]
    E = ck.ekfac(model, loss_func, (X, y), unsupported="gradient")
    assert E.shape == K.shape
    with pytest.raises(ConfigError, match="no Kronecker block"):
        ck.kfac(model, loss_func, (X, y), unsupported="gradient", params=[model.scale.s])


# -- EKFAC --------------------------------------------------------------------------------


def _layer_basis(E, i):
    """The flat orthonormal basis of EKFAC layer ``i`` and its scales, column by column."""
    layer = E.layers[i]
    triples = E.blocks[i]
    cols, scales = [], []
    for p, (U_G, U_A, S) in enumerate(triples):
        if U_G.dim() == 1:  # a diagonal factor's basis (the identity) is a vector of ones
            assert torch.equal(U_G, torch.ones_like(U_G))
            U_G = torch.diag(U_G)
        basis = torch.einsum("ai,bj->ijab", U_G, U_A).reshape(-1, U_G.shape[0], U_A.shape[0])
        k = basis.shape[0]
        mats = [torch.zeros(k, len(t[0]), len(t[1]), dtype=DT) for t in triples]
        mats[p] = basis
        cols.append(layer.merge(mats, torch.empty(layer.numel, k, dtype=DT)))
        scales.append(S.reshape(-1))
    return torch.cat(cols, 1), torch.cat(scales)


@pytest.mark.parametrize("subset", [False, True], ids=["all", "params"])
@pytest.mark.parametrize("name", MODELS)
def test_ekfac_eigenvalues_are_the_empirical_fisher_in_its_basis(name, subset):
    """George et al.: S = diag(Qᵀ F_emp Q) per layer, Q the Kronecker eigenbasis."""
    model, loss_func, X, y = make(name)
    rec = extract(model, loss_func, X, y, ("empirical",))
    chosen = rec.params
    if subset:  # weights alone and biases alone (factored per-example rows of Linear layers)
        chosen = [r.params[k % len(r.params)] for k, r in enumerate(rec)]
    E = ck.ekfac(model, loss_func, (X, y), kind="kflr", params=chosen if subset else None)
    ef = dense_ef(model, loss_func, X, y)
    flat = flat_index(model, chosen)
    off = 0
    for i, layer in enumerate(E.layers):
        Q, S = _layer_basis(E, i)
        assert_allclose_report(Q.T @ Q, torch.eye(layer.numel, dtype=DT), rtol=0, atol=1e-10)
        idx = flat[off : off + layer.numel]
        assert_allclose_report(S, (Q.T @ ef[idx][:, idx] @ Q).diagonal(), rtol=1e-8, atol=1e-12)
        off += layer.numel
    lam = 1e-3
    D = E.to_dense()
    eye = torch.eye(D.shape[0], dtype=DT)
    assert_allclose_report(E.inverse(lam).to_dense() @ (D + lam * eye), eye, rtol=0, atol=1e-8)


def test_ekfac_with_batchnorm_in_train_mode_is_an_error():
    model, loss_func, X, y = make("resnet")
    model.train()
    with pytest.raises(ck.UnsupportedModuleError, match="BatchNorm2d .bn0. normalises"):
        ck.ekfac(model, loss_func, (X, y))
    ck.kfac(model, loss_func, (X, y), kind="kflr")  # defined by the rows


# -- tri-diagonal -------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_tridiagonal_couples_linear_pairs_and_keeps_other_blocks(name):
    model, loss_func, X, y = make(name)
    rec = extract(model, loss_func, X, y, ("kflr", "cross"))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        T = ck.kfac(model, loss_func, (X, y), kind="kflr", structure="tridiagonal")
    B = ck.kfac(model, loss_func, (X, y), kind="kflr")
    DT_, DB = T.to_dense(), B.to_dense()
    starts = [0]
    for layer in T.layers:
        starts.append(starts[-1] + layer.numel)
    coupled = 0
    for i in range(len(T.layers)):
        idx = torch.arange(starts[i], starts[i + 1])
        assert_allclose_report(DT_[idx][:, idx], DB[idx][:, idx], rtol=1e-8, atol=1e-11)
        if i + 1 < len(T.layers) and rec[i].cross_A is not None:
            nxt = torch.arange(starts[i + 1], starts[i + 2])
            r, s = rec[i], rec[i + 1]
            off_block = torch.kron(r.cross_G["kflr"], r.cross_A)  # joint [W|b] orders
            pi = _joint_to_flat(r)
            pj = _joint_to_flat(s)
            expected = torch.zeros_like(off_block)
            expected[pi[:, None], pj[None, :]] = off_block
            assert_allclose_report(DT_[idx][:, nxt], expected, rtol=1e-8, atol=1e-11)
            coupled += 1
    assert coupled == (4 if name == "gpt" else 0)
    names = [(a, b) for a, b, _ in T.fallback_pairs]
    assert len(names) == len(T.layers) - 1 - coupled
    # a layer outside the chain has the block-diagonal factored inverse
    lam = 1e-2
    Ti, Bi = T.inverse(lam).to_dense(), B.inverse(lam, damping_mode="factored").to_dense()
    for i in range(len(T.layers)):
        free = (i == 0 or rec[i - 1].cross_A is None) and rec[i].cross_A is None
        if free:
            idx = torch.arange(starts[i], starts[i + 1])
            assert_allclose_report(Ti[idx][:, idx], Bi[idx][:, idx], rtol=1e-8, atol=1e-10)
    assert torch.linalg.eigvalsh((Ti + Ti.T) / 2).min() > 0
    assert_allclose_report(-T.inverse(lam).logdet(), T.logdet(lam), rtol=1e-12, atol=1e-10)


def _joint_to_flat(rec):
    """Flat position of each joint ``[W|b]`` entry of a Linear record."""
    n_out, n_in = rec.params[0].shape
    idx = []
    for o in range(n_out):
        idx += [o * n_in + i for i in range(n_in)]
        if rec.has_bias:
            idx.append(n_out * n_in + o)
    return torch.tensor(idx)


def test_tridiagonal_inverse_state_dict_round_trip():
    model, loss_func, X, y = make("resnet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        T = ck.kfac(model, loss_func, (X, y), kind="kflr", structure="tridiagonal")
    from curvkit.operators.tridiag import TriDiagonalInverse

    inv = T.inverse(1e-2)
    again = TriDiagonalInverse.from_state_dict(T.layers, inv.state_dict())
    v = torch.randn(T.shape[0], 2, dtype=DT)
    assert_allclose_report(again @ v, inv @ v, rtol=0, atol=0)


# -- diagonal -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "resnet", "transposed"])
def test_diag_ggn_on_graph_models(name):
    model, loss_func, X, y = make(name)
    d = ck.diag_ggn(model, loss_func, (X, y))
    rec = extract(model, loss_func, X, y, ("kflr",))
    flat = flat_index(model, rec.params)
    expected = dense_ggn(model, loss_func, X, y).diagonal()[flat]
    assert_allclose_report(d.to_dense().diagonal(), expected, **TOL)


def test_tridiagonal_with_params_keeps_the_pairs_that_stay_consecutive():
    model, loss_func, X, y = make("gpt")
    chosen = [model.q.weight, model.q.bias, model.k.weight, model.k.bias, model.mlp.weight]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = ck.kfac(model, loss_func, (X, y), kind="kflr", structure="tridiagonal")
        sub = ck.kfac(model, loss_func, (X, y), kind="kflr", structure="tridiagonal", params=chosen)
    assert [(a, b) for a, b, _ in sub.fallback_pairs] == [("k", "mlp")]
    offsets, off = {}, 0
    for p in model.parameters():
        offsets[id(p)] = off
        off += p.numel()
    idx = torch.cat([torch.arange(offsets[id(p)], offsets[id(p)] + p.numel()) for p in chosen])
    F, S = full.to_dense()[idx][:, idx], sub.to_dense()
    qk = torch.arange(0, 40)  # q and k with biases: the coupled pair, F̆ = F̃ on its blocks
    assert_allclose_report(S[qk][:, qk], F[qk][:, qk], rtol=1e-8, atol=1e-11)
    mlp = torch.arange(40, 56)  # the weight alone: G ⊗ A_WW
    B = ck.kfac(model, loss_func, (X, y), kind="kflr", params=[model.mlp.weight]).to_dense()
    assert_allclose_report(S[mlp][:, mlp], B, rtol=1e-8, atol=1e-11)


class OutOfOrder(nn.Module):
    """Modules defined in another order than they are called."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(5, 2)
        self.norm = nn.LayerNorm(5)
        self.body = nn.Linear(3, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.body(x))))


def test_operators_follow_the_model_parameter_order():
    """Records come in call order; ck.kfac / ck.ekfac / ck.diag_ggn in model.parameters() order."""
    torch.manual_seed(0)
    model = OutOfOrder().to(DT)
    X, y = torch.randn(1, 3, dtype=DT), torch.randn(1, 2, dtype=DT)
    loss_func = nn.MSELoss()
    assert [r.name for r in extract(model, loss_func, X, y, ("kflr",))] == ["body", "norm", "head"]
    K = ck.kfac(model, loss_func, (X, y), kind="kflr")
    assert K.block_names == ["head", "norm", "body"]
    assert ck.ekfac(model, loss_func, (X, y)).block_names == ["head", "norm", "body"]
    ggn = ck.ggn(model, loss_func, (X, y)).to_dense()
    D = K.to_dense()
    # one datum: every block (Linear G ⊗ A, the exact LayerNorm block) is the GGN's
    for block in (torch.arange(0, 12), torch.arange(12, 22), torch.arange(22, 42)):
        assert_allclose_report(D[block][:, block], ggn[block][:, block], **TOL)
    d = ck.diag_ggn(model, loss_func, (X, y))
    assert d.block_names == ["head", "norm", "body"]
    assert_allclose_report(d.to_dense().diagonal(), ggn.diagonal(), **TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        T = ck.kfac(model, loss_func, (X, y), kind="kflr", structure="tridiagonal")
    assert T.block_names == ["head", "norm", "body"]


def test_large_vocabulary_embedding_keeps_its_factor_diagonal():
    """V = 50 000: diag(A_diag) is never formed; products and inverses row by row."""
    torch.manual_seed(0)

    class EmbLin(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50_000, 3)
            self.lin = nn.Linear(3, 2)

        def forward(self, idx):
            return self.lin(torch.tanh(self.emb(idx)))

    model = EmbLin().to(DT)
    X, y = torch.randint(0, 50_000, (64,)), torch.randn(64, 2, dtype=DT)
    X[:8] = 7  # one token used often
    loss_func = nn.MSELoss()
    rec, lin = extract(model, loss_func, X, y, ("kflr",))
    a, G = rec.A_diag, rec.G["kflr"]
    lin_trace = torch.trace(lin.G["kflr"]) * torch.trace(lin.A)
    lam = 1e-3
    pi = float((G.diagonal().mean() / a.mean()).sqrt())  # M&G §6.3 for the pair (diag(a), G)
    eye = torch.eye(3, dtype=DT)
    rows = (7, int(X[9]), 12345)  # a frequent token, a rare one, most likely an unseen one
    B = ck.kfac(model, loss_func, (X, y), kind="kflr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        T = ck.kfac(model, loss_func, (X, y), kind="kflr", structure="tridiagonal")
    v = torch.randn(B.shape[0], dtype=DT)
    W = v[:150_000].reshape(50_000, 3)
    for K in (B, T):
        assert_allclose_report((K @ v)[:150_000].reshape(50_000, 3), a[:, None] * (W @ G), **TOL)
        assert_allclose_report(K.trace(), a.sum() * torch.trace(G) + lin_trace, **TOL)
    inverses = {
        "exact": B.inverse(lam),
        "factored": B.inverse(lam, damping_mode="factored"),
        "tridiagonal": T.inverse(lam),
    }
    for name, inv in inverses.items():
        out = (inv @ v)[:150_000].reshape(50_000, 3)
        for r in rows:
            if name == "exact":
                expected = torch.linalg.solve(a[r] * G + lam * eye, W[r])
            else:  # (diag(a) + λ^½/π)⁻¹ ⊗ (G + π λ^½)⁻¹
                expected = torch.linalg.solve(G + pi * lam**0.5 * eye, W[r])
                expected = expected / (a[r] + lam**0.5 / pi)
            assert_allclose_report(out[r], expected, rtol=1e-9, atol=1e-12, msg=f"{name} {r}")
    E = ck.ekfac(model, loss_func, (X, y), kind="kflr")
    assert E.blocks[0][0][0].shape == (50_000,)  # the identity basis, as a vector


def test_tied_weights_with_unsupported_gradient_are_left_out():
    """Graph path: a weight tied between two Linear layers is gradient-only, the rest K-FAC."""
    model, loss_func, X, y = problem("tied", "ce", n=5)
    with pytest.raises(ck.UnsupportedModuleError, match="tied"):
        ck.kfac(model, loss_func, (X, y))
    K = ck.kfac(model, loss_func, (X, y), kind="kflr", unsupported="gradient")
    assert K.block_names == ["inp", "out"]
    rec = extract(model, loss_func, X, y, ("kflr",), unsupported="gradient")
    assert [r.name for r in rec] == ["inp", "out"]
    assert_allclose_report(K.to_dense(), reference(rec, "kflr"), **TOL)
