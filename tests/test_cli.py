import csv
import json
import subprocess
import sys
from importlib import metadata

import pytest
import torch

from curvkit.app.cli import COMMANDS, format_table, main
from curvkit.problems import get_problem, list_problems
from tests.reference import DEVICES, assert_allclose_report, dense_ggn, dense_hessian


def f64(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def run_cli(args, capsys):
    """Run ``main(args)`` in-process: (exit status, stdout, stderr), usage errors included."""
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def extract_json(tmp_path, capsys, *args):
    code, out, err = run_cli(
        ["extract", "--repeat", "1", "--quiet", "--out", str(tmp_path), *args], capsys
    )
    assert code == 0, err
    assert "forward+backward" in out and "extraction" in out
    return json.loads((tmp_path / "extract.json").read_text()), out


def test_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "curvkit.app.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in COMMANDS:
        assert name in out


def test_console_script_is_declared():
    try:
        dist = metadata.distribution("curvkit")
    except metadata.PackageNotFoundError:
        pytest.skip("curvkit is not installed (pip install -e .)")
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts.get("curvkit") == "curvkit.app.cli:main"


def test_problems_lists_every_problem_with_its_size(capsys):
    code, out, _ = run_cli(["problems", "--quiet"], capsys)
    assert code == 0
    lines = out.splitlines()
    for name in list_problems():
        row = next(line for line in lines if line.startswith(name + " "))
        p = get_problem(name)
        assert f" {p.num_params} " in row and f" {p.n_train} " in row


@pytest.mark.parametrize("device", DEVICES)
def test_extract_traces_match_dense_hessian_on_linear_regression(device, tmp_path, capsys):
    # one linear layer with MSE: the Hessian is exactly G ⊗ A, so tr H = tr G · tr A
    summary, _ = extract_json(
        tmp_path, capsys, "--problem", "linear_regression", "--quantities", "kflr",
        "--dtype", "float64", "--device", device, "--batch-size", "40",
    )  # fmt: skip
    p = get_problem("linear_regression", dtype=torch.float64)
    X, y = p.batch(40)
    (layer,) = summary["layers"]
    X1 = torch.cat([X, torch.ones(40, 1, dtype=X.dtype)], dim=1)
    assert_allclose_report(f64(layer["tr A"]), (X1**2).sum() / 40, rtol=1e-12)
    trace_H = torch.trace(dense_hessian(p.model, p.loss_func, X, y))
    assert_allclose_report(f64(layer["tr A"] * layer["tr G[kflr]"]), trace_H, rtol=1e-10)
    assert summary["batch_size"] == 40 and summary["device"].startswith(device)
    assert summary["time_plain_s"] > 0 and summary["time_extract_s"] > 0
    assert summary["ratio"] == pytest.approx(summary["time_extract_s"] / summary["time_plain_s"])
    with open(tmp_path / "extract.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["tr A"]) == pytest.approx(layer["tr A"], rel=1e-12)


def test_extract_diagonal_traces_match_dense_ggn_blocks(tmp_path, capsys):
    summary, out = extract_json(
        tmp_path, capsys, "--problem", "tiny_mlp", "--quantities", "diag_ggn,batch_grad",
        "--dtype", "float64", "--batch-size", "16",
    )  # fmt: skip
    p = get_problem("tiny_mlp", dtype=torch.float64)
    X, y = p.batch(16)
    diag = torch.diagonal(dense_ggn(p.model, p.loss_func, X, y))
    start = 0
    for layer in summary["layers"]:
        block = diag[start : start + layer["params"]]
        start += layer["params"]
        assert_allclose_report(f64(layer["tr diag_ggn"]), block.sum(), rtol=1e-10)
        assert layer["batch_grad"] == [16, layer["params"]]
    assert start == p.num_params
    assert "tr diag_ggn" in out


def test_extract_conv_problem_with_reduce_and_cross(tmp_path, capsys):
    summary, _ = extract_json(
        tmp_path, capsys, "--problem", "tiny_cnn", "--quantities", "kfac,cross",
        "--kfac-approx", "reduce", "--mc-samples", "4",
    )  # fmt: skip
    assert [layer["type"] for layer in summary["layers"]] == ["Conv2d", "Conv2d", "Linear"]
    assert summary["kfac_approx"] == "reduce" and summary["mc_samples"] == 4
    # no cross factor between conv layers of different spatial size: the reason is recorded
    assert summary["cross_reasons"]


BAD = {
    "unknown-problem": (["extract", "--problem", "nope"], 1, "built-in problems"),
    "unknown-quantity": (["extract", "--problem", "tiny_mlp", "--quantities", "kfca"], 1, "kfca"),
    "empty-quantities": (["extract", "--problem", "tiny_mlp", "--quantities", ","], 1, "kfac"),
    "zero-batch": (["extract", "--problem", "tiny_mlp", "--batch-size", "0"], 1, "batch-size"),
    "bad-device": (["extract", "--problem", "tiny_mlp", "--device", "gpu7"], 1, "device"),
    "not-an-int": (["extract", "--batch-size", "many"], 2, "invalid int"),
    "bad-choice": (["extract", "--kfac-approx", "squeeze"], 2, "invalid choice"),
    "no-command": ([], 2, "required"),
    "unknown-command": (["plot"], 2, "invalid choice"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_exits_with_one_line(case, capsys):
    args, status, words = BAD[case]
    code, _, err = run_cli(args + ["--quiet"] if args and args[0] == "extract" else args, capsys)
    assert code == status
    assert len(err.strip().splitlines()) == 1, err
    assert words in err and "error" in err


def test_extract_unwritable_out_is_reported_before_extracting(tmp_path, capsys, monkeypatch):
    import curvkit.problems

    def no_work(*args, **kwargs):
        raise AssertionError("the output folder must be checked before any work")

    monkeypatch.setattr(curvkit.problems, "get_problem", no_work)
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "extract"  # below a regular file: cannot be created
    code, _, err = run_cli(
        ["extract", "--problem", "tiny_mlp", "--quiet", "--out", str(out)], capsys
    )
    assert code == 1 and "--out" in err and "not a writable folder" in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda_is_a_one_line_error(capsys):
    code, _, err = run_cli(["extract", "--problem", "tiny_mlp", "--device", "cuda"], capsys)
    assert code == 1 and "CUDA is not available" in err and len(err.strip().splitlines()) == 1


def test_error_in_a_real_process_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "curvkit.app.cli", "extract", "--problem", "nope"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_format_table_aligns_numbers_right_and_text_left():
    table = format_table([{"name": "a", "n": 5, "shape": (2, 3)}, {"name": "bcd", "n": 12.5}])
    lines = table.splitlines()
    assert lines[0].split() == ["name", "n", "shape"]
    assert lines[2].startswith("a    ") and lines[2].endswith("2x3")
    assert lines[3] == "bcd   12.5"  # "bcd" padded to the width of "name", two spaces, "12.5"
