r"""The settings of :class:`~curvkit.optim.KFAC`, validated in one place.

:class:`KFACConfig` is a frozen dataclass: building one checks every field
(:meth:`KFACConfig.validate`), so an optimiser constructed from it has nothing
left to check but the model and the parameters. ``KFAC(model, loss_func,
**kwargs)`` builds the config from its keyword arguments; ``KFAC(model,
loss_func, config=cfg, **overrides)`` starts from ``cfg``. The config travels in
:meth:`KFAC.state_dict` (:meth:`KFACConfig.to_dict`, plain strings and numbers),
and :meth:`KFAC.load_state_dict` refuses a state saved under another structure
(:meth:`KFACConfig.check_compatible`) before anything changes.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch
from torch import nn

from curvkit.errors import ConfigError
from curvkit.operators.ekfac import CORRECTIONS
from curvkit.operators.kronecker import DAMPING_MODES, STRUCTURES
from curvkit.optim.fallback import FALLBACKS

#: Statistics K-FAC can average: sampled labels (M&G), exact GGN square root, true labels.
KINDS = ("kfac", "kflr", "empirical")

#: Fields whose change makes a saved state meaningless for another optimiser (the
#: factors, inverse and buffers would be of another kind). The step mode (``lr``
#: ``None`` or a number) is checked by :meth:`KFAC.load_state_dict` separately.
STRUCTURAL = ("structure", "kind", "damping_mode", "ekfac", "ekfac_correction", "fallback")

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class UnknownArgumentError(ConfigError, TypeError):
    """A keyword argument that :class:`KFACConfig` does not have."""


def check_number(
    where: str,
    name: str,
    value,
    *,
    positive: bool = True,
    none: bool = False,
    infinite: bool = False,
) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a real number ``> 0`` (or ``>= 0``).

    Args:
        where: The caller, for the message (e.g. ``"KFAC"``).
        name: The argument, for the message.
        value: Its value.
        positive: ``> 0`` if true, ``>= 0`` otherwise.
        none: Whether ``None`` is allowed.
        infinite: Whether ``+inf`` is allowed.

    Raises:
        ConfigError: If ``value`` is not such a number.
    """
    if value is None and none:
        return
    bound = ("" if infinite else "finite ") + ("positive" if positive else "non-negative")
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = (v > 0 if positive else v >= 0) and (math.isfinite(v) or (infinite and v > 0))
    if not ok:
        extra = " or None" if none else ""
        raise ConfigError(f"{where}: {name} must be a {bound} number{extra}, got {value!r}.")


def _positive_int(name: str, value, none: bool = False) -> None:
    if value is None and none:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or int(value) != value or value < 1:
        extra = " or None" if none else ""
        raise ConfigError(f"KFAC: {name} must be a positive integer{extra}, got {value!r}.")


