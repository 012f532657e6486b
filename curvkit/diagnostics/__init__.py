"""Diagnostics on curvature operators: Krylov kernels, estimators, spectra, comparisons.

``krylov`` (Lanczos, Krylov-Schur, CG kernels) and ``estimators`` (trace and diagonal
estimators) are the numerical kernels; ``spectral`` (eigenpairs, densities, scalar
summaries), ``metrics`` (``compare``), ``memory`` (storage costs from shapes) and
``tracking`` (curvature during training) are built on them; ``landscape`` evaluates
the loss along directions. Everything here takes operators (or a model) and returns
numbers or tables; nothing imports plotting.
"""
