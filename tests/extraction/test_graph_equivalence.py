"""Graph path against the sweep where both apply, backend dispatch, the row-by-row backward."""

import pytest
import torch
from torch import nn

from curvkit.errors import UnsupportedModuleError
from curvkit.extraction import extract
from curvkit.extraction.engine import choose_backend
from curvkit.extraction.graph import extract_graph
from tests.conftest import build_case
from tests.extraction.cases import CONV, FULL
from tests.reference import assert_allclose_report, dense_grad, make_problem

QUANTITIES = (
    "kfac",
    "kflr",
    "empirical",
    "cross",
    "batch_grad",
    "diag_ggn",
    "diag_ggn_mc",
    "curvature_grad_factors",
)
TOL = {"rtol": 1e-12, "atol": 1e-13}


def _both(net, loss_func, X, y, quantities, **kwargs):
    """Records and ``.grad`` of the sweep and of the graph path (same Monte Carlo labels)."""
    out = []
    for backend in ("sweep", "graph"):
        for p in net.parameters():
            p.grad = None
        gen = torch.Generator(device=X.device).manual_seed(7)
        rec = extract(
            net, loss_func, X, y, quantities, mc_samples=3, generator=gen, backend=backend, **kwargs
        )
        out.append((rec, [p.grad.clone() for p in net.parameters()]))
    return out


def _assert_same(sweep, graph):
    (rs, gs), (rg, gg) = sweep, graph
    for a, b in zip(gs, gg):
        assert_allclose_report(b, a, msg=".grad", **TOL)
    assert [r.name for r in rs] == [r.name for r in rg]
    assert rs.batch_size == rg.batch_size and rs.reduction_factor == rg.reduction_factor
    assert_allclose_report(rg.loss, rs.loss, msg="loss", **TOL)
    for a, b in zip(rs, rg):
        assert (a.position, a.has_bias, a.joint) == (b.position, b.has_bias, b.joint)
        assert b.block == "kron" and b.calls == 1
        assert a.bias_scale == pytest.approx(b.bias_scale, rel=1e-14)
        pairs = [("A", a.A, b.A), ("cross_A", a.cross_A, b.cross_A)]
        pairs += [(f"G[{k}]", a.G[k], b.G.get(k)) for k in a.G]
        pairs += [(f"cross_G[{k}]", a.cross_G[k], b.cross_G.get(k)) for k in a.cross_G]
        for field in ("batch_grad", "diag_ggn", "diag_ggn_mc"):
            for i, t in enumerate(getattr(a, field) or []):
                pairs.append((f"{field}[{i}]", t, getattr(b, field)[i]))
        for k, (rows, feats) in a.curvature_grad_factors.items():
            pairs += [(f"cgf rows {k}", rows, b.curvature_grad_factors[k][0])]
            pairs += [(f"cgf a {k}", feats, b.curvature_grad_factors[k][1])]
        if a.grad_factors is not None:
            pairs += [("grad_factors g", a.grad_factors[0], b.grad_factors[0])]
            pairs += [("grad_factors a", a.grad_factors[1], b.grad_factors[1])]
        assert (b.grad_factors is None) == (a.grad_factors is None)
        for what, x, z in pairs:
            if x is None:
                assert z is None, f"{a.name} {what}"
            else:
                assert_allclose_report(z, x, msg=f"{a.name} {what}", **TOL)
        assert a.cross_reason == b.cross_reason


APPROX = [pytest.param(*p.values, "expand", id=f"{p.id}-expand") for p in FULL] + [
    pytest.param(*p.values, "reduce", id=f"{p.id}-reduce") for p in CONV
]


@pytest.mark.parametrize("model,loss,reduction,device,approx", APPROX)
def test_graph_equals_sweep(model, loss, reduction, device, approx):
    net, loss_func, X, y = make_problem(model, loss, reduction, device)
    _assert_same(*_both(net, loss_func, X, y, QUANTITIES, kfac_approx=approx))


@pytest.mark.parametrize("model", ["mlp", "deep_mlp", "cnn"])
def test_graph_equals_sweep_separate_bias_and_factors(model):
    net, loss_func, X, y = make_problem(model, "ce", "sum")
    q = ("kflr", "empirical", "cross", "batch_grad_factors")
    _assert_same(*_both(net, loss_func, X, y, q, separate_bias=True))


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("loss", ["mse", "ce", "bce"])
def test_graph_equals_sweep_conftest_cases(model, loss):
    case = build_case(model, loss, "mean")
    _assert_same(*_both(case.model, case.loss_func, case.X, case.y, QUANTITIES))


