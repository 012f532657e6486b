r"""Curvature tracking during training.

A :class:`CurvatureTracker` measures the exact curvature (GGN or Hessian) of a
model on a batch every ``every`` steps of a training loop and keeps a tidy log:

.. code-block:: python

    from curvkit.diagnostics.tracking import CurvatureTracker

    tracker = CurvatureTracker(model, loss_func, every=50, k=5)
    for step, (X, y) in enumerate(loader):
        tracker.maybe_record(step, X, y)
        ...  # the usual training step
    df = tracker.to_dataframe()  # step, quantity, index, value, stderr

Quantities (one or more rows each per recorded step):

- ``loss`` and ``grad_norm`` (always; the gradient is needed anyway);
- ``top_eigenvalues``: rows ``eigenvalue`` with ``index = 1..k`` (Lanczos);
- ``trace``: :func:`curvkit.diagnostics.spectral.trace` with its standard error;
- ``grad_overlap``: :math:`\|V_k^\top g\|^2/\|g\|^2`, the fraction of the
  gradient in the top-``k`` eigenspace (Gur-Ari, Roberts & Dyer 2018,
  arXiv:1812.04754);
- ``approx_error``: ``approx_frobenius`` and ``approx_cosine`` of an
  approximation built by ``approx(model, loss_func, (X, y))`` against the
  exact curvature (:func:`curvkit.diagnostics.metrics.compare`).

Recording leaves the parameters and their ``.grad`` as it found them (an
``approx`` that backpropagates, such as K-FAC's extraction, has its gradients
undone), and with ``eval_mode=True`` puts the model in evaluation mode only
while it measures.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from curvkit.data import as_batches
from curvkit.diagnostics.estimators import TRACE_METHODS, TRACE_MIN_MATVECS
from curvkit.errors import ConfigError, ShapeError

QUANTITIES = ("top_eigenvalues", "trace", "grad_overlap", "approx_error")
CURVATURES = ("ggn", "hessian")
COLUMNS = ["step", "curvature", "quantity", "index", "value", "stderr", "matvecs"]


class CurvatureTracker:
    """Records curvature quantities every ``every`` steps of a training loop.

    Args:
        model: The model being trained.
        loss_func: Its loss (``reduction`` ``"mean"`` or ``"sum"``).
        every: Record when ``step % every == 0``.
        quantities: Subset of :data:`QUANTITIES`; default all but
            ``approx_error``, plus ``approx_error`` when ``approx`` is given.
        curvature: ``"ggn"`` or ``"hessian"`` (:mod:`curvkit.operators.exact`).
        k: Number of top eigenvalues (and the eigenspace of ``grad_overlap``).
        approx: ``approx(model, loss_func, (X, y)) -> CurvatureOperator``, e.g.
            ``lambda m, l, d: ck.kfac(m, l, d, kind="kflr")``.
        trace_method: Method of :func:`curvkit.diagnostics.spectral.trace`.
        num_matvecs: Product budget of the trace and Frobenius estimates.
        params: Parameters to measure (default: all trainable ones).
        eval_mode: Measure with the model in evaluation mode (restored afterwards).
        seed: Seed of the random probes and start vectors.

    Raises:
        ConfigError: For an unknown quantity, curvature or ``trace_method``, ``every``
            or ``k`` not an integer >= 1, ``num_matvecs`` below the trace method's
            minimum, ``approx_error`` without ``approx``, or a loss that is not
            mean- or sum-reduced.

    Attributes:
        records: The log, one dict per row (columns :data:`COLUMNS`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_func: nn.Module,
        every: int = 10,
        quantities: Sequence[str] | None = None,
        curvature: str = "ggn",
        k: int = 5,
        approx: Callable | None = None,
        trace_method: str = "hutch++",
        num_matvecs: int = 30,
        params: Sequence[Tensor] | None = None,
        eval_mode: bool = True,
        seed: int = 0,
    ):
        if quantities is None:
            quantities = QUANTITIES if approx is not None else QUANTITIES[:3]
        unknown = set(quantities) - set(QUANTITIES)
        if unknown:
            raise ConfigError(
                f"CurvatureTracker: unknown quantities {sorted(unknown)}; supported: {QUANTITIES}."
            )
        if "approx_error" in quantities and approx is None:
            raise ConfigError(
                "CurvatureTracker: 'approx_error' needs approx=callable(model, loss_func, data)."
            )
        if curvature not in CURVATURES:
            raise ConfigError(
                f"CurvatureTracker: curvature={curvature!r} is not one of {CURVATURES}."
            )
        for name, value in (("every", every), ("k", k), ("num_matvecs", num_matvecs)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ConfigError(f"CurvatureTracker: {name}={value!r} must be an integer >= 1.")
        if trace_method not in TRACE_METHODS:
            raise ConfigError(
                f"CurvatureTracker: trace_method={trace_method!r} is not one of {TRACE_METHODS}."
            )
        if num_matvecs < TRACE_MIN_MATVECS[trace_method]:
            raise ConfigError(
                f"CurvatureTracker: trace_method={trace_method!r} needs num_matvecs >= "
                f"{TRACE_MIN_MATVECS[trace_method]}, got {num_matvecs}."
            )
        reduction = getattr(loss_func, "reduction", None)
        if reduction not in ("mean", "sum"):
            raise ConfigError(
                f"CurvatureTracker: {type(loss_func).__name__}(reduction={reduction!r}) is not "
                "supported; use reduction='mean' or 'sum'."
            )
        self.model, self.loss_func = model, loss_func
        self.every, self.quantities, self.curvature, self.k = (
            int(every),
            tuple(quantities),
            curvature,
            int(k),
        )
        self.approx, self.trace_method, self.num_matvecs = approx, trace_method, int(num_matvecs)
        self.params = list(params) if params is not None else None
        self.eval_mode, self.seed = eval_mode, seed
        self.records: list[dict] = []

    def maybe_record(self, step: int, X: Tensor, y: Tensor) -> bool:
        """Record on batch ``(X, y)`` if ``step % every == 0``; returns whether it did."""
        if step % self.every:
            return False
        self.record(step, X, y)
        return True

    __call__ = maybe_record

    def record(self, step: int, X: Tensor, y: Tensor) -> list[dict]:
        """Measure now on batch ``(X, y)``; returns (and appends) the new rows.

        Raises:
            ShapeError: If ``X`` or ``y`` is not a tensor or holds no example, or
                their first dimensions (the examples) differ; nothing is recorded.
        """
        as_batches((X, y))
        if y.ndim and X.shape[0] != y.shape[0]:
            raise ShapeError(
                f"CurvatureTracker.record: X and y hold {X.shape[0]} and {y.shape[0]} "
                "examples (first dimensions); they must match."
            )
        training = self.model.training
        params = list(self.model.parameters())
        grads = [
            None if p.grad is None else p.grad.clone() for p in params
        ]  # `approx` may backprop
        if self.eval_mode:
            self.model.eval()
        try:
            rows = self._measure(step, (X, y))
        finally:
            self.model.train(training)
            for p, g in zip(params, grads):
                p.grad = g
        self.records.extend(rows)
        return rows

    def _measure(self, step: int, data) -> list[dict]:
        from curvkit.diagnostics.metrics import compare
        from curvkit.diagnostics.spectral import eigenvectors, trace
        from curvkit.operators.exact import ggn, hessian, loss_and_gradient

        build = ggn if self.curvature == "ggn" else hessian
        op = build(self.model, self.loss_func, data, params=self.params)
        rows = []

        def add(quantity, value, stderr=0.0, index=None, matvecs=0):
            rows.append(
                {
                    "step": step,
                    "curvature": self.curvature,
                    "quantity": quantity,
                    "index": index,
                    "value": float(value),
                    "stderr": float(stderr),
                    "matvecs": int(matvecs),
                }
            )

        loss, g = loss_and_gradient(self.model, self.loss_func, data, params=self.params)
        add("loss", loss)
        add("grad_norm", g.norm())
        if {"top_eigenvalues", "grad_overlap"} & set(self.quantities):
            k = min(self.k, op.dim)
            method = "lanczos" if k < min(max(2 * k + 1, 20), op.dim - 1) else "dense"
            vals, vecs, info = eigenvectors(op, k=k, which="LA", method=method, seed=self.seed)
            if "top_eigenvalues" in self.quantities:
                for i, v in enumerate(vals.tolist()):
                    add("eigenvalue", v, index=i + 1, matvecs=info.matvecs if i == 0 else 0)
            if "grad_overlap" in self.quantities:
                g_op = g.to(vecs)
                add("grad_overlap", (vecs.T @ g_op).pow(2).sum() / g_op.pow(2).sum(), index=k)
        if "trace" in self.quantities:
            est = trace(op, method=self.trace_method, num_matvecs=self.num_matvecs, seed=self.seed)
            add("trace", est.value, est.stderr, matvecs=est.matvecs)
        if "approx_error" in self.quantities:
            approx = self.approx(self.model, self.loss_func, data)
            start = op.matvecs
            metrics = ("frobenius", "cosine")
            df = compare(
                approx, op, metrics, blocks=False, num_probes=self.num_matvecs, seed=self.seed
            )
            for i, r in enumerate(df.itertuples()):
                add(
                    f"approx_{r.metric}",
                    r.value,
                    r.stderr,
                    matvecs=op.matvecs - start if i == 0 else 0,
                )
        return rows

    def to_dataframe(self):
        """The log as a :class:`pandas.DataFrame` with columns :data:`COLUMNS`."""
        import pandas as pd

        return pd.DataFrame(self.records, columns=COLUMNS)
