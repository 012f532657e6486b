r"""Data-parallel K-FAC on ``torch.distributed``.

:class:`DistributedCommunicator` implements the
:class:`~curvkit.optim.comm.Communicator` that :class:`~curvkit.optim.KFAC` calls
wherever processes must agree. Every process holds a replica of the model and a
shard of each batch; with ``reduction="mean"`` and equal shard sizes the average
over processes of each local quantity is the quantity of the whole batch:

- gradients and the loss, the batch's Kronecker factors :math:`A, G` and cross
  factors (before they enter the moving averages), EKFAC's scales and the GGN
  products of M&G's quadratic model (§7) are averaged in place, each call with
  one all-reduce of a flat buffer;
- a non-finite loss, gradient or update on any process rejects the step on all
  of them (an all-reduce of a flag);
- the damped inverse is rebuilt KAISA-style (Pauloski et al. 2021,
  arXiv:2107.01739): each layer's eigendecompositions are computed on one process,
  chosen greedily by cost :math:`d_A^3 + d_G^3`, and broadcast to the others.

Processes with batches of different sizes give :meth:`DistributedCommunicator.set_batch_size`
their local size, which weights every average by :math:`N_r/N`. ``reduction="sum"``
is not supported: the factors :math:`A` would have to be summed and :math:`G`
averaged (:func:`make_kfac` raises).

Misuse is detected rather than trained through. Given the model (as
:func:`make_kfac` does), the communicator checks once, at construction, that every
process holds the same parameters (:meth:`DistributedCommunicator.check_replicas`),
and on every step that the shards have one size unless ``set_batch_size`` was
called: the local batch size rides in the step's non-finite-flag all-reduce
(:meth:`DistributedCommunicator.any`) at no extra collective.

Example (run with ``torchrun --nproc_per_node 2 script.py``; see ``docs/distributed.md``)::

    import torch.distributed as dist
    from curvkit.distributed.kfac import make_kfac

    dist.init_process_group("gloo")
    opt = make_kfac(model, loss_func, structure="tridiagonal")
    for X, y in local_batches:  # this process's shard of each batch
        opt.step(lambda: loss_func(model(X), y))
"""

from __future__ import annotations

import functools
import sys
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from curvkit.errors import CurvkitError, ShapeError
from curvkit.operators import kron_math as km
from curvkit.operators.kron_base import KronEigenOperator
from curvkit.operators.kronecker import BlockDiagonalKFAC
from curvkit.operators.tridiag import TriDiagonalInverse, TriDiagonalKFAC
from curvkit.optim.comm import Communicator

ASSIGNMENTS = ("distributed", "everywhere")
#: Who calls ``average_`` (the caller's function name) → timer label.
_CALLERS = {
    "step": "gradients",
    "update": "factors",
    "update_scales": "ekfac_scales",
    "_automatic_update": "ggn_products",
}


class DistributedError(CurvkitError, RuntimeError):
    """A collective failed: another process raised, died or stalled past the timeout."""


