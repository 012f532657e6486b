import pytest
import torch

from curvkit.optim.preconditioner import all_finite


@pytest.mark.parametrize(
    "tensors, expected",
    [
        ([torch.ones(3), torch.zeros(2, 2, dtype=torch.float64)], True),
        ([torch.ones(3), torch.tensor([1.0, float("nan")])], False),
        ([torch.tensor([float("inf"), -float("inf")])], False),
        ([torch.tensor(-float("inf"))], False),
        # Finite entries whose sum overflows: decided entry by entry.
        ([torch.full((4,), 3e38)], True),
        ([torch.tensor([1e300, 1e300], dtype=torch.float64)], True),
        ([torch.empty(0)], True),
        ([], True),
    ],
    ids=["finite", "nan", "inf-pair", "scalar-inf", "overflow32", "overflow64", "empty", "none"],
)
def test_all_finite(tensors, expected):
    assert all_finite(tensors) is expected
