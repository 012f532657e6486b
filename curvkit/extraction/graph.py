r"""The graph path: extraction on any ``nn.Module`` through autograd.

The sweep of :mod:`curvkit.extraction.engine` walks an ``nn.Sequential`` chain by
hand. The graph path instead

1. registers forward hooks (removed in a ``finally``) on every module with
   trainable parameters of a supported type (:data:`GRAPH_LAYERS`); a hook keeps
   the module's input (detached, no copy) and its output (with its autograd
   graph) for *every call*, and hands a copy of the output on to the model, so
   that in-place operations after the module leave the kept output intact;
2. runs ``model(X)`` once with autograd (``X`` a tensor, dict, tuple, ...: the
   model is called as ``model(X)``), and forms the output-gradient rows
   ``[V, *out.shape]`` of :func:`~curvkit.extraction.losses.make_loss_handler` (row 0:
   gradient of the batch loss, then Monte Carlo rows, then the columns of the loss
   Hessian's square root; the same rows as the sweep). Outputs with extra
   dimensions (``[N, C, T]`` logits of a language model, ``[N, T, C]`` regression)
   are one example per leading index; the GGN diagonal then backpropagates the
   block square root (``T*C`` rows, see :mod:`~curvkit.extraction.losses`);
3. differentiates the output w.r.t. the outputs of every recorded call for all
   rows in one batched backward (``torch.autograd.grad(...,
   is_grads_batched=True)``), or row by row where an operation has no batching
   rule; the parameters of modules without a handler (``unsupported="gradient"``)
   get row 0's gradient from autograd directly;
4. reads every quantity off the rows at each call's output, with the sweep's
   normalisations (:mod:`curvkit.records`).

Parameters of factored modules used *outside* the module's own calls (e.g. an
embedding matrix reused as ``x @ emb.weight.T`` in a parent's ``forward``) are
found by walking the autograd graph; they are an error, or gradient-only with
``unsupported="gradient"``. KFRA and the Hessian diagonal need second derivatives
of every module on the way and stay on the sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from curvkit.errors import ShapeError, UnsupportedModuleError
from curvkit.extraction.checks import (
    CROSS_KINDS,
    check_input_dtype,
    check_options,
    factor_dtype_of,
)
from curvkit.extraction.gram import gram, homogeneous_cross, homogeneous_gram
from curvkit.extraction.graph_layers import (
    GRAPH_LAYERS,
    EmbeddingLayer,
    KronLayer,
    LinearLayer,
    NormLayer,
    batch_statistics,
)
from curvkit.extraction.losses import check_loss, make_loss_handler
from curvkit.records import LayerRecord, Records

#: Quantities the graph path does not compute (they need module second derivatives).
SWEEP_ONLY = ("kfra", "diag_hessian")
#: Quantities that need per-example gradients (undefined with batch-statistics BatchNorm).
PER_EXAMPLE = (
    "batch_grad",
    "batch_grad_factors",
    "curvature_grad_factors",
    "empirical",
    "diag_ggn",
    "diag_ggn_mc",
)
#: Quantities that need Kronecker factors (undefined for parameters tied across modules).
KRONECKER = ("kfac", "kflr", "empirical", "cross", "curvature_grad_factors")

_DIAG_CHUNK = 2**24  # entries of the per-(row, example) parameter gradients at once


def graph_supported_names() -> str:
    """Comma-separated names of the module types the graph path factors."""
    return ", ".join(sorted(t.__name__ for t in GRAPH_LAYERS))


def _direct_trainable(module: nn.Module) -> list[Tensor]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def check_graph_arguments(loss_func, y, quantities, mc_samples, kfac_approx, unsupported):
    """Validate the arguments of :func:`extract_graph` (everything but the model).

    Returns:
        The requested quantities as a set.

    Raises:
        UnsupportedModuleError: For ``"kfra"``/``"diag_hessian"``.
        UnsupportedLossError: For an unsupported loss.
        ShapeError: For unknown quantities or bad options.
    """
    q = check_options(quantities, mc_samples, kfac_approx, unsupported)
    sweep_only = sorted(q & set(SWEEP_ONLY))
    if sweep_only:
        raise UnsupportedModuleError(
            f"The graph path does not compute {sweep_only}: they need second derivatives of "
            "every module between a layer and the output, which only the sweep over plain "
            "nn.Sequential chains provides (backend='sweep')."
        )
    if not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] == 0:
        raise ShapeError("y must be a tensor of targets [N, ...] with N >= 1.")
    check_loss(loss_func)
    return q


class _Plan:
    """Which modules get handlers and which are gradient-only, before the forward pass."""

    def __init__(self, model: nn.Module, q: set[str], unsupported: str):
        self.handlers: list = []
        self.gradient_only: list[tuple[str, nn.Module]] = []
        owners: dict[int, list[str]] = {}
        for name, m in model.named_modules():
            for p in _direct_trainable(m):
                owners.setdefault(id(p), []).append(name)
        for name, m in model.named_modules():
            if not _direct_trainable(m):
                continue
            cls = GRAPH_LAYERS.get(type(m))
            problem = None if cls is not None else "unsupported"
            if cls is not None:
                problem = cls.unsupported_reason(m) or _weight_bias_reason(m)
            tied = sorted({o for p in _direct_trainable(m) for o in owners[id(p)]} - {name})
            if problem is None and tied and q & set(KRONECKER):
                problem = (
                    f"it shares parameters with {tied}; Kronecker factors of parameters "
                    "tied across modules are not defined (batch_grad and the diagonals are)"
                )
            if problem is None:
                self.handlers.append(cls(name, m))
            elif unsupported == "gradient":
                self.gradient_only.append((name, m))
            else:
                raise UnsupportedModuleError(_module_message(name, m, problem))
        # a factored module sharing a parameter with a gradient-only one becomes gradient-only
        grad_ids = {id(p) for _, m in self.gradient_only for p in _direct_trainable(m)}
        for h in list(self.handlers):
            if any(id(p) in grad_ids for p in _direct_trainable(h.module)):
                self.handlers.remove(h)
                self.gradient_only.append((h.name, h.module))
        if per_example := sorted(q & set(PER_EXAMPLE)):
            for name, m in model.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and batch_statistics(m):
                    raise UnsupportedModuleError(
                        f"{type(m).__name__} {name!r} normalises with the batch's statistics "
                        f"(train mode): examples interact, so the per-example quantities "
                        f"{per_example} are undefined. Use eval mode, or kfac/kflr only."
                    )


def _weight_bias_reason(module: nn.Module) -> str | None:
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(w, Tensor) and not w.requires_grad and isinstance(b, Tensor) and b.requires_grad:
        return "a trainable bias with a frozen weight is unsupported"
    return None


def _module_message(name: str, module: nn.Module, problem: str) -> str:
    where = f"{type(module).__name__} {name!r}" if name else f"{type(module).__name__} (root)"
    if problem == "unsupported":
        return (
            f"extract (graph path) cannot factor the parameters of {where}. Factored module "
            f"types: {graph_supported_names()} (parameter-free code is unrestricted). With "
            "unsupported='gradient' its parameters would get gradients without curvature."
        )
    return (
        f"extract (graph path) cannot factor {where}: {problem}. With "
        "unsupported='gradient' its parameters would get gradients without curvature."
    )


def _escaped(out: Tensor, calls: list, watched: dict[int, Tensor]) -> set[int]:
    """Ids of ``watched`` parameters reached by the autograd graph outside the recorded calls.

    The walk starts at the output; at a recorded call's output it continues at
    the call's input instead of entering the call.
    """
    stop = {id(o.grad_fn): (o.grad_fn, x) for o, x in calls if o.grad_fn is not None}
    found, seen, todo = set(), set(), [out.grad_fn]
    keep = []  # keep the Python node objects alive so that their ids stay unique
    while todo:
        fn = todo.pop()
        if fn is None or id(fn) in seen:
            continue
        keep.append(fn)
        seen.add(id(fn))
        if id(fn) in stop:
            x = stop[id(fn)][1]
            if isinstance(x, Tensor) and x.requires_grad:
                if x.grad_fn is None:
                    if id(x) in watched:
                        found.add(id(x))
                else:
                    todo.append(x.grad_fn)
            continue
        var = getattr(fn, "variable", None)
        if var is not None and id(var) in watched:
            found.add(id(var))
        todo.extend(f for f, _ in fn.next_functions)
    return found


def _row_grads(out: Tensor, inputs: list[Tensor], stack: Tensor, batched: bool) -> list:
    """``[V, *x.shape]`` gradients of ``out`` w.r.t. each input for the rows ``stack``."""
    if not inputs:
        return []
    if batched:
        try:
            return list(
                torch.autograd.grad(
                    out, inputs, stack, retain_graph=True, is_grads_batched=True, allow_unused=True
                )
            )
        except RuntimeError as err:  # an operation without a batching rule
            if "vmap" not in str(err).lower() and "batch" not in str(err).lower():
                raise
    rows = [
        torch.autograd.grad(out, inputs, s, retain_graph=True, allow_unused=True) for s in stack
    ]
    return [
        None if rows[0][i] is None else torch.stack([r[i] for r in rows])
        for i in range(len(inputs))
    ]


def extract_graph(
    model: nn.Module,
    loss_func: nn.Module,
    X,
    y: Tensor,
    quantities=("kfac",),
    mc_samples: int = 1,
    separate_bias: bool = False,
    kfac_approx: str = "expand",
    generator: torch.Generator | None = None,
    factor_dtype: torch.dtype | None = None,
    unsupported: str = "error",
    batched: bool = True,
) -> Records:
    r"""Extract curvature quantities of any ``nn.Module`` through autograd (the graph path).

    Same quantities and normalisations as :func:`~curvkit.extraction.extract` (which
    calls this for models the sweep cannot run), except ``"kfra"`` and
    ``"diag_hessian"``. Records are in the order of the modules' first calls.
    Row-0 gradients are accumulated into ``p.grad`` like ``loss.backward()``.

    Args:
        model: Any module; called once as ``model(X)``; must return ``[N, C]`` or an
            output with extra dimensions (``[N, C, d1, ...]`` for cross-entropy,
            ``[N, d1, ..., C]`` otherwise; see :mod:`~curvkit.extraction.losses`).
        loss_func: See :func:`~curvkit.extraction.extract`.
        X: Model input (tensor, dict, tuple, ...), passed on as is.
        y: Targets ``[N, ...]`` (``N`` rows of the model output).
        quantities: See :func:`~curvkit.extraction.extract`.
        mc_samples: Monte Carlo samples.
        separate_bias: See :func:`~curvkit.extraction.extract`.
        kfac_approx: ``"expand"`` or ``"reduce"`` for every weight shared over
            locations ``t`` (convolutions, ``Linear`` on ``[N, ..., in]``, modules
            called several times); ``Embedding`` always uses "expand".
        generator: Random generator for the Monte Carlo labels.
        factor_dtype: dtype of factors and diagonals.
        unsupported: ``"error"`` or ``"gradient"`` (modules without a handler get
            gradients only, listed in ``Records.unfactored``).
        batched: Try one batched backward over all rows (``False``: row by row).

    Returns:
        The records.

    Raises:
        UnsupportedModuleError: For an unsupported module (its qualified name and
            type, the supported types and ``unsupported='gradient'`` in the
            message), ``"kfra"``/``"diag_hessian"``, per-example quantities with
            batch-statistics BatchNorm, Kronecker quantities of tied parameters.
        UnsupportedLossError: For an unsupported loss.
        ShapeError: For bad options or shapes.
    """
    q = check_graph_arguments(loss_func, y, quantities, mc_samples, kfac_approx, unsupported)
    check_input_dtype(model, X)
    plan = _Plan(model, q, unsupported)
    if not plan.handlers:
        raise ShapeError("The model has no trainable parameters in factored modules.")
    fdt = factor_dtype_of(model, factor_dtype)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        out, handlers, order, calls, versions = _forward(model, X, plan)
        return _backward(
            out, handlers, order, calls, versions, plan, X, loss_func, y, q,
            mc_samples, separate_bias, kfac_approx, generator, fdt, unsupported, batched,
        )  # fmt: skip
    except BaseException:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        raise


@dataclass
class GraphForward:
    """A forward pass of the graph path, kept for :func:`backward_graph`.

    Attributes:
        model: The model.
        X: Its input.
        output: The model output (with its autograd graph).
        quantities: The quantities the pass was planned for.
        plan: Handlers and gradient-only modules.
        state: ``(handlers, order, calls, versions)`` of the hooks.
    """

    model: nn.Module
    X: object
    output: Tensor
    quantities: set
    plan: _Plan
    state: tuple = field(default_factory=tuple)


def check_model(model: nn.Module, quantities, unsupported: str = "error") -> None:
    """Raise now what the graph path would raise for ``model`` before its forward pass.

    Unsupported module types (qualified name and type), Kronecker quantities of tied
    parameters, per-example quantities with a ``BatchNorm`` in train mode.

    Raises:
        UnsupportedModuleError: See above.
    """
    _Plan(model, set(quantities), unsupported)


def forward_graph(model: nn.Module, X, quantities, unsupported: str = "error") -> GraphForward:
    """The forward half of :func:`extract_graph`: ``model(X)`` with the hooks.

    Lets a caller use the output (e.g. an optimiser's closure computing the loss)
    before :func:`backward_graph` turns the pass into records.

    Raises:
        UnsupportedModuleError, ShapeError: As :func:`extract_graph`.
    """
    q = set(quantities)
    plan = _Plan(model, q, unsupported)
    if not plan.handlers:
        raise ShapeError("The model has no trainable parameters in factored modules.")
    out, handlers, order, calls, versions = _forward(model, X, plan)
    return GraphForward(model, X, out, q, plan, (handlers, order, calls, versions))


def backward_graph(
    fwd: GraphForward,
    loss_func: nn.Module,
    y: Tensor,
    mc_samples: int = 1,
    separate_bias: bool = False,
    kfac_approx: str = "expand",
    generator: torch.Generator | None = None,
    factor_dtype: torch.dtype | None = None,
    unsupported: str = "error",
) -> Records:
    """The backward half of :func:`extract_graph` for a :func:`forward_graph` pass.

    Returns:
        The records (and ``p.grad`` accumulated), as :func:`extract_graph`.
    """
    q = check_graph_arguments(loss_func, y, fwd.quantities, mc_samples, kfac_approx, unsupported)
    fdt = factor_dtype_of(fwd.model, factor_dtype)
    handlers, order, calls, versions = fwd.state
    return _backward(
        fwd.output, handlers, order, calls, versions, fwd.plan, fwd.X, loss_func, y, q,
        mc_samples, separate_bias, kfac_approx, generator, fdt, unsupported, True,
    )  # fmt: skip


def _forward(model, X, plan):
    """Run ``model(X)`` with hooks on the handled modules; the hooks are always removed."""
    calls, order, versions = [], [], []

    def make_hook(h):
        def hook(module, args, kwargs, output):
            if not isinstance(output, Tensor):
                raise ShapeError(f"{type(module).__name__} {h.name!r} did not return a tensor.")
            h.record(args, kwargs, output)
            x = args[0] if args else kwargs.get("input")
            calls.append((output, x, h))
            versions.append((x, x._version if isinstance(x, Tensor) else None, h))
            if h not in order:
                order.append(h)
            return output.clone()  # in-place operations downstream leave ``output`` intact

        return hook

    handles = []
    try:
        for h in plan.handlers:
            handles.append(h.module.register_forward_hook(make_hook(h), with_kwargs=True))
        with torch.enable_grad():
            out = model(X)
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(out, Tensor):
        raise ShapeError(f"The model must return a tensor [N, C], got {type(out).__name__}.")
    return out, plan.handlers, order, calls, versions


def _backward(
    out, handlers, order, calls, versions, plan, X, loss_func, y, q,
    mc_samples, separate_bias, approx, generator, fdt, unsupported, batched,
):  # fmt: skip
    for x, version, h in versions:
        if isinstance(x, Tensor) and x._version != version:
            raise ShapeError(
                f"The input of {type(h.module).__name__} {h.name!r} was modified in place "
                "after the layer read it; the graph path needs it unchanged."
            )
    if out.dim() < 2 or out.shape[0] != y.shape[0]:
        raise ShapeError(
            f"The model output must be [N, C] or have extra dimensions ([N, C, d1, ...] for "
            f"CrossEntropyLoss, [N, d1, ..., C] otherwise) with N = len(y) = {y.shape[0]}, "
            f"got {tuple(out.shape)}."
        )
    # parameters of factored modules used outside their calls
    watched = {id(p): p for h in order for p in h.params}
    escaped = _escaped(out, [(o, x) for o, x, _ in calls], watched)
    gradient_only = list(plan.gradient_only)
    for h in list(order):
        if any(id(p) in escaped for p in h.params):
            if unsupported != "gradient":
                raise UnsupportedModuleError(
                    _module_message(
                        h.name,
                        h.module,
                        "a parameter of it is also used outside its calls (e.g. in a parent's "
                        "forward)",
                    )  # fmt: skip
                )
            order.remove(h)
            gradient_only.append((h.name, h.module))
    grad_ids = {id(p) for _, m in gradient_only for p in _direct_trainable(m)}
    for h in list(order):  # modules tied to a gradient-only one become gradient-only too
        if any(id(p) in grad_ids for p in _direct_trainable(h.module)):
            order.remove(h)
            gradient_only.append((h.name, h.module))
    if not order:
        raise ShapeError("No factored module was called in the forward pass.")
    kept = set(map(id, order))
    calls = [(o, x, h) for o, x, h in calls if id(h) in kept]

    detached = out.detach()
    loss = make_loss_handler(loss_func, detached, y)
    R, N = loss.R, loss.N
    blocks, rows, V = [loss.grad()[None]], {}, 1
    if q & {"kfac", "diag_ggn_mc"}:
        blocks.append(loss.sqrt_hessian_sampled(mc_samples, generator))
        rows["kfac"] = slice(V, V + mc_samples)
        V += mc_samples
    if "kflr" in q or ("diag_ggn" in q and loss.T == 1):
        blocks.append(loss.sqrt_hessian())
        rows["kflr"] = slice(V, V + loss.C)
        V += loss.C
    if "diag_ggn" in q and loss.T > 1:  # exact: one row per (position, entry)
        blocks.append(loss.sqrt_hessian_blocks())
        rows["diag_ggn"] = slice(V, V + loss.T * loss.C)
        V += loss.T * loss.C
    rows.setdefault("diag_ggn", rows.get("kflr"))
    rows["diag_ggn_mc"] = rows.get("kfac")
    rows["empirical"] = slice(0, 1)
    per_example = sorted(q & set(PER_EXAMPLE))
    n_data = _leading_dim(X)
    for h in order:
        if per_example and n_data is not None and h.N != n_data:
            raise ShapeError(
                f"{type(h.module).__name__} {h.name!r} is called on an input with leading "
                f"dimension {h.N}, not the batch size {n_data} (e.g. positions shared by all "
                f"examples): autograd sums its rows over the examples, so the per-example "
                f"quantities {per_example} are undefined. Expand its input over the batch, "
                "or ask for kfac/kflr only."
            )
    diagonals = sorted(q & {"diag_ggn", "diag_ggn_mc"})
    for h in order:
        if diagonals and h.N != N:
            raise ShapeError(
                f"{diagonals} need one output row per example, but {type(h.module).__name__} "
                f"{h.name!r} sees {h.N} examples and the output has {N} rows (e.g. a sequence "
                "output flattened to [N*T, C]): the rows would mix the terms of one example's "
                "tokens. Return the output unflattened ([N, C, T] logits with targets [N, T] "
                "for CrossEntropyLoss, [N, T, C] otherwise). Kronecker factors, batch_grad and "
                "the gradient are defined."
            )
    stack = torch.cat(blocks) if len(blocks) > 1 else blocks[0]

    # gradients of gradient-only parameters (row 0), then the rows at every call output
    grad_only_params, seen = [], set()
    for _, m in gradient_only:
        for p in _direct_trainable(m):
            if id(p) not in seen:
                seen.add(id(p))
                grad_only_params.append(p)
    grad_only = []
    if grad_only_params:
        grad_only = torch.autograd.grad(
            out, grad_only_params, stack[0], retain_graph=True, allow_unused=True
        )
    outputs = [o for o, _, _ in calls]
    needs = [i for i, o in enumerate(outputs) if o.requires_grad]
    got = _row_grads(out, [outputs[i] for i in needs], stack, batched)
    per_call = [None] * len(outputs)
    for i, g in zip(needs, got):
        per_call[i] = g
    for (o, _, h), g in zip(calls, per_call):
        h.rows.append(torch.zeros(V, *o.shape, dtype=o.dtype, device=o.device) if g is None else g)
    del outputs, got, per_call, calls

    with torch.no_grad():
        records = _records(order, q, rows, R, N, fdt, separate_bias, approx, stack.shape[0])
        # gradients: factored (summed over the calls of every module using a parameter)
        grads: dict[int, list] = {}
        for h in order:
            for p, g in zip(h.params, h.grads()):
                grads.setdefault(id(p), [p, 0.0])[1] += g
        for p, g in [*grads.values(), *zip(grad_only_params, grad_only)]:
            if g is not None:
                _accumulate_grad(p, g)
    unfactored, listed = [], set()  # every parameter once (tied ones with their first module)
    for n, m in gradient_only:
        params = [p for p in _direct_trainable(m) if id(p) not in listed]
        listed |= set(map(id, params))
        unfactored.append((n, m, params))
    return Records(
        layers=records,
        loss=loss.value(),
        batch_size=N,
        reduction_factor=R,
        kfac_approx=approx,
        mc_samples=mc_samples,
        unfactored=unfactored,
    )


def _leading_dim(X) -> int | None:
    """Leading dimension of the first tensor in ``X`` (tensor, dict, list or tuple)."""
    if isinstance(X, Tensor):
        return X.shape[0] if X.dim() else None
    values = X.values() if isinstance(X, dict) else X if isinstance(X, (list, tuple)) else ()
    for v in values:
        n = _leading_dim(v)
        if n is not None:
            return n
    return None


def _accumulate_grad(p: Tensor, g: Tensor) -> None:
    g = g.reshape(p.shape).to(p.dtype)
    if p.grad is None:
        p.grad = g.contiguous()
    else:
        p.grad.add_(g)


def _param_rows(handlers, sl: slice) -> dict[int, Tensor]:
    """Per-(row, example) gradients of every parameter, summed over all modules using it."""
    acc: dict[int, Tensor] = {}
    for h in handlers:
        for p, r in zip(h.params, h.param_rows(sl)):
            acc[id(p)] = r if id(p) not in acc else acc[id(p)] + r
    return acc


def _records(order, q, rows, R, N, fdt, separate_bias, approx, V) -> list[LayerRecord]:
    """One record per called factored module (first-call order); parameters counted once."""
    records, claimed = [], set()
    for h in order:
        params = [p for p in h.params if id(p) not in claimed]
        claimed |= {id(p) for p in params}
        if not params:
            continue
        names = [n for n, p in zip(h.param_names, h.params) if any(p is r for r in params)]
        rec = LayerRecord(
            name=h.name,
            module=h.module,
            position=len(records),
            params=params,
            has_bias="bias" in names,
            separate_bias=separate_bias,
            block=h.block,
            calls=len(h.calls),
        )
        rec._handler = h
        records.append(rec)
    kinds = [k for k in CROSS_KINDS if k in q]
    info = [_factors(rec, rec._handler, q, kinds, rows, R, fdt, approx) for rec in records]
    if "cross" in q:
        for i, rec in enumerate(records):
            _cross(rec, info[i], info[i + 1] if i + 1 < len(records) else None, kinds, R)
    _per_example(records, order, q, rows, R, fdt, V)
    for rec in records:
        del rec._handler
    return records


def _factors(rec, h, q, kinds, rows, R, fdt, approx) -> dict:
    """Kronecker factors / dense blocks of one record; returns what the cross factors need."""
    info = {"linear": False}
    if isinstance(h, KronLayer):
        U = h.all_features()  # [N, T, G, K]
        N, T, G, K = U.shape
        P = N * T if approx == "expand" else N
        feats = U.reshape(N * T, G, K) if approx == "expand" else U.mean(1)
        linear = isinstance(h, LinearLayer) and len(h.calls) == 1
        info.update(linear=linear, T=T, N=N, joint=rec.joint, P=P, rows={})
        if isinstance(h, LinearLayer) and len(h.calls) > 1:
            info["why"] = f"{rec.name!r} is called {len(h.calls)} times"
        if kinds:
            A = [homogeneous_gram(feats[:, g].to(fdt), R, rec.joint) for g in range(G)]
            rec.A = A[0] if G == 1 else torch.stack(A)
            rec.bias_scale = R * P
            if G > 1 and rec.block == "kron":
                rec.block = "kron_grouped"
            if linear:
                info["a"] = feats[:, 0].to(fdt)
        for kind in kinds:
            B = h.all_rows(rows[kind])  # [k, N, T, G, O]
            B = B.reshape(-1, G, B.shape[-1]) if approx == "expand" else B.sum(2).flatten(0, 1)
            scale = 1.0 / (P * R * R) if kind == "empirical" else 1.0 / P
            Gs = [gram(B[:, g].to(fdt), scale) for g in range(G)]
            rec.G[kind] = Gs[0] if G == 1 else torch.stack(Gs)
            if linear:
                info["rows"][kind] = B[:, 0].to(fdt)
        if isinstance(h, LinearLayer) and T == 1 and len(h.calls) == 1:
            a = h.calls[0]
            if "curvature_grad_factors" in q:
                for kind in ("kfac", "kflr"):
                    if kind in q:
                        block = h.rows[0][rows[kind]]
                        rec.curvature_grad_factors[kind] = (block * R, a)
            if "batch_grad_factors" in q:
                rec.grad_factors = (h.rows[0][0].clone(), a)
    elif isinstance(h, EmbeddingLayer) and kinds:
        _, keep = h.tokens()
        P = max(1, int(keep.sum()))
        rec.A_diag = h.counts().to(fdt) * R
        rec.bias_scale = R * P
        for kind in kinds:
            B = h.all_rows(rows[kind])
            scale = 1.0 / (P * R * R) if kind == "empirical" else 1.0 / P
            rec.G[kind] = gram(B.reshape(-1, B.shape[-1]).to(fdt), scale)
    elif isinstance(h, NormLayer):
        for kind in kinds:
            psi = torch.cat([r.flatten(2) for r in h.param_rows(rows[kind])], 2).flatten(0, 1)
            rec.dense[kind] = gram(psi.to(fdt), 1.0 / R if kind == "empirical" else R)
    return info


def _cross(rec, info, nxt, kinds, R) -> None:
    """Cross factors to the next record (single-call Linear pairs with equal rows per example)."""
    if nxt is None:
        rec.cross_reason = "last parametrised layer"
        return
    for side in (info, nxt):
        if "why" in side:
            rec.cross_reason = f"no cross factor: {side['why']}"
            return
    if not (info["linear"] and nxt["linear"]):
        kron = [k for k in (info, nxt) if "T" in k]
        rec.cross_reason = (
            "conv layer: spatial locations differ"
            if len(kron) == 2
            else "not a pair of Kronecker-factored Linear layers"
        )
        return
    if info["P"] != nxt["P"]:
        rec.cross_reason = (
            f"different rows per example ({info['P'] // info['N']} and {nxt['P'] // nxt['N']})"
        )
        return
    P = info["P"]
    rec.cross_A = homogeneous_cross(info["a"], nxt["a"], R, info["joint"], nxt["joint"])
    for kind in kinds:
        scale = 1.0 / (P * R * R) if kind == "empirical" else 1.0 / P
        rec.cross_G[kind] = homogeneous_cross(
            info["rows"][kind], nxt["rows"][kind], scale, False, False
        )


def _per_example(records, order, q, rows, R, fdt, V) -> None:
    """``batch_grad`` and the diagonals, from per-(row, example) parameter gradients."""
    want_bg = "batch_grad" in q or "batch_grad_factors" in q
    if want_bg:
        acc = _param_rows(order, slice(0, 1))
        for rec in records:
            if "batch_grad" in q or rec.grad_factors is None:
                rec.batch_grad = [acc[id(p)][0] for p in rec.params]
        del acc
    for quantity in ("diag_ggn", "diag_ggn_mc"):
        if quantity not in q:
            continue
        sl = rows[quantity]
        diag: dict[int, Tensor] = {}
        users: dict[int, int] = {}
        for h in order:
            for p in h.params:
                users[id(p)] = users.get(id(p), 0) + 1
        generic = []
        for h in order:
            if isinstance(h, KronLayer) and h.T == 1 and all(users[id(p)] == 1 for p in h.params):
                diag.update(zip(map(id, h.params), _diag_single_location(h, sl, R, fdt)))
            else:
                generic.append(h)
        width = max([h.N * sum(p.numel() for p in h.params) for h in generic] or [1])
        step = max(1, _DIAG_CHUNK // max(1, width))
        for start in range(sl.start, sl.stop, step) if generic else ():
            acc = _param_rows(generic, slice(start, min(start + step, sl.stop)))
            for pid, r in acc.items():
                d = r.to(fdt).square().sum((0, 1)) * R
                diag[pid] = d if pid not in diag else diag[pid] + d
        for rec in records:
            setattr(rec, quantity, [diag[id(p)] for p in rec.params])


def _diag_single_location(h: KronLayer, sl: slice, R: float, fdt) -> list[Tensor]:
    r"""Diagonal of a Kronecker layer with one location per example, factorised.

    :math:`R\sum_{v,n} (g_{vn} a_n^\top)^{\odot 2} = R (\sum_v g_{vn}^{\odot 2})^\top a^{\odot 2}`.
    """
    U = h.all_features()[:, 0].to(fdt)  # [N, G, K]
    ss = h.all_rows(sl)[:, :, 0].to(fdt).square().sum(0)  # [N, G, O]
    out = []
    if "weight" in h.param_names:
        out.append(h._weight_rows(torch.einsum("ngo,ngc->goc", ss, U.square())) * R)
    if h.has_bias:
        out.append(ss.sum(0).flatten() * R)
    return out
