r"""K-FAC optimiser (Martens & Grosse 2015) with block-diagonal and tri-diagonal inverses.

One step (M&G Algorithm 2, §5–§7):

1. the closure's forward pass is captured (inputs and targets), and one
   extraction pass (:func:`curvkit.extract`) returns the gradient and, every
   ``T_cov`` steps, the Kronecker statistics, folded into moving averages;
2. every ``T_inv`` steps the damped inverse is rebuilt (factored Tikhonov with
   :math:`\gamma^2 = \lambda + \eta`, or exact eigen-based Tikhonov);
3. the proposal :math:`\Delta = -\hat F^{-1}\nabla h` (with :math:`\ell_2` term
   :math:`\eta\theta` in :math:`\nabla h`);
4. either M&G §7: :math:`\delta = \alpha\Delta + \mu\delta_0` minimising the exact
   quadratic model :math:`M(\delta) = \tfrac12\delta^\top(F + (\lambda+\eta)I)\delta
   + \nabla h^\top\delta` with the exact GGN of the current batch along
   :math:`\Delta, \delta_0` (forward-mode products); or a fixed
   learning rate with momentum (optionally KL-clipped, Ba et al. 2017);
5. every ``T1`` steps the Levenberg–Marquardt rule adapts :math:`\lambda` from
   :math:`\rho = (h(\theta+\delta) - h(\theta)) / M(\delta)` (M&G §6.5).

A step whose model output, loss, gradient, statistics or update is not finite is
rejected: parameters, factor averages, inverse factors, momentum and fallback
buffers and the label sampler stay as they were, :math:`\lambda` is raised and
the event is recorded in :attr:`KFAC.events`. Every argument is validated before
any state changes, so a call that raises changes nothing.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor, nn

from curvkit.errors import ConfigError, ShapeError, UnsupportedModuleError
from curvkit.extraction.losses import check_loss
from curvkit.operators.kron_base import check_untied
from curvkit.optim import damping as dm
from curvkit.optim.capture import capture_forward, preserved_buffers
from curvkit.optim.comm import Communicator
from curvkit.optim.config import KINDS, KFACConfig, check_number
from curvkit.optim.fallback import FALLBACKS, FirstOrderFallback
from curvkit.optim.preconditioner import KroneckerPreconditioner, all_finite
from curvkit.timing import Clock

__all__ = ["FALLBACKS", "KFAC", "KINDS", "KFACConfig"]


class _NonFiniteBatch(Exception):
    """Internal: the batch's output or loss is not finite (the step is rejected)."""

    def __init__(self, loss):
        super().__init__("non-finite model output or loss")
        self.loss = loss


