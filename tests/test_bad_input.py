"""Bad input to the public functions: a correct result or a clear error, and nothing changed.

For every input each test asserts one of two outcomes:

- a correct result, checked against an independent reference (dense autograd in
  float64, or a case where the approximation must be exact);
- a :class:`~curvkit.errors.CurvkitError` that also subclasses the matching
  built-in (``ValueError`` for shapes and values, ``NotImplementedError`` for
  unsupported losses), whose message names the argument, raised before any state
  changes: parameters, ``.grad`` and buffers are as before.

Property-based cases (``hypothesis``) draw shapes, reductions, damping, ``k`` and
sizes on tiny models. Bugs in code owned elsewhere are marked
``xfail(strict=True)`` with the reason, so that their fix is noticed.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import curvkit as ck
from curvkit.errors import (
    ConfigError,
    CurvkitError,
    NonFiniteError,
    ShapeError,
    UnsupportedLossError,
)

DT = torch.float64
FAST = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
LOSSES = {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}
DATA_FUNCTIONS = ("hessian", "ggn", "fisher", "empirical_fisher", "kfac", "ekfac", "diag_ggn")


def tiny_model(seed: int = 0, d_in: int = 3, d_out: int = 2) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 4), nn.Tanh(), nn.Linear(4, d_out)).to(DT)


def tiny_data(n: int, loss: str = "mse", d_in: int = 3, d_out: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=gen, dtype=DT)
    if loss == "ce":
        y = torch.randint(0, d_out, (n,), generator=gen)
    elif loss == "bce":
        y = torch.randint(0, 2, (n, d_out), generator=gen).to(DT)
    else:
        y = torch.randn(n, d_out, generator=gen, dtype=DT)
    return X, y


def snapshot(model: nn.Module) -> dict:
    """Copies of everything a failing call must leave alone."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "hooks": sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in model.modules()
        ),
        "training": [m.training for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for a, b in zip(after["params"], before["params"]):
        assert torch.equal(a, b)
    for a, b in zip(after["grads"], before["grads"]):
        assert (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
    for a, b in zip(after["buffers"], before["buffers"]):
        assert torch.equal(a, b)
    assert after["hooks"] == before["hooks"] and after["training"] == before["training"]


def expect_error(call, builtin, words: str, model: nn.Module | None = None):
    """``call()`` raises a CurvkitError that is also a ``builtin``, naming ``words``."""
    before = snapshot(model) if model is not None else None
    with pytest.raises(CurvkitError) as info:
        call()
    assert isinstance(info.value, builtin), type(info.value).__mro__
    assert words in str(info.value), str(info.value)
    if model is not None:
        assert_unchanged(model, before)
    return info.value


def flat_params(model):
    return [p for p in model.parameters() if p.requires_grad]


def dense_hessian(model, loss_func, X, y) -> torch.Tensor:
    """Reference: the loss Hessian by double autograd (float64)."""
    params = flat_params(model)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(flat):
        chunks = flat.split(sizes)
        named = {
            name: c.view(s)
            for (name, _), c, s in zip(model.named_parameters(), chunks, shapes, strict=True)
        }
        out = torch.func.functional_call(model, named, (X,))
        return loss_func(out, y)

    return torch.autograd.functional.hessian(loss_of, theta)


# -- data: empty batches, non-tensors ------------------------------------------------------
@pytest.mark.parametrize("name", DATA_FUNCTIONS)
@pytest.mark.parametrize("where", ["single", "second-of-two"])
def test_batch_without_examples_is_a_shape_error(name, where):
    model, loss_func = tiny_model(), nn.MSELoss()
    X, y = tiny_data(4)
    empty = (X[:0], y[:0])
    data = empty if where == "single" else [(X, y), empty]
    batch = 0 if where == "single" else 1
    expect_error(
        lambda: getattr(ck, name)(model, loss_func, data),
        ValueError,
        f"data batch {batch} holds no example",
        model,
    )


@pytest.mark.parametrize("name", DATA_FUNCTIONS)
def test_data_that_is_not_tensors_is_a_shape_error(name):
    model, loss_func = tiny_model(), nn.MSELoss()
    X, y = tiny_data(4)
    expect_error(
        lambda: getattr(ck, name)(model, loss_func, [(X, y.tolist())]),
        ValueError,
        "data batch 0: y is a list, not a tensor",
        model,
    )
    expect_error(lambda: getattr(ck, name)(model, loss_func, []), ValueError, "no batch", model)


# -- extract: reductions, quantities, mc_samples, shapes ----------------------------------
@FAST
@given(
    n=st.integers(0, 4),
    loss=st.sampled_from(sorted(LOSSES)),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    quantity=st.sampled_from(["kfac", "kflr", "diag_ggn", "batch_grad", "kfca", "grad"]),
    mc_samples=st.integers(-1, 2),
)
def test_extract_result_or_error(n, loss, reduction, quantity, mc_samples):
    model, loss_func = tiny_model(), LOSSES[loss](reduction=reduction)
    X, y = tiny_data(max(n, 1), loss)
    X, y = X[:n], y[:n]
    problems = []  # (builtin, words): any one may be reported when several apply
    if quantity in ("kfca", "grad"):
        problems.append((ValueError, quantity))
    if reduction == "none":
        problems.append((NotImplementedError, "reduction='none'"))
    if mc_samples < 1:
        problems.append((ValueError, "mc_samples"))
    if n == 0:
        problems.append((ValueError, "empty"))
    before = snapshot(model)
    try:
        records = ck.extract(model, loss_func, X, y, quantities=(quantity,), mc_samples=mc_samples)
    except CurvkitError as err:
        assert problems, f"unexpected error: {err!r}"
        assert any(isinstance(err, b) and w in str(err) for b, w in problems), (err, problems)
        assert_unchanged(model, before)
        return
    assert not problems, f"no error for {problems}"
    ref_model = tiny_model()
    ref_loss = loss_func(ref_model(X), y)
    ref_loss.backward()
    assert float(records.loss) == pytest.approx(float(ref_loss.detach()), rel=1e-12)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, builtin, words",
    [
        (dict(kfac_approx="squeeze"), ValueError, "kfac_approx"),
        (dict(factor_dtype=torch.int32), ValueError, "factor_dtype"),
        (dict(unsupported="ignore"), ValueError, "unsupported"),
    ],
)
def test_extract_bad_options(kwargs, builtin, words):
    model = tiny_model()
    X, y = tiny_data(3)
    expect_error(lambda: ck.extract(model, nn.MSELoss(), X, y, **kwargs), builtin, words, model)


def test_extract_mismatched_batch_and_target_shape():
    model = tiny_model()
    X, y = tiny_data(4)
    expect_error(lambda: ck.extract(model, nn.MSELoss(), X, y[:3]), ValueError, "4 and 3", model)
    expect_error(
        lambda: ck.extract(model, nn.MSELoss(), X, torch.zeros(4, 5, dtype=DT)),
        ValueError,
        "(4, 5)",
        model,
    )


@pytest.mark.parametrize("backend", ["sweep", "graph"])
def test_extract_input_dtype_unlike_the_model(backend):
    model = tiny_model()
    X, y = tiny_data(3)
    expect_error(
        lambda: ck.extract(model, nn.MSELoss(), X.float(), y, backend=backend),
        ValueError,
        "dtype",
        model,
    )


# -- exact operators ----------------------------------------------------------------------
@FAST
@given(
    n=st.integers(1, 4),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    name=st.sampled_from(["hessian", "ggn", "fisher"]),
    blocks=st.sampled_from(["layer", "param", "module"]),
)
def test_exact_operators_result_or_error(n, reduction, name, blocks):
    """A linear model with MSE: Hessian = GGN = Fisher (exact), against double autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    loss_func = nn.MSELoss(reduction=reduction)
    X, y = tiny_data(n)
    call = lambda: getattr(ck, name)(model, loss_func, (X, y), blocks=blocks)  # noqa: E731
    if reduction == "none":
        expect_error(call, NotImplementedError, "reduction='none'", model)
    elif blocks == "module":
        expect_error(call, ValueError, "blocks='module'", model)
    else:
        before = snapshot(model)
        dense = call().to_dense()
        assert_unchanged(model, before)
        torch.testing.assert_close(dense, dense_hessian(model, loss_func, X, y))


@pytest.mark.parametrize("mc_samples", [0, -1, 1.5])
def test_fisher_bad_mc_samples(mc_samples):
    model = tiny_model()
    expect_error(
        lambda: ck.fisher(model, nn.MSELoss(), tiny_data(3), mc_samples=mc_samples),
        ValueError,
        "mc_samples",
        model,
    )


@pytest.mark.parametrize("name", ["hessian", "ggn", "fisher", "empirical_fisher"])
def test_exact_operator_mismatched_examples(name):
    model = tiny_model()
    X, y = tiny_data(4)
    expect_error(
        lambda: getattr(ck, name)(model, nn.MSELoss(), (X, y[:3])).to_dense(),
        ValueError,
        "4 and 3",
        model,
    )


# -- structured approximations ------------------------------------------------------------
@FAST
@given(
    x=st.lists(st.floats(-3, 3), min_size=3, max_size=3),
    reduction=st.sampled_from(["mean", "sum"]),
)
def test_kfac_of_one_linear_layer_and_one_example_is_the_ggn(x, reduction):
    """With one example a single layer's GGN is exactly A ⊗ G (KFLR), and its diagonal exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    loss_func = nn.MSELoss(reduction=reduction)
    X, y = torch.tensor([x], dtype=DT), torch.tensor([[0.5, -1.0]], dtype=DT)
    ggn = dense_hessian(model, loss_func, X, y)
    kf = ck.kfac(model, loss_func, (X, y), kind="kflr")
    torch.testing.assert_close(kf.to_dense(), ggn)
    torch.testing.assert_close(ck.diag_ggn(model, loss_func, (X, y)).to_dense(), ggn.diag().diag())


@pytest.mark.parametrize(
    "call, builtin, words",
    [
        (lambda m, d: ck.kfac(m, nn.MSELoss(), d, kind="fisher"), ValueError, "kind='fisher'"),
        (lambda m, d: ck.kfac(m, nn.MSELoss(), d, mc_samples=0), ValueError, "mc_samples"),
        (
            lambda m, d: ck.kfac(m, nn.MSELoss(reduction="none"), d),
            NotImplementedError,
            "reduction='none'",
        ),
        (lambda m, d: ck.kfac(m, nn.MSELoss(), (d[0], d[1][:2])), ValueError, "4 and 2"),
        (lambda m, d: ck.ekfac(m, nn.MSELoss(), (d[0], d[1][:2])), ValueError, "4 and 2"),
        (lambda m, d: ck.diag_ggn(m, nn.MSELoss(), (d[0], d[1][:2])), ValueError, "4 and 2"),
        (lambda m, d: ck.kfac(m, nn.L1Loss(), d), NotImplementedError, "L1Loss"),
    ],
    ids=["kind", "mc", "reduction", "kfac-mismatch", "ekfac-mismatch", "diag-mismatch", "loss"],
)
def test_structured_bad_arguments(call, builtin, words):
    model = tiny_model()
    expect_error(lambda: call(model, tiny_data(4)), builtin, words, model)


@FAST
@given(damping=st.floats(allow_nan=True, allow_infinity=True, width=64))
@example(damping=math.nan)
@example(damping=-1.0)
@example(damping=math.inf)
def test_kfac_inverse_damping(damping):
    model = tiny_model()
    op = ck.kfac(model, nn.MSELoss(), tiny_data(4), kind="kflr")
    if not damping >= 0:
        with pytest.raises(ConfigError, match="damping"):
            op.inverse(damping=damping)
        return
    v = torch.randn(op.dim, dtype=DT, generator=torch.Generator().manual_seed(0))
    if math.isinf(damping):  # the limit: (A + inf I)^{-1} = 0
        assert torch.equal(op.inverse(damping=damping) @ v, torch.zeros_like(v))
        return
    if damping > 1e8 or 0 < damping < 1e-8:
        return  # the inverse exists, but the product test below would only check round-off
    M = op.to_dense() + damping * torch.eye(op.dim, dtype=DT)
    eig = torch.linalg.eigvalsh(M)
    if eig.min() < 1e-6 * eig.max():
        return  # condition number above 1e6: the dense solve is no reference at rtol 1e-6
    inv = op.inverse(damping=damping, damping_mode="exact")
    torch.testing.assert_close(inv @ v, torch.linalg.solve(M, v), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("damping", [math.nan, -1e-3, "1"])
@pytest.mark.parametrize(
    "build",
    [
        lambda m, d: ck.kfac(m, nn.MSELoss(), d, kind="kflr"),
        lambda m, d: ck.kfac(m, nn.MSELoss(), d, kind="kflr", structure="tridiagonal"),
        lambda m, d: ck.ekfac(m, nn.MSELoss(), d, kind="kflr"),
        lambda m, d: ck.diag_ggn(m, nn.MSELoss(), d),
        lambda m, d: ck.DenseOperator(ck.ggn(m, nn.MSELoss(), d).to_dense()),
    ],
    ids=["kfac", "tridiagonal", "ekfac", "diag_ggn", "dense"],
)
def test_structured_inverse_rejects_bad_damping(build, damping):
    op = build(tiny_model(), tiny_data(4))
    with pytest.raises(ConfigError, match="damping"):
        op.inverse(damping=damping)


# -- diagnostics --------------------------------------------------------------------------
def diag_op(values) -> ck.DenseOperator:
    return ck.DenseOperator(torch.diag(torch.tensor(values, dtype=DT)))


@FAST
@given(k=st.one_of(st.integers(-2, 7), st.floats(0.5, 3.5)), which=st.sampled_from(["LA", "SA"]))
def test_eigenvalues_k(k, which):
    op = diag_op([4.0, 1.0, 3.0, 2.0, 0.5])
    if isinstance(k, float) or not 1 <= k <= 5:
        expect_error(lambda: ck.eigenvalues(op, k=k, which=which), ValueError, f"k={k!r}")
        assert op.matvecs == 0
        return
    values, info = ck.eigenvalues(op, k=k, which=which)
    ref = torch.tensor(sorted([4.0, 1.0, 3.0, 2.0, 0.5], reverse=which == "LA")[:k], dtype=DT)
    torch.testing.assert_close(values, ref, rtol=0, atol=1e-12)


@FAST
@given(width=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=64)))
def test_spectral_density_kernel_width(width):
    op = diag_op([0.1 * i for i in range(1, 9)])
    call = lambda: ck.spectral_density(op, num_probes=3, lanczos_steps=8, kernel_width=width)  # noqa: E731
    if width is not None and not (math.isfinite(width) and width > 0):
        expect_error(call, ValueError, "kernel_width")
        assert op.matvecs == 0
        return
    if width is not None and not 1e-3 <= width <= 10:
        return  # a valid but degenerate smoothing: nothing to compare on a finite grid
    sd = call()
    # eight Lanczos steps resolve the eight eigenvalues: nodes are the eigenvalues
    torch.testing.assert_close(
        sd.nodes[0].sort().values, torch.arange(1, 9, dtype=DT) * 0.1, rtol=0, atol=1e-10
    )
    assert float(torch.trapezoid(sd.density, sd.grid)) == pytest.approx(1.0, abs=1e-3)


