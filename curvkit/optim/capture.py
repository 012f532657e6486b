"""Capture the inputs and targets of a closure's forward pass."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from curvkit.errors import ShapeError


def capture_batch(
    model: nn.Module, loss_func: nn.Module, closure: Callable[[], Tensor]
) -> tuple[Tensor, Tensor]:
    """Run ``closure`` once without autograd and return the ``(X, y)`` it used.

    The model's input is taken from a forward pre-hook on ``model``, the target from a
    forward pre-hook on ``loss_func``; both hooks are removed before returning.

    Raises:
        ShapeError: If the closure does not call ``model`` and ``loss_func`` once each.
    """
    seen: dict[str, list] = {"X": [], "y": []}
    h1 = model.register_forward_pre_hook(lambda m, args: seen["X"].append(args[0]))
    h2 = loss_func.register_forward_pre_hook(lambda m, args: seen["y"].append(args[1]))
    try:
        with torch.no_grad():
            closure()
    finally:
        h1.remove()
        h2.remove()
    if len(seen["X"]) != 1 or len(seen["y"]) != 1:
        raise ShapeError(
            "The closure must call the model once and the loss function once, as in "
            f"`lambda: loss_func(model(X), y)`; saw {len(seen['X'])} model call(s) and "
            f"{len(seen['y'])} loss call(s)."
        )
    return seen["X"][0].detach(), seen["y"][0].detach()