class KFAC(torch.optim.Optimizer):
    r"""K-FAC for any model the extraction supports (``docs/optimizer.md``).

    A plain ``nn.Sequential`` chain runs through the sweep, any other ``nn.Module``
    through the graph path (every block layout of
    :class:`~curvkit.operators.kron_base.KronLayer`: Linear/Conv, grouped and
    transposed convolutions, embeddings, exact dense blocks of normalisation layers).

    Args:
        model: The model (any ``nn.Module`` :func:`curvkit.extract` supports).
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``.
        params: Parameters or parameter groups (default: the model's trainable
            parameters). A layer's weight and bias must sit in the same group. A
            parameter listed twice raises; so does a weight tied between two modules
            (Kronecker factors are per module).
        config: A :class:`~curvkit.optim.config.KFACConfig` holding the settings below;
            keyword arguments given as well replace its fields. Without it, the
            settings are the keyword arguments (defaults as listed).
        structure: ``"block-diagonal"`` or ``"tridiagonal"`` (coupled pairs of
            consecutive ``Linear`` layers; every other layer block-diagonal).
        kind: Statistics: ``"kfac"`` (sampled labels; M&G), ``"kflr"`` (exact
            GGN square root), ``"empirical"`` (true labels).
        lr: ``None`` selects M&G §7's automatic step (:math:`\alpha`, :math:`\mu`
            from the exact quadratic model); a float uses a fixed learning rate
            with ``momentum`` (per parameter group). All groups use one mode. The
            automatic step has no learning rate, so an LR scheduler cannot drive it:
            :meth:`step` raises when one is attached.
        momentum: Heavy-ball momentum of the fixed-lr mode.
        damping: Initial :math:`\lambda` in the automatic mode, the fixed one with a
            fixed ``lr``. It is added to the curvature of the loss as written (for a
            mean-reduced loss, an average over examples). The default ``1e-2``
            trains the five problems of ``analysis/initial_damping.py``; ``1e-3``
            diverges within four steps on three of its four classifiers, while the
            MSE autoencoder progresses faster from it. Too large is safer than too
            small: Levenberg–Marquardt changes :math:`\lambda` by a factor
            :math:`(20/19)^{T_1}` every ``T1`` steps, about 5% per step.
        damping_mode: ``"factored"`` (M&G §6.3) or ``"exact"`` (block-diagonal only).
        adapt_damping: Levenberg–Marquardt adaptation of :math:`\lambda`
            (default: on in the automatic mode, off with a fixed ``lr``).
        T_cov: Steps between statistics updates (M&G: 1).
        T_inv: Steps between inverse rebuilds (M&G: 20).
        T1: Steps between damping adaptations (M&G: 5).
        T2: Steps between :math:`\gamma` re-selections (M&G §6.6: 20); ``None`` uses
            :math:`\gamma = \sqrt{\lambda + \eta}` always.
        ema_max: Largest moving-average decay (M&G: 0.95).
        mc_samples: Sampled labels per example for ``kind="kfac"``.
        kfac_approx: ``"expand"`` (default) or ``"reduce"``: how a weight shared over
            locations (convolutions, ``Linear`` on ``[N, T, d]``) is factored
            (Eschenhagen et al. 2023; see :func:`curvkit.extract`).
        stats_fraction: Fraction of the batch the statistics come from (for large
            batches, e.g. 1/8); the gradient always uses the whole batch.
        l2: :math:`\eta`, an :math:`\ell_2` term added to the objective (M&G §6.1).
        weight_decay: Decoupled weight decay :math:`\theta \leftarrow \theta(1 -
            \text{lr}\cdot\text{wd})` (per group; ``lr`` is 1 in the automatic mode).
        kl_clip: KL-clipping bound :math:`\kappa` of the fixed-lr mode (Ba et al. 2017).
        min_damping, max_damping: Bounds of :math:`\lambda`. Default floor: ``1e-6``
            for the tri-diagonal structure with float32 factors, ``1e-8`` otherwise.
            With a floor of ``1e-8`` the float32 tri-diagonal inverse let the
            training loss of the MNIST autoencoder rise again once the floor was
            reached, which float64 factors did not (see ``docs/optimizer.md``).
        factor_dtype: Type of factors and inverses (float32 or float64); default: the
            parameters' type (float32 for half precision).
        ekfac: Eigenvalue-corrected K-FAC (George et al. 2018; block-diagonal only):
            eigenbasis from the averaged factors every ``T_inv`` steps, eigenvalues
            from a moving average of per-example gradient second moments (factored
            for ``Linear`` layers; conv layers materialise
            their per-example gradients, memory ``N x D_conv`` during the pass).
        ekfac_correction: ``"empirical"`` (default): EKFAC's second moments from
            true-label gradients; ``"kind"``: from the output gradients behind
            ``G[kind]`` (sampled labels for ``"kfac"``: George et al.'s EKFAC of the
            Fisher; ``Linear`` layers only).
        seed: Seed of the label sampling.
        fallback: First-order rule for parameters of modules without curvature
            (custom modules; BatchNorm/LayerNorm in a chain the sweep runs):
            ``"adam"`` (default), ``"sgd"`` (with the group's momentum), or ``None``
            to raise instead (at construction). It is announced once and applied
            outside the quadratic model.
        fallback_lr: Learning rate of the fallback rule.
        comm: Where processes agree in data-parallel training (averaged gradients,
            statistics and curvature products; see :mod:`curvkit.distributed.kfac`).
            Default: one process. A ``DistributedDataParallel`` model needs one:
            build the optimiser with :func:`curvkit.distributed.make_kfac`.

    All settings are checked (:meth:`KFACConfig.validate
    <curvkit.optim.config.KFACConfig.validate>`) before anything is built; the
    optimiser keeps them in :attr:`config`.

    Raises:
        ConfigError: For an argument out of its range (NaN, infinite, negative where a
            positive number is due), an unknown name (structure, kind, ...), a
            parameter listed twice, or parameter groups mixing ``lr=None`` with a
            fixed ``lr``; for an unknown keyword argument the error is also a
            ``TypeError``.
        UnsupportedLossError: For a loss other than the three above, or a reduction
            other than ``"mean"``/``"sum"``.
        UnsupportedModuleError: For a weight tied between two modules, a module
            without a curvature rule with ``fallback=None`` (named by path and type),
            or per-example statistics (``kind="empirical"``, ``ekfac``) with a
            BatchNorm in train mode.

    Example:
        >>> import torch, curvkit as ck
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator ...>
        >>> nn = torch.nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> loss_func = torch.nn.CrossEntropyLoss()
        >>> X, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> opt = ck.optim.KFAC(model, loss_func, damping=1e-2)
        >>> losses = [float(opt.step(lambda: loss_func(model(X), y))) for _ in range(10)]
        >>> losses[-1] < losses[0]
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_func: nn.Module,
        params=None,
        *,
        config: KFACConfig | None = None,
        comm: Communicator | None = None,
        **kwargs,
    ):
        cfg = KFACConfig.from_kwargs(config, **kwargs)  # every value checked here
        cfg.check_model(model)
        check_loss(loss_func)  # type, reduction and likelihood options, before any state
        net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        check_untied(net, "KFAC")
        if comm is None and net is not model:
            raise ConfigError(
                "KFAC got a DistributedDataParallel model without a communicator; build it "
                "with curvkit.distributed.make_kfac(model, loss_func, ...), which adds the "
                "communicator and a per-process sampling seed."
            )
        self._automatic = cfg.lr is None  # the step mode; param groups may not change it
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        defaults = dict(
            lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, kl_clip=cfg.kl_clip
        )
        super().__init__(params, defaults)
        factor_dtype = cfg.factor_dtype
        if factor_dtype is None:
            dtype = self.param_groups[0]["params"][0].dtype
            factor_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        #: The settings this optimiser was built with (``None`` fields as given).
        self.config = cfg
        self.model = model
        # a DistributedDataParallel wrapper is called by the closure; the curvature
        # passes run on the module inside it (their gradients are averaged by `comm`)
        self.net = net
        self.loss_func = loss_func
        self.kind = cfg.kind
        self.structure = cfg.structure
        self.damping_mode = cfg.damping_mode
        self.mc_samples = cfg.mc_samples
        self.stats_fraction = cfg.stats_fraction
        self.T_cov, self.T_inv, self.T1, self.T2 = cfg.T_cov, cfg.T_inv, cfg.T1, cfg.T2
        self.l2 = cfg.l2
        min_damping = cfg.min_damping
        if min_damping is None:
            low_precision = factor_dtype != torch.float64
            min_damping = 1e-6 if cfg.structure == "tridiagonal" and low_precision else 1e-8
        self.min_damping, self.max_damping = min_damping, cfg.max_damping
        self.adapt_damping = (cfg.lr is None) if cfg.adapt_damping is None else cfg.adapt_damping
        self.preconditioner = KroneckerPreconditioner(
            cfg.structure,
            cfg.kind,
            cfg.damping_mode,
            cfg.ema_max,
            factor_dtype,
            cfg.ekfac,
            cfg.ekfac_correction,
        )
        self.fallback, self.fallback_lr = cfg.fallback, cfg.fallback_lr
        self.first_order = FirstOrderFallback(cfg.fallback, cfg.fallback_lr)
        _check_model(net, self.preconditioner.quantities, cfg.fallback)
        self.comm = comm if comm is not None else Communicator()
        self.generator = torch.Generator(device=_device_of(model)).manual_seed(cfg.seed)
        self.state["kfac"] = {
            "step": 0,
            "damping": float(cfg.damping),
            "gamma": math.sqrt(cfg.damping + cfg.l2),
            "last_rho": float("nan"),
        }
        self.events: list[dict] = []
        self.timers: dict[str, float] = defaultdict(float)

    # -- public --------------------------------------------------------------------------
    @property
    def damping(self) -> float:
        r"""Current :math:`\lambda`."""
        return self.state["kfac"]["damping"]

    @property
    def gamma(self) -> float:
        r"""Current :math:`\gamma` (the inverse uses damping :math:`\gamma^2`)."""
        return self.state["kfac"]["gamma"]

    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group after validating it (see :class:`KFAC`'s arguments).

        Raises:
            ConfigError: For a parameter listed twice, a value out of range, or an
                ``lr`` whose mode (``None`` or a number) differs from the other groups'.
        """
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif not isinstance(params, set):  # a set: torch's own error
            params = list(params)
        param_group = {**param_group, "params": params}
        seen: dict[int, int] = {}
        for i, p in enumerate(params):
            if id(p) in seen:
                raise ConfigError(
                    f"KFAC: params[{i}] is params[{seen[id(p)]}] (shape {tuple(p.shape)}); "
                    "list each parameter once (a tied weight is one parameter)."
                )
            seen[id(p)] = i
        self._check_group({**self.defaults, **param_group})
        lr = param_group.get("lr", self.defaults["lr"])
        if (lr is None) != self._automatic:
            raise ConfigError(
                f"KFAC: a parameter group has lr={lr!r}, but the optimiser uses "
                f"{'the automatic step (lr=None)' if self._automatic else 'a fixed lr'}; the "
                "automatic step sets one step for all parameters, so give every parameter "
                "group lr=None or every group a fixed lr."
            )
        super().add_param_group(param_group)

    @staticmethod
    def _check_group(group: dict) -> None:
        check_number("KFAC", "lr", group["lr"], positive=False, none=True)  # 0 freezes a group
        check_number("KFAC", "momentum", group["momentum"], positive=False)
        check_number("KFAC", "weight_decay", group["weight_decay"], positive=False)
        check_number("KFAC", "kl_clip", group["kl_clip"], none=True)

    def _check_groups(self, groups: list[dict]) -> None:
        """Validate parameter groups (which a user or a scheduler may have changed)."""
        for group in groups:
            self._check_group(group)
        modes = {group["lr"] is None for group in groups}
        if len(modes) > 1:
            raise ConfigError(
                "KFAC: parameter groups mix lr=None (automatic step) with a fixed lr; give "
                "every group lr=None or every group a fixed lr."
            )
        for i, group in enumerate(groups):
            if (group["lr"] is None) != self._automatic:
                if self._automatic:
                    raise ConfigError(
                        f"KFAC: constructed with lr=None (the automatic step of M&G §7, which "
                        f"chooses the step size itself), but param group {i} now has "
                        f"lr={group['lr']!r} (set by an LR scheduler or by hand). Construct "
                        "KFAC with a fixed lr to schedule it."
                    )
                raise ConfigError(
                    f"KFAC: constructed with a fixed lr, but param group {i} now has lr=None; "
                    "construct KFAC with lr=None for the automatic step."
                )
        if self._automatic and any("initial_lr" in group for group in groups):
            raise ConfigError(
                "KFAC: an LR scheduler is attached, but with lr=None the automatic step "
                "(M&G §7) chooses the step size from the quadratic model and has no learning "
                "rate to schedule. Construct KFAC with a fixed lr to use a scheduler."
            )

    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # noqa: C901
        """One K-FAC step.

        Args:
            closure: Runs the model's forward pass on one batch and returns the loss,
                e.g. ``lambda: loss_func(model(X), y)``. It must not call ``backward``;
                it may be called a second time (under ``torch.no_grad``) to measure
                the reduction ratio.

        Returns:
            The loss before the step.

        Raises:
            ConfigError: For a closure that is not callable, or parameter groups
                changed into an invalid state (e.g. ``lr`` NaN, a scheduler on the
                automatic step).
            ShapeError: For a closure that calls ``backward()`` or does not call the
                model and the loss once each, or an empty batch. Nothing changes
                then: parameters, optimiser state and the model's buffers are as
                before the call.
        """
        if not callable(closure):
            raise ConfigError(
                "KFAC.step needs a closure that runs the forward pass and returns the loss, "
                "e.g. `opt.step(lambda: loss_func(model(X), y))`."
            )
        self._check_groups(self.param_groups)
        st = self.state["kfac"]
        k = st["step"] + 1
        pre = self.preconditioner
        refresh_due = (k - 1) % self.T_inv == 0 or pre.inverse is None
        stats = (k - 1) % self.T_cov == 0 or pre.updates == 0 or (pre.ekfac and refresh_due)
        snapshot = pre.snapshot()
        generator_state = self.generator.get_state()
        buffers = [(b, b.detach().clone()) for b in self.net.buffers()]

        def undo():
            pre.restore(snapshot)
            self.generator.set_state(generator_state)
            with torch.no_grad():
                for b, value in buffers:  # e.g. BatchNorm statistics of a NaN batch
                    b.copy_(value)

        def reject(loss, reason):
            undo()
            return self._reject(k, loss, reason)

        try:  # nothing below changes state that is kept unless the step is accepted
            try:
                records, stats_records, stats_scale, X, y = self._extract(closure, stats)
            except _NonFiniteBatch as bad:
                return reject(bad.loss, str(bad))
            loss = records.loss
            params = records.params
            others = [p for _, _, ps in records.unfactored for p in ps]
            self.first_order.announce(records.unfactored, stacklevel=3)
            grads = [p.grad for p in params]
            other_grads = [p.grad for p in others]
            if self.comm.any(not all_finite([loss, *grads, *other_grads])):
                return reject(loss, "non-finite loss or gradient")
            with self._timer("communication"):
                loss = loss.clone()
                self.comm.average_([*grads, *other_grads, loss], label="gradients")
            if stats:
                try:
                    with self._timer("factors"):
                        pre.update(stats_records, stats_scale, self.comm)
                except FloatingPointError as err:
                    return reject(loss, str(err))
            if pre.ekfac:
                with self._timer("inverses"):
                    if refresh_due or pre.bases is None:
                        pre.refresh_basis()
                    try:
                        if stats:
                            pre.update_scales(stats_records, self.comm)
                    except FloatingPointError as err:
                        return reject(loss, str(err))
                self._refresh()
            elif refresh_due:
                self._refresh()
            flat_g = torch.cat([g.reshape(-1) for g in grads])
            if self.l2:
                flat_g = flat_g + self.l2 * torch.cat([p.detach().reshape(-1) for p in params])
            automatic = self._automatic
            gamma = st["gamma"]
            pending: list[tuple[dict, str, object]] = []  # buffer updates, kept if accepted
            if automatic and self.T2 is not None and k % self.T2 == 0:
                update, model_change, gamma = self._reselect_gamma(X, y, params, flat_g)
            else:
                with self._timer("precondition"):
                    proposal = self.preconditioner.apply(flat_g).neg_()
                if automatic:
                    with self._timer("quadratic_model"):
                        update, model_change = self._automatic_update(
                            X, y, params, flat_g, proposal
                        )
                else:
                    update = self._fixed_lr_update(params, flat_g, proposal, pending)
                    model_change = None
            other_update = self._fallback_update(others, other_grads, pending)
            if self.comm.any(not all_finite([update, other_update])):
                return reject(loss, "non-finite update")
        except BaseException:
            undo()
            raise
        for state, key, value in pending:
            state[key] = value
        st["gamma"] = gamma
        self._apply(params + others, torch.cat([update, other_update]) if others else update)
        st["step"] = k
        if automatic:
            st["prev_update"] = update
        if self.adapt_damping and model_change is not None and k % self.T1 == 0:
            with self._timer("rho"), torch.no_grad(), preserved_buffers(self.model):
                new_loss = self.comm.average_scalar(float(closure()))
            rho = dm.reduction_ratio(new_loss, float(loss), model_change)
            st["last_rho"] = rho
            st["damping"] = dm.levenberg_marquardt(
                st["damping"], rho, dm.lm_omega(self.T1), self.min_damping, self.max_damping
            )
            if self.T2 is None:
                st["gamma"] = math.sqrt(st["damping"] + self.l2)
        return loss

    # -- pieces --------------------------------------------------------------------------
    def _extract(self, closure, stats: bool):
        """The closure's forward pass, one backward sweep; statistics of a subset if asked.

        Returns:
            ``(records, stats_records, scale, X, y)``; ``stats_records`` is ``None``
            without statistics, ``scale`` rescales a subset's sum-reduced factors.
        """
        from curvkit.extraction import extract
        from curvkit.extraction.engine import backward_sweep, choose_backend, forward_pass
        from curvkit.extraction.graph import backward_graph, forward_graph

        unsupported = "error" if self.fallback is None else "gradient"
        quantities = set(self.preconditioner.quantities) if stats else set()

        def forward(net, X):
            if choose_backend(net, X, quantities, unsupported) == "graph":
                n = _batch_size(X)  # statistics of a subset come from a second pass
                whole = max(1, int(round(self.stats_fraction * n))) == n
                fwd = forward_graph(net, X, quantities if whole else set(), unsupported)
            else:
                fwd = forward_pass(net, X, unsupported=unsupported)
            return fwd, fwd.output

        def backward(fwd, y, quantities, **kwargs):
            if hasattr(fwd, "plan"):  # a graph-path pass
                kwargs.pop("loss_value", None)
                return backward_graph(fwd, self.loss_func, y, unsupported=unsupported, **kwargs)
            return backward_sweep(fwd, self.loss_func, y, quantities, **kwargs)

        with self._timer("extraction"):
            X, y, fwd, value = capture_forward(self.net, self.loss_func, closure, forward)
            if self._automatic and not isinstance(X, Tensor):
                raise ConfigError(
                    "KFAC: the automatic step (lr=None) evaluates the exact GGN on the batch, "
                    f"which needs a tensor model input, got a {type(X).__name__}; use a fixed "
                    "lr."
                )
            N = _batch_size(X)
            if N == 0:
                raise ShapeError(
                    "KFAC.step: the closure's batch is empty (0 examples); K-FAC needs at "
                    "least one example per step."
                )
            value = value if isinstance(value, torch.Tensor) else None  # else: recomputed
            checked = [fwd.output] if value is None else [fwd.output, value]
            if self.comm.any(not all_finite(checked)):
                raise _NonFiniteBatch(
                    value if value is not None else fwd.output.new_tensor(math.nan)
                )
            for p in self._all_params():
                p.grad = None
            n_stats = max(1, int(round(self.stats_fraction * N)))
            kwargs = dict(
                mc_samples=self.mc_samples,
                generator=self.generator,
                kfac_approx=self.config.kfac_approx,
            )
            if not stats or n_stats == N:
                rec = backward(fwd, y, quantities, loss_value=value, **kwargs)
                return rec, (rec if stats else None), 1.0, X, y
            if not isinstance(X, Tensor) or y.shape[0] % N:
                raise ShapeError(
                    "KFAC: stats_fraction < 1 needs a tensor input and a whole number of "
                    f"target rows per example (got {y.shape[0]} rows for {N} examples)."
                )
            rows = y.shape[0] // N  # e.g. tokens of a sequence output flattened to [N*T, C]
            full = backward(fwd, y, set(), loss_value=value)
            grads = [p.grad for p in self._all_params()]
            for p in self._all_params():
                p.grad = None
            with preserved_buffers(self.net):  # the closure's pass moved them already
                sub = extract(
                    self.net, self.loss_func, X[:n_stats], y[: n_stats * rows],
                    quantities=quantities,
                    unsupported=unsupported, **kwargs,
                )  # fmt: skip
            for p, g in zip(self._all_params(), grads):
                p.grad = g
            scale = (full.reduction_factor * N) / (sub.reduction_factor * n_stats)
            return full, sub, scale, X, y

    def _fallback_update(self, params, grads, pending: list) -> Tensor:
        """First-order updates (flat) of the parameters without Kronecker factors.

        The new buffers go to ``pending`` as ``(state, key, value)``; the step stores
        them only if it is accepted (see :class:`~curvkit.optim.fallback.FirstOrderFallback`).
        """
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        like = self.param_groups[0]["params"][0]
        return self.first_order.update(
            params,
            grads,
            state_of=lambda p: self.state[p],
            momentum_of=lambda p: group_of[p]["momentum"] if p in group_of else 0.0,
            pending=pending,
            like=like,
        )

    def _refresh(self, gamma: float | None = None) -> None:
        with self._timer("inverses"):
            gamma = self.state["kfac"]["gamma"] if gamma is None else gamma
            self.preconditioner.refresh(gamma**2, comm=self.comm)
            if self.preconditioner.fallback_pairs and not getattr(self, "_warned_pairs", False):
                warnings.warn(
                    "KFAC(structure='tridiagonal'): no cross factors between "
                    + ", ".join(
                        f"{a}->{b} ({why})" for a, b, why in self.preconditioner.fallback_pairs
                    )
                    + "; these pairs are treated block-diagonally.",
                    stacklevel=3,
                )
                self._warned_pairs = True

    def _reselect_gamma(self, X, y, params, flat_g):
        r"""M&G §6.6: the best of three :math:`\gamma` by the quadratic model.

        Candidates :math:`\gamma, \omega_2\gamma, \gamma/\omega_2` with
        :math:`\omega_2 = (19/20)^{T_2/2}`; the one whose step minimises :math:`M` is kept.

        Returns:
            ``(update, model_change, gamma)``; the inverse of ``gamma`` is installed.
        """
        st = self.state["kfac"]
        omega2 = math.sqrt(19.0 / 20.0) ** self.T2
        candidates = []
        for gamma in (st["gamma"], omega2 * st["gamma"], st["gamma"] / omega2):
            self._refresh(gamma)
            with self._timer("precondition"):
                proposal = self.preconditioner.apply(flat_g).neg_()
            candidates.append((gamma, self.preconditioner.inverse, proposal))
        prev = st.get("prev_update")
        with self._timer("quadratic_model"):
            # the three proposals and the previous update along the exact GGN at once
            extra = [] if prev is None else [prev]
            Q = self._quadratic(X, y, params, [p for *_, p in candidates] + extra)
            best = None
            for j, (gamma, inverse, proposal) in enumerate(candidates):
                idx = [j] if prev is None else [j, 3]
                update, change = self._automatic_update(
                    X, y, params, flat_g, proposal, Q[idx][:, idx]
                )
                if best is None or change < best[2]:
                    best = (gamma, inverse, change, update)
        gamma, inverse, change, update = best
        self.preconditioner.inverse, self.preconditioner.inverse_damping = inverse, gamma**2
        return update, change, gamma

    def _quadratic(self, X, y, params, vecs) -> Tensor:
        """``VᵀGV`` for the exact GGN ``G`` on the batch, by forward-mode products only."""
        from curvkit.operators.exact import ggn

        # the closure's forward pass moved the buffers (BatchNorm statistics) once; the
        # model's passes here must not move them again
        with preserved_buffers(self.net), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is in training mode.*")
            G = ggn(self.net, self.loss_func, (X, y), params=params)
            Q = G.quadratic_form(torch.stack(vecs, 1))
        self.comm.average_([Q], label="ggn_products")
        return Q

    def _automatic_update(self, X, y, params, flat_g, proposal, Q=None):
        """M&G §7: ``α``, ``μ`` from the quadratic model (``Q``: its GGN part, if known)."""
        st = self.state["kfac"]
        prev = st.get("prev_update")
        vecs = [proposal] if prev is None else [proposal, prev]
        if Q is None:
            Q = self._quadratic(X, y, params, vecs)
        V = torch.stack(vecs, 1)
        C = (Q + (st["damping"] + self.l2) * (V.T @ V)).tolist()
        gd = float(flat_g @ proposal)
        if prev is None:
            q = dm.solve_alpha_mu(C[0][0], 0.0, 0.0, gd, 0.0, False)
        else:
            q = dm.solve_alpha_mu(C[0][0], C[0][1], C[1][1], gd, float(flat_g @ prev), True)
        update = q.alpha * proposal if prev is None else q.alpha * proposal + q.mu * prev
        return update, q.model_change

    def _fixed_lr_update(self, params, flat_g, proposal, pending: list):
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        kl = self.param_groups[0]["kl_clip"]
        nu = 1.0
        if kl is not None:
            lr = self.param_groups[0]["lr"]
            nu = dm.kl_clip_factor(lr, float(flat_g @ proposal), kl)
        out = torch.empty_like(proposal)
        sizes = [p.numel() for p in params]
        for p, d, o in zip(params, proposal.split(sizes), out.split(sizes)):
            group = group_of.get(p)
            if group is None:  # not given to this optimiser: left unchanged by _apply
                o.zero_()
                continue
            d = d.view_as(p) if nu == 1.0 else d.view_as(p) * nu
            if group["momentum"]:
                buf = self.state[p].get("momentum_buffer")
                buf = d.clone() if buf is None else buf.mul(group["momentum"]).add_(d)
                pending.append((self.state[p], "momentum_buffer", buf))
                d = buf
            torch.mul(d.reshape(-1), group["lr"], out=o)
        return out

    @torch.no_grad()
    def _apply(self, params, update: Tensor) -> None:
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        for p, d in zip(params, update.split([p.numel() for p in params])):
            if p not in group_of:  # a parameter this optimiser was not given
                continue
            group = group_of[p]
            if group["weight_decay"]:
                p.mul_(1 - (group["lr"] or 1.0) * group["weight_decay"])
            p.add_(d.view_as(p))

    def _reject(self, k: int, loss: Tensor, reason: str) -> Tensor:
        st = self.state["kfac"]
        st["damping"] = min(st["damping"] / dm.lm_omega(self.T1), self.max_damping)
        st["gamma"] = math.sqrt(st["damping"] + self.l2)
        st["step"] = k
        st.pop("prev_update", None)
        for p in self._all_params():
            p.grad = None
        self.events.append(
            {"step": k, "event": "rejected", "reason": reason, "damping": st["damping"]}
        )
        if self.preconditioner.layers:
            self._refresh()
        return loss

    def _all_params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _timer(self, phase: str):
        return Clock(phases=self.timers)(phase)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Parameter state, counters, damping, factors, inverses, RNG and configuration.

        The configuration is :meth:`KFACConfig.to_dict` (plain strings and numbers), so
        ``torch.load(..., weights_only=True)`` reads the whole state.
        """
        sd = super().state_dict()
        sd["preconditioner"] = self.preconditioner.state_dict()
        sd["generator"] = self.generator.get_state()
        sd["config"] = self.config.to_dict()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict` so that training continues bit for bit on CPU.

        Everything is validated before anything is changed (as in
        ``torch.optim.Optimizer.load_state_dict``): a state that does not fit leaves
        this optimiser as it was.

        The saved configuration's structural fields (:data:`~curvkit.optim.config.STRUCTURAL`:
        structure, kind, damping mode, EKFAC setting and correction, fallback rule) must
        equal this optimiser's; the others (damping, intervals, ...) may differ. A state
        saved without a configuration is checked through its factors only.

        Raises:
            ConfigError: If the state comes from an optimiser of another structure,
                kind, damping mode, EKFAC setting, fallback or step mode, its
                parameter groups are invalid, or it lacks entries.
            ShapeError: If its factors do not fit.
            ValueError: From ``torch.optim``, if the parameter groups do not match.
        """
        from copy import copy

        missing = [k for k in ("state", "param_groups", "preconditioner", "generator")]
        missing = [k for k in missing if k not in state_dict]
        if missing:
            raise ConfigError(f"KFAC.load_state_dict: the state lacks {missing}.")
        state_dict = dict(state_dict)
        pre_state = state_dict.pop("preconditioner")
        gen_state = state_dict.pop("generator")
        saved_config = state_dict.pop("config", None)
        if saved_config is not None:
            self.config.check_compatible(saved_config)
        counters = state_dict["state"].get("kfac")
        need = ("step", "damping", "gamma", "last_rho")
        if not isinstance(counters, dict) or any(k not in counters for k in need):
            raise ConfigError(f"KFAC.load_state_dict: the state lacks the K-FAC counters {need}.")
        groups = state_dict["param_groups"]
        automatic = self._automatic
        if groups and (groups[0].get("lr") is None) != automatic:
            mode = "automatic (lr=None)" if groups[0].get("lr") is None else "fixed-lr"
            raise ConfigError(
                f"KFAC.load_state_dict: the state is from a {mode} optimiser; construct KFAC "
                f"with {'lr=None' if mode.startswith('auto') else 'a fixed lr'} to load it."
            )
        try:
            self._check_groups([{**self.defaults, **g} for g in groups])
        except ConfigError as err:
            raise ConfigError(f"KFAC.load_state_dict: {err}") from None
        fresh = copy(self.preconditioner)  # configuration; the loaded state replaces the rest
        fresh.load_state_dict(pre_state)  # raises on a mismatch; self is untouched
        generator = torch.Generator(device=self.generator.device)
        try:
            generator.set_state(gen_state)
        except (TypeError, RuntimeError, ValueError) as err:
            raise ConfigError("KFAC.load_state_dict: the sampler state is malformed.") from err
        super().load_state_dict(state_dict)  # validates the groups before changing anything
        self.preconditioner = fresh
        self.generator.set_state(gen_state)


