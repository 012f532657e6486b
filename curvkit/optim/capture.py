"""Capture the inputs, targets and forward pass of a closure."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from curvkit.errors import ShapeError


def _check(seen: dict) -> None:
    if len(seen["X"]) != 1 or len(seen["y"]) != 1:
        raise ShapeError(
            "The closure must call the model once and the loss function once, as in "
            f"`lambda: loss_func(model(X), y)`; saw {len(seen['X'])} model call(s) and "
            f"{len(seen['y'])} loss call(s)."
        )


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
    with restored_buffers_on_error(model):
        try:
            with torch.no_grad():
                closure()
        finally:
            h1.remove()
            h2.remove()
        _check(seen)
    return seen["X"][0].detach(), seen["y"][0].detach()


def capture_forward(
    net: nn.Module, loss_func: nn.Module, closure: Callable[[], Tensor], forward: Callable
):
    """Run ``closure`` once with ``net``'s forward replaced by ``forward(net, X)``.

    ``forward`` returns ``(state, output)``; the closure sees ``output``. This lets
    an extraction pass reuse the closure's forward pass instead of running its own.

    Returns:
        ``(X, y, state, value)``, ``value`` the closure's return value.

    Raises:
        ShapeError: If the closure does not call the model and the loss once each, or
            calls ``backward()`` itself. The buffers are then restored (a failing call
            leaves BatchNorm's running statistics as they were).
    """
    seen: dict[str, list] = {"X": [], "y": [], "state": []}

    original = net.__dict__.get("forward")  # an instance forward of the user's, if any

    def patched(X):
        seen["X"].append(X)
        # ``forward`` may call ``net(X)`` itself (the graph path's hooks): with the
        # model's own forward, not this one
        with _instance_forward(net, original):
            state, out = forward(net, X)
        seen["state"].append(state)
        return out

    hook = loss_func.register_forward_pre_hook(lambda m, args: seen["y"].append(args[1]))
    with restored_buffers_on_error(net):
        try:
            with _instance_forward(net, patched), torch.no_grad():
                value = closure()
        except RuntimeError as err:
            if "does not require grad" not in str(err):
                raise
            raise ShapeError(
                "The closure called backward(); K-FAC runs its own backward sweep. Return "
                "the loss without calling backward, as in `lambda: loss_func(model(X), y)`."
            ) from err
        finally:
            hook.remove()
        _check(seen)
    return _detach(seen["X"][0]), seen["y"][0].detach(), seen["state"][0], value


def _detach(X):
    """A model input detached: a tensor, or a dict/tuple/list of them."""
    if isinstance(X, Tensor):
        return X.detach()
    if isinstance(X, dict):
        return {k: _detach(v) for k, v in X.items()}
    if isinstance(X, (tuple, list)):
        return type(X)(_detach(v) for v in X)
    return X


@contextmanager
def _instance_forward(net: nn.Module, forward: Callable | None):
    """``net.forward = forward`` for the block (``None``: the class's forward)."""
    had = "forward" in net.__dict__
    old = net.__dict__.get("forward")
    if forward is None:
        net.__dict__.pop("forward", None)
    else:
        net.forward = forward
    try:
        yield
    finally:
        if had:
            net.forward = old
        else:
            net.__dict__.pop("forward", None)


@contextmanager
def preserved_buffers(model: nn.Module):
    """Restore every buffer (e.g. BatchNorm running statistics) on exit."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


@contextmanager
def restored_buffers_on_error(model: nn.Module):
    """Restore every buffer if the body raises; keep the body's changes otherwise."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
        raise