@dataclass(frozen=True)
class KFACConfig:
    r"""Settings of :class:`~curvkit.optim.KFAC` (see its arguments for their meaning).

    Every field is checked when the config is built; ``None`` for ``adapt_damping``,
    ``min_damping`` and ``factor_dtype`` means "the default for the model and step
    mode", which :class:`~curvkit.optim.KFAC` resolves.

    Raises:
        ConfigError: For a field out of its range or an unknown name (structure,
            kind, damping mode, EKFAC correction, fallback), naming the field and
            what is supported.

    Example:
        >>> from curvkit.optim.config import KFACConfig
        >>> cfg = KFACConfig(structure="tridiagonal", T_inv=10)
        >>> cfg.replace(damping=1e-3).damping
        0.001
    """

    structure: str = "block-diagonal"
    kind: str = "kfac"
    lr: float | None = None
    momentum: float = 0.0
    damping: float = 1e-2
    damping_mode: str = "factored"
    adapt_damping: bool | None = None
    T_cov: int = 1
    T_inv: int = 20
    T1: int = 5
    T2: int | None = None
    ema_max: float = 0.95
    mc_samples: int = 1
    stats_fraction: float = 1.0
    l2: float = 0.0
    weight_decay: float = 0.0
    kl_clip: float | None = None
    min_damping: float | None = None
    max_damping: float = 1e6
    factor_dtype: torch.dtype | None = None
    ekfac: bool = False
    ekfac_correction: str = "empirical"
    seed: int = 0
    fallback: str | None = "adam"
    fallback_lr: float = 1e-3
    kfac_approx: str = "expand"

    def __post_init__(self):
        self.validate()

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_kwargs(cls, config: KFACConfig | None = None, **kwargs) -> KFACConfig:
        """``config`` (default: the defaults) with the fields in ``kwargs`` replaced.

        Raises:
            UnknownArgumentError: For a keyword that is not a field (also a ``TypeError``).
            ConfigError: For a field out of its range.
        """
        if config is not None and not isinstance(config, KFACConfig):
            raise ConfigError(f"KFAC: config must be a KFACConfig, got {type(config).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise UnknownArgumentError(
                f"KFAC: unknown argument(s) {unknown}; the settings are {sorted(names)} "
                "(plus model, loss_func, params, config and comm)."
            )
        base = cls() if config is None else config
        return dataclasses.replace(base, **kwargs) if kwargs else base

    def replace(self, **changes) -> KFACConfig:
        """A copy with ``changes`` (validated like a new config)."""
        return KFACConfig.from_kwargs(self, **changes)

    # -- checks --------------------------------------------------------------------------
    def validate(self) -> None:  # noqa: C901
        """Check every field; nothing else happens (called when the config is built).

        Raises:
            ConfigError: Naming the first field out of its range.
        """
        if self.structure not in STRUCTURES:
            raise ConfigError(
                f"KFAC: structure={self.structure!r} is not supported; use one of {STRUCTURES}."
            )
        if self.kind not in KINDS:
            raise ConfigError(f"KFAC: kind={self.kind!r} is not supported; use one of {KINDS}.")
        if self.damping_mode not in DAMPING_MODES:
            raise ConfigError(
                f"KFAC: damping_mode={self.damping_mode!r} is not supported; use one of "
                f"{DAMPING_MODES}."
            )
        if self.structure == "tridiagonal" and self.damping_mode != "factored":
            raise ConfigError(
                "KFAC: structure='tridiagonal' uses M&G's factored damping of the diagonal "
                "factors; damping_mode='exact' exists for 'block-diagonal' only."
            )
        if not isinstance(self.ekfac, bool):
            raise ConfigError(f"KFAC: ekfac must be True or False, got {self.ekfac!r}.")
        if self.ekfac and self.structure != "block-diagonal":
            raise ConfigError("KFAC: ekfac=True needs structure='block-diagonal'.")
        if self.ekfac_correction not in CORRECTIONS:
            raise ConfigError(
                f"KFAC: ekfac_correction={self.ekfac_correction!r} is not supported; use one "
                f"of {CORRECTIONS}."
            )
        if self.adapt_damping not in (None, True, False):
            raise ConfigError(
                f"KFAC: adapt_damping must be True, False or None, got {self.adapt_damping!r}."
            )
        if self.kfac_approx not in ("expand", "reduce"):
            raise ConfigError(
                f"KFAC: kfac_approx={self.kfac_approx!r} is not supported; use 'expand' or "
                "'reduce'."
            )
        for name in ("T_cov", "T_inv", "T1", "mc_samples"):
            _positive_int(name, getattr(self, name))
        _positive_int("T2", self.T2, none=True)
        if not (isinstance(self.stats_fraction, numbers.Real) and 0.0 < self.stats_fraction <= 1.0):
            raise ConfigError(
                f"KFAC: stats_fraction must lie in (0, 1], got {self.stats_fraction}."
            )
        check_number("KFAC", "damping", self.damping)
        check_number("KFAC", "lr", self.lr, none=True)
        check_number("KFAC", "momentum", self.momentum, positive=False)
        check_number("KFAC", "l2", self.l2, positive=False)
        check_number("KFAC", "weight_decay", self.weight_decay, positive=False)
        check_number("KFAC", "kl_clip", self.kl_clip, none=True)
        check_number("KFAC", "min_damping", self.min_damping, positive=False, none=True)
        check_number("KFAC", "max_damping", self.max_damping, infinite=True)
        check_number("KFAC", "fallback_lr", self.fallback_lr)
        if self.min_damping is not None and self.min_damping > self.max_damping:
            raise ConfigError(
                f"KFAC: min_damping={self.min_damping} exceeds max_damping={self.max_damping}."
            )
        if not (isinstance(self.ema_max, numbers.Real) and 0.0 <= self.ema_max < 1.0):
            raise ConfigError(f"KFAC: ema_max must lie in [0, 1), got {self.ema_max!r}.")
        if self.fallback not in FALLBACKS:
            raise ConfigError(
                f"KFAC: fallback={self.fallback!r} is not supported; use one of {FALLBACKS}."
            )
        if self.factor_dtype not in (None, torch.float32, torch.float64):
            raise ConfigError(
                f"KFAC: factor_dtype must be float32 or float64, got {self.factor_dtype}."
            )
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool):
            raise ConfigError(f"KFAC: seed must be an integer, got {self.seed!r}.")

    def check_model(self, model: nn.Module) -> None:
        """Check the settings that depend on the model's layers.

        Raises:
            ConfigError: For ``ekfac_correction="kind"`` on a model with trainable
                layers other than ``Linear`` (each named with its type).
        """
        if self.ekfac and self.ekfac_correction == "kind":
            others = [
                f"{type(m).__name__} {n!r}"
                for n, m in model.named_modules()
                if type(m) is not nn.Linear
                and any(p.requires_grad for p in m.parameters(recurse=False))
            ]
            if others:
                raise ConfigError(
                    f"KFAC: ekfac_correction='kind' supports Linear layers only; the model has "
                    f"{', '.join(others)}. Use ekfac_correction='empirical'."
                )

    def check_compatible(self, saved: dict, where: str = "KFAC.load_state_dict") -> None:
        """Raise unless a state saved under the config ``saved`` fits this one.

        Only the :data:`STRUCTURAL` fields must agree; the others (damping, intervals,
        learning rate) may change between runs.

        Args:
            saved: :meth:`to_dict` of the config the state was saved under.
            where: The caller, for the message.

        Raises:
            ConfigError: Naming the first structural field that differs.
        """
        if not isinstance(saved, dict):
            raise ConfigError(f"{where}: the saved config is a {type(saved).__name__}, not a dict.")
        for name in STRUCTURAL:
            if name not in saved:
                raise ConfigError(f"{where}: the saved config lacks {name!r}.")
            if saved[name] != getattr(self, name):
                raise ConfigError(
                    f"{where}: the state is from {name}={saved[name]!r}, this optimiser has "
                    f"{name}={getattr(self, name)!r}; construct KFAC with {name}="
                    f"{saved[name]!r} to load this state."
                )

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The fields as plain Python values (``factor_dtype`` by name), for a state dict."""
        out = dataclasses.asdict(self)
        dtype = self.factor_dtype
        out["factor_dtype"] = None if dtype is None else str(dtype).removeprefix("torch.")
        return out

    @classmethod
    def from_dict(cls, values: dict) -> KFACConfig:
        """Inverse of :meth:`to_dict` (validated like a new config).

        Raises:
            ConfigError: For an unknown field, an unknown dtype or a field out of range.
        """
        values = dict(values)
        dtype = values.get("factor_dtype")
        if dtype is not None:
            if dtype not in _DTYPES:
                raise ConfigError(
                    f"KFACConfig.from_dict: factor_dtype={dtype!r} is not one of {list(_DTYPES)}."
                )
            values["factor_dtype"] = _DTYPES[dtype]
        return cls.from_kwargs(None, **values)
