"""A small residual CNN with BatchNorm on sklearn digits (8x8), ~100k parameters.

An example model for ``curvkit report --model`` above the dense threshold
(matrix-free report)::

    curvkit report --model docs/examples/resnet_digits.py:build --out report-resnet/

or from Python::

    import curvkit as ck
    from docs.examples.resnet_digits import build

    model, loss_func, data = build()
    ck.report(model, loss_func, data, out="report-resnet/", train_steps=50)
"""

import torch
from torch import nn


class Block(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or 1x1) shortcut (He et al. 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem 1->32, three blocks at 32 channels, one strided block to 48, pooling, linear."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32))
        self.blocks = nn.Sequential(Block(32, 32), Block(32, 32), Block(32, 32), Block(32, 48, 2))
        self.fc = nn.Linear(48, classes)

    def forward(self, x):
        """Logits ``[N, classes]`` of images ``[N, 1, H, W]``."""
        x = self.blocks(torch.relu(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


def build(seed: int = 0):
    """``(model, loss_func, (X, y))``: the ResNet and the digits training split."""
    from curvkit.problems import get_problem

    problem = get_problem("digits_cnn", seed=seed)
    torch.manual_seed(seed)
    return ResNet(), nn.CrossEntropyLoss(), problem.train


if __name__ == "__main__":
    model, _, (X, _) = build()
    print(sum(p.numel() for p in model.parameters()), "parameters;", tuple(model(X[:2]).shape))
