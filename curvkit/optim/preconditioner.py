r"""Kronecker preconditioner: moving averages of factors and their damped inverses.

The preconditioner owns no model: it folds :class:`~curvkit.records.Records` of
successive batches into exponential moving averages (M&G §5), rebuilds the damped
inverse from the averages on request (M&G §6.3 factored Tikhonov, or exact
eigen-based Tikhonov), and applies it to flat gradients. Its state is plain
tensors and numbers, so ``torch.save`` with ``weights_only=True`` can store it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.errors import ShapeError
from curvkit.operators import kron_math as km
from curvkit.operators.ekfac import (
    correction_quantities,
    correction_source,
    eigenbases,
    record_eigenvalues,
)
from curvkit.operators.kron_base import (
    KronEigenOperator,
    KronLayer,
    check_factors,
    record_factors,
)
from curvkit.operators.kronecker import BlockDiagonalKFAC
from curvkit.records import Records


def all_finite(tensors) -> bool:
    """Whether every entry of every tensor is finite, with one device synchronisation.

    A NaN or infinity makes the tensor's sum non-finite, so one reduction per
    tensor decides the common case; only when some sum is non-finite (which a
    finite tensor can also give, by overflow) are the entries checked one by one.
    """
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    sums = torch.stack([t.sum().to(torch.float32) for t in tensors])
    if bool(torch.isfinite(sums).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


STRUCTURES = ("block-diagonal", "tridiagonal")


class KroneckerPreconditioner:
    r"""EMA Kronecker factors of the layers one extraction pass covers, and their inverse.

    Args:
        structure: ``"block-diagonal"`` (M&G §4.2) or ``"tridiagonal"`` (M&G §4.3).
        kind: Factor kind read from the records (``"kfac"``, ``"kflr"``, ``"empirical"``).
        damping_mode: ``"factored"`` (M&G §6.3, π-scaled) or ``"exact"``
            (:math:`(G\otimes A + \gamma^2 I)^{-1}`; block-diagonal only).
        ema_max: :math:`\varepsilon_{\max}` of the decay :math:`\min(1 - 1/k, \varepsilon_{\max})`.
        factor_dtype: Type the factors and inverses are kept in.
        ekfac: Eigenvalue-corrected K-FAC (George et al. 2018): keep the Kronecker
            eigenbasis of the averaged factors, refreshed by :meth:`refresh_basis`,
            and replace its eigenvalues by a moving average of the per-example
            gradients' second moments in that basis (:meth:`update_scales`); the
            inverse applies exact damping :math:`(S + \gamma^2)^{-1}`.
        ekfac_correction: Where EKFAC's second moments come from: ``"empirical"``
            (true-label gradients) or ``"kind"`` (the rows behind ``G[kind]``:
            George et al.'s EKFAC of the Fisher or GGN; ``Linear`` layers only).
    """

    def __init__(
        self,
        structure: str = "block-diagonal",
        kind: str = "kfac",
        damping_mode: str = "factored",
        ema_max: float = 0.95,
        factor_dtype: torch.dtype = torch.float32,
        ekfac: bool = False,
        ekfac_correction: str = "empirical",
    ):
        if structure not in STRUCTURES:
            raise ShapeError(f"structure={structure!r} is not supported; use one of {STRUCTURES}.")
        if structure == "tridiagonal" and damping_mode != "factored":
            raise ShapeError(
                "structure='tridiagonal' uses M&G's factored damping of the diagonal factors; "
                "damping_mode='exact' exists for 'block-diagonal' only."
            )
        if ekfac and structure != "block-diagonal":
            raise ShapeError("ekfac=True needs structure='block-diagonal'.")
        self.structure = structure
        self.kind = kind
        self.ekfac = ekfac
        self.ekfac_source = correction_source(kind, ekfac_correction)
        self.ekfac_quantities = correction_quantities(kind, ekfac_correction)
        self.bases: list | None = None
        self.S: list | None = None
        self.scale_updates = 0
        self.damping_mode = damping_mode
        self.ema_max = ema_max
        self.factor_dtype = factor_dtype
        self.layers: list[KronLayer] = []
        self.A: list[Tensor] = []
        self.G: list[Tensor] = []
        self.cross_A: list[Tensor | None] = []
        self.cross_G: list[Tensor | None] = []
        self.bias_scale: list[float] = []
        self.updates = 0
        self.inverse: KronEigenOperator | None = None
        self.inverse_damping: float | None = None
        self.fallback_pairs: list[tuple[str, str, str]] = []

    @property
    def quantities(self) -> tuple[str, ...]:
        """What an extraction pass must return for this preconditioner."""
        if self.structure == "tridiagonal":
            return (self.kind, "cross")
        return (self.kind, *self.ekfac_quantities) if self.ekfac else (self.kind,)

    # -- statistics ----------------------------------------------------------------------
    def update(self, records: Records, scale: float = 1.0, comm=None) -> None:
        r"""Fold one batch's factors into the averages.

        Args:
            records: An extraction pass with factors of :attr:`kind` (and cross factors
                for the tri-diagonal structure).
            scale: Multiplies the batch's ``A`` (and bias scale), e.g. ``N / N_s`` when the
                statistics come from ``N_s`` of ``N`` examples under ``reduction="sum"``.
            comm: A :class:`~curvkit.optim.comm.Communicator` averaging the batch's
                factors over processes before they are folded in.

        Raises:
            FloatingPointError: If the batch's factors are not finite (the averages
                are left unchanged).
        """
        layers = [KronLayer.from_record(r) for r in records]
        if self.layers and layers != self.layers:
            raise ShapeError("The layers of this extraction differ from the earlier ones.")
        factors = [record_factors(r, self.kind) for r in records]  # every block layout
        new_A = [scale * a.to(self.factor_dtype) for a, _ in factors]
        new_G = [g.to(self.factor_dtype) for _, g in factors]
        new_cA, new_cG = [], []
        if self.structure == "tridiagonal":
            for r in records:
                ok = r.cross_A is not None and self.kind in r.cross_G
                new_cA.append(scale * r.cross_A.to(self.factor_dtype) if ok else None)
                new_cG.append(r.cross_G[self.kind].to(self.factor_dtype) if ok else None)
        square = [t for t in new_A + new_G if t.dim() == 2]
        others = [t for t in new_A + new_G if t.dim() != 2]  # diagonal (embedding) factors
        tensors = square + others + [t for t in new_cA + new_cG if t is not None]
        if comm is not None:  # A and G are symmetric: their upper triangles suffice
            comm.average_(tensors, symmetric=len(square))
        if not all_finite(tensors):
            raise FloatingPointError("Non-finite Kronecker factors in this batch.")
        self.updates += 1
        decay = min(1.0 - 1.0 / self.updates, self.ema_max)
        if not self.layers:
            self.layers = layers
            self.A, self.G = new_A, new_G
            self.cross_A, self.cross_G = new_cA, new_cG
            self.bias_scale = [scale * r.bias_scale for r in records]
            return
        _ema(self.A, new_A, decay)
        _ema(self.G, new_G, decay)
        if self.structure == "tridiagonal":
            _ema(self.cross_A, new_cA, decay)
            _ema(self.cross_G, new_cG, decay)
        self.bias_scale = [
            decay * s + (1 - decay) * scale * r.bias_scale for s, r in zip(self.bias_scale, records)
        ]

    def refresh_basis(self) -> None:
        """EKFAC: eigenbasis of the current averaged factors; the scales start afresh."""
        self.bases = eigenbases(self.layers, self.A, self.G, self.bias_scale)
        self.S, self.scale_updates = None, 0

    def update_scales(self, records: Records, comm=None) -> None:
        r"""EKFAC: fold :math:`R\sum_n (U_G^\top \nabla\ell_n U_A)^{\odot 2}` into the scales."""
        weight = 1.0 / records.reduction_factor
        new = record_eigenvalues(self.layers, self.bases, records, weight, self.ekfac_source)
        if comm is not None:
            comm.average_([t for layer in new for t in layer])
        if not all_finite([t for layer in new for t in layer]):
            raise FloatingPointError("Non-finite EKFAC scales in this batch.")
        self.scale_updates += 1
        decay = min(1.0 - 1.0 / self.scale_updates, self.ema_max)
        if self.S is None:
            self.S = new
            return
        for old_layer, new_layer in zip(self.S, new):
            _ema(old_layer, new_layer, decay)

    # -- inverse -------------------------------------------------------------------------
    def refresh(self, damping: float) -> None:
        r"""Rebuild the inverse from the current averages with damping :math:`\gamma^2`.

        Args:
            damping: The damping the inverse applies (M&G's :math:`\gamma^2`).
        """
        if not self.layers:
            raise RuntimeError("refresh() before any statistics update.")
        if self.ekfac:
            if self.bases is None or self.S is None:
                raise RuntimeError("EKFAC refresh() needs refresh_basis() and update_scales().")
            blocks = [
                [
                    (U_G, U_A, km.safe_reciprocal(S + damping, pseudo=damping == 0))
                    for (U_G, U_A), S in zip(basis, scales)
                ]
                for basis, scales in zip(self.bases, self.S)
            ]
            self.inverse = KronEigenOperator(self.layers, blocks)
        elif self.structure == "block-diagonal":
            op = BlockDiagonalKFAC(self.layers, self.A, self.G, self.bias_scale)
            self.inverse = op.inverse(damping=damping, damping_mode=self.damping_mode)
        else:
            from curvkit.operators.tridiag import TriDiagonalKFAC

            op = TriDiagonalKFAC(
                self.layers, self.A, self.G, self.cross_A[:-1], self.cross_G[:-1], self.bias_scale
            )
            self.inverse = op.inverse(damping=damping)
            self.fallback_pairs = list(getattr(op, "fallback_pairs", []))
        self.inverse_damping = damping

    def apply(self, grad: Tensor) -> Tensor:
        """``F̂⁻¹ g`` for a flat gradient of the covered parameters, in the gradient's dtype."""
        if self.inverse is None:
            raise RuntimeError("apply() before refresh().")
        return (
            self.inverse.matmat(grad.to(self.factor_dtype).unsqueeze(1)).squeeze(1).to(grad.dtype)
        )

    # -- transactions --------------------------------------------------------------------
    _MUTABLE = (
        "layers", "A", "G", "cross_A", "cross_G", "bias_scale", "updates", "inverse",
        "inverse_damping", "bases", "S", "scale_updates", "fallback_pairs",
    )  # fmt: skip

    def snapshot(self) -> dict:
        """What :meth:`restore` needs to undo later updates and refreshes.

        Cheap: the averages are updated into new tensors, so the snapshot holds
        references (and copies of the lists), no copies of factors.
        """
        snap = {k: getattr(self, k) for k in self._MUTABLE}
        for k in ("layers", "A", "G", "cross_A", "cross_G", "bias_scale", "fallback_pairs"):
            snap[k] = list(snap[k])
        if snap["S"] is not None:
            snap["S"] = [list(layer) for layer in snap["S"]]
        return snap

    def restore(self, snap: dict) -> None:
        """Return to the state of :meth:`snapshot` (e.g. after a rejected step)."""
        for k, v in snap.items():
            setattr(self, k, v)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Configuration, factors, counters and the current inverse as tensors, lists, numbers."""
        return {
            "structure": self.structure,
            "kind": self.kind,
            "ekfac": self.ekfac,
            "damping_mode": self.damping_mode,
            "layers": [
                (la.name, list(la.weight_shape), la.has_bias, la.separate_bias)
                for la in self.layers
            ],
            "A": self.A,
            "G": self.G,
            "cross_A": self.cross_A,
            "cross_G": self.cross_G,
            "bias_scale": self.bias_scale,
            "updates": self.updates,
            "inverse": None if self.inverse is None else self.inverse.state_dict(),
            "inverse_damping": self.inverse_damping,
            "bases": self.bases,
            "S": self.S,
            "scale_updates": self.scale_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned; on any error nothing changes.

        Factors are cast to :attr:`factor_dtype`.

        Raises:
            ShapeError: If ``state`` comes from a preconditioner of another structure,
                kind, damping mode or EKFAC setting, or its factors do not fit its layers.
        """
        new = self._parse_state(state)
        for k, v in new.items():
            setattr(self, k, v)

    def _parse_state(self, state: dict) -> dict:  # noqa: C901
        where = "KroneckerPreconditioner.load_state_dict"
        if not isinstance(state, dict):
            raise ShapeError(f"{where}: expected a dict, got {type(state).__name__}.")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ShapeError(f"{where}: the state lacks {missing}.")
        has_cross = any(t is not None for t in list(state["cross_A"]) + list(state["cross_G"]))
        saved = {
            "structure": state.get("structure", "tridiagonal" if has_cross else None),
            "kind": state.get("kind"),
            "ekfac": state.get("ekfac", state["bases"] is not None or state["S"] is not None),
            "damping_mode": state.get("damping_mode"),
        }
        for name, value in saved.items():
            if value is not None and value != getattr(self, name):
                raise ShapeError(
                    f"{where}: the state is from {name}={value!r}, this preconditioner has "
                    f"{name}={getattr(self, name)!r}; construct it with {name}={value!r} to "
                    "load this state."
                )
        try:
            layers = [KronLayer(n, torch.Size(s), b, sb) for n, s, b, sb in state["layers"]]
        except (TypeError, ValueError) as err:
            raise ShapeError(f"{where}: malformed layers {state['layers']!r}.") from err
        dtype = self.factor_dtype
        A, G = list(_cast(state["A"], dtype)), list(_cast(state["G"], dtype))
        cross_A, cross_G = (
            list(_cast(state["cross_A"], dtype)),
            list(_cast(state["cross_G"], dtype)),
        )
        bias_scale = list(state["bias_scale"])
        if len(bias_scale) != len(layers):
            raise ShapeError(f"{where}: {len(layers)} layers but {len(bias_scale)} bias scales.")
        check_factors(layers, A, G)
        n_cross = len(layers) if self.structure == "tridiagonal" and layers else 0
        if len(cross_A) != n_cross or len(cross_G) != n_cross:
            raise ShapeError(
                f"{where}: a {self.structure} preconditioner over {len(layers)} layers has "
                f"{n_cross} cross factors; the state has {len(cross_A)}."
            )
        bases, S = _cast(state["bases"], dtype), _cast(state["S"], dtype)
        inverse = None
        if state["inverse"] is not None:
            if not layers:
                raise ShapeError(f"{where}: an inverse without layers.")
            inverse_state = _cast(state["inverse"], dtype)
            try:
                if self.structure == "block-diagonal" or self.ekfac:
                    inverse = KronEigenOperator.from_state_dict(layers, inverse_state)
                else:
                    from curvkit.operators.tridiag import TriDiagonalInverse

                    inverse = TriDiagonalInverse.from_state_dict(layers, inverse_state)
            except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
                raise ShapeError(f"{where}: the saved inverse does not fit the layers.") from err
        return {
            "layers": layers,
            "A": A,
            "G": G,
            "cross_A": cross_A,
            "cross_G": cross_G,
            "bias_scale": bias_scale,
            "updates": int(state["updates"]),
            "inverse": inverse,
            "inverse_damping": state["inverse_damping"],
            "bases": bases,
            "S": S,
            "scale_updates": int(state["scale_updates"]),
            "fallback_pairs": [],
        }


def _ema(avg: list, new: list, decay: float) -> None:
    """``avg[i] <- decay avg[i] + (1 - decay) new[i]`` into new tensors (snapshots keep the old)."""
    for i, (a, n) in enumerate(zip(avg, new)):
        avg[i] = None if a is None or n is None else a.mul(decay).add_(n, alpha=1.0 - decay)


def _cast(obj, dtype: torch.dtype):
    """Floating tensors in nested lists/tuples/dicts cast to ``dtype``."""
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


_STATE_KEYS = (
    "layers", "A", "G", "cross_A", "cross_G", "bias_scale", "updates", "inverse",
    "inverse_damping", "bases", "S", "scale_updates",
)  # fmt: skip
