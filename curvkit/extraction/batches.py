r"""Extraction over several batches, combined as one batch (:func:`extract_batches`)."""

from __future__ import annotations

import torch

from curvkit.data import as_batches, num_data
from curvkit.errors import UnsupportedModuleError
from curvkit.extraction.engine import choose_backend, extract
from curvkit.records import LayerRecord, Records


def tied_parameters(model: torch.nn.Module) -> list[list[tuple[str, torch.nn.Module]]]:
    """Trainable parameters registered in more than one module (tied weights).

    A module object used at two places counts as two modules (its parameters are
    tied between them).

    Returns:
        Per shared parameter, its ``(qualified name, owning module)`` pairs.
    """
    owners: dict[int, list] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None and p.requires_grad:
                owners.setdefault(id(p), []).append(
                    (f"{mname}.{pname}" if mname else pname, module)
                )
    return [pairs for pairs in owners.values() if len(pairs) > 1]


def check_untied(model: torch.nn.Module, what: str) -> None:
    """Raise unless every trainable parameter belongs to one module.

    Kronecker factors (and the extraction's per-layer diagonals) describe one
    module's use of its weight; a weight shared by two modules has a curvature
    block that is no Kronecker product of either module's factors.

    Raises:
        UnsupportedModuleError: Naming the parameter and both modules.
    """
    tied = tied_parameters(model)
    if tied:
        (n1, m1), (n2, m2) = tied[0][:2]
        raise UnsupportedModuleError(
            f"{what}: {n1!r} ({type(m1).__name__}) and {n2!r} ({type(m2).__name__}) are one "
            "tied parameter; Kronecker factors are per module, so a weight shared by two "
            "modules has no Kronecker block. Untie the weights, or use the exact operators "
            "(curvkit.ggn, curvkit.fisher, curvkit.hessian), which count a tied weight once."
        )


_R_WEIGHTED = ("A", "cross_A", "diag_ggn", "diag_ggn_mc", "diag_hessian", "batch_grad")


def _combine(acc: LayerRecord | None, rec: LayerRecord, wr: float, wg: float) -> LayerRecord:
    """``acc + weights * rec`` for one layer (``weights * rec`` when ``acc`` is ``None``).

    ``R``-weighted quantities get ``wr``, averaged ``G`` factors ``wg``; per-example
    gradients are concatenated along the example axis. Updates ``rec`` in place.
    """
    for name in _R_WEIGHTED:
        value = getattr(rec, name)
        if value is None:
            continue
        old = None if acc is None else getattr(acc, name)
        if not isinstance(value, list):
            setattr(rec, name, value * wr if old is None else old + value * wr)
        elif old is None:
            setattr(rec, name, [v * wr for v in value])
        elif name == "batch_grad":
            setattr(rec, name, [torch.cat([a, v * wr]) for a, v in zip(old, value)])
        else:
            setattr(rec, name, [a + v * wr for a, v in zip(old, value)])
    if rec.grad_factors is not None:
        g, a = rec.grad_factors
        old = None if acc is None else acc.grad_factors
        rec.grad_factors = (
            (g * wr, a) if old is None else (torch.cat([old[0], g * wr]), torch.cat([old[1], a]))
        )
    old = {} if acc is None else acc.curvature_grad_factors
    for kind, (rows, a) in rec.curvature_grad_factors.items():
        if kind in old:
            rows, a = torch.cat([old[kind][0], rows * wr], dim=1), torch.cat([old[kind][1], a])
        else:
            rows = rows * wr
        rec.curvature_grad_factors[kind] = (rows, a)
    for name in ("G", "cross_G"):
        old = {} if acc is None else getattr(acc, name)
        new = {k: v * wg + old[k] if k in old else v * wg for k, v in getattr(rec, name).items()}
        setattr(rec, name, new)
    rec.bias_scale = rec.bias_scale * wr + (0.0 if acc is None else acc.bias_scale)
    return rec


def extract_batches(model, loss_func, data, quantities, seed: int = 0, **kwargs) -> Records:
    r"""Extract ``quantities`` on every batch of ``data`` and combine them globally.

    With :math:`N = \sum_b N_b` and the global :math:`R` (``1/N`` or ``1``), each
    batch's ``R``-weighted quantities (``A``, cross ``A``, diagonals, per-example
    gradients, ``bias_scale``, the loss) are multiplied by :math:`R / R_b`
    (:math:`N_b/N` for ``"mean"``, ``1`` for ``"sum"``) and summed, and the averaged
    ``G`` factors by :math:`N_b/N`. Several batches thus give exactly the records of
    one concatenated batch (up to Monte Carlo sampling). Per-example gradients are
    concatenated. Label sampling uses one ``torch.Generator`` seeded with ``seed``.
    The parameters' ``.grad`` are left as they were.

    Args:
        model: The model.
        loss_func: The loss (its ``reduction`` sets :math:`R`).
        data: One ``(X, y)`` batch or an iterable of batches.
        quantities: What :func:`curvkit.extraction.extract` should compute.
        seed: Seed of the label sampling (``"kfac"``, ``"diag_ggn_mc"``).
        **kwargs: Passed on to :func:`curvkit.extraction.extract`.

    Returns:
        The combined :class:`~curvkit.records.Records`.

    Raises:
        UnsupportedModuleError: For a weight tied between two modules (see
            :func:`check_untied`; on the graph path with ``unsupported="gradient"`` the
            tied modules get gradients only), or from the extraction.
    """
    batches = as_batches(data)
    unsupported, backend = kwargs.get("unsupported", "error"), kwargs.get("backend", "auto")
    if backend == "auto" and batches:
        backend = choose_backend(model, batches[0][0], quantities, unsupported)
    if not (unsupported == "gradient" and backend == "graph"):
        # the graph path with unsupported="gradient" leaves tied parameters gradient-only
        check_untied(model, "Kronecker and diagonal extraction")
    total = num_data(batches)
    mean = getattr(loss_func, "reduction", "mean") == "mean"
    generator = None
    if any(q in ("kfac", "diag_ggn_mc") for q in quantities):
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    combined = None
    try:
        for X, y in batches:
            rec = extract(model, loss_func, X, y, quantities, generator=generator, **kwargs)
            if len(batches) == 1:
                return rec
            wr, wg = (X.shape[0] / total if mean else 1.0), X.shape[0] / total
            previous = [None] * len(rec) if combined is None else combined.layers
            rec.layers = [_combine(a, r, wr, wg) for a, r in zip(previous, rec.layers)]
            rec.loss = rec.loss * wr + (0.0 if combined is None else combined.loss)
            rec.reduction_factor = rec.reduction_factor * wr  # R_b * R / R_b = R
            combined = rec
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
    combined.batch_size = total
    return combined
