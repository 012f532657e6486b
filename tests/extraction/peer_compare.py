"""Run ``extract`` on one peer setting and compare every quantity with independent references.

References (all float64):

- ``autograd``: dense per-example gradients, the dense GGN (its diagonal and blocks) and
  the dense empirical Fisher by ``torch.func`` (``tests/reference.py``);
- ``backpack``: BackPACK's own extensions (``BatchGrad``, ``DiagGGNExact``, ``KFLR``) on
  a deep copy of the model and loss (``extend`` never touches the model ``extract``
  gets);
- ``loops``: cross factors of ``Linear`` chains by the explicit per-example loop of
  ``tests/reference.py`` (``brute_force_factors``, autograd Jacobians per example);
- ``curvlinops``: ``KFACLinearOperator`` (``fisher_type`` "type-2"/"empirical",
  ``kfac_approx`` "expand"/"reduce") on the ``Linear``/``Conv2d`` layers.

Outputs with extra axes (``[N, C, d...]`` cross-entropy, ``[N, ..., C]`` MSE/BCE): the
GGN is taken over the whole flattened output (:func:`_dense_ggn_whole_output`);
``kflr`` spans all positions with one square-root column per class (curvlinops' type-2
convention, not the exact GGN where a layer feeds several positions), so it is compared
with curvlinops and, on dense blocks, with :func:`_shared_root_ggn`; ``kfac`` (labels
independent per position) with curvlinops' MC K-FAC and the exact GGN of dense blocks;
the empirical factor with curvlinops' divided by ``T`` or ``T·C``
(:meth:`References.empirical_scale`).

Each comparison is one :class:`Row`. ``status``: ``"ok"`` (agrees), ``"mismatch"``,
``"crash"`` (``extract`` raised something that is not a ``CurvkitError``),
``"refused"`` (a ``CurvkitError``; whether it is expected is the caller's table),
``"peer_failed"`` (the reference itself raised: the peer's failure, not curvkit's),
``"unchecked"`` (computed, but no reference applies to these layers), ``"differs"``
(a difference listed in :data:`KNOWN_DIFFERENCES`, which the peers share).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import hessian, jacrev

from curvkit.errors import CurvkitError
from curvkit.extraction import extract
from curvkit.extraction.engine import choose_backend
from tests.extraction.peer_cases import PeerSetting, build
from tests.reference import (
    _flat_loss_fn,
    brute_force_factors,
    dense_ef,
    dense_ggn,
    flatten_sequential,
    joint_permutation,
    kron_block,
    per_example_grads,
)

#: Quantity groups, one ``extract`` call each (``cross`` comes with ``kflr``).
QUANTITIES = ("batch_grad", "diag_ggn", "diag_ggn_mc", "kfac", "kflr", "empirical", "cross")
RTOL = 1e-8
#: Monte Carlo samples and the relative error allowed against the exact value.
MC_SAMPLES, MC_RTOL = 500, 0.3
#: curvlinops' Monte Carlo samples where its MC K-FAC is the reference of ``kfac``.
CL_MC_SAMPLES = 5000
#: ``(setting, quantity) -> reason`` where curvkit is known to differ from the reference
#: with the peers doing the same (status ``"differs"``).
KNOWN_DIFFERENCES = {
    ("cl-batchnorm-train", "kfac"): (
        "a train-mode BatchNorm mixes examples: the square-root rows behind kflr share "
        "their column over all examples (cross-example terms S_n S_m^T), the Monte Carlo "
        "labels are independent per example (no such terms), so kfac does not estimate "
        "kflr for the layer before the BatchNorm (about 50 times larger in norm); curvlinops' "
        "type-2 and MC K-FAC differ the same way (kflr equals curvlinops' type-2 there)"
    ),
}
#: Layer types whose ``G ⊗ A`` BackPACK's ``KFLR`` defines the same way (weights).
_BACKPACK_KFLR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class Row:
    """One comparison: a quantity of one setting on one backend against one reference."""

    setting: str
    backend: str
    quantity: str
    reference: str
    status: str
    detail: str = ""


class _DictInput(nn.Module):
    """Tensor-input view of a model that takes ``{"x": X}`` (shares its parameters)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model({"x": x})


class _GroupsAsConv2d(nn.Module):
    """A ``Conv1d``/``Conv2d`` (any ``groups``) as one ``Conv2d`` (``groups=1``) per group.

    A ``Conv1d`` acts on ``[N, C, 1, L]`` with kernel ``(1, k)`` (same patches); group
    ``j`` convolves input channels ``j·i … (j+1)·i − 1`` into output channels
    ``j·o … (j+1)·o − 1`` with the rows ``j·o …`` of the weight.
    """

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.one_d = isinstance(conv, nn.Conv1d)
        lift = (lambda t: (1, t[0])) if self.one_d else tuple
        pad = (0, conv.padding[0]) if self.one_d else conv.padding
        g = conv.groups
        o, i = conv.out_channels // g, conv.in_channels // g
        self.i = i
        self.convs = nn.ModuleList()
        for j in range(g):
            c = nn.Conv2d(
                i, o, lift(conv.kernel_size), stride=lift(conv.stride), padding=pad,
                dilation=lift(conv.dilation), bias=conv.bias is not None,
            )  # fmt: skip
            w = conv.weight.detach()[j * o : (j + 1) * o]
            c.weight.data = (w[:, :, None] if self.one_d else w).clone()
            if conv.bias is not None:
                c.bias.data = conv.bias.detach()[j * o : (j + 1) * o].clone()
            self.convs.append(c)

    def forward(self, x):
        x = x[:, :, None] if self.one_d else x
        out = torch.cat(
            [c(x[:, j * self.i : (j + 1) * self.i]) for j, c in enumerate(self.convs)], dim=1
        )
        return out[:, :, 0] if self.one_d else out