def assign_layers(costs: Sequence[float], world_size: int) -> list[int]:
    """Greedy assignment of layers to processes (longest processing time first).

    Args:
        costs: Cost of each layer's inverse, e.g. :math:`d_A^3 + d_G^3`.
        world_size: Number of processes.

    Returns:
        The owner (rank) of each layer; ties go to the lower layer and rank, so every
        process computes the same assignment.

    Example:
        >>> assign_layers([8.0, 1.0, 1.0, 8.0], world_size=2)
        [0, 0, 1, 1]
    """
    load = [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


def flatten(obj) -> tuple[list[Tensor], object]:
    """Tensors of a nest of lists, tuples (named tuples too) and ``None``, and its layout.

    The layout is picklable and holds shapes and dtypes only, so a process that
    receives the tensors as one flat buffer can rebuild the nest (:func:`unflatten`).
    """
    if obj is None:
        return [], None
    if isinstance(obj, Tensor):
        return [obj], ("tensor", tuple(obj.shape), obj.dtype)
    if isinstance(obj, (list, tuple)):
        parts = [flatten(item) for item in obj]
        leaves = [t for sub, _ in parts for t in sub]
        return leaves, ("nest", type(obj), [layout for _, layout in parts])
    raise ShapeError(f"flatten: cannot send an object of type {type(obj).__name__}.")


def unflatten(layout, leaves: list[Tensor]):
    """Inverse of :func:`flatten`: the nest of ``layout`` with ``leaves`` in order (consumed)."""
    if layout is None:
        return None
    if layout[0] == "tensor":
        return leaves.pop(0)
    _, kind, specs = layout
    items = [unflatten(s, leaves) for s in specs]
    return kind(*items) if hasattr(kind, "_fields") else kind(items)


def leaf_layouts(layout) -> list[tuple]:
    """``(shape, dtype)`` of the tensors of a :func:`flatten` layout, in order."""
    if layout is None:
        return []
    if layout[0] == "tensor":
        return [layout[1:]]
    return [leaf for s in layout[2] for leaf in leaf_layouts(s)]


class DistributedCommunicator(Communicator):
    r"""The collectives of data-parallel K-FAC on a ``torch.distributed`` process group.

    Args:
        process_group: The group of processes training together (default: all).
        inverse_assignment: ``"distributed"``: each layer's inverse is computed on one
            process and broadcast (for ``structure="tridiagonal"`` in two rounds: the
            factors' eigendecompositions, then the per-layer chain pieces);
            ``"everywhere"``: every process computes every inverse.
        timeout: Time after which a collective that a peer never joins fails with
            :class:`DistributedError` (a new group with this timeout is created over
            the same processes). Default: the process group's own timeout.
        model: The model being trained (optional; :func:`make_kfac` passes it). Its
            replicas are checked for agreement (:meth:`check_replicas`) and its
            forward passes report the local batch size (:meth:`watch`).

    Attributes:
        timers: Seconds per phase (host wall-clock, waiting for slower processes
            included): ``"any"``, ``"average/gradients"``, ``"average/factors"``,
            ``"average/ekfac_scales"``, ``"average/ggn_products"`` (named after the
            caller of :meth:`average_`), ``"average_scalar"``, ``"inverse/compute"``,
            ``"inverse/agree"``, ``"inverse/broadcast"``.
        counts: Collective calls per phase (same keys, but ``"inverse/compute"``).

    Raises:
        ShapeError: If ``torch.distributed`` is not initialised, the assignment is
            unknown, or the processes' replicas of ``model`` differ.
    """

    def __init__(
        self,
        process_group=None,
        inverse_assignment: str = "distributed",
        timeout: timedelta | None = None,
        model: nn.Module | None = None,
    ):
        if not (dist.is_available() and dist.is_initialized()):
            raise ShapeError(
                "DistributedCommunicator: torch.distributed is not initialised; call "
                "torch.distributed.init_process_group() first (torchrun sets its environment)."
            )
        if inverse_assignment not in ASSIGNMENTS:
            raise ShapeError(
                f"DistributedCommunicator: inverse_assignment={inverse_assignment!r} is not "
                f"supported; use one of {ASSIGNMENTS}."
            )
        group = process_group if process_group is not None else dist.group.WORLD
        self.backend = dist.get_backend(group)
        if timeout is not None:
            group = dist.new_group(
                dist.get_process_group_ranks(group),
                timeout=timeout,
                backend=self.backend,
                use_local_synchronization=True,
            )
        # a weak reference: a process group must not outlive destroy_process_group(),
        # or gloo may abort when it is finally freed at interpreter exit
        self._group = weakref.ref(group)
        self.timeout = timeout
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.inverse_assignment = inverse_assignment
        nccl = self.backend == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
        self.batch_size: int | None = None
        self.timers: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._layouts: dict = {}
        self._seen_batch = 0  # examples in the last forward pass of a watched model (0: none)
        if model is not None:
            net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
            self.check_replicas(net)
            self.watch(net)

    # -- agreement checks ----------------------------------------------------------------
    def check_replicas(self, model: nn.Module, where: str = "DistributedCommunicator") -> None:
        r"""Check that every process holds the same parameters (one gather, at construction).

        Each process computes per parameter, in float64, the checksums
        :math:`(\sum_i \theta_i, \sum_i \theta_i^2, \sum_i (i \bmod 997)\,\theta_i)`
        with its name and shape; all are gathered, and every process compares them
        with process 0's (relative tolerance :math:`10^{-12}`, round-off of the
        sums only), so all raise the same error together. Replicas that start
        from different weights never agree, whatever the averaging.

        Args:
            model: The model (its own module, not a ``DistributedDataParallel`` wrapper).
            where: Name of the caller in the error message.

        Raises:
            ShapeError: Naming the first process and parameter that differ from
                process 0's.
        """
        sums = []
        for name, p in model.named_parameters():
            x = p.detach().reshape(-1).to(torch.float64)
            ramp = torch.arange(x.numel(), device=x.device, dtype=torch.float64).remainder_(997)
            sums.append(
                (name, tuple(p.shape), float(x.sum()), float(x.square().sum()), float(x @ ramp))
            )
        gathered = [None] * self.world_size
        self._run(
            "check",
            "parameter checksum exchange",
            lambda: dist.all_gather_object(gathered, sums, group=self.group),
        )
        ref = gathered[0]
        for rank, other in enumerate(gathered[1:], start=1):
            problem = _replica_difference(ref, other)
            if problem is not None:
                raise ShapeError(
                    f"{where}: the model replicas differ: process {rank}'s {problem} "
                    "process 0's. Every process must start from the same weights: seed the "
                    "model's initialisation identically, or copy process 0's parameters "
                    "(dist.broadcast, as DistributedDataParallel does at construction)."
                )

    def watch(self, model: nn.Module) -> None:
        """Record the batch size of each forward pass of ``model`` (its first input's rows).

        The size is checked for agreement between processes on every :meth:`any` call
        (once or twice per K-FAC step); the hook only reads the input's shape.
        """
        ref = weakref.ref(self)

        def hook(module, args):
            comm = ref()
            if comm is not None and args and isinstance(args[0], Tensor) and args[0].ndim:
                comm._seen_batch = int(args[0].shape[0])

        self._watch_handle = model.register_forward_pre_hook(hook)

    @property
    def group(self):
        """The process group of the collectives (alive until ``destroy_process_group``)."""
        group = self._group()
        if group is None:
            raise DistributedError(
                f"Process {self.rank}: the process group was destroyed; build a new "
                "DistributedCommunicator after init_process_group()."
            )
        return group

    # -- collectives ---------------------------------------------------------------------
    def _run(self, phase: str, what: str, fn: Callable[[], object]):
        """Run a collective timed under ``phase``; a failure becomes :class:`DistributedError`."""
        start = time.perf_counter()
        try:
            return fn()
        except RuntimeError as err:
            limit = "the process group's timeout" if self.timeout is None else self.timeout
            raise DistributedError(
                f"Process {self.rank} of {self.world_size}: {what} failed ({self.backend}). "
                "Another process probably raised an exception, died, or did not reach this "
                f"collective within {limit}; see its log. Original error: {err}"
            ) from err
        finally:
            self.timers[phase] += time.perf_counter() - start
            self.counts[phase] += 1

    def _all_reduce(self, phase: str, tensor: Tensor, op=dist.ReduceOp.SUM) -> None:
        self._run(phase, f"all-reduce ({phase})", lambda: dist.all_reduce(tensor, op, self.group))

    def _small(self, values: Sequence[float]) -> Tensor:
        return torch.tensor(values, dtype=torch.float64, device=self.device)

    def set_batch_size(self, n: int | None) -> None:
        r"""Examples in this process's batch, to weight averages by :math:`N_r/N`.

        Call it before each step whose shards differ in size (``None``: equal weights).
        With ``stats_fraction < 1`` the factors are weighted by the batch size, not the
        statistics subset's (equal up to rounding).
        """
        if n is not None and (int(n) != n or n < 1):
            raise ShapeError(f"set_batch_size: n must be a positive integer or None, got {n!r}.")
        self.batch_size = None if n is None else int(n)

    def average_(self, tensors: list[Tensor], symmetric: int = 0) -> None:
        """Average ``tensors`` over processes in place: one all-reduce of their concatenation.

        Of the first ``symmetric`` tensors (symmetric matrices) only the upper
        triangles are sent; the averages are mirrored back.
        """
        sym = [t for t in tensors[:symmetric] if t is not None]
        rest = [t for t in tensors[symmetric:] if t is not None]
        tensors = sym + rest
        if not tensors or self.world_size == 1:
            return
        for t in tensors:
            if not t.is_floating_point() or t.device != tensors[0].device:
                raise ShapeError(
                    "DistributedCommunicator.average_: expected floating-point tensors on one "
                    f"device, got {t.dtype} on {t.device} beside {tensors[0].device}."
                )
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
        upper = [_upper_indices(t) for t in sym]
        flat = torch.cat(
            [t[i, j].to(dtype) for t, (i, j) in zip(sym, upper)]
            + [t.reshape(-1).to(dtype) for t in rest]
        )
        if self.batch_size is not None:
            flat = torch.cat([flat.mul_(self.batch_size), flat.new_full((1,), self.batch_size)])
        label = _CALLERS.get(sys._getframe(1).f_code.co_name, "other")
        self._all_reduce(f"average/{label}", flat)
        flat = flat[:-1] / flat[-1] if self.batch_size is not None else flat.div_(self.world_size)
        offset = 0
        for t, (i, j) in zip(sym, upper):
            part = flat[offset : offset + i.numel()].to(t.dtype)
            t[i, j] = part
            t[j, i] = part
            offset += i.numel()
        for t in rest:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def average_scalar(self, value: float) -> float:
        """Average a Python number over processes."""
        if self.world_size == 1:
            return value
        weight = 1.0 if self.batch_size is None else float(self.batch_size)
        buf = self._small([value * weight, weight])
        self._all_reduce("average_scalar", buf)
        return float(buf[0] / buf[1])

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process (every process gets the same answer).

        The same all-reduce (a maximum) carries this process's last batch size
        :math:`n_r` (see :meth:`watch`) as :math:`(n_r, -n_r)` and whether
        :meth:`set_batch_size` is in use, so every process learns the smallest and
        largest shard at no extra cost, and all decide alike.

        Raises:
            ShapeError: On every process, if the shards differ in size and
                :meth:`set_batch_size` was not called (the averages would weight the
                processes equally, not by their examples), or if it was called on
                some processes only.
        """
        if self.world_size == 1:
            return flag
        n, sized = self._seen_batch, 1.0 if self.batch_size is not None else 0.0
        buf = self._small([1.0 if flag else 0.0, n, -n, sized, -sized])
        self._all_reduce("any", buf, dist.ReduceOp.MAX)
        largest, smallest = int(buf[1]), -int(buf[2])
        if float(buf[3]) != -float(buf[4]):
            raise ShapeError(
                "DistributedCommunicator: set_batch_size() was called on some processes but "
                "not on others; call it on every process before each step, or on none."
            )
        if sized == 0 and smallest >= 1 and largest != smallest:
            raise ShapeError(
                f"DistributedCommunicator: the processes' batches differ in size ({smallest} "
                f"to {largest} examples; this process has {n}) and set_batch_size() was not "
                "called, so the averages would weight every process equally instead of by "
                "its examples. Call comm.set_batch_size(len(X)) on every process before "
                "each step, or split every batch evenly."
            )
        return bool(buf[0].item() > 0)

    def _any(self, flag: bool, phase: str) -> bool:
        buf = self._small([1.0 if flag else 0.0])
        self._all_reduce(phase, buf, dist.ReduceOp.MAX)
        return bool(buf.item() > 0)

    # -- inverse -------------------------------------------------------------------------
    def refresh(self, preconditioner, damping: float) -> None:
        r"""Rebuild the preconditioner's inverse with damping :math:`\gamma^2`.

        With ``inverse_assignment="distributed"`` each layer's inverse is computed by
        its owner (:func:`assign_layers`) and broadcast; the result equals
        :meth:`~curvkit.optim.preconditioner.KroneckerPreconditioner.refresh` on one
        process. EKFAC's inverse (reciprocals of the scales) is cheap and computed
        everywhere; its eigenbasis is refreshed by the optimiser on every process.

        Raises:
            DistributedError: If the computation failed on another process (the
                process where it failed re-raises its own error).
        """
        pre = preconditioner
        if self.world_size == 1 or self.inverse_assignment == "everywhere" or pre.ekfac:
            start = time.perf_counter()
            pre.refresh(damping)
            self.timers["inverse/compute"] += time.perf_counter() - start
            return
        if not pre.layers:
            raise RuntimeError("refresh() before any statistics update.")
        if pre.structure == "block-diagonal":
            blocks = self._distribute(pre, "blocks", lambda i: _kron_block(pre, i, damping))
            pre.inverse = KronEigenOperator(pre.layers, blocks)
        else:
            pre.inverse, pre.fallback_pairs = self._tridiagonal(pre, damping)
        pre.inverse_damping = damping

    def _tridiagonal(self, pre, damping: float):
        r"""Tri-diagonal inverse (M&G §4.3) from chain pieces computed by their owners.

        Undamped, the pieces share eigendecompositions of the factors, computed first
        (also distributed); damped, each piece factorises its own shifted factors.
        """
        eig = None
        if damping == 0:
            eig = self._distribute(
                pre, "eig", lambda i: [km.eigh_psd(pre.G[i]), km.eigh_psd(pre.A[i])]
            )
        pieces = self._distribute(
            pre, "chain", lambda i: _chain_piece(pre, eig, i, damping), _chain_costs(pre)
        )
        L = len(pre.layers)
        fallback = [
            (pre.layers[i].name, pre.layers[i + 1].name, "no cross factor")
            for i in range(L - 1)
            if not _linked(pre, i)
        ]
        psi = [pieces[i][0] for i in range(L - 1)]
        return TriDiagonalInverse(pre.layers, psi, [p[1] for p in pieces]), fallback

    def _distribute(self, pre, stage: str, compute: Callable[[int], object], costs=None) -> list:
        """``compute(i)`` for every layer ``i``, each on its owner, broadcast to all.

        Owners come from :func:`assign_layers` with ``costs`` (default: :func:`_costs`).
        """
        key = (
            stage,
            pre.structure,
            pre.damping_mode,
            pre.factor_dtype,
            tuple(pre.layers),
            tuple(_linked(pre, i) for i in range(len(pre.layers) - 1)),
        )
        layout = self._layouts.get(key)
        if layout is None:
            owners = assign_layers(_costs(pre) if costs is None else costs, self.world_size)
        else:
            owners = layout[0]
        start, local, error = time.perf_counter(), {}, None
        try:
            for i, owner in enumerate(owners):
                if owner == self.rank:
                    local[i] = compute(i)
        except Exception as err:  # re-raised after the agreement below
            error = err
        self.timers["inverse/compute"] += time.perf_counter() - start
        if self._any(error is not None, "inverse/agree"):
            if error is not None:
                raise error
            raise DistributedError(
                f"Process {self.rank}: the {stage!r} stage of the inverse failed on another "
                "process; see its error."
            )
        if layout is None:
            specs = {i: flatten(obj)[1] for i, obj in local.items()}
            gathered = [None] * self.world_size
            self._run(
                "inverse/broadcast",
                "layout exchange",
                lambda: dist.all_gather_object(gathered, specs, group=self.group),
            )
            layout = (owners, {i: s for part in gathered for i, s in part.items()})
            self._layouts[key] = layout
        return self._broadcast(owners, layout[1], local, pre.A[0])

    def _broadcast(self, owners, specs, local: dict, like: Tensor) -> list:
        """One broadcast per owning process of its layers' tensors in a flat buffer."""
        out = [None] * len(owners)
        for rank in range(self.world_size):
            layers = [i for i, o in enumerate(owners) if o == rank]
            if not layers:
                continue
            if rank == self.rank:
                leaves = [t for i in layers for t in flatten(local[i])[0]]
                buf = torch.cat([t.reshape(-1).to(like.dtype) for t in leaves])
            else:
                size = sum(
                    torch.Size(sh).numel() for i in layers for sh, _ in leaf_layouts(specs[i])
                )
                buf = torch.empty(size, dtype=like.dtype, device=like.device)
            src = dist.get_global_rank(self.group, rank)
            self._run(
                "inverse/broadcast",
                f"broadcast of the inverse from process {rank}",
                lambda b=buf, s=src: dist.broadcast(b, s, self.group),
            )
            if rank == self.rank:
                for i in layers:
                    out[i] = local[i]
                continue
            offset = 0
            for i in layers:
                leaves = []
                for shape, dtype in leaf_layouts(specs[i]):
                    n = torch.Size(shape).numel()
                    leaves.append(buf[offset : offset + n].view(shape).to(dtype))
                    offset += n
                out[i] = unflatten(specs[i], leaves)
        return out


def _replica_difference(ref: list, other: list) -> str | None:
    """How a process's parameter checksums differ from process 0's (``None``: they agree)."""
    if len(ref) != len(other):
        return f"model has {len(other)} parameter tensors, against {len(ref)} on"
    for (name, shape, *a), (oname, oshape, *b) in zip(ref, other):
        if (name, shape) != (oname, oshape):
            return f"parameter {oname!r} {list(oshape)} stands where {name!r} {list(shape)} is on"
        for x, z in zip(a, b):
            if abs(x - z) > 1e-12 * max(abs(x), abs(z), 1e-300):
                return f"parameter {name!r} (sum {b[0]:.6g}) differs from that of"
    return None


@functools.lru_cache(maxsize=64)
def _triu(d: int, device: torch.device) -> tuple[Tensor, Tensor]:
    i, j = torch.triu_indices(d, d, device=device)
    return i, j


def _upper_indices(t: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column indices of the upper triangle of the square matrix ``t``."""
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ShapeError(
            f"DistributedCommunicator.average_: symmetric tensors must be square matrices, "
            f"got shape {tuple(t.shape)}."
        )
    return _triu(t.shape[0], t.device)


def _costs(pre) -> list[float]:
    r"""Per layer :math:`d_A^3 + d_G^3`: the cost of its two eigendecompositions."""
    return [float(a.shape[0] ** 3 + g.shape[0] ** 3) for a, g in zip(pre.A, pre.G)]


def _chain_costs(pre) -> list[float]:
    r"""Cost of layer :math:`i`'s chain piece, in units of :func:`_costs` :math:`c_i`.

    Linked to the next layer: :math:`2c_i + c_{i+1}` (two generalised eigenproblems of
    layer :math:`i`'s sizes, products with layer :math:`i+1`'s inverses); otherwise
    :math:`c_i/4` (two factor inverses). Fitted to timings
    of the half-width autoencoder; only the balance between processes depends on it.
    """
    c = _costs(pre)
    return [
        2 * c[i] + c[i + 1] if i + 1 < len(c) and _linked(pre, i) else c[i] / 4
        for i in range(len(c))
    ]


def _linked(pre, i: int) -> bool:
    """Whether layers ``i`` and ``i + 1`` have cross factors (tri-diagonal structure)."""
    if pre.structure != "tridiagonal":
        return False
    return pre.cross_A[i] is not None and pre.cross_G[i] is not None


def _kron_block(pre, i: int, damping: float) -> list:
    """Layer ``i``'s pairs of the block-diagonal inverse, as the preconditioner computes them."""
    op = BlockDiagonalKFAC([pre.layers[i]], [pre.A[i]], [pre.G[i]], [pre.bias_scale[i]])
    return op.inverse(damping=damping, damping_mode=pre.damping_mode).blocks[0]


def _chain_piece(pre, eig: list, i: int, damping: float) -> list:
    r"""Layer ``i``'s :math:`(\Psi^G_i, \Psi^A_i)` (or ``None``) and :math:`\Sigma_{i|i+1}^{-1}`.

    A two-layer :class:`~curvkit.operators.tridiag.TriDiagonalKFAC` over layers ``i``,
    ``i + 1`` (one layer where the chain breaks), given the shared eigendecompositions
    ``eig`` when undamped, computes exactly the pieces the whole chain's operator would.
    """
    idx = [i, i + 1] if i + 1 < len(pre.layers) and _linked(pre, i) else [i]
    cross = [pre.cross_A[i]], [pre.cross_G[i]]
    op = TriDiagonalKFAC(
        [pre.layers[j] for j in idx],
        [pre.A[j] for j in idx],
        [pre.G[j] for j in idx],
        *(cross if len(idx) == 2 else ([], [])),
    )
    if eig is not None:
        op._eig = [tuple(tuple(e) for e in eig[j]) for j in idx]
    inv = op.inverse(damping)
    return [inv.psi[0] if len(idx) == 2 else None, inv.sigma_inv[0]]


def make_kfac(
    model: nn.Module,
    loss_func: nn.Module,
    params=None,
    *,
    inverse_assignment: str = "distributed",
    timeout: timedelta | None = None,
    process_group=None,
    **kwargs,
):
    """:class:`~curvkit.optim.KFAC` with a :class:`DistributedCommunicator` when one is needed.

    With ``torch.distributed`` initialised and more than one process, the optimiser
    gets a communicator and a per-process seed for the label sampling
    (``seed + rank``, so that ``kind="kfac"`` draws independent labels on each
    shard); otherwise it is a plain single-process :class:`~curvkit.optim.KFAC`.

    Args:
        model: The model, possibly wrapped in ``DistributedDataParallel``.
        loss_func: The loss; ``reduction="mean"`` in data-parallel runs.
        params: Parameters or groups (default: the model's trainable parameters).
        inverse_assignment: See :class:`DistributedCommunicator`.
        timeout: See :class:`DistributedCommunicator`.
        process_group: See :class:`DistributedCommunicator`.
        **kwargs: Passed on to :class:`~curvkit.optim.KFAC`.

    Returns:
        The optimiser.

    Raises:
        ShapeError: For a sum-reduced loss in a data-parallel run (averaging the
            factors would misweight them), a ``comm`` keyword, or replicas of the
            model that differ between processes (checked once here; see
            :meth:`DistributedCommunicator.check_replicas`). Later, a step whose
            shards differ in size without ``set_batch_size`` raises on every process.
    """
    from curvkit.optim.kfac import KFAC

    if "comm" in kwargs:
        raise ShapeError("make_kfac builds the communicator itself; call KFAC(comm=...) instead.")
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and dist.get_world_size(process_group) > 1:
        if getattr(loss_func, "reduction", "mean") != "mean":
            raise ShapeError(
                f"make_kfac: data-parallel K-FAC needs reduction='mean', got "
                f"{type(loss_func).__name__}(reduction={loss_func.reduction!r}); averaging "
                "sum-reduced factors over processes does not give the global ones."
            )
        comm = DistributedCommunicator(process_group, inverse_assignment, timeout, model=model)
        kwargs["seed"] = kwargs.get("seed", 0) + comm.rank
        kwargs["comm"] = comm
    return KFAC(model, loss_func, params, **kwargs)
