"""curvkit: curvature analysis for PyTorch.

Extraction of Kronecker factors, per-example gradients and diagonals in one
backward pass; exact Hessian / GGN / Fisher operators beside their Kronecker,
EKFAC and diagonal approximations; comparisons, spectra and plots; a K-FAC
optimiser with block-diagonal and tri-diagonal inverses.

Public names are loaded on first use, so ``import curvkit`` stays light and
never imports matplotlib or seaborn.

Example:
    >>> import torch, curvkit as ck
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    >>> X, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    >>> rec = ck.extract(model, torch.nn.CrossEntropyLoss(), X, y, quantities=("kflr",))
    >>> [tuple(r.A.shape) for r in rec]
    [(5, 5), (4, 4)]
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    # extraction and records
    "extract": "curvkit.extraction",
    "Records": "curvkit.records",
    "LayerRecord": "curvkit.records",
    # errors
    "CurvkitError": "curvkit.errors",
    "UnsupportedModuleError": "curvkit.errors",
    "UnsupportedLossError": "curvkit.errors",
    "ShapeError": "curvkit.errors",
    "ConfigError": "curvkit.errors",
    "NonFiniteError": "curvkit.errors",
    # operators
    "CurvatureOperator": "curvkit.operators.base",
    "DenseOperator": "curvkit.operators.base",
    "hessian": "curvkit.operators.exact",
    "ggn": "curvkit.operators.exact",
    "fisher": "curvkit.operators.exact",
    "empirical_fisher": "curvkit.operators.exact",
    "kfac": "curvkit.operators.kronecker",
    "ekfac": "curvkit.operators.ekfac",
    "diag_ggn": "curvkit.operators.diagonal",
    "diag_hessian": "curvkit.operators.diagonal",
    # comparison and spectra
    "compare": "curvkit.diagnostics.metrics",
    "eigenvalues": "curvkit.diagnostics.spectral",
    "eigenvectors": "curvkit.diagnostics.spectral",
    "spectral_density": "curvkit.diagnostics.spectral",
    "trace": "curvkit.diagnostics.spectral",
    "diagonal": "curvkit.diagnostics.spectral",
    "lambda_max": "curvkit.diagnostics.spectral",
    "lambda_min": "curvkit.diagnostics.spectral",
    "condition_number": "curvkit.diagnostics.spectral",
    "effective_rank": "curvkit.diagnostics.spectral",
    "logdet": "curvkit.diagnostics.spectral",
    "memory_report": "curvkit.diagnostics.memory",
    "CurvatureTracker": "curvkit.diagnostics.tracking",
    # the report
    "report": "curvkit.app.report",
}
#: Sub-packages and the modules users reach as ``ck.<name>`` (loaded on first use).
_SUBMODULES = {
    "problems": "curvkit.problems",
    "optim": "curvkit.optim",
    "operators": "curvkit.operators",
    "extraction": "curvkit.extraction",
    "diagnostics": "curvkit.diagnostics",
    "distributed": "curvkit.distributed",
    "app": "curvkit.app",
    "plotting": "curvkit.plotting",
    "metrics": "curvkit.diagnostics.metrics",
    "spectral": "curvkit.diagnostics.spectral",
    "tracking": "curvkit.diagnostics.tracking",
    "launch": "curvkit.distributed.launch",
}

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = import_module(_SUBMODULES[name])
        globals()[name] = module
        return module
    raise AttributeError(f"module 'curvkit' has no attribute {name!r}")


def __dir__():
    return __all__