class _TransposedAsConv2d(nn.Module):
    """A ``ConvTranspose1d/2d`` as ``Conv2d`` (one per group) on the stride-dilated input.

    The input gets ``stride − 1`` zeros between entries and ``dilation·(k − 1) −
    padding`` zeros on each side (plus ``output_padding`` at the end); group ``j`` is
    then a stride-1 convolution with ``W'_j[o, i, κ] = W[j·C_in/g + i, o, κmax − κ]``
    (docs/conventions.md).
    """

    def __init__(self, ct: nn.Module):
        super().__init__()
        self.one_d = isinstance(ct, nn.ConvTranspose1d)
        self.ct_stride, self.ct_padding = ct.stride, ct.padding
        self.ct_dilation, self.ct_output_padding = ct.dilation, ct.output_padding
        self.ct_kernel = ct.kernel_size
        lift = (lambda t: (1, t[0])) if self.one_d else tuple
        g = ct.groups
        W = ct.weight.detach()
        self.i = W.shape[0] // g
        o = W.shape[1]
        self.convs = nn.ModuleList()
        for j in range(g):
            w = W[j * self.i : (j + 1) * self.i].transpose(0, 1).flip(dims=tuple(range(2, W.dim())))
            c = nn.Conv2d(self.i, o, lift(ct.kernel_size), dilation=lift(ct.dilation),
                          bias=ct.bias is not None)  # fmt: skip
            c.weight.data = (w[:, :, None] if self.one_d else w).clone()
            if ct.bias is not None:
                c.bias.data = ct.bias.detach()[j * o : (j + 1) * o].clone()
            self.convs.append(c)

    def forward(self, x):
        d = x.dim() - 2
        s, k, dil = self.ct_stride, self.ct_kernel, self.ct_dilation
        z = x.new_zeros(*x.shape[:2], *[(n - 1) * s[i] + 1 for i, n in enumerate(x.shape[2:])])
        z[(slice(None), slice(None)) + tuple(slice(None, None, s[i]) for i in range(d))] = x
        pads = []
        for i in reversed(range(d)):
            lo = dil[i] * (k[i] - 1) - self.ct_padding[i]
            pads += [lo, lo + self.ct_output_padding[i]]
        z = nn.functional.pad(z, pads)
        z = z[:, :, None] if self.one_d else z
        out = torch.cat(
            [c(z[:, j * self.i : (j + 1) * self.i]) for j, c in enumerate(self.convs)], dim=1
        )
        return out[:, :, 0] if self.one_d else out


class _OneHotLinear(nn.Module):
    """``Embedding`` written as a bias-free ``Linear`` (weight ``E^T``) on one-hot inputs."""

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        self.num = emb.num_embeddings
        self.linear = nn.Linear(self.num, emb.embedding_dim, bias=False)
        self.linear.weight.data = emb.weight.detach().T.clone()

    def forward(self, x):
        return self.linear(nn.functional.one_hot(x, self.num).to(self.linear.weight.dtype))


def _needs_split(m: nn.Module) -> bool:
    """A conv layer curvlinops covers through an equivalent ``Conv2d`` (zero padding)."""
    return (
        (
            type(m) in (nn.Conv1d, nn.ConvTranspose1d, nn.ConvTranspose2d)
            or (type(m) is nn.Conv2d and m.groups > 1)
        )
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
    )


def _close(a: Tensor, b: Tensor) -> str | None:
    """``None`` if ``a`` and ``b`` agree to :data:`RTOL` (scaled to ``b``), else a message."""
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    a, b = a.detach().double(), b.detach().double()
    scale = float(b.abs().max()) if b.numel() else 0.0
    err = float((a - b).abs().max()) if b.numel() else 0.0
    if not (err <= RTOL * scale + 1e-14):
        return f"max|diff| {err:.3e}, max|ref| {scale:.3e}"
    return None


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def backends(setting: PeerSetting) -> list[str]:
    """``["auto"]``, plus ``"graph"`` when ``auto`` takes the sweep for this setting."""
    model, _, X, _ = build(setting)
    return ["auto", "graph"] if choose_backend(model, X, ("kflr",)) == "sweep" else ["auto"]