def _batch_size(X) -> int:
    """Examples of a model input: leading dimension of a tensor, or of a dict/tuple's first."""
    if isinstance(X, Tensor):
        return X.shape[0]
    first = next(iter(X.values())) if isinstance(X, dict) else X[0]
    return _batch_size(first)


def _sweep_runs(net: nn.Module, unsupported: str) -> bool:
    """Whether the extraction will run ``net`` by the sweep (a tensor input assumed)."""
    from curvkit.extraction.checks import check_module, flatten_sequential, sweep_reason

    if sweep_reason(net) is not None:
        return False
    if unsupported == "gradient":
        return True
    try:
        for pos, (name, module) in enumerate(flatten_sequential(net)):
            check_module(name, pos, module, False, "error")
    except UnsupportedModuleError:
        return False
    return True


def _check_model(net: nn.Module, quantities, fallback) -> None:
    """Raise at construction what the first step's extraction would raise for ``net``.

    Raises:
        UnsupportedModuleError: For a module without a curvature rule with
            ``fallback=None`` (its qualified name and type), or per-example statistics
            (``kind="empirical"``, EKFAC) with a ``BatchNorm`` in train mode.
    """
    from curvkit.extraction.graph import check_model

    unsupported = "error" if fallback is None else "gradient"
    if _sweep_runs(net, unsupported):
        return
    try:
        check_model(net, quantities, unsupported)
    except UnsupportedModuleError as err:
        if "train mode" in str(err):
            hint = (
                "KFAC needs per-example gradients for kind='empirical' and for EKFAC; use "
                "kind='kfac' or 'kflr' without ekfac, or put the BatchNorm in eval mode."
            )
        else:
            hint = (
                "With fallback='adam' (default) or 'sgd' such a module's parameters are "
                "updated by that first-order rule instead (the extraction's "
                "unsupported='gradient')."
            )
        raise UnsupportedModuleError(f"KFAC: {err} {hint}") from None


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
