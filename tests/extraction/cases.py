"""Views of the case table (:mod:`tests.cases`) for the extraction tests."""

import pytest
import torch

from tests.cases import DEVICES, EXTRACTION_MODELS, LOSSES, REDUCTIONS, grid

MODEL_NAMES = list(EXTRACTION_MODELS)
LINEAR_MODELS = ["mlp", "deep_mlp", "deep_linear"]
CONV_MODELS = ["cnn", "cnn1d"]

#: models x losses x reductions x this machine's devices, with readable ids; unmarked,
#: so tests may derive rows from them (``p.values``) without losing a skip mark.
FULL = grid(EXTRACTION_MODELS, devices=DEVICES)
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
    return torch.cat([t.flatten() for t in tensors])