@FAST
@given(
    method=st.sampled_from(["exact", "hutchinson", "hutch++", "xtrace", "lanczos"]),
    n=st.integers(-1, 12),
)
def test_trace_method_and_budget(method, n):
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    op = diag_op(values)
    minimum = {"exact": 0, "hutchinson": 2, "hutch++": 6, "xtrace": 4}.get(method)
    call = lambda: ck.trace(op, method=method, num_matvecs=n)  # noqa: E731
    if minimum is None:
        expect_error(call, ValueError, "method='lanczos'")
    elif n < minimum:
        expect_error(call, ValueError, f"needs num_matvecs >= {minimum}")
    elif method == "xtrace" and n // 2 >= op.dim:
        expect_error(call, ValueError, "xtrace needs")
    else:
        est = call()
        if method in ("exact", "hutchinson"):  # Rademacher probes are exact on a diagonal
            assert est.value == pytest.approx(sum(values), rel=1e-12)
        else:
            assert math.isfinite(est.value)


@FAST
@given(damping=st.floats(allow_nan=True, allow_infinity=True, width=64))
def test_condition_number_damping(damping):
    op = diag_op([4.0, 1.0, 0.5])
    if not (math.isfinite(damping) and damping >= 0):
        expect_error(lambda: ck.condition_number(op, damping=damping), ValueError, "damping")
        assert op.matvecs == 0
        return
    expected = (4.0 + damping) / (0.5 + damping)
    assert ck.condition_number(op, damping=damping) == pytest.approx(expected, rel=1e-12)


