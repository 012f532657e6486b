"""First-order updates for the parameters K-FAC has no curvature block for.

Modules without Kronecker factors (BatchNorm, LayerNorm, grouped convolutions, ...)
still have parameters to train. :class:`FirstOrderFallback` updates them with Adam
(Kingma & Ba 2015) or SGD with momentum, outside K-FAC's quadratic model. Its
buffers live in the optimiser's per-parameter state; new values are handed back
as pending writes, which the optimiser stores only if the step is accepted.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: First-order rules for parameters without Kronecker factors (``None``: raise instead).
FALLBACKS = ("adam", "sgd", None)

#: Adam's constants (Kingma & Ba 2015, Algorithm 1 defaults): the decays, their
#: complements (written out: ``1 - 0.9`` is not ``0.1`` in floating point) and epsilon.
ADAM_BETAS = (0.9, 0.999)
ADAM_WEIGHTS = (0.1, 0.001)
ADAM_EPS = 1e-8


class FirstOrderFallback:
    """Adam or SGD for the parameters of modules without Kronecker factors.

    Args:
        rule: ``"adam"`` or ``"sgd"`` (``None``: no fallback; :meth:`update` then
            must not be given parameters).
        lr: Its learning rate.
    """

    def __init__(self, rule: str | None, lr: float):
        self.rule, self.lr = rule, lr
        self.announced = False

    def announce(self, unfactored, where: str = "KFAC", stacklevel: int = 4) -> None:
        """Warn once which modules the fallback updates.

        Args:
            unfactored: ``(name, module, params)`` of the modules without factors
                (``Records.unfactored``).
            where: The optimiser's name, for the message.
            stacklevel: Passed on to :func:`warnings.warn`.
        """
        if unfactored and not self.announced:
            names = ", ".join(f"{type(m).__name__} {n!r}" for n, m, _ in unfactored)
            warnings.warn(
                f"{where}: no Kronecker factors for {names}; their parameters are updated by "
                f"{self.rule} (lr={self.lr}) outside the K-FAC step.",
                stacklevel=stacklevel,
            )
            self.announced = True

    def update(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        state_of: Callable[[Tensor], dict],
        momentum_of: Callable[[Tensor], float],
        pending: list,
        like: Tensor,
    ) -> Tensor:
        """The flat first-order update of ``params``; new buffers go to ``pending``.

        Args:
            params: The parameters without Kronecker factors.
            grads: Their gradients.
            state_of: The optimiser state dict of a parameter.
            momentum_of: SGD momentum of a parameter (its group's).
            pending: Receives ``(state, key, value)`` for every new buffer; the caller
                stores them if the step is accepted.
            like: A tensor of the device and dtype of an empty update.

        Returns:
            The concatenated updates (the parameters' order), to be added to them.
        """
        if not params:
            return torch.zeros(0, device=like.device, dtype=like.dtype)
        b1, b2 = ADAM_BETAS
        w1, w2 = ADAM_WEIGHTS
        out = []
        for p, g in zip(params, grads):
            state = state_of(p)
            if self.rule == "sgd":
                mom = momentum_of(p)
                buf = state.get("momentum_buffer")
                buf = g.clone() if buf is None else buf.mul(mom).add_(g)
                pending.append((state, "momentum_buffer", buf))
                d = -self.lr * buf
            else:  # Adam
                t = state.get("adam_step", 0) + 1
                m = state.get("exp_avg", torch.zeros_like(g)).mul(b1)
                v = state.get("exp_avg_sq", torch.zeros_like(g)).mul(b2)
                m.add_(g, alpha=w1)
                v.addcmul_(g, g, value=w2)
                pending += [
                    (state, "adam_step", t),
                    (state, "exp_avg", m),
                    (state, "exp_avg_sq", v),
                ]
                d = -self.lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + ADAM_EPS)
            out.append(d.reshape(-1))
        return torch.cat(out)