class References:
    """Lazily computed references of one setting (shared by its backends)."""

    def __init__(self, setting: PeerSetting):
        self.setting = setting
        self.model, self.loss_func, self.X, self.y = build(setting)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.index = {id(p): i for i, p in enumerate(self.params)}
        offsets = [0]
        for p in self.params:
            offsets.append(offsets[-1] + p.numel())
        self.offsets = offsets
        self._cache = {}
        self.N = self._n()
        #: Whether ``backend="auto"`` takes the sweep (KFRA is compared there only).
        self.sweep = (
            isinstance(self.X, Tensor) and choose_backend(self.model, self.X, ("kflr",)) == "sweep"
        )

    def _n(self) -> int:
        with torch.no_grad():
            out = self.model(self.X)
        self.out_shape = tuple(out.shape)
        #: Whether the output keeps axes beyond ``[N, C]`` (positions).
        self.extra_axes = out.dim() > 2
        return int(out.shape[0])

    def _tensor_model(self):
        """A copy for the dense references: tensor input, BatchNorm buffers not updated.

        (``torch.func`` transforms refuse the in-place running-statistics update of a
        train-mode BatchNorm; without tracking it normalises with the same batch
        statistics.)
        """
        model = copy.deepcopy(self.model)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                m.track_running_stats = False
        if isinstance(self.X, dict):
            return _DictInput(model), self.X["x"]
        return model, self.X

    def empirical_scale(self) -> float:
        """curvlinops' empirical K-FAC over ours: ``T`` (CE "mean"), ``T·C`` (MSE/BCE "mean").

        ``T`` is the number of positions per example (``1`` for ``[N, C]`` outputs), ``C``
        the number of classes/features; ``1`` for ``"sum"``.
        """
        if self.loss_func.reduction != "mean":
            return 1.0
        shape = self.out_shape
        if isinstance(self.loss_func, nn.CrossEntropyLoss):
            return float(math.prod(shape[2:]))  # [N, C, d1, ..., dK]: T
        return float(math.prod(shape[1:]))  # [N, d1, ..., dK, C]: T·C

    def _cached(self, key, fn):
        if key not in self._cache:
            try:
                self._cache[key] = (fn(), None)
            except Exception as e:  # noqa: BLE001 - a reference that fails is recorded
                self._cache[key] = (None, _err(e))
        return self._cache[key]

    # -- autograd --------------------------------------------------------------------
    def batch_grad(self):
        m, X = self._tensor_model()
        return self._cached("bg", lambda: per_example_grads(m, self.loss_func, X, self.y))

    def ggn(self):
        m, X = self._tensor_model()
        if len(self.out_shape) > 2:
            return self._cached(
                "ggn", lambda: _dense_ggn_whole_output(m, self.loss_func, X, self.y)
            )
        return self._cached("ggn", lambda: dense_ggn(m, self.loss_func, X, self.y))

    def shared_root_ggn(self):
        """:func:`_shared_root_ggn`: ``kflr``'s convention on outputs with positions."""
        m, X = self._tensor_model()
        return self._cached("sggn", lambda: _shared_root_ggn(m, self.loss_func, X, self.y))

    def ef(self):
        m, X = self._tensor_model()
        return self._cached("ef", lambda: dense_ef(m, self.loss_func, X, self.y))

    # -- BackPACK --------------------------------------------------------------------
    def backpack(self, what: str):
        """``{"batch_grad": [...], "diag_ggn": [...]}`` or ``{"kflr": [...]}`` per param."""
        return self._cached(("bp", what), lambda: self._run_backpack(what))

    def _run_backpack(self, what: str):
        from backpack import backpack, extend
        from backpack.extensions import KFLR, BatchGrad, DiagGGNExact

        model, loss_func = copy.deepcopy(self.model), copy.deepcopy(self.loss_func)
        custom = not isinstance(model, nn.Sequential) and any(True for _ in model.children())
        model = extend(model, use_converter=custom)
        loss_func = extend(loss_func)
        from backpack.extensions import KFRA

        exts = {"first": (BatchGrad(), DiagGGNExact()), "kflr": (KFLR(),), "kfra": (KFRA(),)}[what]
        with backpack(*exts):
            loss_func(model(self.X), self.y).backward()
        params = [p for p in model.parameters() if p.requires_grad]
        if what == "first":
            return {
                "batch_grad": [p.grad_batch for p in params],
                "diag_ggn": [p.diag_ggn_exact for p in params],
            }
        return {what: [getattr(p, what) for p in params]}

    # -- curvlinops ------------------------------------------------------------------
    def curvlinops(self, params: list[Tensor], fisher_type: str, approx: str):
        """curvlinops' K-FAC over ``params`` (on a deep copy: a failing run leaves hooks)."""
        key = ("cl", fisher_type, approx, tuple(id(p) for p in params))
        return self._cached(key, lambda: self._run_curvlinops(params, fisher_type, approx))

    def _run_curvlinops(self, params, fisher_type, approx):
        from curvlinops import KFACLinearOperator

        model = copy.deepcopy(self.model)
        copied = [p for p in model.parameters() if p.requires_grad]
        params = [copied[self.index[id(p)]] for p in params]
        mc = {"mc_samples": CL_MC_SAMPLES, "seed": 1} if fisher_type == "mc" else {}
        K = KFACLinearOperator(
            model, self.loss_func, params, [(self.X, self.y)], fisher_type=fisher_type,
            kfac_approx=approx, separate_weight_and_bias=True, check_deterministic=False,
            batch_size_fn=(lambda X: X["x"].shape[0]) if isinstance(self.X, dict) else None,
            **mc,
        )  # fmt: skip
        return K @ torch.eye(K.shape[0], dtype=torch.float64)

    def curvlinops_one_hot(self, fisher_type: str):
        """curvlinops' K-FAC ("expand") of each ``Embedding`` as a ``Linear`` on one-hot inputs.

        Returns:
            ``{id(embedding weight): dense block over the row-major Linear weight
            [dim, num_embeddings]}``.
        """
        return self._cached(("cl-onehot", fisher_type), lambda: self._run_one_hot(fisher_type))

    def _run_one_hot(self, fisher_type):
        from curvlinops import KFACLinearOperator

        model = copy.deepcopy(self.model)
        originals = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        swapped = {}
        for name, m in list(model.named_modules()):
            for child_name, child in list(m.named_children()):
                if type(child) is nn.Embedding:
                    lin = _OneHotLinear(child)
                    setattr(m, child_name, lin)
                    prefix = f"{name}.{child_name}" if name else child_name
                    swapped[id(originals[f"{prefix}.weight"])] = lin.linear.weight
        params = list(swapped.values())
        K = KFACLinearOperator(
            model, self.loss_func, params, [(self.X, self.y)], fisher_type=fisher_type,
            kfac_approx="expand", separate_weight_and_bias=True, check_deterministic=False,
        )  # fmt: skip
        dense = K @ torch.eye(K.shape[0], dtype=torch.float64)
        out, off = {}, 0
        for key, w in swapped.items():
            out[key] = dense[off : off + w.numel(), off : off + w.numel()]
            off += w.numel()
        return out

    def curvlinops_conv(self, fisher_type: str, approx: str):
        """curvlinops' K-FAC of each ``Conv1d`` and grouped ``Conv2d`` via :class:`_GroupsAsConv2d`.

        Returns:
            ``{id(original weight): [(weight block, bias block or None) per group]}``.
        """
        key = ("cl-conv", fisher_type, approx)
        return self._cached(key, lambda: self._run_conv(fisher_type, approx))

    def _run_conv(self, fisher_type, approx):
        from curvlinops import KFACLinearOperator

        model = copy.deepcopy(self.model)
        originals = dict(self.model.named_parameters())
        swapped = {}
        for name, m in list(model.named_modules()):
            for child_name, child in list(m.named_children()):
                if _needs_split(child) and child.weight.requires_grad:
                    eq = (
                        _TransposedAsConv2d(child)
                        if isinstance(child, (nn.ConvTranspose1d, nn.ConvTranspose2d))
                        else _GroupsAsConv2d(child)
                    )
                    setattr(m, child_name, eq)
                    prefix = f"{name}.{child_name}" if name else child_name
                    swapped[id(originals[f"{prefix}.weight"])] = list(eq.convs)
        params = [p for convs in swapped.values() for c in convs for p in c.parameters()]
        K = KFACLinearOperator(
            model, self.loss_func, params, [(self.X, self.y)], fisher_type=fisher_type,
            kfac_approx=approx, separate_weight_and_bias=True, check_deterministic=False,
        )  # fmt: skip
        dense = K @ torch.eye(K.shape[0], dtype=torch.float64)
        out, off = {}, 0
        for key, convs in swapped.items():
            out[key] = []
            for c in convs:
                nw = c.weight.numel()
                W = dense[off : off + nw, off : off + nw]
                off += nw
                B = None
                if c.bias is not None:
                    nb = c.bias.numel()
                    B = dense[off : off + nb, off : off + nb]
                    off += nb
                out[key].append((W, B))
        return out

    # -- flat indices ----------------------------------------------------------------
    def flat(self, p: Tensor) -> Tensor:
        i = self.index[id(p)]
        return torch.arange(self.offsets[i], self.offsets[i + 1])

    def joint(self, rec) -> Tensor:
        """Flat indices of a record's ``[W | b]`` in joint row-major order."""
        base = torch.cat([self.flat(p) for p in rec.params])
        return base[joint_permutation(rec.out_features, rec.in_features, rec.joint)]


