r"""Extraction with BackPACK's extensions, converted to curvkit's records.

:func:`extract_backpack` runs one forward and one backward pass of the user's model
under ``backpack(...)`` (Dangel, Kunstner & Hennig 2020) with the extensions the
requested quantities need, and converts BackPACK's layouts and normalisations to
those of :mod:`curvkit.records`:

==========================  ============================  ==================================
quantity                    BackPACK extension            conversion
==========================  ============================  ==================================
``batch_grad``              ``BatchGrad``                 none (same convention)
``kflr`` / ``kfac``         ``KFLR`` / ``KFAC(M)``        ``A = R N A_bp``, ``G = G_bp/(R N)``
``kfra``                    ``KFRA``                      as ``kflr`` (Linear chains only)
``diag_ggn``                ``DiagGGNExact``              none
``diag_ggn_mc``             ``DiagGGNMC(M)``              none
``diag_hessian``            ``DiagHessian``               none
==========================  ============================  ==================================

BackPACK keeps weight and bias separate and its conv factors mix the two KFC
variants (its ``A`` sums the patches over output locations like "expand", its ``G``
sums the gradients over them like "reduce"). The rest is formed here from what the
pass stores:

- the homogeneous border of a joint ``A`` (``separate_bias=False``) and the
  "reduce" ``A`` of conv layers, from the layer inputs (``module.input0``);
- the "expand" ``G`` of conv layers, from the square root of the output GGN that
  ``KFLR``/``KFAC`` backpropagate (kept while they run);
- ``"empirical"`` ``G``, ``"batch_grad_factors"``, ``"curvature_grad_factors"`` and
  ``"cross"`` factors, from the layer inputs, the output gradients of the loss and
  the backpropagated square roots.

BackPACK's loss square roots include :math:`\sqrt R`; the square-root rows here
are divided by it before they enter curvkit's normalisation.

The model is extended in place (BackPACK's hooks and attributes on the user's
modules and parameters, so that ``.grad`` accumulates as with ``loss.backward()``)
and restored in a ``finally``: afterwards it has exactly the hooks and attributes it
had before. Monte Carlo labels are drawn by BackPACK from PyTorch's global
generator inside ``torch.random.fork_rng``, seeded from ``generator``, so the global
state is untouched and a seeded ``generator`` makes the pass reproducible; the
samples differ from :func:`~curvkit.extraction.extract`'s, so ``"kfac"`` and
``"diag_ggn_mc"`` agree with it in expectation only.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import OrderedDict

import torch
from torch import Tensor, nn

from curvkit.errors import CurvkitError, ShapeError, UnsupportedModuleError
from curvkit.extraction.checks import (
    CROSS_KINDS,
    check_options,
    factor_dtype_of,
    flatten_sequential,
)
from curvkit.extraction.gram import assemble_homogeneous, gram, homogeneous_cross
from curvkit.extraction.losses import check_loss, make_loss_handler
from curvkit.records import LayerRecord, Records

#: Parametrised module types BackPACK's extensions handle (``groups=1`` for conv).
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BACKPACK_PARAMETRISED = (nn.Linear, *CONV_TYPES, *CONV_TRANSPOSE_TYPES)

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_ALTERNATIVE = 'use backend="sweep" (curvkit.extract) or backend="graph" instead'


class BackpackError(UnsupportedModuleError):
    """BackPACK itself cannot compute a request (unsupported module, loss or option).

    A :class:`~curvkit.errors.UnsupportedModuleError` (and ``NotImplementedError``):
    the message says what BackPACK reported and which backend to use instead.
    """


def backpack_supports(model: nn.Module, quantities=("kflr",)) -> str | None:
    """Why :func:`extract_backpack` cannot handle ``model``, or ``None`` if it (likely) can.

    A cheap check without running the model: the model is an ``nn.Sequential`` whose
    leaf modules all have a BackPACK extension for every requested quantity.

    Args:
        model: The model.
        quantities: Requested quantities.

    Returns:
        ``None`` or the reason (also used in the error :func:`extract_backpack` raises).
    """
    if isinstance(quantities, str):
        quantities = (quantities,)
    if not isinstance(model, nn.Sequential):
        return "the model is not an nn.Sequential (try use_converter=True)"
    exts = _extensions(set(quantities), 1)
    return _unsupported_leaf(model, exts)


# -- validation -----------------------------------------------------------------------


def _check(model, loss_func, X, y, quantities, mc_samples, kfac_approx, unsupported, converter):
    q = check_options(quantities, mc_samples, kfac_approx, unsupported)
    if unsupported == "gradient":
        raise BackpackError(
            "BackPACK cannot pass gradients through modules it does not support, so "
            "unsupported='gradient' is not available with the BackPACK backend; "
            f"{_ALTERNATIVE}."
        )
    if X.shape[0] != y.shape[0]:
        raise ShapeError(f"X and y have different batch sizes: {X.shape[0]} and {y.shape[0]}.")
    if X.shape[0] == 0:
        raise ShapeError("The batch is empty.")
    check_loss(loss_func)
    if not converter and not isinstance(model, nn.Sequential):
        raise UnsupportedModuleError(
            "The BackPACK backend needs an nn.Sequential model (nested Sequentials are "
            f"flattened) or use_converter=True; got {type(model).__name__}."
        )
    return q


def _trainable(module: nn.Module) -> list[Tensor]:
    w, b = module.weight, module.bias
    if not w.requires_grad:
        return []
    return [w, b] if b is not None and b.requires_grad else [w]


def _check_layers(named: list[tuple[str, nn.Module]], q: set[str]) -> list[tuple[str, nn.Module]]:
    """Trainable parametrised leaves; reject what the conventions do not cover."""
    layers = []
    for pos, (name, m) in enumerate(named):
        where = f"{type(m).__name__} at position {pos} (name {name!r})"
        own = list(m.parameters(recurse=False))
        if not isinstance(m, BACKPACK_PARAMETRISED):
            if any(p.requires_grad for p in own):
                raise BackpackError(
                    f"The BackPACK backend supports trainable parameters in "
                    f"{', '.join(t.__name__ for t in BACKPACK_PARAMETRISED)} only; got "
                    f"{where}; {_ALTERNATIVE} (with unsupported='gradient')."
                )
            continue
        if type(m) not in BACKPACK_PARAMETRISED:
            raise BackpackError(f"BackPACK matches module types exactly; got subclass {where}.")
        b = m.bias
        if not m.weight.requires_grad and b is not None and b.requires_grad:
            raise UnsupportedModuleError(
                f"{where}: a trainable bias with a frozen weight is unsupported."
            )
        if not _trainable(m):
            continue
        if not isinstance(m, nn.Linear):
            if m.groups != 1:
                raise BackpackError(
                    f"{where}: BackPACK's Kronecker factors need groups=1; {_ALTERNATIVE}."
                )
            if m.padding_mode != "zeros":
                raise BackpackError(
                    f"{where}: BackPACK supports padding_mode='zeros' only; {_ALTERNATIVE}."
                )
        if "kfra" in q and not isinstance(m, nn.Linear):
            raise BackpackError(
                f"KFRA is defined for chains of Linear layers and element-wise activations "
                f"(BackPACK's conv KFRA mixes the KFC variants); got {where}; use "
                f"backend='backpack' without 'kfra' or {_ALTERNATIVE}."
            )
        layers.append((name, m))
    if not layers:
        raise ShapeError("The model has no trainable parameters in parametrised layers.")
    return layers


# -- BackPACK extensions --------------------------------------------------------------


class _Stash:
    """Square roots ``[V, N, *out]`` that ``KFLR``/``KFAC`` backpropagate, by layer."""

    def __init__(self):
        self.rows: dict[str, dict[int, Tensor]] = {"kflr": {}, "kfac": {}}

    def wrap(self, ext, kind: str) -> None:
        """Keep the backpropagated matrix at every parametrised layer of ``ext``."""
        table = ext._BackpropExtension__module_extensions  # BackPACK's type -> extension map
        for cls in BACKPACK_PARAMETRISED:
            orig = table.get(cls)
            if orig is None:
                continue
            wrapped = copy.copy(orig)
            store = self.rows[kind]

            def weight(ext_, module, g_inp, g_out, backproped, _orig=orig, _store=store):
                _store[id(module)] = backproped
                return _orig.weight(ext_, module, g_inp, g_out, backproped)

            wrapped.weight = weight
            ext.set_module_extension(cls, wrapped, overwrite=True)


def _mse_sum_hessian_fix(ext) -> None:
    """KFRA's ``MSELoss`` start: BackPACK 1.7.1 builds it in float32 whatever the dtype."""
    from backpack.core.derivatives.mseloss import MSELossDerivatives
    from backpack.extensions.secondorder.hbp.losses import HBPMSELoss

    class _Derivatives(MSELossDerivatives):
        def sum_hessian(self, module, g_inp, g_out):
            self._check_input_dims(module)
            N, D = module.input0.shape
            x = module.input0
            H = 2.0 * torch.eye(D, device=x.device, dtype=x.dtype)
            return H * N if module.reduction == "sum" else H / D

    mse = HBPMSELoss()
    mse.derivatives = _Derivatives()
    ext.set_module_extension(nn.MSELoss, mse, overwrite=True)


