r"""Built-in problems on the architectures researchers study: a ResNet and a transformer.

Both models are plain ``nn.Module`` subclasses written the usual way (a
``forward`` with residual additions, BatchNorm, LayerNorm, attention from
``Linear`` layers), not ``nn.Sequential`` chains: the Kronecker extraction reaches
them through its graph path.

- :func:`mnist_resnet` / :func:`digits_resnet`: a pre-activation-free ResNet
  (He et al. 2016) of three stages of :class:`BasicBlock` with BatchNorm, on the
  MNIST subset (1x28x28) or scikit-learn's digits (1x8x8).
- :func:`char_transformer`: a decoder-only character transformer (GPT-style,
  causal self-attention, learned positions) on the text of Python's own
  ``pydoc_data.topics`` (about 0.46 MB of English, shipped with the standard
  library). Its output is ``[N, V, T]`` with targets ``[N, T]``, the layout
  ``nn.CrossEntropyLoss`` takes for a sequence (one loss term per position).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.errors import ConfigError
from curvkit.problems._data import digits_arrays, mnist_arrays, split_indices, to_tensors
from curvkit.problems.problem import Problem


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection (He et al. 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        """conv1-bn1-ReLU-conv2-bn2, plus the input or its 1x1-conv projection, then ReLU."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    """Stem, three stages of one :class:`BasicBlock` each, global average pooling, linear head."""

    def __init__(self, width: int = 16, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(
            BasicBlock(width, width),
            BasicBlock(width, 2 * width, stride=2),
            BasicBlock(2 * width, 4 * width, stride=2),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` of images ``[N, C, H, W]``."""
        h = F.relu(self.bn(self.stem(x)))
        h = self.blocks(h)
        return self.head(h.mean((2, 3)))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention from ``Linear`` layers on ``[N, T, d]``."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"d_model={d_model} is not divisible by n_heads={n_heads}.")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """``[N, T, d]`` -> ``[N, T, d]``; position ``t`` attends to ``0..t``."""
        N, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.reshape(N, T, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        att = scores.masked_fill(mask, float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(N, T, d))


class DecoderBlock(nn.Module):
    """Pre-LayerNorm transformer block: attention and a GELU MLP, each with a residual."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """``[N, T, d]`` -> ``[N, T, d]``."""
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """Decoder-only transformer: token and position embeddings, blocks, LayerNorm, linear head.

    ``forward(tokens [N, T])`` returns logits ``[N, V, T]`` (class dimension second,
    as ``nn.CrossEntropyLoss`` expects for sequences).
    """

    def __init__(self, vocab: int, context: int, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(DecoderBlock(d_model, n_heads) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``[N, V, T]`` of token ids ``[N, T]``."""
        T = tokens.shape[1]
        h = self.tok(tokens) + self.pos(torch.arange(T, device=tokens.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h)).transpose(1, 2)


def _seeded(seed: int, build, dtype, device) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.to(device=device, dtype=dtype)


def _resnet_problem(name, X, y, shape, width, seed, n_train, n_test, dtype, device, what):
    if not isinstance(width, int) or width < 1:
        raise ConfigError(f"{name}: width must be a positive int, got {width!r}.")
    train_idx, test_idx = split_indices(X.shape[0], n_train, n_test, seed)
    X = X.reshape(-1, *shape)
    return Problem(
        name=name,
        model=_seeded(seed, lambda: ResNet(width), dtype, device),
        loss_func=nn.CrossEntropyLoss(),
        train=to_tensors(X[train_idx], y[train_idx], dtype, device),
        test=to_tensors(X[test_idx], y[test_idx], dtype, device),
        description=f"ResNet (3 stages of BasicBlock with BatchNorm, width {width}) on {what}, "
        "cross-entropy",
        task="classification",
        seed=seed,
    )