def _dense_ggn_whole_output(model: nn.Module, loss_func: nn.Module, X: Tensor, y: Tensor):
    r"""Exact GGN :math:`J^\top (\nabla^2_f L) J` over the whole output ``f``, ``[D, D]``.

    ``J`` is the Jacobian of the full output (all examples, all positions, flattened) and
    ``\nabla^2_f L`` the Hessian of the reduced batch loss with respect to it: no per-example
    or per-position split, so it holds for any output layout (``[N, C, d...]`` with
    cross-entropy, ``[N, ..., C]`` with MSE/BCE) and any reduction.
    """
    theta0, output = _flat_loss_fn(model, loss_func, X, y)
    out = output(theta0, X).detach()
    J = jacrev(lambda t: output(t, X))(theta0).reshape(out.numel(), -1)
    H = hessian(lambda f: loss_func(f.reshape(out.shape), y))(out.flatten())
    return J.T @ H @ J


def _shared_root_ggn(model: nn.Module, loss_func: nn.Module, X: Tensor, y: Tensor):
    r"""curvlinops' type-2 convention on outputs with positions, as a dense ``[D, D]`` matrix.

    :math:`\sum_n \sum_c v_{nc} v_{nc}^\top` with
    :math:`v_{nc} = \sum_t \sqrt{\kappa} J_{nt}^\top S_{nt} e_c`: one column per class
    spanning all positions ``t`` of example ``n`` at once. ``J_{nt}`` is the autograd
    Jacobian of position ``t``'s ``C`` outputs, ``S_{nt}`` the loss Hessian's square root
    whose columns are the rows of curvlinops' ``loss_hessian_matrix_sqrt`` (cross-entropy
    :math:`\mathrm{diag}(\sqrt p) - p \sqrt p^\top`, column ``c`` is
    :math:`\sqrt{p_c}(e_c - p)`; MSE :math:`\sqrt 2 I`; BCE
    :math:`\mathrm{diag}(\sqrt{\sigma(1-\sigma)})`), and ``κ`` the reduction's weight of one
    position's loss: ``1/(N·T)`` (cross-entropy "mean"), ``1/(N·T·C)`` (MSE/BCE "mean"),
    ``1`` ("sum"). Without positions (``T = 1``) it is the exact GGN; with them it keeps
    the cross terms :math:`S_{nt} S_{nt'}^\top` that the exact GGN lacks. It is the
    dense-block analogue of ``kflr`` (docs/conventions.md), which has no curvlinops
    reference on normalisation layers.
    """
    theta0, output = _flat_loss_fn(model, loss_func, X, y)
    out = output(theta0, X).detach()
    J = jacrev(lambda t: output(t, X))(theta0)  # [N, *out, D]
    N, D = out.shape[0], theta0.numel()
    if isinstance(loss_func, nn.CrossEntropyLoss):
        C = out.shape[1]
        f = out.movedim(1, -1).reshape(N, -1, C)  # [N, T, C]
        J = J.movedim(1, -2).reshape(N, -1, C, D)
        p = f.softmax(-1)
        # column c: the transpose of row c of curvlinops' diag(√p) − √p pᵀ, √p_c (e_c − p)
        S = torch.diag_embed(p.sqrt()) - p[..., :, None] * p.sqrt()[..., None, :]
    else:
        C = out.shape[-1]
        f = out.reshape(N, -1, C)
        J = J.reshape(N, -1, C, D)
        if isinstance(loss_func, nn.MSELoss):
            S = torch.diag_embed(torch.full_like(f, 2.0).sqrt())
        else:
            sig = f.sigmoid()
            S = torch.diag_embed((sig * (1 - sig)).sqrt())
    T = f.shape[1]
    mean = loss_func.reduction == "mean"
    kappa = 1.0 / (N * T) if isinstance(loss_func, nn.CrossEntropyLoss) else 1.0 / (N * T * C)
    kappa = kappa if mean else 1.0
    v = math.sqrt(kappa) * torch.einsum("ntkd,ntkc->ncd", J, S)  # [N, C, D]
    return torch.einsum("ncd,nce->de", v, v)


def _per_param(rec, got: list[Tensor], ref_all: list[Tensor], refs: References) -> str | None:
    for p, g in zip(rec.params, got):
        msg = _close(g, ref_all[refs.index[id(p)]])
        if msg:
            return f"{rec.name}: {msg}"
    return None