def _extensions(q: set[str], mc_samples: int, stash: _Stash | None = None) -> dict:
    """BackPACK extensions for the quantities, by quantity."""
    from backpack import extensions as E

    exts = {}
    if "batch_grad" in q:
        exts["batch_grad"] = E.BatchGrad()
    if "kflr" in q:
        exts["kflr"] = E.KFLR()
    if "kfac" in q:
        exts["kfac"] = E.KFAC(mc_samples=mc_samples)
    if "kfra" in q:
        exts["kfra"] = E.KFRA()
        _mse_sum_hessian_fix(exts["kfra"])
    if "diag_ggn" in q:
        exts["diag_ggn"] = E.DiagGGNExact()
    if "diag_ggn_mc" in q:
        exts["diag_ggn_mc"] = E.DiagGGNMC(mc_samples=mc_samples)
    if "diag_hessian" in q:
        exts["diag_hessian"] = E.DiagHessian()
    if stash is not None:
        for kind in ("kflr", "kfac"):
            if kind in exts:
                stash.wrap(exts[kind], kind)
    return exts


def _own_trainable(m: nn.Module) -> bool:
    return any(p.requires_grad for p in m.parameters(recurse=False))


def _unsupported_leaf(root: nn.Module, exts: dict) -> str | None:
    """The first leaf module some extension has no rule for, as a sentence, or ``None``."""
    from backpack.utils.module_classification import is_no_op

    for name, m in root.named_modules():
        if next(m.children(), None) is not None or is_no_op(m):
            continue
        for quantity, ext in exts.items():
            if not ext.expects_backpropagation_quantities() and not _own_trainable(m):
                continue  # first-order extensions only act on parametrised modules
            if type(m) not in ext._BackpropExtension__module_extensions:
                return (
                    f"BackPACK's {type(ext).__name__} (quantity {quantity!r}) has no rule "
                    f"for {type(m).__name__} (name {name!r})"
                )
    return None


