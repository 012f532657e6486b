"""Validation of :func:`curvkit.extraction.extract`'s model, loss and arguments.

Everything is checked before any computation, so that bad input raises a curvkit
error naming the module (type, position, name) or argument and what is supported.
"""

from __future__ import annotations

import torch
from torch import nn

from curvkit.errors import ShapeError, UnsupportedModuleError
from curvkit.extraction.layers import PARAMETRISED, conv_padding
from curvkit.extraction.losses import check_loss
from curvkit.extraction.modules import PARAMETER_FREE

#: Quantity names accepted by :func:`~curvkit.extraction.extract`.
QUANTITIES = (
    "batch_grad",
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
    """Leaf modules of a (nested) ``nn.Sequential`` in execution order, with qualified names."""
    leaves = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential):
            leaves.extend(flatten_sequential(child, f"{prefix}{name}."))
        else:
            leaves.append((f"{prefix}{name}", child))
    return leaves


def supported_names() -> str:
    """Comma-separated names of the supported module types."""
    return ", ".join(sorted(t.__name__ for t in (*PARAMETRISED, *PARAMETER_FREE)))


def check_module(name: str, pos: int, module: nn.Module, kfra: bool) -> None:
    """Raise :class:`~curvkit.errors.UnsupportedModuleError` if the sweep cannot handle ``module``.

    Args:
        name: Qualified name of the module in the model.
        pos: Position among the model's leaf modules.
        module: The module.
        kfra: Whether KFRA is requested (stricter: Linear and element-wise only).
    """
    kind = type(module)
    where = f"{kind.__name__} at position {pos} (name {name!r})"
    if kind not in PARAMETRISED and kind not in PARAMETER_FREE:
        raise UnsupportedModuleError(
            f"extract does not support {where}. Supported modules: {supported_names()}."
        )
    if kind in PARAMETRISED and kind is not nn.Linear:
        if module.groups != 1:
            raise UnsupportedModuleError(f"{where}: grouped convolutions (groups > 1) unsupported.")
        if module.padding_mode != "zeros":
            raise UnsupportedModuleError(f"{where}: only padding_mode='zeros' is supported.")
        if conv_padding(module) is None:
            raise UnsupportedModuleError(f"{where}: asymmetric padding='same' is unsupported.")
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d)) and module.return_indices:
        raise UnsupportedModuleError(f"{where}: return_indices=True is unsupported.")
    if kind in PARAMETRISED:
        w, b = module.weight, module.bias
        if not w.requires_grad and b is not None and b.requires_grad:
            raise UnsupportedModuleError(
                f"{where}: a trainable bias with a frozen weight is unsupported."
            )
    if kfra and (kind not in KFRA_TYPES or (kind is nn.Dropout and module.training)):
        raise UnsupportedModuleError(
            f"KFRA supports chains of Linear layers and element-wise activations only "
            f"(Linear, Sigmoid, Tanh, ReLU, LeakyReLU, Identity, eval-mode Dropout); "
            f"got {where}."
        )


def check_arguments(model, loss_func, X, y, quantities, mc_samples, kfac_approx) -> set[str]:
    """Validate :func:`~curvkit.extraction.extract`'s arguments.

    Returns:
        The requested quantities as a set.

    Raises:
        UnsupportedModuleError: If the model is not an ``nn.Sequential``.
        UnsupportedLossError: For an unsupported loss.
        ShapeError: For unknown quantities, bad ``mc_samples`` / ``kfac_approx``,
            or mismatched batch sizes.
    """
    if not isinstance(model, nn.Sequential):
        raise UnsupportedModuleError(
            f"extract needs an nn.Sequential model (nested Sequentials are flattened); "
            f"got {type(model).__name__}."
        )
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
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ShapeError(f"mc_samples must be an integer >= 1, got {mc_samples!r}.")
    if kfac_approx not in ("expand", "reduce"):
        raise ShapeError(f"kfac_approx must be 'expand' or 'reduce', got {kfac_approx!r}.")
    if X.shape[0] != y.shape[0]:
        raise ShapeError(f"X and y have different batch sizes: {X.shape[0]} and {y.shape[0]}.")
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
