r"""Storage cost of curvature representations, from parameter shapes alone.

For a model with ``D`` trainable parameters in layers of ``d_l`` parameters,
the representations of a Fisher/GGN-type matrix need (entries):

- ``full``: :math:`D^2` (the layer's rows: :math:`d_l D`);
- ``block_diagonal``: :math:`\sum_l d_l^2`;
- ``kronecker``: :math:`\sum_l (i_l + 1)^2 + o_l^2` for a layer with ``i_l``
  inputs (``C_in·prod(kernel)`` for convolutions), ``o_l`` outputs and a bias
  (:math:`i_l^2` without bias) — M&G 2015, §3; Grosse & Martens 2016, §3;
- ``kronecker_cross``: the cross factors :math:`A_{l,l+1}` and
  :math:`G_{l,l+1}` of block-tri-diagonal K-FAC (M&G 2015, §4.3),
  :math:`(i_l + 1)(i_{l+1} + 1) + o_l o_{l+1}`, assuming consecutive
  parametrised layers form a chain (0 for the last layer);
- ``diagonal``: :math:`D`.

Nothing is allocated: the report works on models on the ``meta`` device.
"""

from __future__ import annotations

import math

import pandas as pd
import torch
from torch import nn

from curvkit.errors import ConfigError

MEMORY_STRUCTURES = ("full", "block_diagonal", "kronecker", "kronecker_cross", "diagonal")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _kron_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(inputs incl. bias coordinate, outputs)`` of a layer's Kronecker factors, or ``None``."""
    w = getattr(module, "weight", None)
    if w is None or not w.requires_grad:
        return None
    bias = int(getattr(module, "bias", None) is not None and module.bias.requires_grad)
    if isinstance(module, nn.Linear) or (isinstance(module, _CONV) and module.groups == 1):
        return w[0].numel() + bias, w.shape[0]
    if isinstance(module, _CONV_T) and module.groups == 1:
        return w.shape[0] * math.prod(w.shape[2:]) + bias, w.shape[1]
    return None


def memory_report(model: nn.Module, dtype: torch.dtype = torch.float32) -> pd.DataFrame:
    r"""Entries and bytes of each curvature representation, per layer and in total.

    Layers are the modules that own trainable parameters (in
    ``model.named_modules()`` order). Kronecker factors are counted for
    ``Linear``, ``Conv{1,2,3}d`` and ``ConvTranspose{1,2,3}d`` (``groups=1``);
    other layers get missing values there and in the cross factors, and are
    left out of those totals.

    Args:
        model: The model; parameters may live on the ``meta`` device.
        dtype: Storage type used for the byte counts.

    Returns:
        A tidy DataFrame with columns ``layer``, ``type``, ``params``,
        ``structure`` (one of :data:`MEMORY_STRUCTURES`), ``entries`` and ``bytes``;
        the last rows (``layer == "total"``) sum over layers. Pivot for a wide
        view: ``df.pivot(index="layer", columns="structure", values="bytes")``.

    Example:
        AlexNet (the torchvision layout, built on ``meta``; M&G 2015 make the
        same point for their autoencoders): the full Fisher of its 61.1M
        parameters needs 14.9 PB in float32, the per-layer blocks 6.9 PB, the
        Kronecker factors 0.71 GB (0.41 GB of it for the 9216 x 4096 layer).

        >>> import torch, curvkit as ck
        >>> from torch import nn
        >>> with torch.device("meta"):
        ...     alexnet = nn.Sequential(
        ...         nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        ...         nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        ...         nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        ...         nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        ...         nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
        ...         nn.Flatten(), nn.Linear(9216, 4096), nn.ReLU(),
        ...         nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000))
        >>> df = ck.memory_report(alexnet)
        >>> total = df[df.layer == "total"].set_index("structure")
        >>> int(total.loc["full", "entries"]) == 61100840**2
        True
        >>> gb = (total["bytes"].astype(float) / 1e9).round(2)
        >>> gb.to_dict()  # doctest: +NORMALIZE_WHITESPACE
        {'full': 14933250.59, 'block_diagonal': 6901365.66, 'kronecker': 0.71,
         'kronecker_cross': 0.46, 'diagonal': 0.24}
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"memory_report: model must be an nn.Module, got {type(model).__name__}.")
    if not (isinstance(dtype, torch.dtype) and (dtype.is_floating_point or dtype.is_complex)):
        raise ConfigError(
            f"memory_report: dtype must be a floating-point torch.dtype (e.g. torch.float32), "
            f"got {dtype!r}."
        )
    layers = [
        (name, m)
        for name, m in model.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    sizes = [
        sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad) for _, m in layers
    ]
    dims = [_kron_dims(m) for _, m in layers]
    D = sum(sizes)
    itemsize = torch.empty((), dtype=dtype, device="meta").element_size()
    rows = []
    for i, ((name, module), d) in enumerate(zip(layers, sizes)):
        kron = cross = math.nan
        if dims[i] is not None:
            kron = dims[i][0] ** 2 + dims[i][1] ** 2
            nxt = dims[i + 1] if i + 1 < len(dims) else (0, 0)
            cross = math.nan if nxt is None else dims[i][0] * nxt[0] + dims[i][1] * nxt[1]
        entries = {
            "full": d * D,
            "block_diagonal": d * d,
            "kronecker": kron,
            "kronecker_cross": cross,
            "diagonal": d,
        }
        for structure, n in entries.items():
            rows.append(
                {
                    "layer": name,
                    "type": type(module).__name__,
                    "params": d,
                    "structure": structure,
                    "entries": n,
                }
            )
    df = pd.DataFrame(rows, columns=["layer", "type", "params", "structure", "entries"])
    df["entries"] = df["entries"].astype("Int64")  # exact integers, <NA> where not applicable
    totals = df.groupby("structure", sort=False)["entries"].sum(min_count=1)
    total_rows = pd.DataFrame(
        {
            "layer": "total",
            "type": "",
            "params": D,
            "structure": list(MEMORY_STRUCTURES),
            "entries": pd.array([totals.get(s, pd.NA) for s in MEMORY_STRUCTURES], dtype="Int64"),
        }
    )
    df = pd.concat([df, total_rows], ignore_index=True)
    df.loc[df.structure.eq("full") & df.layer.eq("total"), "entries"] = D * D
    df["bytes"] = df["entries"] * itemsize
    return df
