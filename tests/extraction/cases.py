"""Case tables shared by the extraction tests."""

import pytest

from tests.reference import DEVICES, LOSSES, MODELS, REDUCTIONS

MODEL_NAMES = list(MODELS)
LINEAR_MODELS = ["mlp", "deep_mlp", "deep_linear"]
CONV_MODELS = ["cnn", "cnn1d"]

#: models x losses x reductions x devices, with readable ids.
FULL = [
    pytest.param(m, loss, red, dev, id=f"{m}-{loss}-{red}-{dev}")
    for m in MODEL_NAMES
    for loss in LOSSES
    for red in REDUCTIONS
    for dev in DEVICES
]
LINEAR = [p for p in FULL if p.values[0] in LINEAR_MODELS]
CONV = [p for p in FULL if p.values[0] in CONV_MODELS]
LOSS_CASES = [
    pytest.param(loss, red, dev, id=f"{loss}-{red}-{dev}")
    for loss in LOSSES
    for red in REDUCTIONS
    for dev in DEVICES
]


def flat(tensors):
    """Concatenate flattened tensors."""
    import torch

    return torch.cat([t.flatten() for t in tensors])
