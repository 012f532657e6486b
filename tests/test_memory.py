"""memory_report against hand-computed sizes."""

import pandas as pd
import pytest
import torch
from torch import nn

import curvkit as ck


def table(df, column="entries"):
    return df.pivot(index="layer", columns="structure", values=column)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_small_mlp_by_hand(device):
    with torch.device(device):
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    df = ck.memory_report(model, dtype=torch.float64)
    t = table(df)
    d0, d1 = 5 * 4 + 4, 4 * 3 + 3  # 24, 15
    D = d0 + d1
    expected = {
        "0": {"full": d0 * D, "block_diagonal": d0**2, "kronecker": 6**2 + 4**2,
              "kronecker_cross": 6 * 5 + 4 * 3, "diagonal": d0},
        "2": {"full": d1 * D, "block_diagonal": d1**2, "kronecker": 5**2 + 3**2,
              "kronecker_cross": 0, "diagonal": d1},
        "total": {"full": D**2, "block_diagonal": d0**2 + d1**2, "kronecker": 52 + 34,
                  "kronecker_cross": 42, "diagonal": D},
    }  # fmt: skip
    for layer, sizes in expected.items():
        for structure, n in sizes.items():
            assert t.loc[layer, structure] == n, (layer, structure)
    assert (df["bytes"] == df["entries"] * 8).all()
    assert set(df[df.layer != "total"].type) == {"Linear"}
    assert df[df.layer == "total"].params.unique().tolist() == [D]


def test_conv_frozen_and_unsupported_layers():
    with torch.device("meta"):
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, bias=False),
            nn.LayerNorm(8),
            nn.Flatten(),
            nn.Linear(8, 2),
            nn.Linear(2, 2),
        )
    model[4].requires_grad_(False)
    df = ck.memory_report(model)
    t = table(df)
    assert list(t.index) == ["0", "1", "3", "total"]  # the frozen layer is not counted
    assert t.loc["0", "kronecker"] == 27**2 + 8**2  # no bias: C_in * 3 * 3 inputs
    assert pd.isna(t.loc["0", "kronecker_cross"])  # the next parametrised layer has no factors
    assert pd.isna(t.loc["1", "kronecker"]) and t.loc["1", "block_diagonal"] == 16**2
    assert t.loc["3", "kronecker"] == 9**2 + 2**2 and t.loc["3", "kronecker_cross"] == 0
    assert t.loc["total", "kronecker"] == 27**2 + 8**2 + 9**2 + 2**2
    assert t.loc["total", "diagonal"] == 216 + 16 + 18
    assert (table(df, "bytes") == t * 4).all().all()


def test_conv_transpose_factors():
    with torch.device("meta"):
        model = nn.Sequential(nn.ConvTranspose1d(4, 6, 5))
    t = table(ck.memory_report(model))
    assert t.loc["0", "kronecker"] == (4 * 5 + 1) ** 2 + 6**2
    assert t.loc["0", "block_diagonal"] == (4 * 6 * 5 + 6) ** 2