@FAST
@given(
    k=st.integers(-2, 6),
    grid=st.lists(st.one_of(st.floats(-1.0, 2.0), st.just(math.nan)), min_size=1, max_size=3),
)
def test_compare_k_and_damping_grid(k, grid):
    A, B = diag_op([4.0, 2.0, 1.0]), diag_op([4.0, 2.0, 0.5])
    g = torch.ones(3, dtype=DT)
    call = lambda: ck.compare(A, B, k=k, damping_grid=grid, gradient=g)  # noqa: E731
    if k < 1:
        expect_error(call, ValueError, f"k={k} must be an integer >= 1")
    elif not all(math.isfinite(x) and x >= 0 for x in grid):
        expect_error(call, ValueError, "damping_grid")
    elif min(grid) == 0:
        return  # B is invertible, A too: fine, but covered by the metrics tests
    else:
        df = ck.compare(A, B, k=k, damping_grid=grid, gradient=g, metrics=("frobenius",))
        ref = float(
            torch.linalg.norm(A.to_dense() - B.to_dense()) / torch.linalg.norm(B.to_dense())
        )
        assert float(df["value"].iloc[0]) == pytest.approx(ref, rel=1e-12)


def test_compare_empty_mapping_and_non_operator():
    B = diag_op([1.0, 2.0])
    expect_error(lambda: ck.compare({}, B), ValueError, "empty mapping")
    expect_error(lambda: ck.compare(B.to_dense(), B), ValueError, "not a CurvatureOperator")


