r"""Float64 brute-force references shared by the test suite.

Everything here is deliberately slow and explicit: dense matrices from
``torch.func``, per-example Python loops, explicit patch extraction. The
conventions are those of ``curvkit/records.py`` and ``docs/conventions.md``:

- ``L = R * sum_n l_n`` with ``l_n = loss_func(f(x_n)[None], y_n[None])`` (the
  user's loss on a batch of one) and ``R = 1/N`` ("mean") or ``1`` ("sum"). For
  ``MSELoss``/``BCEWithLogitsLoss`` with ``"mean"`` this ``l_n`` includes the
  ``1/C`` over output entries, so that ``L`` is exactly the loss the user wrote.
- Flat parameter order: ``p.flatten()`` concatenated over the trainable
  parameters in ``model.parameters()`` order.
- Kronecker blocks over the joint row-major matrix ``[W, b]`` (``[out, in + 1]``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, vmap

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOSSES = {
    "mse": nn.MSELoss,
    "ce": nn.CrossEntropyLoss,
    "bce": nn.BCEWithLogitsLoss,
}
REDUCTIONS = ("mean", "sum")
PARAM_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


# -- problems -------------------------------------------------------------------------


def tiny_mlp(d_in: int = 5, hidden: int = 4, d_out: int = 3, act: type = nn.Tanh) -> nn.Sequential:
    """``Linear(d_in, hidden) - act - Linear(hidden, d_out)``."""
    return nn.Sequential(nn.Linear(d_in, hidden), act(), nn.Linear(hidden, d_out))


def deep_mlp(d_out: int = 3) -> nn.Sequential:
    """Three Linear layers with Sigmoid/Tanh, a nested Sequential and a bias-less layer."""
    return nn.Sequential(
        nn.Linear(5, 4),
        nn.Sigmoid(),
        nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh()),
        nn.Linear(4, d_out),
    )


def deep_linear(d_out: int = 3) -> nn.Sequential:
    """A deep linear network (no activations): KFLR is exact for MSE."""
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3), nn.Identity(), nn.Linear(3, d_out))


def tiny_cnn(d_out: int = 3) -> nn.Sequential:
    """Conv2d (stride, padding) - ReLU - MaxPool2d - Conv2d (dilation) - Flatten - Linear."""
    return nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 2, kernel_size=2, stride=1, dilation=2, bias=True),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, d_out),
    )


def tiny_cnn1d(d_out: int = 3) -> nn.Sequential:
    """Conv1d - Tanh - AvgPool1d - Conv1d (stride 2, no bias) - Flatten - Linear."""
    return nn.Sequential(
        nn.Conv1d(2, 3, kernel_size=3, padding=1),
        nn.Tanh(),
        nn.AvgPool1d(2),
        nn.Conv1d(3, 2, kernel_size=2, stride=2, bias=False),
        nn.Flatten(),
        nn.Linear(2 * 2, d_out),
    )


MODELS: dict[str, tuple[Callable[[int], nn.Module], tuple[int, ...]]] = {
    "mlp": (lambda c: tiny_mlp(d_out=c), (5,)),
    "deep_mlp": (deep_mlp, (5,)),
    "deep_linear": (deep_linear, (4,)),
    "cnn": (tiny_cnn, (2, 8, 8)),
    "cnn1d": (tiny_cnn1d, (2, 8)),
}


def make_problem(
    model: str,
    loss: str,
    reduction: str = "mean",
    device: str = "cpu",
    n: int = 6,
    d_out: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """A seeded ``(model, loss_func, X, y)`` from the tables :data:`MODELS` and :data:`LOSSES`.

    Targets: regression targets for MSE, class indices for CE, probabilities in
    ``[0, 1]`` for BCE.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    build, in_shape = MODELS[model]
    net = build(d_out).to(device=device, dtype=dtype)
    X = torch.randn(n, *in_shape, generator=gen, dtype=dtype).to(device)
    if loss == "mse":
        y = torch.randn(n, d_out, generator=gen, dtype=dtype)
    elif loss == "ce":
        y = torch.randint(0, d_out, (n,), generator=gen)
    elif loss == "bce":
        y = torch.rand(n, d_out, generator=gen, dtype=dtype)
    else:
        raise ValueError(loss)
    return net, LOSSES[loss](reduction=reduction), X, y.to(device)