class _TanhNoVmap(torch.autograd.Function):
    """Tanh as a custom autograd function whose backward cannot be batched (data-dependent)."""

    @staticmethod
    def forward(ctx, x):
        out = torch.tanh(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        if bool(torch.isnan(g).any()):  # data-dependent control flow: no vmap
            raise FloatingPointError("NaN gradient")
        return g * (1 - out**2)


class _Net(nn.Module):
    def __init__(self, custom: bool):
        super().__init__()
        self.custom = custom
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.l1(x)
        return self.l2(_TanhNoVmap.apply(h) if self.custom else torch.tanh(h))


def test_row_by_row_fallback_equals_batched_backward():
    torch.manual_seed(0)
    plain, custom = _Net(False).double(), _Net(True).double()
    custom.load_state_dict(plain.state_dict())
    X = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    # the custom function really has no batching rule
    Xg = X.clone().requires_grad_(True)
    out = custom(Xg)
    with pytest.raises(RuntimeError, match="(?i)batching rule|vmap"):
        torch.autograd.grad(
            out, Xg, torch.ones(2, *out.shape, dtype=X.dtype), is_grads_batched=True
        )
    q = ("kflr", "kfac", "empirical", "cross", "batch_grad", "diag_ggn")
    recs = []
    for net, batched in ((plain, True), (plain, False), (custom, True)):
        gen = torch.Generator().manual_seed(3)
        recs.append(
            extract_graph(net, nn.CrossEntropyLoss(), X, y, q, 2, generator=gen, batched=batched)
        )
    for other in recs[1:]:
        for a, b in zip(recs[0], other):
            assert_allclose_report(b.A, a.A, **TOL)
            for k in ("kflr", "kfac", "empirical"):
                assert_allclose_report(b.G[k], a.G[k], **TOL)
            for x, z in zip(a.batch_grad + a.diag_ggn, b.batch_grad + b.diag_ggn):
                assert_allclose_report(z, x, **TOL)


class _OwnForward(nn.Sequential):
    def forward(self, x):
        return super().forward(x) * 2.0


def _reused():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    return nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 3)).double()


def test_auto_dispatch():
    net, loss_func, X, y = make_problem("mlp", "ce")
    assert choose_backend(net, X, ("kflr",)) == "sweep"
    assert choose_backend(net, {"x": X}, ("kflr",)) == "graph"
    assert choose_backend(_OwnForward(*net), X, ("kflr",)) == "graph"
    assert choose_backend(_reused(), X, ("kflr",)) == "graph"
    with_norm = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    assert choose_backend(with_norm, X, ("kflr",)) == "graph"
    assert choose_backend(with_norm, X, ("kflr",), unsupported="gradient") == "sweep"
    assert choose_backend(with_norm, X, ("kfra",)) == "sweep"
    seq = nn.Sequential(
        nn.Dropout(0.0), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.Flatten(0, 1)
    )
    assert choose_backend(seq, X[:, None].expand(-1, 2, -1), ("kflr",)) == "graph"
    assert choose_backend(seq, X, ("kflr",)) == "sweep"
    X3 = X[:, None].expand(-1, 2, -1).double()
    seq = seq.double()
    rec = extract(seq, loss_func, X3, y.repeat_interleave(2), ("kflr",))
    assert [r.calls for r in rec] == [1, 1] and rec.batch_size == 2 * X.shape[0]


def test_sweep_refuses_what_it_would_get_wrong():
    _, loss_func, X, y = make_problem("mlp", "ce", n=6)
    X = X[:, :4]
    own = _OwnForward(nn.Linear(4, 3)).double()
    with pytest.raises(UnsupportedModuleError, match="_OwnForward.*overrides forward"):
        extract(own, loss_func, X, y, backend="sweep")
    with pytest.raises(UnsupportedModuleError, match="'0' is used again as '2'"):
        extract(_reused(), loss_func, X, y, backend="sweep")
    # under "auto" both run on the graph path and get the gradient of what they compute
    for net in (own, _reused()):
        expected = dense_grad(net, loss_func, X, y)
        rec = extract(net, loss_func, X, y, ("kflr",))
        for p, g in zip(net.parameters(), expected):
            assert_allclose_report(p.grad, g, **TOL)
        assert all(not m._forward_hooks for m in net.modules())
    assert [r.calls for r in rec] == [2, 1]


def test_graph_rejects_sweep_only_quantities():
    net, loss_func, X, y = make_problem("mlp", "ce")
    for q in ("kfra", "diag_hessian"):
        with pytest.raises(UnsupportedModuleError, match="second derivatives"):
            extract(net, loss_func, X, y, (q,), backend="graph")
    assert all(p.grad is None for p in net.parameters())