# -- hygiene --------------------------------------------------------------------------


class _Snapshot:
    """Hooks and attributes of modules and parameters, to restore after BackPACK."""

    def __init__(self, model: nn.Module):
        self.modules = list(model.modules())
        self.hooks = [
            {h: OrderedDict(getattr(m, h)) for h in _HOOK_DICTS if hasattr(m, h)}
            for m in self.modules
        ]
        self.mod_dict = [dict(m.__dict__) for m in self.modules]
        self.params = list({id(p): p for p in model.parameters()}.values())
        self.par_dict = [set(p.__dict__) for p in self.params]
        self.grads = [p.grad for p in self.params]
        self.grad_values = [None if g is None else g.clone() for g in self.grads]

    def restore_grads(self) -> None:
        """Put back every ``.grad`` as it was (after a failed pass)."""
        for p, g, v in zip(self.params, self.grads, self.grad_values):
            if g is None:
                p.grad = None
            else:
                g.copy_(v)
                p.grad = g

    def restore(self) -> None:
        """Remove every hook and attribute added since the snapshot."""
        for m, hooks, before in zip(self.modules, self.hooks, self.mod_dict):
            for h, saved in hooks.items():
                d = getattr(m, h)
                d.clear()
                d.update(saved)
            for key in set(m.__dict__) - set(before):
                delattr(m, key)
            for key, value in before.items():  # e.g. _is_full_backward_hook, inplace
                if m.__dict__.get(key) is not value:
                    m.__dict__[key] = value
        for p, before in zip(self.params, self.par_dict):
            for key in set(p.__dict__) - before:
                delattr(p, key)


# -- conversion -----------------------------------------------------------------------