@pytest.mark.parametrize(
    "model, dtype, words",
    [
        ("model", torch.int8, "floating-point"),
        ("model", "float32", "floating-point"),
        (5, torch.float32, "nn.Module, got int"),
    ],
)
def test_memory_report_bad_arguments(model, dtype, words):
    net = tiny_model()
    model = net if model == "model" else model
    expect_error(lambda: ck.memory_report(model, dtype=dtype), ValueError, words)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_memory_report_bytes_follow_the_dtype(dtype):
    df = ck.memory_report(tiny_model(), dtype=dtype)
    full = df[(df.layer == "total") & (df.structure == "full")].iloc[0]
    D = sum(p.numel() for p in tiny_model().parameters())
    assert int(full["entries"]) == D * D
    assert int(full["bytes"]) == D * D * torch.finfo(dtype).bits // 8


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(every=0), "every=0"),
        (dict(k=0), "k=0"),
        (dict(k=2.5), "k=2.5"),
        (dict(num_matvecs=0), "num_matvecs=0"),
        (dict(trace_method="hutch++", num_matvecs=4), "needs num_matvecs >= 6"),
        (dict(trace_method="lanczos"), "trace_method='lanczos'"),
        (dict(curvature="fisher"), "curvature='fisher'"),
        (dict(quantities=("spectrum",)), "spectrum"),
        (dict(quantities=("approx_error",)), "approx"),
    ],
)
def test_curvature_tracker_bad_arguments(kwargs, words):
    model = tiny_model()
    expect_error(lambda: ck.CurvatureTracker(model, nn.MSELoss(), **kwargs), ValueError, words)


