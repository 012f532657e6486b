r"""Parametrised layers of the graph path (:mod:`curvkit.extraction.graph`).

Index conventions: ``v`` row of the output-gradient stack (``V`` rows), ``n``
example (the leading dimension of the layer's input, ``N``), ``t`` a location
the weight is shared over (``T`` of them: the extra leading dimensions of a
``Linear`` input, the output locations of a convolution, the tokens of an
``Embedding``; ``T = 1`` for a ``Linear`` on ``[N, in]``), ``g`` a group of a
grouped convolution (``1`` otherwise), ``o`` output feature, ``k`` input
feature (``C_in/groups * prod(kernel)`` for a convolution).

A handler is created per module and records every call of the module during the
forward pass (a module called several times contributes once per call). After
the backward pass it gets, per call, the output-gradient rows ``[V, *out.shape]``
and provides

- ``param_rows(sl)``: the per-(row, example) parameter gradients
  ``[k, N, *p.shape]`` of the rows in ``sl``, summed over calls, per trainable
  parameter (per-example gradients, diagonals, dense blocks);
- ``grads()``: the gradient of the loss (row 0) per trainable parameter;
- Kronecker layers (``block = "kron"``): feature rows ``[N, T, G, K]`` and
  gradient rows ``[V, N, T, G, O]`` of all calls (concatenated over ``t``), from
  which :mod:`curvkit.extraction.graph` forms the factors exactly as the sweep
  does (KFC, Grosse & Martens 2016; K-FAC-expand/-reduce, Eschenhagen et al. 2023).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.errors import ShapeError


def _call_input(args: tuple, kwargs: dict) -> Tensor:
    """The first positional (or ``input=``) argument of a module call."""
    if args:
        return args[0]
    if "input" in kwargs:
        return kwargs["input"]
    raise ShapeError("A parametrised module was called without an input tensor.")


class GraphLayer:
    """Base class: one parametrised module and its calls.

    Args:
        name: Qualified module name inside the model.
        module: The module.

    Attributes:
        block: Layout of the record's curvature block (see :class:`~curvkit.records.LayerRecord`).
        calls: Per call: what the handler keeps of the input.
        N: Examples (leading dimension of the input), the same for every call.
    """

    block = "kron"

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        self.calls: list = []
        self.rows: list[Tensor] = []
        self.N: int | None = None

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        """Why this handler cannot factor ``module`` (``None``: it can)."""
        return None

    @property
    def param_names(self) -> list[str]:
        """Names of the trainable parameters, flat order ``[weight, bias]``."""
        return [n for n in ("weight", "bias") if _trainable(self.module, n)]

    @property
    def params(self) -> list[Tensor]:
        """The trainable parameters, flat order."""
        return [getattr(self.module, n) for n in self.param_names]

    @property
    def has_bias(self) -> bool:
        """Whether ``params`` contains a bias."""
        return "bias" in self.param_names

    def _set_batch(self, x: Tensor) -> None:
        N = x.shape[0]
        if self.N is not None and N != self.N:
            raise ShapeError(
                f"{type(self.module).__name__} {self.name!r} is called with {self.N} and "
                f"{N} examples (leading dimension); every call needs the same batch."
            )
        self.N = N

    def record(self, args: tuple, kwargs: dict, out: Tensor) -> None:
        """Keep what the backward needs of one call (input detached, no copies)."""
        raise NotImplementedError

    def param_rows(self, sl: slice) -> list[Tensor]:
        """Per-(row, example) gradients ``[k, N, *p.shape]`` of rows ``sl``, summed over calls."""
        raise NotImplementedError

    def grads(self) -> list[Tensor]:
        """Gradient of the loss (row 0) per trainable parameter, summed over calls."""
        return [r[0].sum(0) for r in self.param_rows(slice(0, 1))]


def _trainable(module: nn.Module, name: str) -> bool:
    p = getattr(module, name, None)
    return isinstance(p, Tensor) and p.requires_grad


# -- Kronecker layers -----------------------------------------------------------------


class KronLayer(GraphLayer):
    """Layers whose weight is ``[O_total, K]`` acting on feature rows: Kronecker factors."""

    groups = 1

    def features(self, i: int) -> Tensor:
        """Feature rows ``[N, T_i, G, K]`` of call ``i``."""
        raise NotImplementedError

    def grad_rows(self, i: int, block: Tensor) -> Tensor:
        """Output-gradient rows ``[k, N, *out]`` of call ``i`` -> ``[k, N, T_i, G, O]``."""
        raise NotImplementedError

    def all_features(self) -> Tensor:
        """``[N, T, G, K]`` of all calls, concatenated over ``t``."""
        feats = [self.features(i) for i in range(len(self.calls))]
        return feats[0] if len(feats) == 1 else torch.cat(feats, 1)

    def all_rows(self, sl: slice) -> Tensor:
        """``[k, N, T, G, O]`` of all calls for the rows ``sl``."""
        rows = [self.grad_rows(i, r[sl]) for i, r in enumerate(self.rows)]
        return rows[0] if len(rows) == 1 else torch.cat(rows, 2)

    @property
    def T(self) -> int:
        """Locations per example, over all calls."""
        return sum(self.features(i).shape[1] for i in range(len(self.calls)))

    def _weight_rows(self, gw: Tensor) -> Tensor:
        """``[..., G, O, K]`` -> ``[..., *weight.shape]``."""
        return gw.reshape(*gw.shape[:-3], *self.module.weight.shape)

    def param_rows(self, sl):
        """See :meth:`GraphLayer.param_rows`."""
        U, B = self.all_features(), self.all_rows(sl)
        out = []
        if "weight" in self.param_names:
            out.append(self._weight_rows(torch.einsum("kntgo,ntgc->kngoc", B, U)))
        if self.has_bias:
            out.append(B.sum(2).flatten(-2))
        return out

    def grads(self):
        """See :meth:`GraphLayer.grads`."""
        U, B = self.all_features(), self.all_rows(slice(0, 1))[0]
        out = []
        if "weight" in self.param_names:
            out.append(self._weight_rows(torch.einsum("ntgo,ntgc->goc", B, U)))
        if self.has_bias:
            out.append(B.sum((0, 1)).flatten())
        return out


class LinearLayer(KronLayer):
    r"""``nn.Linear`` on ``[N, ..., in]``: the extra dimensions share the weight (``T`` of them)."""

    def record(self, args, kwargs, out):
        """See :meth:`GraphLayer.record`."""
        x = _call_input(args, kwargs)
        if x.dim() < 2:
            raise ShapeError(
                f"Linear {self.name!r} needs a batched input [N, ..., in], got shape "
                f"{tuple(x.shape)}."
            )
        self._set_batch(x)
        self.calls.append(x.detach())

    def features(self, i):
        """See :meth:`KronLayer.features`."""
        x = self.calls[i]
        return x.reshape(x.shape[0], -1, 1, x.shape[-1])

    def grad_rows(self, i, block):
        """See :meth:`KronLayer.grad_rows`."""
        return block.reshape(block.shape[0], block.shape[1], -1, 1, block.shape[-1])


def _conv_dims(module: nn.Module) -> int:
    return len(module.kernel_size)


def unfold_patches(x: Tensor, kernel, stride, dilation) -> Tensor:
    """Patches ``[N, T, C * prod(kernel)]`` of an (already padded) input ``[N, C, *spatial]``.

    Works for any number of spatial dimensions; the columns are ordered like
    ``weight[o].flatten()`` (channel first, then kernel positions), the locations
    ``t`` row-major over the output positions (as ``F.unfold``).
    """
    d = len(kernel)
    N, C = x.shape[:2]
    for i in range(d):
        x = x.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])
    x = x[(Ellipsis, *(slice(None, None, dil) for dil in dilation))]
    perm = [0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d)]
    T = math.prod(x.shape[2 : 2 + d])
    return x.permute(perm).reshape(N, T, C * math.prod(kernel))


class ConvLayer(KronLayer):
    r"""``nn.Conv1d/2d/3d``: any stride, dilation, padding, ``padding_mode`` and ``groups``.

    The input is padded with ``F.pad`` in the module's ``padding_mode`` (the
    padding PyTorch uses, ``"same"`` included), then unfolded. The weight of a
    grouped convolution is block-diagonal over the ``G`` groups: group ``g`` maps
    channels ``g*C_in/G ...`` to output channels ``g*C_out/G ...``; each group
    gets its own Kronecker block.
    """

    def __init__(self, name, module):
        super().__init__(name, module)
        self._U: dict[int, Tensor] = {}

    @property
    def groups(self) -> int:
        """Groups of the convolution."""
        return self.module.groups

    def record(self, args, kwargs, out):
        """See :meth:`GraphLayer.record`."""
        x = _call_input(args, kwargs)
        if x.dim() != 2 + _conv_dims(self.module):
            raise ShapeError(
                f"{type(self.module).__name__} {self.name!r} needs a batched input "
                f"[N, C, *spatial], got shape {tuple(x.shape)}."
            )
        self._set_batch(x)
        self.calls.append(x.detach())

    def features(self, i):
        """See :meth:`KronLayer.features`."""
        if i not in self._U:
            m = self.module
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            pad = list(m._reversed_padding_repeated_twice)
            x = self.calls[i]
            if any(pad):
                x = F.pad(x, pad, mode=mode)
            U = unfold_patches(x, m.kernel_size, m.stride, m.dilation)
            self._U[i] = U.reshape(U.shape[0], U.shape[1], m.groups, -1)
        return self._U[i]

    def grad_rows(self, i, block):
        """See :meth:`KronLayer.grad_rows`."""
        k, N, c_out = block.shape[:3]
        B = block.reshape(k, N, c_out, -1).transpose(2, 3)
        return B.reshape(k, N, B.shape[2], self.module.groups, c_out // self.module.groups)


class ConvTransposeLayer(ConvLayer):
    r"""``nn.ConvTranspose1d/2d/3d`` as a convolution over the stride-dilated input.

    ``conv_transpose(x, W)`` equals ``conv(x̃, W')`` with ``x̃`` the input with
    ``stride - 1`` zeros between entries, padded by ``dilation * (kernel - 1) -
    padding`` (plus ``output_padding`` at the end), and ``W'`` the weight with
    input and output channels swapped and the kernel flipped, per group:
    :math:`W'_g[o, i, \kappa] = W[g C^\text{in}_g + i, o, \kappa_\text{max} - \kappa]`.
    The Kronecker factors are those of that convolution: the block is
    :math:`G \otimes A` over the row-major ``W'`` ``[C_out, C_in/groups * prod(kernel)]``
    (``block = "kron_transposed"``; joint with the bias as for a convolution).
    Gradients, per-example gradients and diagonals are shaped like ``W``.
    """

    block = "kron_transposed"

    @classmethod
    def unsupported_reason(cls, module):
        """See :meth:`GraphLayer.unsupported_reason`."""
        if module.padding_mode != "zeros":
            return "only padding_mode='zeros' exists for transposed convolutions."
        return None

    def record(self, args, kwargs, out):
        """See :meth:`GraphLayer.record`."""
        if len(args) > 1 or "output_size" in kwargs:
            raise ShapeError(
                f"{type(self.module).__name__} {self.name!r}: output_size is unsupported."
            )
        super().record(args, kwargs, out)

    def features(self, i):
        """See :meth:`KronLayer.features`."""
        if i not in self._U:
            m, x = self.module, self.calls[i]
            d = len(m.kernel_size)
            N, C, *S = x.shape
            dil = x.new_zeros(N, C, *((L - 1) * s + 1 for L, s in zip(S, m.stride)))
            dil[(slice(None), slice(None), *(slice(None, None, s) for s in m.stride))] = x
            pad = []
            for j in reversed(range(d)):
                left = m.dilation[j] * (m.kernel_size[j] - 1) - m.padding[j]
                pad += [left, left + m.output_padding[j]]
            U = unfold_patches(F.pad(dil, pad), m.kernel_size, (1,) * d, m.dilation)
            self._U[i] = U.reshape(U.shape[0], U.shape[1], m.groups, -1)
        return self._U[i]

    def _weight_rows(self, gw):
        """``[..., G, C_out/G, C_in/G * prod(kernel)]`` (``W'``) -> ``[..., *weight.shape]``."""
        m = self.module
        G, c_out_g = m.groups, m.weight.shape[1]
        d = len(m.kernel_size)
        lead = gw.shape[:-3]
        w = gw.reshape(*lead, G, c_out_g, -1, *m.kernel_size)
        nl = len(lead)
        w = w.flip(tuple(range(nl + 3, nl + 3 + d))).transpose(nl + 1, nl + 2)
        return w.reshape(*lead, *m.weight.shape)


# -- Embedding ------------------------------------------------------------------------


class EmbeddingLayer(GraphLayer):
    r"""``nn.Embedding`` on indices ``[N, ...]`` (the extra dimensions are the tokens ``t``).

    Seen as a ``Linear`` layer on one-hot inputs, its weight ``[V_tok, d]`` is the
    *transposed* weight: the gradient of token ``i`` with output gradient ``g`` is
    :math:`e_i g^\top`. The Kronecker block over the row-major ``weight`` is
    :math:`\operatorname{diag}(A_\text{diag}) \otimes G` with

    .. math::
        A_\text{diag} = R \sum_{n,t} e_{i_{nt}}, \qquad
        G = \frac1{P} \sum_{v,n,t} g_{vnt} g_{vnt}^\top

    (K-FAC-expand over the tokens; the token counts are the diagonal input
    factor; ``P`` tokens in the batch). Tokens equal to ``padding_idx`` get no
    gradient; they count neither in :math:`A_\text{diag}`, nor in :math:`G`, nor in ``P``.
    """

    block = "embedding"

    @classmethod
    def unsupported_reason(cls, module):
        """See :meth:`GraphLayer.unsupported_reason`."""
        if module.max_norm is not None:
            return "max_norm renormalises the weight in the forward pass; unsupported."
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq=True is unsupported."
        if module.sparse:
            return "sparse=True is unsupported (dense gradients only)."
        return None

    def record(self, args, kwargs, out):
        """See :meth:`GraphLayer.record`."""
        idx = _call_input(args, kwargs)
        if idx.dim() < 1:
            raise ShapeError(f"Embedding {self.name!r} needs batched indices [N, ...].")
        self._set_batch(idx)
        self.calls.append(idx.detach())

    def tokens(self) -> tuple[Tensor, Tensor]:
        """Indices ``[N, T]`` of all calls and the mask of non-padding tokens."""
        idx = torch.cat([c.reshape(c.shape[0], -1) for c in self.calls], 1)
        pad = self.module.padding_idx
        keep = torch.ones_like(idx, dtype=torch.bool) if pad is None else idx != pad
        return idx, keep

    def all_rows(self, sl: slice) -> Tensor:
        """``[k, N, T, d]`` of all calls (padding tokens zeroed)."""
        rows = [r[sl].reshape(r[sl].shape[0], self.N, -1, r.shape[-1]) for r in self.rows]
        B = rows[0] if len(rows) == 1 else torch.cat(rows, 2)
        _, keep = self.tokens()
        return B * keep[None, :, :, None].to(B.dtype)

    def param_rows(self, sl):
        """See :meth:`GraphLayer.param_rows`."""
        idx, _ = self.tokens()
        B = self.all_rows(sl)
        k, N, T, d = B.shape
        out = B.new_zeros(k, N, self.module.num_embeddings, d)
        out.scatter_add_(2, idx[None, :, :, None].expand(k, N, T, d), B)
        return [out]

    def grads(self):
        """See :meth:`GraphLayer.grads`."""
        idx, _ = self.tokens()
        B = self.all_rows(slice(0, 1))[0]
        out = B.new_zeros(self.module.num_embeddings, B.shape[-1])
        out.index_add_(0, idx.flatten(), B.reshape(-1, B.shape[-1]))
        return [out]

    def counts(self) -> Tensor:
        """Non-padding token counts ``[num_embeddings]`` over the batch."""
        idx, keep = self.tokens()
        c = torch.zeros(self.module.num_embeddings, dtype=torch.float64, device=idx.device)
        return c.index_add_(0, idx[keep], torch.ones_like(idx[keep], dtype=torch.float64))


# -- normalisation layers -------------------------------------------------------------


class NormLayer(GraphLayer):
    r"""Affine parameters of ``BatchNorm1d/2d/3d``, ``LayerNorm``, ``GroupNorm``.

    The output is :math:`\gamma \odot \hat x + \beta`; the per-(row, example)
    gradients are :math:`\sum g \odot \hat x` and :math:`\sum g` over the
    positions sharing a parameter entry. The record stores the exact small block
    of each requested kind (``block = "dense"``, ``LayerRecord.dense``).
    """

    block = "dense"

    def record(self, args, kwargs, out):
        """See :meth:`GraphLayer.record`."""
        x = _call_input(args, kwargs)
        if x.dim() < 2:
            raise ShapeError(
                f"{type(self.module).__name__} {self.name!r} needs a batched input, got shape "
                f"{tuple(x.shape)}."
            )
        self._set_batch(x)
        with torch.no_grad():
            self.calls.append(self.normalised(x.detach()))

    def normalised(self, x: Tensor) -> Tensor:
        r""":math:`\hat x` of one call."""
        raise NotImplementedError

    def _reduce(self, t: Tensor) -> Tensor:
        """Sum ``[k, N, *shape]`` over the positions sharing a parameter entry."""
        raise NotImplementedError

    def param_rows(self, sl):
        """See :meth:`GraphLayer.param_rows`."""
        w = b = 0.0
        for xhat, r in zip(self.calls, self.rows):
            B = r[sl]
            w = w + self._reduce(B * xhat[None])
            b = b + self._reduce(B)
        out = []
        if "weight" in self.param_names:
            out.append(w)
        if self.has_bias:
            out.append(b)
        return out


class LayerNormLayer(NormLayer):
    """``nn.LayerNorm`` with ``elementwise_affine=True``."""

    def normalised(self, x):
        """See :meth:`NormLayer.normalised`."""
        m = self.module
        return F.layer_norm(x, m.normalized_shape, None, None, m.eps)

    def _reduce(self, t):
        nd = len(self.module.normalized_shape)
        dims = tuple(range(2, t.dim() - nd))
        return t.sum(dims) if dims else t


class ChannelNormLayer(NormLayer):
    """Per-channel affine parameters over ``[N, C, *spatial]`` (BatchNorm, GroupNorm)."""

    def _reduce(self, t):
        dims = tuple(range(3, t.dim()))
        return t.sum(dims) if dims else t


class GroupNormLayer(ChannelNormLayer):
    """``nn.GroupNorm`` with ``affine=True``."""

    def normalised(self, x):
        """See :meth:`NormLayer.normalised`."""
        m = self.module
        return F.group_norm(x, m.num_groups, None, None, m.eps)


def batch_statistics(module: nn.Module) -> bool:
    """Whether a BatchNorm module normalises with the batch's statistics (train mode)."""
    return module.training or module.running_mean is None


class BatchNormLayer(ChannelNormLayer):
    """``nn.BatchNorm1d/2d/3d`` with ``affine=True`` (eval mode: running statistics)."""

    def normalised(self, x):
        """See :meth:`NormLayer.normalised`."""
        m = self.module
        if batch_statistics(m):
            return F.batch_norm(x, None, None, None, None, True, 0.0, m.eps)
        return F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)


#: Parametrised module type -> graph-path handler (exact type match).
GRAPH_LAYERS: dict[type, type[GraphLayer]] = {
    nn.Linear: LinearLayer,
    nn.Conv1d: ConvLayer,
    nn.Conv2d: ConvLayer,
    nn.Conv3d: ConvLayer,
    nn.ConvTranspose1d: ConvTransposeLayer,
    nn.ConvTranspose2d: ConvTransposeLayer,
    nn.ConvTranspose3d: ConvTransposeLayer,
    nn.Embedding: EmbeddingLayer,
    nn.LayerNorm: LayerNormLayer,
    nn.GroupNorm: GroupNormLayer,
    nn.BatchNorm1d: BatchNormLayer,
    nn.BatchNorm2d: BatchNormLayer,
    nn.BatchNorm3d: BatchNormLayer,
}