def _patches(module: nn.Module, x: Tensor) -> Tensor:
    """Feature rows ``[N, K, T]`` of a layer's input (``T = 1`` for ``Linear``)."""
    if isinstance(module, nn.Linear):
        return x[:, :, None]
    if isinstance(module, CONV_TYPES):
        from backpack.utils.conv import unfold_input

        return unfold_input(module, x)
    from backpack.utils.conv_transpose import unfold_by_conv_transpose

    return unfold_by_conv_transpose(x, module)


def _sum_rows(block: Tensor, approx: str) -> Tensor:
    """``[V, N, C, *spatial]`` -> ``[V*N*T, C]`` ("expand") or ``[V*N, C]`` summed over ``t``."""
    B = block.flatten(3) if block.dim() > 3 else block[..., None]
    if approx == "reduce":
        return B.sum(3).reshape(-1, B.shape[2])
    return B.transpose(2, 3).reshape(-1, B.shape[2])


def _input_factor(U: Tensor, A_bp: Tensor | None, approx: str, R: float, joint: bool, fdt):
    """Curvkit's ``A`` from BackPACK's weight factor (expand) or the patches (reduce)."""
    N, K, T = U.shape
    U = U.to(fdt)
    if approx == "reduce" and T > 1:
        feats = U.mean(2)
        core, col, count = gram(feats, 1.0), feats.sum(0), N
    else:
        # BackPACK: A_bp = (1/N) sum_{n,t} u u^T, so sum_{n,t} u u^T = N A_bp
        core = A_bp.to(fdt) * N if A_bp is not None else torch.einsum("nkt,nlt->kl", U, U)
        col, count = U.sum((0, 2)), N * T
    if not joint:
        return core * R
    return assemble_homogeneous(core, col, count, R)


def _layer_record(name, m, pos, st, q, R, N, fdt, separate_bias, approx):
    params = _trainable(m)
    has_bias = len(params) == 2
    rec = LayerRecord(
        name=name,
        module=m,
        position=pos,
        params=params,
        has_bias=has_bias,
        separate_bias=separate_bias,
    )
    U = st["U"]
    T = U.shape[2]
    P = N * (T if approx == "expand" else 1)
    kinds = [k for k in ("kfac", "kflr", "kfra", "empirical") if k in q]
    if kinds:
        A_bp = next((st["factors"][k][1] for k in ("kflr", "kfac", "kfra") if k in q), None)
        rec.A = _input_factor(U, A_bp, approx, R, rec.joint, fdt)
        rec.bias_scale = R * P
    for kind in ("kflr", "kfac"):
        if kind in q:
            G_bp = st["factors"][kind][0]
            if approx == "expand" and T > 1:
                rows = _sum_rows(st["sqrt"][kind].to(fdt), "expand")
                rec.G[kind] = gram(rows, 1.0 / (R * N * T))
            else:  # BackPACK sums over t (its conv G is the "reduce" G)
                rec.G[kind] = G_bp.to(fdt) / (R * N)
    if "kfra" in q:
        rec.G["kfra"] = st["factors"]["kfra"][0].to(fdt) / (R * N)
    if "empirical" in q:
        rec.G["empirical"] = gram(_sum_rows(st["g0"][None].to(fdt), approx), 1.0 / (P * R * R))
    linear = isinstance(m, nn.Linear)
    if "batch_grad" in q or ("batch_grad_factors" in q and not linear):
        rec.batch_grad = [p.grad_batch.detach() for p in params]
    if "batch_grad_factors" in q and linear:
        rec.grad_factors = (st["g0"].detach().clone(), st["x"].detach())
    if "curvature_grad_factors" in q and linear:
        for kind in ("kfac", "kflr"):
            if kind in q:
                rows = st["sqrt"][kind].detach() * math.sqrt(R)
                rec.curvature_grad_factors[kind] = (rows, st["x"].detach())
    savefields = {
        "diag_ggn": "diag_ggn_exact",
        "diag_ggn_mc": "diag_ggn_mc",
        "diag_hessian": "diag_h",
    }
    for quantity, field in savefields.items():
        if quantity in q:
            setattr(rec, quantity, [getattr(p, field).detach().to(fdt) for p in params])
    return rec


