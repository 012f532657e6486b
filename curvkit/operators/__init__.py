"""Curvature operators: exact matrices and their structured approximations.

Every operator is a :class:`~curvkit.operators.base.CurvatureOperator` over the
flat parameter vector (the order of docs/conventions.md): ``@`` with vectors, matrices or lists of
parameter-shaped tensors, ``to_dense()``, ``to_scipy()``, ``inverse(damping)``.
"""

from curvkit.operators.base import (
    CurvatureOperator,
    DenseOperator,
    IdentityOperator,
    ProductOperator,
    ScaledOperator,
    SumOperator,
)
from curvkit.operators.cg import CGInverse
from curvkit.operators.exact import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    MCFisherOperator,
    empirical_fisher,
    fisher,
    ggn,
    hessian,
    loss_and_gradient,
)

__all__ = [
    "CGInverse",
    "CurvatureOperator",
    "DenseOperator",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "MCFisherOperator",
    "ProductOperator",
    "ScaledOperator",
    "SumOperator",
    "empirical_fisher",
    "fisher",
    "ggn",
    "hessian",
    "loss_and_gradient",
]