def test_curvature_tracker_rejects_unreduced_loss_and_mismatched_batch():
    model = tiny_model()
    expect_error(
        lambda: ck.CurvatureTracker(model, nn.MSELoss(reduction="none")),
        ValueError,
        "reduction='none'",
    )
    tracker = ck.CurvatureTracker(model, nn.MSELoss(), k=2, num_matvecs=6)
    X, y = tiny_data(4)
    model.train()
    loss = nn.MSELoss()(model(X), y)
    loss.backward()  # a gradient in .grad, which a failing record must keep
    expect_error(lambda: tracker.record(0, X, y[:3]), ValueError, "4 and 3", model)
    expect_error(lambda: tracker.record(0, X[:0], y[:0]), ValueError, "holds no example", model)
    assert tracker.records == [] and model.training
    rows = tracker.record(0, X, y)  # a good batch still works; the loss row is the loss
    assert rows[0]["quantity"] == "loss"
    assert rows[0]["value"] == pytest.approx(loss.item(), rel=1e-12)


# -- the K-FAC optimiser's arguments ------------------------------------------------------
@FAST
@given(
    damping=st.floats(-1.0, 1.0),
    lr=st.one_of(st.none(), st.floats(-1.0, 1.0)),
    T_inv=st.integers(-1, 3),
    kind=st.sampled_from(["kfac", "kflr", "empirical", "kfra"]),
)
def test_kfac_optimizer_arguments(damping, lr, T_inv, kind):
    model = tiny_model()

    def call():
        return ck.optim.KFAC(model, nn.MSELoss(), damping=damping, lr=lr, T_inv=T_inv, kind=kind)

    if kind == "kfra":
        expect_error(call, ValueError, "kind='kfra'", model)
    elif T_inv < 1:
        expect_error(call, ValueError, "T_inv", model)
    elif damping <= 0:
        expect_error(call, ValueError, "damping", model)
    elif lr is not None and lr <= 0:
        expect_error(call, ValueError, "lr", model)
    else:
        opt = call()
        assert opt.damping == damping and opt.param_groups[0]["lr"] == lr