def _cross(records, states, q, R, N, fdt) -> None:
    """Cross factors between consecutive Linear records (curvkit's convention)."""
    kinds = [k for k in CROSS_KINDS if k in q]
    for i, rec in enumerate(records):
        if i + 1 == len(records):
            rec.cross_reason = "last parametrised layer"
            continue
        nxt = records[i + 1]
        if not (isinstance(rec.module, nn.Linear) and isinstance(nxt.module, nn.Linear)):
            rec.cross_reason = "conv layer: spatial locations differ"
            continue
        s1, s2 = states[i], states[i + 1]
        a1, a2 = s1["x"].detach().to(fdt), s2["x"].detach().to(fdt)
        rec.cross_A = homogeneous_cross(a1, a2, R, rec.joint, nxt.joint)
        for kind in kinds:
            if kind == "empirical":
                r1, r2, scale = s1["g0"], s2["g0"], 1.0 / (N * R * R)
            else:
                r1, r2, scale = s1["sqrt"][kind], s2["sqrt"][kind], 1.0 / (N * R)
            r1 = r1.detach().reshape(-1, r1.shape[-1]).to(fdt)
            r2 = r2.detach().reshape(-1, r2.shape[-1]).to(fdt)
            rec.cross_G[kind] = homogeneous_cross(r1, r2, scale, False, False)


# -- the pass -------------------------------------------------------------------------


def _fail(stage: str, err: Exception) -> BackpackError:
    text = str(err).strip()
    msg = text.splitlines()[0].rstrip(".") if text else "(no message)"
    return BackpackError(
        f"BackPACK failed during {stage}: {type(err).__name__}: {msg}. This is a "
        f"limitation of BackPACK (backpack-for-pytorch) under the installed torch "
        f"{torch.__version__}; {_ALTERNATIVE}."
    )