# -- parameters and layers ------------------------------------------------------------


def reduction_factor(loss_func: nn.Module, n: int) -> float:
    """``R``: ``1/N`` for ``reduction="mean"``, ``1`` for ``"sum"``."""
    return {"mean": 1.0 / n, "sum": 1.0}[loss_func.reduction]


def flatten_sequential(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The leaf modules of a (nested) ``nn.Sequential`` in execution order, with qualified names."""
    leaves = []
    for name, child in model.named_children():
        qual = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            leaves.extend(flatten_sequential(child, qual + "."))
        else:
            leaves.append((qual, child))
    return leaves


def trainable_params(model: nn.Module) -> list[Tensor]:
    """``[p for p in model.parameters() if p.requires_grad]``: the flat order."""
    return [p for p in model.parameters() if p.requires_grad]


def param_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules holding at least one trainable parameter, forward order."""
    return [
        (name, m)
        for name, m in flatten_sequential(model)
        if any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def layer_slices(model: nn.Module) -> dict[str, dict[str, slice]]:
    """Slice of every trainable parameter in the flat vector, keyed by layer and param name.

    Returns:
        ``{layer_name: {"weight": slice, "bias": slice}}`` (entries only for
        trainable parameters).
    """
    ids = {id(p): i for i, p in enumerate(trainable_params(model))}
    offsets = [0]
    for p in trainable_params(model):
        offsets.append(offsets[-1] + p.numel())
    out = {}
    for name, m in param_layers(model):
        out[name] = {}
        for pname, p in m.named_parameters(recurse=False):
            if p.requires_grad:
                i = ids[id(p)]
                out[name][pname] = slice(offsets[i], offsets[i + 1])
    return out


def joint_permutation(out_features: int, in_features: int, has_bias: bool) -> Tensor:
    """Flat indices (``[W.flatten(), b]``, relative to the layer) in joint ``[W | b]`` order.

    Entry ``k`` of the result is the flat position of joint row-major entry ``k``
    of the ``[out, in + 1]`` matrix ``[W, b]`` (``[out, in]`` without bias).
    """
    cols = in_features + int(has_bias)
    perm = torch.empty(out_features * cols, dtype=torch.long)
    for o in range(out_features):
        for i in range(cols):
            perm[o * cols + i] = (
                o * in_features + i if i < in_features else (out_features * in_features + o)
            )
    return perm


def joint_block(
    M: Tensor, model: nn.Module, layer: str, layer2: str | None = None, separate: bool = False
) -> Tensor:
    """Block of a dense ``[D, D]`` matrix for one layer (or a pair), in joint ``[W|b]`` order.

    Args:
        M: Dense matrix in flat parameter order.
        model: The model (defines the flat order).
        layer: Row layer name.
        layer2: Column layer name (default: ``layer``).
        separate: If ``True``, return only the weight-weight block (row-major ``W``).
    """
    slices = layer_slices(model)
    mods = dict(param_layers(model))

    def index(name):
        s = slices[name]
        w = s["weight"]
        has_bias = "bias" in s and not separate
        out = mods[name].weight.shape[0]
        inn = mods[name].weight[0].numel()
        perm = joint_permutation(out, inn, has_bias)
        base = torch.arange(w.start, w.stop)
        if has_bias:
            base = torch.cat([base, torch.arange(s["bias"].start, s["bias"].stop)])
        return base[perm].to(M.device)

    rows = index(layer)
    cols = index(layer2 if layer2 is not None else layer)
    return M[rows][:, cols]


def curvlinops_kron_blocks(model, loss_func, X, y, records, fisher_type, approx, **kw):
    """curvlinops' ``KFACLinearOperator`` on the Linear layers of ``records``, densely.

    One block per record (weight and bias), in joint ``[W | b]`` order (that of
    :func:`kron_block`); ``kw`` goes to the operator.
    """
    from curvlinops import KFACLinearOperator

    params = [p for r in records for p in r.params]
    K = KFACLinearOperator(
        model, loss_func, params, [(X, y)], fisher_type=fisher_type, kfac_approx=approx,
        separate_weight_and_bias=False, check_deterministic=False, **kw,
    )  # fmt: skip
    dense = K @ torch.eye(K.shape[0], dtype=params[0].dtype)
    off, out = 0, []
    for r in records:
        n_out, n_in = r.module.weight.shape
        idx = off + joint_permutation(n_out, n_in, True)
        out.append(dense[idx][:, idx])
        off += r.numel
    return out


# -- dense matrices ---------------------------------------------------------------------


def _flat_loss_fn(model: nn.Module, loss_func: nn.Module, X: Tensor, y: Tensor):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def unflatten(theta):
        parts = theta.split(sizes)
        return {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)} | frozen

    def output(theta, x):
        return functional_call(model, unflatten(theta), (x,))

    theta0 = torch.cat([p.detach().flatten() for _, p in named])
    return theta0, output


def dense_hessian(model: nn.Module, loss_func: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """Exact Hessian ``[D, D]`` of ``loss_func(model(X), y)`` over the trainable parameters."""
    theta0, output = _flat_loss_fn(model, loss_func, X, y)
    # reverse-over-reverse: works for every module (some lack forward-mode AD rules)
    return jacrev(jacrev(lambda t: loss_func(output(t, X), y)))(theta0)


def _loss_hessians(loss_func: nn.Module, out: Tensor, y: Tensor) -> Tensor:
    """Per-example ``Lambda_n = d^2 l_n / df^2``, ``[N, C, C]`` (``l_n`` unreduced)."""
    return torch.stack(
        [hessian(lambda f, yy=yn: loss_func(f[None], yy[None]))(fn) for fn, yn in zip(out, y)]
    )


def _loss_grads(loss_func: nn.Module, out: Tensor, y: Tensor) -> Tensor:
    """Per-example ``d l_n / df``, ``[N, C]`` (``l_n`` unreduced)."""
    return torch.stack(
        [
            torch.func.grad(lambda f, yy=yn: loss_func(f[None], yy[None]))(fn)
            for fn, yn in zip(out, y)
        ]
    )


def _output_jacobians(model, loss_func, X, y) -> tuple[Tensor, Tensor]:
    theta0, output = _flat_loss_fn(model, loss_func, X, y)
    out = output(theta0, X).detach()
    J = jacrev(lambda t: output(t, X))(theta0)  # [N, C, D]
    return out, J


def dense_ggn(model: nn.Module, loss_func: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    r"""Exact GGN :math:`R \sum_n J_n^\top \Lambda_n J_n`, ``[D, D]``."""
    out, J = _output_jacobians(model, loss_func, X, y)
    lam = _loss_hessians(loss_func, out, y)
    R = reduction_factor(loss_func, X.shape[0])
    return R * torch.einsum("ncd,nce,nef->df", J, lam, J)


def dense_ef(model: nn.Module, loss_func: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    r"""Empirical Fisher :math:`R \sum_n \nabla\ell_n \nabla\ell_n^\top`, ``[D, D]``."""
    R = reduction_factor(loss_func, X.shape[0])
    g = torch.cat([pg.flatten(1) for pg in per_example_grads(model, loss_func, X, y)], dim=1) / R
    return R * g.T @ g


def per_example_grads(model: nn.Module, loss_func: nn.Module, X: Tensor, y: Tensor) -> list[Tensor]:
    r"""Per-example gradients :math:`R \nabla_\theta \ell_n`, one ``[N, *p.shape]`` per param.

    They sum over ``n`` to the gradient of the batch loss.
    """
    theta0, output = _flat_loss_fn(model, loss_func, X, y)
    R = reduction_factor(loss_func, X.shape[0])

    def loss_n(t, x, yy):
        return loss_func(output(t, x[None]), yy[None])

    g = vmap(torch.func.grad(loss_n), in_dims=(None, 0, 0))(theta0, X, y) * R
    params = trainable_params(model)
    return [
        t.reshape(-1, *p.shape) for t, p in zip(g.split([p.numel() for p in params], 1), params)
    ]


def dense_grad(model: nn.Module, loss_func: nn.Module, X: Tensor, y: Tensor) -> list[Tensor]:
    """Gradient of the batch loss by plain autograd (no ``.grad`` touched)."""
    return list(torch.autograd.grad(loss_func(model(X), y), trainable_params(model)))


# -- Kronecker factors by explicit loops ----------------------------------------------


def _patches(module: nn.Module, x: Tensor) -> Tensor:
    """Patches ``[T, C_in * prod(kernel)]`` of one example ``x`` (``[C_in, *spatial]``).

    Explicit slicing (no ``unfold``), row order ``(c, k...)`` like ``weight[o].flatten()``.
    """
    if isinstance(module, nn.Conv1d):
        x = x[:, None]
        k, s = (1, module.kernel_size[0]), (1, module.stride[0])
        p, d = (0, module.padding[0]), (1, module.dilation[0])
    else:
        k, s, p, d = module.kernel_size, module.stride, module.padding, module.dilation
    x = F.pad(x, (p[1], p[1], p[0], p[0]))
    H, W = x.shape[1:]
    Ho = (H - d[0] * (k[0] - 1) - 1) // s[0] + 1
    Wo = (W - d[1] * (k[1] - 1) - 1) // s[1] + 1
    rows = []
    for i in range(Ho):
        for j in range(Wo):
            hs, ws = i * s[0], j * s[1]
            patch = x[
                :, hs : hs + d[0] * (k[0] - 1) + 1 : d[0], ws : ws + d[1] * (k[1] - 1) + 1 : d[1]
            ]
            rows.append(patch.flatten())
    return torch.stack(rows)


def _layer_io_jacobians(model: nn.Module, x: Tensor):
    """Forward one example; inputs of the param layers and Jacobians ``d f / d z_l``.

    Returns:
        ``(inputs, jacs, out)``: per param layer the input (without batch dim) and the
        Jacobian ``[C, *z_l.shape]`` of the output w.r.t. the layer output ``z_l``.
    """
    players = {id(m) for _, m in param_layers(model)}
    h = x[None]
    inputs, zs = [], []
    for _, m in flatten_sequential(model):
        if id(m) in players:
            inputs.append(h.detach()[0])
            h = m(h.detach() if not zs else h)
            zs.append(h)
        else:
            h = m(h.clone() if getattr(m, "inplace", False) else h)
    out = h[0]
    jac_rows = [
        torch.autograd.grad(out[c], zs, retain_graph=True, allow_unused=True)
        for c in range(out.numel())
    ]
    jacs = [torch.stack([row[k][0] for row in jac_rows]) for k in range(len(zs))]
    return inputs, jacs, out.detach()


def brute_force_factors(
    model: nn.Module,
    loss_func: nn.Module,
    X: Tensor,
    y: Tensor,
    kind: str = "kflr",
    kfac_approx: str = "expand",
    separate_bias: bool = False,
) -> list[dict[str, Tensor | None]]:
    r"""Kronecker factors by an explicit per-example loop (``records.py`` conventions).

    ``G = (1/N) sum_n J_n^T Q_n J_n`` with ``Q_n = Lambda_n`` (``"kflr"``) or
    ``g_n g_n^T`` (``"empirical"``), ``J_n = d f_n / d z_l``; conv "expand" averages
    ``J_{n,t}^T Q J_{n,t}`` over locations, "reduce" uses ``sum_t J_{n,t}``. Cross
    factors (Linear pairs only) ``A_{li,li+1} = R sum_n a^(li) a^(li+1)^T``,
    ``G_{li,li+1} = (1/N) sum_n J_{n,li}^T Q_n J_{n,li+1}``.

    Returns:
        One dict per param layer with ``"A"``, ``"G"``, ``"cross_A"``, ``"cross_G"``
        (``None`` where there is no cross factor).
    """
    N = X.shape[0]
    R = reduction_factor(loss_func, N)
    layers = [m for _, m in param_layers(model)]
    res = [{"A": 0.0, "G": 0.0, "cross_A": None, "cross_G": None} for _ in layers]
    joint = [(m.bias is not None and m.bias.requires_grad) and not separate_bias for m in layers]
    for n in range(N):
        inputs, jacs, out = _layer_io_jacobians(model, X[n])
        if kind == "kflr":
            Q = hessian(lambda f, yy=y[n]: loss_func(f[None], yy[None]))(out)
        elif kind == "empirical":
            g = torch.func.grad(lambda f, yy=y[n]: loss_func(f[None], yy[None]))(out)
            Q = torch.outer(g, g)
        else:
            raise ValueError(kind)
        abar, gmats = [], []
        for li, m in enumerate(layers):
            if isinstance(m, nn.Linear):
                a = inputs[li][None]  # [T=1, in]
                J = jacs[li][:, None]  # [C, T=1, out]
            else:
                a = _patches(m, inputs[li])  # [T, K]
                J = jacs[li].flatten(2).transpose(1, 2)  # [C, T, Cout]
            T = a.shape[0]
            if kfac_approx == "reduce":
                a, J = a.mean(0, keepdim=True), J.sum(1, keepdim=True)
                T = 1
            if joint[li]:
                a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
            res[li]["A"] = res[li]["A"] + R * a.T @ a
            res[li]["G"] = res[li]["G"] + torch.einsum("ctk,cd,dtj->kj", J, Q, J) / (N * T)
            abar.append(a)
            gmats.append(J)
        for li in range(len(layers) - 1):
            if isinstance(layers[li], nn.Linear) and isinstance(layers[li + 1], nn.Linear):
                cA = R * abar[li].T @ abar[li + 1]
                cG = torch.einsum("ck,cd,dj->kj", gmats[li][:, 0], Q, gmats[li + 1][:, 0]) / N
                res[li]["cross_A"] = cA if res[li]["cross_A"] is None else res[li]["cross_A"] + cA
                res[li]["cross_G"] = cG if res[li]["cross_G"] is None else res[li]["cross_G"] + cG
    return res


def kron_block(G: Tensor, A: Tensor) -> Tensor:
    """``G ⊗ A`` (row-major flatten order of ``[out, in]``)."""
    return torch.kron(G.contiguous(), A.contiguous())


# -- comparison -------------------------------------------------------------------------


def assert_allclose_report(
    actual: Tensor, expected: Tensor, rtol: float = 1e-7, atol: float = 1e-10, msg: str = ""
) -> None:
    """``torch.allclose`` with a report of the worst entry on failure.

    Raises:
        AssertionError: On a shape mismatch or if some entry violates
            ``|a - e| <= atol + rtol * |e|``; the message names the worst entry.
    """
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    assert actual.shape == expected.shape, (
        f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    excess = (a - e).abs() - (atol + rtol * e.abs())
    if a.numel() == 0 or excess.max() <= 0:
        return
    idx = int(excess.flatten().argmax())
    pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), a.shape)) if a.dim() else ()
    rel = float((a - e).abs().max() / e.abs().max().clamp_min(1e-300))
    bad = int((excess > 0).sum())
    raise AssertionError(
        f"{msg} mismatch in {bad}/{a.numel()} entries; worst at {pos}: "
        f"actual={a.flatten()[idx].item():.6e} expected={e.flatten()[idx].item():.6e} "
        f"(atol={atol:g}, rtol={rtol:g}); max|diff|/max|expected|={rel:.3e}"
    )


def sqrt_psd(M: Tensor) -> Tensor:
    """A square root ``S`` with ``S S^T = M`` of a symmetric PSD matrix (eigendecomposition)."""
    evals, evecs = torch.linalg.eigh(M)
    return evecs * evals.clamp_min(0).sqrt()


def mc_error_bound(samples: int, scale: float = 1.0) -> float:
    """``scale / sqrt(samples)``: the order of a Monte Carlo estimate's error."""
    return scale / math.sqrt(samples)