KFAC_BAD_VALUES = [  # momentum >= 1 is accepted, as torch.optim.SGD does
    pytest.param(dict(damping=math.nan), "damping", id="damping-nan"),
    pytest.param(dict(damping=math.inf), "damping", id="damping-inf"),
    pytest.param(dict(lr=math.nan), "lr", id="lr-nan"),
    pytest.param(dict(lr=math.inf), "lr", id="lr-inf"),
    pytest.param(dict(lr=0.1, momentum=-0.5), "momentum", id="momentum-negative"),
    pytest.param(dict(weight_decay=-1.0), "weight_decay", id="weight-decay-negative"),
    pytest.param(dict(lr=0.1, kl_clip=-1.0), "kl_clip", id="kl-clip-negative"),
]


@pytest.mark.parametrize("kwargs, words", KFAC_BAD_VALUES)
def test_kfac_optimizer_rejects_out_of_range_values(kwargs, words):
    model = tiny_model()
    expect_error(lambda: ck.optim.KFAC(model, nn.MSELoss(), **kwargs), ValueError, words, model)


def test_kfac_optimizer_rejects_unreduced_loss():
    model = tiny_model()
    expect_error(
        lambda: ck.optim.KFAC(model, nn.MSELoss(reduction="none")),
        NotImplementedError,
        "reduction='none'",
        model,
    )


def test_errors_subclass_the_matching_builtin():
    assert issubclass(ShapeError, ValueError) and issubclass(ShapeError, CurvkitError)
    assert issubclass(UnsupportedLossError, NotImplementedError)


def test_ekfac_on_data_with_nan():
    model = tiny_model()
    X, y = tiny_data(4)
    y[1, 0] = math.nan
    expect_error(lambda: ck.ekfac(model, nn.MSELoss(), (X, y)), FloatingPointError, "finite", model)


@pytest.mark.parametrize("where", ["X", "y"])
def test_kfac_inverse_on_data_with_nan(where):
    """NaN data reaches the factors of the empirical kind: the inverse raises NonFiniteError."""
    model = tiny_model()
    X, y = tiny_data(4)
    (X if where == "X" else y)[1, 0] = math.nan
    op = ck.kfac(model, nn.MSELoss(), (X, y), kind="empirical")
    with pytest.raises(NonFiniteError, match="finite"):
        op.inverse(damping=1e-3, damping_mode="exact")
