"""Validation of :func:`curvkit.extraction.extract`'s model, loss and arguments.

Everything is checked before any computation, so that bad input raises a curvkit
error naming the module (type, position, name) or argument and what is supported.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from curvkit.errors import ShapeError, UnsupportedModuleError
from curvkit.extraction.layers import PARAMETRISED, conv_padding
from curvkit.extraction.losses import check_loss
from curvkit.extraction.modules import PARAMETER_FREE

#: Quantity names accepted by :func:`~curvkit.extraction.extract`.
QUANTITIES = (
    "batch_grad",
    "batch_grad_factors",
    "curvature_grad_factors",
    "kfac",
    "kflr",
    "kfra",
    "empirical",
    "diag_ggn",
    "diag_ggn_mc",
    "diag_hessian",
    "cross",
)
#: Factor kinds that have cross factors.
CROSS_KINDS = ("kfac", "kflr", "empirical")
#: Module types KFRA's batch-averaged recursion supports.
KFRA_TYPES = (nn.Linear, nn.Sigmoid, nn.Tanh, nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout)


def flatten_sequential(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """Leaf modules of a (nested) ``nn.Sequential`` in execution order, with qualified names.

    A module object that appears several times is listed at every appearance
    (``named_children`` would list it once).
    """
    leaves = []
    for name, child in model._modules.items():
        if child is None:
            continue
        if isinstance(child, nn.Sequential):
            leaves.extend(flatten_sequential(child, f"{prefix}{name}."))
        else:
            leaves.append((f"{prefix}{name}", child))
    return leaves


def sweep_reason(model: nn.Module) -> str | None:
    """Why the sweep cannot run ``model`` as a chain (``None``: it can).

    The sweep runs the leaves of a (nested) ``nn.Sequential`` one after the other;
    that is the model's computation only if no ``Sequential`` subclass overrides
    ``forward`` and no module object appears twice.
    """
    if not isinstance(model, nn.Sequential):
        return f"the model is a {type(model).__name__}, not an nn.Sequential"
    todo = [("", model)]
    while todo:
        prefix, seq = todo.pop()
        if type(seq).forward is not nn.Sequential.forward:
            where = f"{prefix.rstrip('.')!r}" if prefix else "(the model)"
            return f"the Sequential subclass {type(seq).__name__} {where} overrides forward"
        todo.extend(
            (f"{prefix}{n}.", c) for n, c in seq._modules.items() if isinstance(c, nn.Sequential)
        )
    seen: dict[int, str] = {}
    for name, m in flatten_sequential(model):
        if id(m) in seen:
            return (
                f"the module object {seen[id(m)]!r} is used again as {name!r} "
                "(a reused module or shared weights)"
            )
        seen[id(m)] = name
    return None


def supported_names() -> str:
    """Comma-separated names of the supported module types."""
    return ", ".join(sorted(t.__name__ for t in (*PARAMETRISED, *PARAMETER_FREE)))


#: Values of ``extract(..., unsupported=...)``.
UNSUPPORTED = ("error", "gradient")


def check_module(
    name: str, pos: int, module: nn.Module, kfra: bool, unsupported: str = "error"
) -> str:
    """How the sweep handles ``module``: ``"kron"``, ``"free"`` or ``"gradient"``.

    ``"kron"``: a parametrised layer with Kronecker factors; ``"free"``: a
    parameter-free module of :data:`~curvkit.extraction.modules.PARAMETER_FREE`;
    ``"gradient"`` (only with ``unsupported="gradient"``): any other module, passed
    through by ``torch.func.vjp``; its parameters get gradients but no curvature.

    Args:
        name: Qualified name of the module in the model.
        pos: Position among the model's leaf modules.
        module: The module.
        kfra: Whether KFRA is requested (stricter: Linear and element-wise only).
        unsupported: ``"error"`` (raise) or ``"gradient"``.

    Raises:
        UnsupportedModuleError: If the sweep cannot handle ``module`` and
            ``unsupported="error"``, or KFRA meets a module outside its chains.
    """
    kind = type(module)
    where = f"{kind.__name__} at position {pos} (name {name!r})"
    if kfra and (kind not in KFRA_TYPES or (kind is nn.Dropout and module.training)):
        raise UnsupportedModuleError(
            f"KFRA supports chains of Linear layers and element-wise activations only "
            f"(Linear, Sigmoid, Tanh, ReLU, LeakyReLU, Identity, eval-mode Dropout); "
            f"got {where}."
        )
    problem = _unsupported_reason(module)
    if problem is None:
        return "kron" if kind in PARAMETRISED else "free"
    if unsupported == "gradient":
        return "gradient"
    sep = ". " if problem.startswith("Supported") else ": "
    raise UnsupportedModuleError(f"extract does not support {where}{sep}{problem}")


def _unsupported_reason(module: nn.Module) -> str | None:
    kind = type(module)
    if kind not in PARAMETRISED and kind not in PARAMETER_FREE:
        return (
            f"Supported modules: {supported_names()}. With unsupported='gradient' it "
            "would get gradients without curvature."
        )
    if kind in PARAMETRISED and kind is not nn.Linear:
        if module.groups != 1:
            return "grouped convolutions (groups > 1) are unsupported."
        if module.padding_mode != "zeros":
            return "only padding_mode='zeros' is supported."
        if conv_padding(module) is None:
            return "asymmetric padding='same' is unsupported."
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d)) and module.return_indices:
        return "return_indices=True is unsupported."
    if kind in PARAMETRISED:
        w, b = module.weight, module.bias
        if not w.requires_grad and b is not None and b.requires_grad:
            return "a trainable bias with a frozen weight is unsupported."
    return None


def check_options(quantities, mc_samples, kfac_approx, unsupported) -> set[str]:
    """Validate the options every extraction backend shares.

    Returns:
        The requested quantities as a set.

    Raises:
        ShapeError: For unknown quantities, ``"cross"`` without a factor kind,
            ``mc_samples`` not an integer ``>= 1``, or unknown ``kfac_approx`` /
            ``unsupported`` values.
    """
    if isinstance(quantities, str):
        quantities = (quantities,)
    q = set(quantities)
    unknown = sorted(q - set(QUANTITIES))
    if unknown:
        raise ShapeError(f"Unknown quantities {unknown}; choose from {list(QUANTITIES)}.")
    if "cross" in q and not q & set(CROSS_KINDS):
        raise ShapeError(
            f"'cross' needs at least one factor kind among {list(CROSS_KINDS)} in quantities."
        )
    if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
        raise ShapeError(f"mc_samples must be an integer >= 1, got {mc_samples!r}.")
    if kfac_approx not in ("expand", "reduce"):
        raise ShapeError(f"kfac_approx must be 'expand' or 'reduce', got {kfac_approx!r}.")
    if unsupported not in UNSUPPORTED:
        raise ShapeError(f"unsupported must be one of {UNSUPPORTED}, got {unsupported!r}.")
    return q


def check_arguments(
    model, loss_func, X, y, quantities, mc_samples, kfac_approx, unsupported="error"
) -> set[str]:
    """Validate :func:`~curvkit.extraction.extract`'s arguments.

    Returns:
        The requested quantities as a set.

    Raises:
        UnsupportedModuleError: If the model is not a plain ``nn.Sequential`` chain
            (see :func:`sweep_reason`).
        UnsupportedLossError: For an unsupported loss.
        ShapeError: For unknown quantities, bad ``mc_samples`` / ``kfac_approx``,
            or mismatched batch sizes.
    """
    reason = sweep_reason(model)
    if reason is not None:
        raise UnsupportedModuleError(
            f"The sweep (backend='sweep') needs a plain nn.Sequential chain (nested "
            f"Sequentials are flattened), but {reason}; use backend='graph' or 'auto'."
        )
    q = check_options(quantities, mc_samples, kfac_approx, unsupported)
    if X.shape[0] != y.shape[0]:
        raise ShapeError(f"X and y have different batch sizes: {X.shape[0]} and {y.shape[0]}.")
    check_input_dtype(model, X)
    if X.shape[0] == 0:
        raise ShapeError("The batch is empty.")
    check_loss(loss_func)
    return q


def factor_dtype_of(model: nn.Module, factor_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of factors: ``factor_dtype``, else the model's (float32 for half precision).

    Raises:
        ShapeError: If ``factor_dtype`` is neither float32 nor float64.
    """
    if factor_dtype is not None:
        if factor_dtype not in (torch.float32, torch.float64):
            raise ShapeError(f"factor_dtype must be float32 or float64, got {factor_dtype}.")
        return factor_dtype
    dtype = next(model.parameters()).dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def check_input_dtype(model: nn.Module, X) -> None:
    """Floating-point inputs must have the dtype of the model's floating-point parameters.

    ``X`` may be a tensor or a mapping/tuple/list of tensors (the graph path); integer
    inputs (token ids) are not checked.

    Raises:
        ShapeError: Naming the input's and the parameters' dtypes.
    """
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        return
    (dtype,) = dtypes
    if isinstance(X, Tensor):
        items = [("X", X)]
    elif isinstance(X, Mapping):
        items = [(f"X[{k!r}]", v) for k, v in X.items()]
    elif isinstance(X, (tuple, list)):
        items = [(f"X[{i}]", v) for i, v in enumerate(X)]
    else:
        return
    for name, t in items:
        if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype:
            raise ShapeError(
                f"{name} has dtype {t.dtype} but the model's parameters are {dtype}; cast the "
                f"input (X.to({dtype})) or the model (model.to({t.dtype}))."
            )
