"""CurvatureTracker in a tiny training loop, against dense float64 references."""

import pytest
import torch
from reference import (
    DEVICES,
    brute_force_factors,
    dense_ggn,
    dense_grad,
    dense_hessian,
    joint_permutation,
    kron_block,
    layer_slices,
    param_layers,
)
from torch import nn

import curvkit as ck
from curvkit.diagnostics.tracking import COLUMNS, CurvatureTracker
from curvkit.errors import ShapeError


def problem(device, seed=0):
    torch.manual_seed(seed)
    model = (
        nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 3))
        .double()
        .to(device)
    )
    gen = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(8, 4, generator=gen, dtype=torch.float64).to(device)
    y = torch.randint(0, 3, (8,), generator=gen).to(device)
    return model, nn.CrossEntropyLoss(), X, y


def dense_kflr(model, loss_func, X, y):
    """Block-diagonal KFLR in flat order from the brute-force factors."""
    D = sum(p.numel() for p in model.parameters())
    M = torch.zeros(D, D, dtype=X.dtype, device=X.device)
    slices = layer_slices(model)
    factors = brute_force_factors(model, loss_func, X, y, kind="kflr")
    for (name, module), f in zip(param_layers(model), factors):
        s = slices[name]
        flat = torch.cat(
            [
                torch.arange(s["weight"].start, s["weight"].stop),
                torch.arange(s["bias"].start, s["bias"].stop),
            ]
        )
        idx = flat[joint_permutation(*module.weight.shape, has_bias=True)].to(X.device)
        M[idx[:, None], idx[None, :]] = kron_block(f["G"], f["A"])
    return M


def kflr(model, loss_func, data):
    return ck.kfac(model, loss_func, data, kind="kflr")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_tracker_records_exact_quantities_in_a_training_loop(curvature, device):
    model, loss_func, X, y = problem(device)
    dense = dense_ggn if curvature == "ggn" else dense_hessian
    approx = kflr if curvature == "ggn" else None
    k = 3
    tracker = CurvatureTracker(
        model, loss_func, every=2, k=k, curvature=curvature, approx=approx, trace_method="exact"
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    recorded = []
    for step in range(5):
        model.train()
        opt.zero_grad()
        loss_func(model(X), y).backward()
        grads_before = [p.grad.clone() for p in model.parameters()]
        if tracker.maybe_record(step, X, y):
            recorded.append(step)
            model.eval()  # the reference: eval mode (Dropout off), as the tracker measures
            M = dense(model, loss_func, X, y)
            g = torch.cat([t.reshape(-1) for t in dense_grad(model, loss_func, X, y)])
            rows = {(r["quantity"], r["index"]): r for r in tracker.records if r["step"] == step}
            evals, evecs = torch.linalg.eigh(M)
            top = evals.flip(0)[:k]
            for i in range(k):
                assert rows[("eigenvalue", i + 1)]["value"] == pytest.approx(
                    float(top[i]), abs=1e-6
                )
            V = evecs[:, -k:]
            overlap = float((V.T @ g).pow(2).sum() / g.pow(2).sum())
            assert rows[("grad_overlap", k)]["value"] == pytest.approx(overlap, abs=1e-6)
            assert rows[("trace", None)]["value"] == pytest.approx(float(M.trace()), rel=1e-10)
            assert rows[("loss", None)]["value"] == pytest.approx(
                float(loss_func(model(X), y).detach())
            )
            assert rows[("grad_norm", None)]["value"] == pytest.approx(float(g.norm()))
            if approx is not None:
                K = dense_kflr(model, loss_func, X, y)
                frob = float(torch.linalg.matrix_norm(K - M) / torch.linalg.matrix_norm(M))
                assert rows[("approx_frobenius", None)]["value"] == pytest.approx(frob, rel=1e-8)
            assert model.training is False  # restored to the mode it had (set above)
        for p, before in zip(model.parameters(), grads_before):
            assert torch.equal(p.grad, before)  # recording leaves .grad alone
        opt.step()
    assert recorded == [0, 2, 4]
    df = tracker.to_dataframe()
    assert list(df.columns) == COLUMNS
    assert sorted(df.step.unique()) == [0, 2, 4]
    expected = {"loss", "grad_norm", "eigenvalue", "grad_overlap", "trace"}
    assert set(df.quantity) == expected | (
        {"approx_frobenius", "approx_cosine"} if approx else set()
    )


def test_tracker_restores_training_mode_and_callback_form():
    model, loss_func, X, y = problem("cpu")
    tracker = CurvatureTracker(model, loss_func, every=3, quantities=("trace",), num_matvecs=12)
    model.train()
    assert tracker(0, X, y) and not tracker(1, X, y)
    assert model.training
    assert {r["quantity"] for r in tracker.records} == {"loss", "grad_norm", "trace"}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"quantities": ("top_eigenvalues", "entropy")}, "unknown quantities"),
        ({"quantities": ("approx_error",)}, "needs approx"),
        ({"curvature": "fisher"}, "curvature='fisher'"),
        ({"every": 0}, "every=0"),
    ],
    ids=["quantity", "approx-missing", "curvature", "every"],
)
def test_tracker_bad_arguments(kwargs, match):
    model, loss_func, _, _ = problem("cpu")
    with pytest.raises(ShapeError, match=match):
        CurvatureTracker(model, loss_func, **kwargs)