def extract_backpack(
    model: nn.Module,
    loss_func: nn.Module,
    X: Tensor,
    y: Tensor,
    q=("kflr",),
    mc_samples: int = 1,
    separate_bias: bool = False,
    kfac_approx: str = "expand",
    generator: torch.Generator | None = None,
    factor_dtype: torch.dtype | None = None,
    unsupported: str = "error",
    use_converter: bool = False,
) -> Records:
    r"""The records of :func:`curvkit.extraction.extract`, computed with BackPACK.

    Same arguments, normalisations and layouts as :func:`~curvkit.extraction.extract`
    (see :mod:`curvkit.records`); the gradient of the loss is accumulated into
    ``p.grad`` like ``loss.backward()``. Exact quantities (``kflr``, ``kfra``,
    ``empirical``, diagonals, per-example gradients, cross factors) equal the
    sweep's up to rounding; Monte Carlo ones (``kfac``, ``diag_ggn_mc``) use
    BackPACK's own samples and agree in expectation.

    Besides the sweep's modules, BackPACK handles ``Conv3d``, ``ConvTranspose1d/2d/3d``
    (their factors refer to ``weight.transpose(0, 1)``, BackPACK's convention),
    ``ZeroPad2d`` and further pooling layers, depending on the extension.

    Args:
        model: An ``nn.Sequential`` (nested ones are flattened), or any module with
            ``use_converter=True``.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``
            (``"mean"``/``"sum"``; BackPACK's ``KFRA`` lacks ``BCEWithLogitsLoss``).
        X: Inputs ``[N, ...]``.
        y: Targets ``[N, ...]``.
        q: Requested quantities (names of :data:`curvkit.extraction.checks.QUANTITIES`).
        mc_samples: Monte Carlo samples for ``"kfac"``/``"diag_ggn_mc"``.
        separate_bias: Weight-only ``A`` and a separate bias block.
        kfac_approx: ``"expand"`` or ``"reduce"`` (conv layers).
        generator: Seeds the Monte Carlo labels (drawn by BackPACK from the global
            generator inside ``torch.random.fork_rng``).
        factor_dtype: dtype of factors and diagonals (float32/float64).
        unsupported: Only ``"error"``: BackPACK cannot pass through unknown modules.
        use_converter: Let BackPACK convert a general ``nn.Module`` with ``torch.fx``
            (``extend(..., use_converter=True)``).

    Returns:
        The per-layer records, forward order.

    Raises:
        BackpackError: If BackPACK lacks a rule for a module, loss or option, or
            fails under the installed torch; the message names the alternative
            backend. The model is unchanged (hooks, attributes, ``.grad``).
        UnsupportedModuleError: For a model the backend cannot take.
        UnsupportedLossError: For an unsupported loss.
        ShapeError: For bad arguments or shapes.
    """
    q = _check(model, loss_func, X, y, q, mc_samples, kfac_approx, unsupported, use_converter)
    fdt = factor_dtype_of(model, factor_dtype)
    if use_converter:
        named = [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
    else:
        named = flatten_sequential(model)
    layers = _check_layers(named, q)
    N = X.shape[0]
    R = 1.0 / N if loss_func.reduction == "mean" else 1.0
    stash = _Stash()
    exts = _extensions(q, mc_samples, stash)
    needs_io = bool(q & {"empirical", "batch_grad_factors", "cross"})  # output gradients
    if not use_converter:
        reason = _unsupported_leaf(model, exts)
        if reason is not None:
            raise BackpackError(f"{reason}; {_ALTERNATIVE}.")

    seed = None
    if q & {"kfac", "diag_ggn_mc"}:
        device = "cpu" if generator is None else generator.device
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
    snap = _Snapshot(model)
    states = [{} for _ in layers]
    handles, order = [], []
    stage = "extend"
    try:
        from backpack import backpack, extend

        for i, (_, m) in enumerate(layers):

            def fwd_hook(module, inp, out, _i=i):
                order.append(_i)
                states[_i]["x"] = inp[0].detach()
                states[_i]["out_shape"] = out.shape

            def bwd_hook(module, g_inp, g_out, _i=i):
                states[_i]["g0"] = g_out[0].detach()

            handles.append(m.register_forward_hook(fwd_hook))
            if needs_io:
                handles.append(m.register_full_backward_hook(bwd_hook))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="backpack")
            warnings.filterwarnings("ignore", message=".*transpose convolutions.*")
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            net = extend(model, use_converter=use_converter)
            if use_converter:
                reason = _unsupported_leaf(net, exts)
                if reason is not None:
                    raise NotImplementedError(reason)
            lossf = extend(copy.deepcopy(loss_func))
            stage = "the forward pass"
            out = net(X)
            _check_io(layers, states, order)
            make_loss_handler(loss_func, out.detach(), y)  # the sweep's checks of output/targets
            if out.dim() != 2:
                raise ShapeError(
                    f"The BackPACK backend needs a model output [N, C], got {tuple(out.shape)}; "
                    "use backend='graph' or 'sweep' for outputs with extra dimensions."
                )
            loss = lossf(out, y)
            stage = "the backward pass"
            with torch.random.fork_rng(devices=[] if X.device.type == "cpu" else [X.device]):
                if seed is not None:
                    torch.manual_seed(seed)
                with backpack(*exts.values()):
                    loss.backward()
        ranked = sorted(range(len(layers)), key=order.index)  # forward execution order
        layers, states = [layers[i] for i in ranked], [states[i] for i in ranked]
        records = []
        for pos, ((name, m), st) in enumerate(zip(layers, states)):
            st["U"] = _patches(m, st["x"]).detach()
            st["factors"] = {k: getattr(m.weight, k) for k in ("kflr", "kfac", "kfra") if k in q}
            st["sqrt"] = {k: stash.rows[k][id(m)] for k in ("kflr", "kfac") if k in q}
            records.append(
                _layer_record(name, m, pos, st, q, R, N, fdt, separate_bias, kfac_approx)
            )
        if "cross" in q:
            _cross(records, states, q, R, N, fdt)
    except CurvkitError:
        snap.restore_grads()
        raise
    except (NotImplementedError, AttributeError, RuntimeError, ValueError, AssertionError) as e:
        snap.restore_grads()
        raise _fail(stage, e) from e
    finally:
        for h in handles:
            h.remove()
        snap.restore()
    return Records(
        layers=records,
        loss=loss.detach(),
        batch_size=N,
        reduction_factor=R,
        kfac_approx=kfac_approx,
        mc_samples=mc_samples,
    )


def _check_io(layers, states, order) -> None:
    """After the forward pass: every layer ran once and Linear inputs are 2-D."""
    for i, (name, m) in enumerate(layers):
        calls = order.count(i)
        where = f"{type(m).__name__} (name {name!r})"
        if calls != 1:
            raise UnsupportedModuleError(
                f"{where} ran {calls} times in the forward pass; the records need every "
                "parametrised layer exactly once (no weight sharing)."
            )
        if isinstance(m, nn.Linear) and states[i]["x"].dim() != 2:
            raise ShapeError(
                f"{where} needs 2-D input [N, in], got shape {tuple(states[i]['x'].shape)}."
            )