def mnist_resnet(
    seed: int = 0,
    width: int = 16,
    n_train: int = 4000,
    n_test: int = 1000,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Problem:
    """ResNet with BatchNorm on the 5000-image MNIST subset (1x28x28; 77,754 parameters).

    Stem ``Conv2d(1, w, 3)``-BatchNorm-ReLU, three :class:`BasicBlock` stages of
    widths ``w, 2w, 4w`` (strides 1, 2, 2; 1x1 convolutions on the shortcut where
    the shape changes), global average pooling and ``Linear(4w, 10)``. The model
    is in training mode (BatchNorm uses batch statistics).

    Args:
        seed: Seed of the initialisation and of the split.
        width: Channels of the first stage.
        n_train: Training images.
        n_test: Test images.
        dtype: Floating-point type of model and data.
        device: Device of model and data.
    """
    X, y = mnist_arrays()
    return _resnet_problem(
        "mnist_resnet", X, y, (1, 28, 28), width, seed, n_train, n_test, dtype, device,
        "the 5000-image MNIST subset",
    )  # fmt: skip


def digits_resnet(
    seed: int = 0,
    width: int = 3,
    n_train: int = 1500,
    n_test: int = 297,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Problem:
    """ResNet with BatchNorm on scikit-learn's digits (1x8x8 in ``[0, 1]``; 2,965 parameters).

    The model of :func:`mnist_resnet` at width 3, small enough for dense curvature matrices.
    Arguments as in :func:`mnist_resnet`.
    """
    X, y = digits_arrays()
    return _resnet_problem(
        "digits_resnet", X / 16.0, y, (1, 8, 8), width, seed, n_train, n_test, dtype, device,
        "sklearn digits",
    )  # fmt: skip


def character_corpus() -> tuple[np.ndarray, list[str]]:
    """The text of ``pydoc_data.topics`` as character ids, and the sorted alphabet."""
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    return np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text)), alphabet


def char_transformer(
    seed: int = 0,
    context: int = 64,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_train: int = 4000,
    n_test: int = 500,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Problem:
    """Decoder-only character transformer on ``pydoc_data.topics`` (117,479 parameters).

    Sequences of ``context`` characters are cut from the corpus at seeded random
    offsets (the first 90% of the text for training, the rest for testing); the
    target is the next character at every position. The model
    (:class:`CharTransformer`) has token and learned position embeddings,
    ``n_layers`` pre-LayerNorm blocks of causal self-attention and a GELU MLP, a
    final LayerNorm and a linear head; its logits are ``[N, V, T]``.

    Args:
        seed: Seed of the initialisation and of the sequence offsets.
        context: Sequence length ``T``.
        d_model: Width of the residual stream.
        n_layers: Transformer blocks.
        n_heads: Attention heads.
        n_train: Training sequences.
        n_test: Test sequences.
        dtype: Floating-point type of the model.
        device: Device of model and data.
    """
    for arg, value in (("context", context), ("n_train", n_train), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"char_transformer: {arg} must be a positive int, got {value!r}.")
    ids, alphabet = character_corpus()
    cut = int(0.9 * len(ids))
    rng = np.random.default_rng(seed)

    def sequences(part: np.ndarray, n: int) -> tuple[Tensor, Tensor]:
        starts = rng.integers(0, len(part) - context - 1, size=n)
        windows = np.stack([part[s : s + context + 1] for s in starts])
        tokens = torch.from_numpy(windows).to(device)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    vocab = len(alphabet)
    return Problem(
        name="char_transformer",
        model=_seeded(
            seed, lambda: CharTransformer(vocab, context, d_model, n_layers, n_heads), dtype, device
        ),
        loss_func=nn.CrossEntropyLoss(),
        train=sequences(ids[:cut], n_train),
        test=sequences(ids[cut:], n_test),
        description=f"decoder-only transformer ({n_layers} blocks, d={d_model}, {n_heads} heads, "
        f"context {context}) on pydoc_data.topics characters (V={vocab}), cross-entropy",
        task="language-model",
        seed=seed,
    )
