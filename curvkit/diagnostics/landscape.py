"""The loss along directions in parameter space (loss-landscape slices)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch

from curvkit.data import as_batches
from curvkit.errors import ShapeError


def loss_along_directions(
    model: torch.nn.Module,
    loss_func,
    data,
    directions: Mapping[str, torch.Tensor],
    alphas,
    params: Sequence[torch.Tensor] | None = None,
    normalize: bool = True,
) -> pd.DataFrame:
    r"""The loss :math:`L(\theta + \alpha d)` along flat directions ``d``.

    Computed with :func:`torch.func.functional_call` on perturbed copies: the
    model's parameters are never modified. Batches are combined as the
    curvature operators do (the loss of the concatenated data).

    Args:
        model: The model.
        loss_func: Its loss (``reduction`` ``"mean"`` or ``"sum"``).
        data: ``(X, y)`` or an iterable of batches.
        directions: Name -> flat ``[D]`` direction (flat parameter order).
        alphas: Step lengths :math:`\alpha`.
        params: Parameters the directions refer to (default: trainable ones).
        normalize: Scale each direction to unit norm first.

    Returns:
        A DataFrame with columns ``direction``, ``alpha``, ``loss``.

    Raises:
        ShapeError: If a direction has the wrong size.
    """
    named = dict(model.named_parameters())
    params = [p for p in named.values() if p.requires_grad] if params is None else list(params)
    ids = {id(p): n for n, p in named.items()}
    names = [ids[id(p)] for p in params]
    D = sum(p.numel() for p in params)
    batches = as_batches(data)
    N = sum(X.shape[0] for X, _ in batches)
    mean = getattr(loss_func, "reduction", "mean") == "mean"
    rows = []
    with torch.no_grad():
        for label, d in directions.items():
            d = torch.as_tensor(d).reshape(-1).to(params[0])
            if d.numel() != D:
                raise ShapeError(
                    f"loss_along_directions: {label!r} has {d.numel()} entries, D={D}."
                )
            if normalize:
                d = d / d.norm().clamp_min(torch.finfo(d.dtype).tiny)
            parts = d.split([p.numel() for p in params])
            for a in torch.as_tensor(alphas, dtype=torch.float64).reshape(-1).tolist():
                moved = {n: p + a * v.view_as(p) for n, p, v in zip(names, params, parts)}
                total = 0.0
                for X, y in batches:
                    out = torch.func.functional_call(model, moved, (X,))
                    weight = X.shape[0] / N if mean else 1.0
                    total += weight * float(loss_func(out, y))
                rows.append({"direction": label, "alpha": a, "loss": total})
    return pd.DataFrame(rows, columns=["direction", "alpha", "loss"])
