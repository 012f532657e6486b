"""Diagnostics on curvature operators: Krylov kernels, estimators, spectra, comparisons.

``krylov`` (Lanczos, Krylov-Schur, CG kernels) and ``estimators`` (trace and diagonal
estimators) are the numerical kernels; ``spectral`` (eigenpairs, densities, scalar
summaries), ``metrics`` (``compare``), ``memory`` (storage costs from shapes) and
``tracking`` (curvature during training) are built on them. Everything here takes
operators and returns numbers or tables; nothing imports plotting.
"""
