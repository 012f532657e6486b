"""Models written the way researchers write them, and dense float64 references for any module.

The references work on any ``nn.Module`` whose output has ``M = N * T_out`` rows
(``T_out = 1`` unless a sequence output is flattened): ``model(X)`` is called with
``torch.func.functional_call`` on the flat trainable parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

DT = torch.float64


# -- models ---------------------------------------------------------------------------


class CustomCNN(nn.Module):
    """Reflect/circular padding, a grouped conv, a Conv1d branch via reshape, a Linear head."""

    def __init__(self, c_out: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.conv2 = nn.Conv2d(4, 4, 3, groups=2, stride=2, padding=1, padding_mode="circular")
        self.conv3 = nn.Conv1d(4, 2, 2, padding="same", padding_mode="replicate", bias=False)
        self.fc = nn.Linear(2 * 9, c_out)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.tanh(self.conv2(h))  # [N, 4, 3, 3]
        h = self.conv3(h.flatten(2))  # [N, 2, 9]
        return self.fc(h.flatten(1))


class Conv3dNet(nn.Module):
    """Conv3d with dilation and zero padding, then Linear."""

    def __init__(self, c_out: int = 3):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 2, dilation=(1, 2, 1), padding=(1, 0, 0))
        self.fc = nn.Linear(2 * 4 * 2 * 2, c_out)

    def forward(self, x):
        return self.fc(torch.sigmoid(self.conv(x)).flatten(1))


class ResBlockNet(nn.Module):
    """A ResNet basic block (BatchNorm, in-place ReLU, residual add) and a Linear head."""

    def __init__(self, c_out: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(3, c_out)

    def forward(self, x):
        x = self.relu(self.bn0(self.stem(x)))
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        out = self.relu(out)
        return self.fc(out.mean((2, 3)))


class TinyGPT(nn.Module):
    """Decoder-only transformer: token+position Embedding, LayerNorm, causal attention, MLP."""

    def __init__(self, vocab: int = 7, d: int = 4, T: int = 3, expand_positions: bool = True):
        super().__init__()
        self.expand_positions = expand_positions  # False: positions [T] shared by the batch
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        N, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        h = self.tok(idx) + self.pos(pos.expand(N, T) if self.expand_positions else pos)
        x = self.ln1(h)
        q, k, v = self.q(x), self.k(x), self.v(x)
        att = q @ k.transpose(1, 2) / k.shape[-1] ** 0.5
        mask = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        h = h + self.proj(att @ v)
        h = h + self.mlp(F.gelu(self.ln2(h)))
        return self.head(h).reshape(N * T, -1)  # [N*T, vocab] for CrossEntropyLoss


class ReusedNet(nn.Module):
    """One Tanh module used twice and one Linear module called twice (shared weights)."""

    def __init__(self, c_out: int = 3):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.act = nn.Tanh()
        self.shared = nn.Linear(5, 5)
        self.out = nn.Linear(5, c_out)

    def forward(self, x):
        h = self.act(self.inp(x))
        h = self.act(self.shared(h))
        h = self.shared(h) + h
        return self.out(h)


class DictNet(nn.Module):
    """Dict input with two branches, GroupNorm on one."""

    def __init__(self, c_out: int = 3):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(2, 4, bias=False)
        self.gn = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, c_out)

    def forward(self, batch):
        h = self.gn(torch.tanh(self.a(batch["x"]))) + self.b(batch["z"])
        return self.head(torch.sigmoid(h))


class TiedNet(nn.Module):
    """Two Linear layers sharing one weight (separate biases)."""

    def __init__(self, c_out: int = 3):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.l1 = nn.Linear(5, 5)
        self.l2 = nn.Linear(5, 5)
        self.l2.weight = self.l1.weight
        self.out = nn.Linear(5, c_out)

    def forward(self, x):
        h = torch.tanh(self.l1(torch.tanh(self.inp(x))))
        return self.out(torch.sigmoid(self.l2(h)))


class TiedHeadLM(nn.Module):
    """Embedding reused as the output layer through its weight (outside the module's calls)."""

    def __init__(self, vocab: int = 6, d: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)

    def forward(self, idx):
        h = torch.tanh(self.mix(self.emb(idx)))  # [N, d] (one token per example)
        return h @ self.emb.weight.T


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random affine parameters and running statistics of every normalisation layer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model


def problem(name: str, loss: str = "ce", n: int = 5, seed: int = 0):
    """``(model, loss_func, X, y)`` in float64 for a model of this file (eval mode)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    C = 3
    if name == "cnn":
        model, X = CustomCNN(), torch.randn(n, 2, 6, 6, generator=gen, dtype=DT)
    elif name == "conv3d":
        model, X = Conv3dNet(), torch.randn(n, 1, 3, 4, 3, generator=gen, dtype=DT)
    elif name == "resnet":
        model, X = ResBlockNet(), torch.randn(n, 1, 4, 4, generator=gen, dtype=DT)
    elif name in ("gpt", "gpt_shared_pos"):
        model, C = TinyGPT(expand_positions=name == "gpt"), 7
        X = torch.randint(0, 7, (n, 3), generator=gen)
    elif name == "reused":
        model, X = ReusedNet(), torch.randn(n, 4, generator=gen, dtype=DT)
    elif name == "dict":
        model = DictNet()
        X = {
            "x": torch.randn(n, 4, generator=gen, dtype=DT),
            "z": torch.randn(n, 2, generator=gen, dtype=DT),
        }
    elif name == "tied":
        model, X = TiedNet(), torch.randn(n, 4, generator=gen, dtype=DT)
    else:
        raise KeyError(name)
    model = randomise_norms(model.to(DT)).eval()
    M = n * 3 if name.startswith("gpt") else n
    if loss == "mse":
        y = torch.randn(M, C, generator=gen, dtype=DT)
    elif loss == "ce":
        y = torch.randint(0, C, (M,), generator=gen)
    else:
        y = torch.rand(M, C, generator=gen, dtype=DT)
    lf = {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}[loss]
    return model, lf(), X, y


# -- references -----------------------------------------------------------------------


def trainable(model: nn.Module) -> list[Tensor]:
    """Trainable parameters, flat order."""
    return [p for p in model.parameters() if p.requires_grad]


def _output_fn(model: nn.Module):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]

    def out(theta, X):
        params = {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        return functional_call(model, params, (X,), tie_weights=True)

    return torch.cat([p.detach().flatten() for _, p in named]), out


def reduction(loss_func: nn.Module, rows: int) -> float:
    """``R`` of the loss over ``rows`` output rows."""
    return 1.0 / rows if loss_func.reduction == "mean" else 1.0


def dense_ggn(model, loss_func, X, y) -> Tensor:
    r"""GGN :math:`R\sum_m J_m^\top \Lambda_m J_m` over the output rows ``m``."""
    theta, out = _output_fn(model)
    f = out(theta, X).detach()
    J = jacrev(lambda t: out(t, X))(theta)  # [M, C, D]
    lam = torch.stack(
        [hessian(lambda g, yy=ym: loss_func(g[None], yy[None]))(fm) for fm, ym in zip(f, y)]
    )
    return reduction(loss_func, f.shape[0]) * torch.einsum("mcd,mce,mef->df", J, lam, J)


def slice_example(X, n: int):
    """Example ``n`` of a tensor or dict input (batch dimension kept)."""
    if isinstance(X, dict):
        return {k: v[n : n + 1] for k, v in X.items()}
    return X[n : n + 1]


def batch_size(X) -> int:
    """``N`` of a tensor or dict input."""
    return next(iter(X.values())).shape[0] if isinstance(X, dict) else X.shape[0]


def per_example_grads(model, loss_func, X, y) -> Tensor:
    r"""``[N, D]``: :math:`R\nabla\sum_{m\in n}\ell_m` per example ``n`` (explicit loop)."""
    theta, out = _output_fn(model)
    N = batch_size(X)
    M = y.shape[0]
    R = reduction(loss_func, M)
    ys = y.reshape(N, M // N, *y.shape[1:])
    rows = []
    for n in range(N):
        Xn = slice_example(X, n)

        def loss_n(t, Xn=Xn, yn=ys[n]):
            f = out(t, Xn)
            return sum(loss_func(f[m][None], yn[m][None]) for m in range(f.shape[0]))

        rows.append(R * torch.func.grad(loss_n)(theta))
    return torch.stack(rows)


def dense_ef(model, loss_func, X, y) -> Tensor:
    r""":math:`\frac1R \sum_n g_n g_n^\top` with ``g_n`` the rows of :func:`per_example_grads`."""
    g = per_example_grads(model, loss_func, X, y)
    return g.T @ g / reduction(loss_func, y.shape[0])


def offsets(model: nn.Module) -> dict[int, int]:
    """Flat offset of every trainable parameter, by ``id``."""
    res, o = {}, 0
    for p in trainable(model):
        res[id(p)] = o
        o += p.numel()
    return res


def flat_index(model: nn.Module, params: list[Tensor]) -> Tensor:
    """Flat indices of ``params`` (in the given order)."""
    off = offsets(model)
    return torch.cat([torch.arange(off[id(p)], off[id(p)] + p.numel()) for p in params])


def joint_index(model: nn.Module, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Flat indices of a layer's joint ``[W, b]`` (row-major over ``[out, in + 1]``)."""
    off = offsets(model)
    n_out, K = weight.shape[0], weight[0].numel()
    idx = []
    for o in range(n_out):
        idx.extend(off[id(weight)] + o * K + k for k in range(K))
        if bias is not None:
            idx.append(off[id(bias)] + o)
    return torch.tensor(idx)


def sub(M: Tensor, rows: Tensor, cols: Tensor | None = None) -> Tensor:
    """``M[rows][:, cols]``."""
    return M[rows][:, rows if cols is None else cols]