def _shares_weights(rec, refs: References, R: float) -> bool:
    """Whether the layer's weight is shared over locations (conv, Linear on [N, ..., in])."""
    return not (
        isinstance(rec.module, nn.Linear) and abs(rec.bias_scale - R * refs.N) < 1e-12 * R * refs.N
    )


class Runner:
    """Rows of one setting on one backend."""

    def __init__(self, setting: PeerSetting, backend: str, refs: References | None = None):
        self.setting, self.backend = setting, backend
        self.refs = refs or References(setting)
        self.rows: list[Row] = []
        self.recs = {}

    def row(self, quantity, reference, status, detail=""):
        self.rows.append(Row(self.setting.id, self.backend, quantity, reference, status, detail))

    def extract(self, quantity, quantities, **kw):
        r = self.refs
        try:
            model, loss_func, X, y = r.model, r.loss_func, r.X, r.y
            for p in model.parameters():
                p.grad = None
            return extract(model, loss_func, X, y, quantities, backend=self.backend, **kw)
        except CurvkitError as e:
            self.row(quantity, "-", "refused", _err(e))
        except Exception as e:  # noqa: BLE001 - a crash is what the table records
            self.row(quantity, "-", "crash", _err(e))
        return None

    def compare(self, quantity, reference, ref_result, check) -> None:
        value, failure = ref_result
        if failure is not None:
            # a peer's failure is the peer's; a failing dense reference is a bug here
            peer = reference in ("backpack", "curvlinops")
            self.row(quantity, reference, "peer_failed" if peer else "crash", failure)
            return
        try:
            msg = check(value)
        except Exception as e:  # noqa: BLE001 - the comparison itself broke: a crash
            self.row(quantity, reference, "crash", f"comparison: {_err(e)}")
            return
        if msg == "n/a":
            return
        self.row(quantity, reference, "mismatch" if msg else "ok", msg or "")

    # -- quantities ------------------------------------------------------------------
    def run(self) -> list[Row]:
        self.first_order("batch_grad")
        self.first_order("diag_ggn")
        self.monte_carlo("diag_ggn_mc")
        self.monte_carlo("kfac")
        covered = {approx: self.kron(approx) for approx in ("expand", "reduce")}
        if all(c is not None for c in covered.values()):
            by_backpack = self.backpack_kflr()
            embedding = self.embedding_always_expand()
            if covered["reduce"] is not False:
                covered["reduce"] |= embedding
            for approx, names in covered.items():
                if names is False:
                    continue  # "reduce" without weight sharing: the same as "expand"
                # BackPACK's check covers the product G_reduce ⊗ A_expand, not each variant
                missing = [
                    x.name
                    + (" (BackPACK: G_reduce ⊗ A_expand only)" if x.name in by_backpack else "")
                    for x in self.recs[approx]
                    if x.name not in names
                ]
                if missing:
                    self.row(f"kflr/{approx}", "none", "unchecked", ", ".join(missing))
        self.cross()
        if self.backend == "auto" and self.refs.sweep:
            self.kfra()
        return self.rows

    def first_order(self, q: str) -> None:
        rec = self.extract(q, (q,))
        if rec is None:
            return
        r = self.refs
        ref_auto = r.batch_grad() if q == "batch_grad" else r.ggn()

        def with_dense(value):
            if q == "diag_ggn":
                d = value.diagonal()
                value = [d[r.flat(p)].reshape(p.shape) for p in r.params]
            return self.all_layers(rec, q, value)

        self.compare(q, "autograd", ref_auto, with_dense)
        self.compare(q, "backpack", r.backpack("first"), lambda v: self.all_layers(rec, q, v[q]))
        if q == "batch_grad":
            grads = [p.grad for p in r.params]

            def check_grad(per_example):
                for p, g, ref in zip(r.params, grads, per_example):
                    msg = "no .grad" if g is None else _close(g, ref.sum(0))
                    if msg:
                        return f"{tuple(p.shape)}: {msg}"
                return None

            self.compare("grad", "autograd", ref_auto, check_grad)

    def all_layers(self, rec, q, ref_all) -> str | None:
        for layer in rec:
            msg = _per_param(layer, getattr(layer, q), ref_all, self.refs)
            if msg:
                return msg
        return None

    def monte_carlo(self, q: str) -> None:
        """``kfac``/``diag_ggn_mc``: shapes, and ``MC_SAMPLES`` samples near the exact value.

        The exact value is this backend's ``kflr``/``diag_ggn`` (itself compared with the
        references); with a fixed generator the check is deterministic. The relative
        Frobenius error of an unbiased estimate is ``O(1/sqrt(M))`` (below 0.2 on every
        setting at ``M = 500``); a mis-scaled sampler (a missing factor 2 or ``C``) is far
        above :data:`MC_RTOL`.
        """
        exact_q = {"kfac": "kflr", "diag_ggn_mc": "diag_ggn"}[q]
        gen = torch.Generator().manual_seed(0)
        rec = self.extract(q, (q,), mc_samples=MC_SAMPLES, generator=gen)
        if rec is None:
            return
        bad = []
        for layer in rec:
            if q == "diag_ggn_mc":
                ok = [t.shape == p.shape for t, p in zip(layer.diag_ggn_mc, layer.params)]
                ok += [bool(torch.isfinite(t).all() and (t >= 0).all()) for t in layer.diag_ggn_mc]
            elif layer.block == "dense":
                D = layer.numel
                ok = [layer.dense["kfac"].shape == (D, D)]
            else:
                G = layer.G["kfac"]
                ok = [G.shape[-1] == G.shape[-2], bool(torch.isfinite(G).all())]
                ok.append(bool(torch.allclose(G, G.transpose(-1, -2))))
            if not all(ok):
                bad.append(layer.name)
        self.row(q, "shape", "mismatch" if bad else "ok", ", ".join(bad))
        if q == "kfac" and self.refs.extra_axes:
            self.kfac_positions()
            return
        exact = self.extract(q, (exact_q,))
        if exact is None:
            return
        worst, where = 0.0, ""
        for a, b in zip(rec, exact):
            if q == "diag_ggn_mc":
                x = torch.cat([t.flatten() for t in a.diag_ggn_mc])
                y = torch.cat([t.flatten() for t in b.diag_ggn])
            elif a.block == "dense":
                x, y = a.dense["kfac"], b.dense["kflr"]
            else:
                x, y = a.G["kfac"], b.G["kflr"]
            err = float((x - y).norm() / y.norm()) if float(y.norm()) > 0 else float(x.norm())
            if err > worst:
                worst, where = err, a.name
        status = "ok" if worst <= MC_RTOL else "mismatch"
        if status == "mismatch" and (self.setting.id, q) in KNOWN_DIFFERENCES:
            status = "differs"
        self.row(q, f"{exact_q} (M={MC_SAMPLES})", status, f"{where}: rel. error {worst:.3f}")

    def kfac_positions(self) -> None:
        """``kfac`` on outputs with extra axes, against what it estimates.

        Its labels are drawn independently at every position, so the cross terms between
        positions that ``kflr``'s shared square root keeps (docs/conventions.md) vanish in
        expectation: ``kfac`` is not an estimate of ``kflr`` where a layer feeds several
        positions. It is unbiased for the exact GGN block of a dense (normalisation) layer,
        compared with the autograd GGN, and for curvlinops' Monte Carlo K-FAC (labels drawn
        per position of the flattened ``[N·T, C]`` output) on ``Linear``/``Conv2d``,
        compared with ``CL_MC_SAMPLES`` of curvlinops' samples.
        """
        r = self.refs
        gen = torch.Generator().manual_seed(0)
        rec = self.extract("kfac", ("kfac",), mc_samples=MC_SAMPLES, generator=gen,
                           separate_bias=True)  # fmt: skip
        if rec is None:
            return
        ref = f"kfac (M={MC_SAMPLES})"

        def rel(x, y):
            return float((x - y).norm() / y.norm()) if float(y.norm()) > 0 else float(x.norm())

        def verdict(worst, where):
            return ("ok" if worst <= MC_RTOL else "mismatch"), f"{where}: rel. error {worst:.3f}"

        dense = [layer for layer in rec if layer.block == "dense"]
        if dense:

            def check_dense(ggn):
                worst, where = 0.0, ""
                for layer in dense:
                    idx = torch.cat([r.flat(p) for p in layer.params])
                    err = rel(layer.dense["kfac"], ggn[idx][:, idx])
                    if err > worst:
                        worst, where = err, layer.name
                status, detail = verdict(worst, where)
                return None if status == "ok" else detail

            self.compare("kfac", f"autograd GGN, {ref}", r.ggn(), check_dense)
        cl_layers = [
            layer for layer in rec
            if layer.block == "kron" and type(layer.module) in (nn.Linear, nn.Conv2d)
        ]  # fmt: skip
        if cl_layers:
            params = [p for layer in cl_layers for p in layer.params]

            def check_cl(mat):
                worst, where, off = 0.0, "", 0
                for layer in cl_layers:
                    n_w = layer.params[0].numel()
                    W = mat[off : off + n_w, off : off + n_w]
                    err = rel(kron_block(layer.G["kfac"], layer.A), W)
                    if layer.has_bias:
                        nb = layer.params[1].numel()
                        B = mat[off + n_w : off + n_w + nb, off + n_w : off + n_w + nb]
                        err = max(err, rel(layer.G["kfac"] * layer.bias_scale, B))
                    if err > worst:
                        worst, where = err, layer.name
                    off += layer.numel
                status, detail = verdict(worst, where)
                return None if status == "ok" else detail

            self.compare(
                "kfac", f"curvlinops MC (M={CL_MC_SAMPLES}), {ref}",
                r.curvlinops(params, "mc", "expand"), check_cl,
            )  # fmt: skip
        rest = [layer for layer in rec if layer not in dense and layer not in cl_layers]
        if rest:
            self.row("kfac", "none", "unchecked", ", ".join(x.name for x in rest))

    def kron(self, approx: str) -> set[str] | bool | None:
        """Compare ``kflr``/``empirical`` with ``approx``; the names of the layers compared.

        ``None`` if ``extract`` refused or crashed, ``False`` for "reduce" without weight
        sharing (nothing to compare beyond "expand").
        """
        r = self.refs
        q_tag = f"kflr+empirical/{approx}"
        kinds = ("kflr", "empirical")
        rec = self.extract(q_tag, kinds, separate_bias=True, kfac_approx=approx)
        if rec is None and "'empirical'" in self.rows[-1].detail:
            # empirical refused (examples interact): kflr alone is still defined
            kinds = ("kflr",)
            rec = self.extract(f"kflr/{approx}", kinds, separate_bias=True, kfac_approx=approx)
        if rec is None:
            return None
        R = rec.reduction_factor
        self.recs[approx] = rec
        covered: set[str] = set()
        # weight sharing is read off the "expand" record: a "reduce" record's bias scale is
        # R·N whether or not the layer is applied at several locations
        shares = {
            x.name: _shares_weights(x, r, R)
            for x in self.recs.get("expand", rec)
            if x.block != "dense"
        }
        sharing = any(shares.values())
        if approx == "reduce" and not sharing:
            return False
        # curvlinops' empirical K-FAC with "mean" is ``empirical_scale`` times ours: T
        # (cross-entropy over [N, C, d...], T = d1⋯dK positions) or T·C (MSE/BCE over
        # [N, ..., C]); its gradients are of the loss averaged over examples only, ours of
        # the loss itself (docs/conventions.md, "Outputs with extra dimensions")
        ef_scale = r.empirical_scale()
        # curvlinops on Linear/Conv2d Kronecker records
        cl_layers = [
            layer for layer in rec
            if layer.block == "kron" and type(layer.module) in (nn.Linear, nn.Conv2d)
        ]  # fmt: skip
        if cl_layers:
            params = [p for layer in cl_layers for p in layer.params]
            for fisher, kind in (("type-2", "kflr"), ("empirical", "empirical"))[: len(kinds)]:
                scale = ef_scale if kind == "empirical" else 1.0

                def check(dense, kind=kind, scale=scale):
                    off = 0
                    for layer in cl_layers:
                        n_w = layer.params[0].numel()
                        W = dense[off : off + n_w, off : off + n_w]
                        msg = _close(kron_block(layer.G[kind], layer.A) * scale, W)
                        if msg:
                            return f"{layer.name} weight: {msg}"
                        if layer.has_bias:
                            nb = layer.params[1].numel()
                            B = dense[off + n_w : off + n_w + nb, off + n_w : off + n_w + nb]
                            msg = _close(layer.G[kind] * layer.bias_scale * scale, B)
                            if msg:
                                return f"{layer.name} bias: {msg}"
                        off += layer.numel
                    return None

                self.compare(
                    f"{kind}/{approx}", "curvlinops", r.curvlinops(params, fisher, approx), check
                )
            covered |= {layer.name for layer in cl_layers}
        # Conv1d, grouped Conv2d, ConvTranspose1d/2d: curvlinops on per-group Conv2d equivalents
        split = [
            layer for layer in rec
            if layer.block in ("kron", "kron_grouped", "kron_transposed")
            and _needs_split(layer.module)
        ]  # fmt: skip
        if split:
            for fisher, kind in (("type-2", "kflr"), ("empirical", "empirical"))[: len(kinds)]:
                scale = ef_scale if kind == "empirical" else 1.0

                def check_split(blocks, kind=kind, scale=scale):
                    for layer in split:
                        A, G = layer.A, layer.G[kind]
                        if A.dim() == 2:
                            A, G = A[None], G[None]
                        for j, (W, B) in enumerate(blocks[id(layer.params[0])]):
                            msg = _close(kron_block(G[j], A[j]) * scale, W)
                            if msg is None and B is not None:
                                msg = _close(G[j] * layer.bias_scale * scale, B)
                            if msg:
                                return f"{layer.name} group {j}: {msg}"
                    return None

                self.compare(
                    f"{kind}/{approx}", "curvlinops per-group Conv2d",
                    r.curvlinops_conv(fisher, approx), check_split,
                )  # fmt: skip
            covered |= {layer.name for layer in split}
        # Embedding ("expand" only): curvlinops on the equivalent one-hot Linear, whose
        # weight is the transpose: diag(A_diag) ⊗ G over E equals G ⊗ diag(A_diag) over E^T
        emb = [layer for layer in rec if layer.block == "embedding"]
        if emb and approx == "expand":
            for fisher, kind in (("type-2", "kflr"), ("empirical", "empirical"))[: len(kinds)]:
                scale = ef_scale if kind == "empirical" else 1.0

                def check_emb(blocks, kind=kind, scale=scale):
                    for layer in emb:
                        ref = blocks[id(layer.params[0])]
                        num, dim = layer.params[0].shape
                        perm = torch.arange(dim * num).reshape(dim, num).T.flatten()
                        ours = kron_block(torch.diag(layer.A_diag), layer.G[kind]) * scale
                        msg = _close(ours, ref[perm][:, perm])
                        if msg:
                            return f"{layer.name}: {msg}"
                    return None

                self.compare(
                    f"{kind}/{approx}",
                    "curvlinops one-hot",
                    r.curvlinops_one_hot(fisher),
                    check_emb,
                )
            covered |= {layer.name for layer in emb}
        # exact cases: Linear layers without weight sharing (one example, or deep linear MSE);
        # dense blocks of normalisation layers (no batch statistics) are exact GGN blocks
        exact = [
            layer for layer in rec
            if self.setting.kflr_exact and isinstance(layer.module, nn.Linear)
            and not shares.get(layer.name, True)
        ]  # fmt: skip
        dense_layers = [layer for layer in rec if layer.block == "dense"]
        if exact or dense_layers:

            def check_exact(ggn, kind):
                for layer in exact:
                    idx = torch.cat([r.flat(p) for p in layer.params])
                    block = ggn[idx][:, idx]
                    n_w = layer.params[0].numel()
                    msg = _close(kron_block(layer.G[kind], layer.A), block[:n_w, :n_w])
                    if msg:
                        return f"{layer.name} weight: {msg}"
                    if layer.has_bias:
                        msg = _close(layer.G[kind] * layer.bias_scale, block[n_w:, n_w:])
                        if msg:
                            return f"{layer.name} bias: {msg}"
                for layer in dense_layers:
                    idx = torch.cat([r.flat(p) for p in layer.params])
                    msg = _close(layer.dense[kind], ggn[idx][:, idx])
                    if msg:
                        return f"{layer.name} dense: {msg}"
                return None

            if r.extra_axes:
                # kflr's shared square root spans all positions at once (curvlinops'
                # type-2 convention): not the exact GGN where a layer feeds several
                # positions, so the reference keeps the same cross-position terms
                self.compare(
                    f"kflr/{approx}", "autograd shared-root GGN", r.shared_root_ggn(),
                    lambda g: check_exact(g, "kflr"),
                )  # fmt: skip
            else:
                self.compare(
                    f"kflr/{approx}", "autograd GGN", r.ggn(), lambda g: check_exact(g, "kflr")
                )
            if (r.N == 1 or dense_layers) and "empirical" in kinds:
                self.compare(
                    f"empirical/{approx}", "autograd EF", r.ef(),
                    lambda g: check_exact(g, "empirical"),
                )  # fmt: skip
            covered |= {layer.name for layer in exact + dense_layers}
        return covered

    def embedding_always_expand(self) -> set[str]:
        """``Embedding`` blocks are "expand" whatever ``kfac_approx`` (docs/conventions.md)."""
        pairs = [
            (e, g) for e, g in zip(self.recs["expand"], self.recs["reduce"])
            if e.block == "embedding"
        ]  # fmt: skip
        if not pairs:
            return set()

        def check(_):
            for e, g in pairs:
                for what in ("A_diag", "G"):
                    a, b = getattr(g, what), getattr(e, what)
                    a, b = (a["kflr"], b["kflr"]) if what == "G" else (a, b)
                    msg = _close(a, b)
                    if msg:
                        return f"{e.name} {what}: {msg}"
            return None

        self.compare("kflr/reduce", "expand (Embedding)", (None, None), check)
        return {e.name for e, _ in pairs}

    def backpack_kflr(self) -> set[str]:
        """BackPACK's ``KFLR`` against ``G_reduce ⊗ A_expand`` (weights of Kronecker layers).

        BackPACK's K-FAC for convolutions pairs the "expand" input factor (patches summed
        over locations) with the "reduce" output factor (gradients summed over locations
        before the outer product); for layers without weight sharing both are the same.
        Its bias factor of a convolution is its own convention and is not compared.
        Transposed convolutions: BackPACK's input factor is over the unflipped kernel.
        """
        r = self.refs
        layers = [
            (e, g) for e, g in zip(self.recs["expand"], self.recs["reduce"])
            if (e.block == "kron" and type(e.module) in _BACKPACK_KFLR)
            or (e.block == "kron_transposed" and e.A.dim() == 2)
        ]  # fmt: skip
        if not layers or not isinstance(r.model, nn.Sequential):
            return set()

        def check(v):
            for e, g in layers:
                G, A = v["kflr"][r.index[id(e.params[0])]]
                ours = e.A
                if e.block == "kron_transposed":
                    # our rows (i, κ) are over the flipped kernel W'[o, i, κ] = W[i, o, κmax − κ]
                    W = e.params[0]
                    idx = torch.arange(W.shape[0] * W[0, 0].numel()).reshape(
                        W.shape[0], *W.shape[2:]
                    )
                    perm = idx.flip(dims=tuple(range(1, idx.dim()))).flatten()
                    ours = ours[perm][:, perm]
                msg = _close(kron_block(g.G["kflr"], ours), kron_block(G, A))
                if msg:
                    return f"{e.name} weight: {msg}"
            return None

        self.compare("kflr/backpack-kfc", "backpack", r.backpack("kflr"), check)
        ran = self.rows[-1].reference == "backpack" and self.rows[-1].status == "ok"
        return {e.name for e, _ in layers} if ran else set()

    def kfra(self) -> None:
        """KFRA (sweep only): BackPACK's ``KFRA`` on ``Linear`` weights; exact cases vs the GGN."""
        rec = self.extract("kfra", ("kfra",), separate_bias=True)
        if rec is None:
            return
        r = self.refs
        linear = [x for x in rec if isinstance(x.module, nn.Linear)]

        def check_bp(v):
            for x in linear:
                G, A = v["kfra"][r.index[id(x.params[0])]]
                msg = _close(kron_block(x.G["kfra"], x.A), kron_block(G, A))
                if msg:
                    return f"{x.name} weight: {msg}"
            return None

        self.compare("kfra", "backpack", r.backpack("kfra"), check_bp)
        if self.setting.kflr_exact and linear:

            def check_exact(ggn):
                for x in linear:
                    idx = r.flat(x.params[0])
                    msg = _close(kron_block(x.G["kfra"], x.A), ggn[idx][:, idx])
                    if msg:
                        return f"{x.name} weight: {msg}"
                return None

            self.compare("kfra", "autograd GGN", r.ggn(), check_exact)

    def cross(self) -> None:
        rec = self.extract("cross", ("kflr", "cross"))
        if rec is None:
            return
        r = self.refs
        pairs = [(a, b) for a, b in zip(rec.layers, rec.layers[1:]) if a.cross_A is not None]
        bad = [
            a.name for a, b in pairs
            if a.cross_A.shape != (a.A.shape[0], b.A.shape[0])
            or a.cross_G["kflr"].shape != (a.out_features, b.out_features)
        ]  # fmt: skip
        self.row("cross", "shape", "mismatch" if bad else "ok", ", ".join(bad))
        if pairs and _linear_chain(r):

            def check_loops(_):
                ref = brute_force_factors(r.model, r.loss_func, r.X, r.y, "kflr")
                for i, (a, b) in enumerate(zip(rec.layers, rec.layers[1:])):
                    if a.cross_A is None:
                        continue
                    for what, ours in (("A", a.cross_A), ("G", a.cross_G["kflr"])):
                        msg = _close(ours, ref[i][f"cross_{what}"])
                        if msg:
                            return f"{a.name}-{b.name} cross_{what}: {msg}"
                return None

            self.compare("cross", "loops", (None, None), check_loops)
        if not (pairs and self.setting.kflr_exact and r.N == 1):
            return

        def check(ggn):
            for a, b in pairs:
                block = ggn[r.joint(a)][:, r.joint(b)]
                msg = _close(kron_block(a.cross_G["kflr"], a.cross_A), block)
                if msg:
                    return f"{a.name}-{b.name}: {msg}"
            return None

        self.compare("cross", "autograd GGN", r.ggn(), check)


def _linear_chain(refs: References) -> bool:
    """A ``Sequential`` of ``Linear`` layers and parameter-free modules on a 2-D input."""
    if not (isinstance(refs.model, nn.Sequential) and isinstance(refs.X, Tensor)):
        return False
    leaves = [m for _, m in flatten_sequential(refs.model)]
    return refs.X.dim() == 2 and all(
        isinstance(m, nn.Linear) or not any(True for _ in m.parameters()) for m in leaves
    )


def run_setting(setting: PeerSetting, backend: str, refs: References | None = None) -> list[Row]:
    """All rows of ``setting`` on ``backend``."""
    return Runner(setting, backend, refs).run()
