"""The ``curvkit train`` job and its training loop (``curvkit/train.py``).

References: a plain PyTorch loop over the same batches (the job's loop must
reproduce it bit for bit), a hand-rolled K-FAC loop, hand-built curves whose
steps-to-target are known, and the files the job promises.
"""

import copy
import importlib.util
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

import curvkit as ck
from curvkit.app import train as T
from curvkit.app.cli import main
from tests.reference import DEVICES

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"


def run_cli(args, capsys):
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def plain_loop(problem, make_opt, first_order, steps, batch_size, seed):
    """Reference: the same batches, a fresh copy of the model, a textbook loop."""
    model = copy.deepcopy(problem.model)
    loss_func = problem.loss_func
    opt = make_opt(model, loss_func)
    loader = problem.loader(batch_size, seed=seed, drop_last=True)
    done = 0
    while done < steps:
        for X, y in loader:
            if done == steps:
                break
            if first_order:
                opt.zero_grad()
                loss_func(model(X), y).backward()
                opt.step()
            else:
                opt.step(lambda X=X, y=y: loss_func(model(X), y))
            done += 1
    with torch.no_grad():
        return float(loss_func(model(problem.train[0]), problem.train[1]))


CASES = [
    pytest.param(
        "sgd", 0.3,
        lambda m, lf: torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9, nesterov=True),
        True, id="sgd-nesterov",
    ),
    pytest.param(
        "adam", 1e-2, lambda m, lf: torch.optim.Adam(m.parameters(), lr=1e-2), True, id="adam"
    ),
    pytest.param(
        "kfac", None, lambda m, lf: ck.optim.KFAC(m, lf, damping=1e-3), False, id="kfac-auto"
    ),
    pytest.param(
        "kfac-lr", 0.1,
        lambda m, lf: ck.optim.KFAC(m, lf, lr=0.1, momentum=0.9, damping=1e-2),
        False, id="kfac-fixed-lr",
    ),
]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, lr, make_opt, first_order", CASES)
def test_train_run_matches_a_plain_loop(name, lr, make_opt, first_order, device):
    problem = ck.problems.get_problem("tiny_mlp", seed=1, n_train=48, device=device)
    steps, batch = 7, 16  # more steps than batches per epoch: crosses an epoch boundary
    rows = T.train_run(problem, name, lr, steps, batch, seed=1, eval_every=3)
    expected = plain_loop(problem, make_opt, first_order, steps, batch, seed=1)
    assert [r["step"] for r in rows] == list(range(steps + 1))
    evaluated = [r["step"] for r in rows if not math.isnan(r["train_loss"])]
    assert evaluated == [0, 3, 6, 7]
    assert T.final_loss(rows) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    seconds = [r["seconds"] for r in rows]
    assert seconds == sorted(seconds) and seconds[-1] > 0
    with torch.no_grad():  # the problem's own model is left as it was
        initial = float(problem.loss_func(problem.model(problem.train[0]), problem.train[1]))
    assert rows[0]["train_loss"] == pytest.approx(initial, rel=1e-6)


def test_diverging_run_stops_with_inf_and_tuning_avoids_it():
    problem = ck.problems.get_problem("tiny_mlp", seed=0, task="regression")
    rows = T.train_run(problem, "sgd", 1e4, 20, 32, seed=0, eval_every=5)
    assert T.final_loss(rows) == math.inf
    assert len(rows) < 21
    best, tuning = T.tune_lr(problem, "sgd", (1e-2, 1e4), 10, 32, eval_every=5)
    assert best == 1e-2
    assert set(pd.DataFrame(tuning)["lr"]) == {1e-2, 1e4}


class _PoisonAfter(torch.optim.Optimizer):
    """Plain SGD that sets every parameter to NaN after ``after`` steps."""

    def __init__(self, params, after):
        super().__init__(params, dict(lr=1e-3))
        self.after, self.done = after, 0

    @torch.no_grad()
    def step(self, closure):
        with torch.enable_grad():
            loss = closure()
        self.done += 1
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"])
                if self.done >= self.after:
                    p.fill_(math.nan)
        return loss


def test_run_whose_loss_turns_nan_is_diverged_not_at_its_initial_loss():
    problem = ck.problems.get_problem("tiny_mlp", seed=0, task="regression")
    method = T.Method("poisoned", lambda m, lf, lr: _PoisonAfter(m.parameters(), 3), True)
    rows = T.train_run(problem, "poisoned", None, 20, 32, seed=0, eval_every=100, method=method)
    # the batch loss of step 4 is NaN: the run stops there as diverged
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert math.isnan(rows[-1]["batch_loss"])
    assert T.final_loss(rows) == math.inf
    # NaN found by an evaluation (step 3 is evaluated) also ends the run
    rows = T.train_run(problem, "poisoned", None, 20, 32, seed=0, eval_every=3, method=method)
    assert rows[-1]["step"] == 3 and T.final_loss(rows) == math.inf
    summary = T.summarize(
        T.train_run(problem, "sgd", 0.1, 6, 32, seed=0, eval_every=3) + rows, reference="sgd"
    ).set_index("optimizer")
    assert math.isnan(summary.loc["poisoned", "final_loss"])
    assert summary.loc["poisoned", "diverged"] == "1/1"
    assert summary.loc["poisoned", "reached"] == "0/1"
    assert summary.loc["sgd", "diverged"] == "0/1" and summary.loc["sgd", "reached"] == "1/1"


def test_summarize_marks_diverged_seeds_and_never_counts_them_as_reaching():
    def curve(name, seed, losses):
        return [
            dict(optimizer=name, seed=seed, lr=0.1, step=k, seconds=k * 1.0, train_loss=v)
            for k, v in enumerate(losses)
        ]

    rows = curve("adam", 0, [4.0, 2.0, 1.0]) + curve("adam", 1, [4.0, 3.0, math.inf])
    rows += curve("sgd", 0, [4.0, 0.5, math.inf]) + curve("sgd", 1, [4.0, 3.0, 2.0])
    summary = T.summarize(rows, reference="adam").set_index("optimizer")
    assert summary.loc["adam", "target"] == 1.0  # the diverged reference seed sets no target
    assert summary.loc["adam", "diverged"] == "1/2" and summary.loc["sgd", "diverged"] == "1/2"
    assert math.isnan(summary.loc["adam", "final_loss"])
    assert math.isnan(summary.loc["sgd", "final_loss"])
    assert summary.loc["sgd", "reached"] == "0/2"  # seed 0 was below 1.0, then diverged
    # every reference run diverged: no target, nothing reached
    summary = T.summarize(curve("adam", 0, [4.0, math.inf]) + curve("sgd", 0, [4.0, 0.1]), "adam")
    assert math.isnan(summary.set_index("optimizer").loc["sgd", "target"])
    assert summary.set_index("optimizer").loc["sgd", "reached"] == "0/1"


def test_summarize_steps_and_seconds_to_target():
    def curve(name, seed, losses, dt):
        return [
            dict(optimizer=name, seed=seed, lr=0.1, step=k, seconds=k * dt, train_loss=v)
            for k, v in enumerate(losses)
        ]

    rows = curve("adam", 0, [4.0, 2.0, 1.0, 0.5], 1.0) + curve("adam", 1, [4.0, 3.0, 2.0, 1.5], 1.0)
    target = (0.5 + 1.5) / 2  # mean final loss of the reference
    rows += curve("kfac", 0, [4.0, 0.9, 0.8], 10.0) + curve("kfac", 1, [4.0, 1.2, 2.0], 10.0)
    rows += curve("sgd", 0, [4.0, 3.0, 3.0, 3.0], 0.5) + curve("sgd", 1, [4.0, 3.0], 0.5)
    rows += curve("sgd", 2, [4.0, 3.0, 3.0, 3.0], 5.0)  # a run slowed down by other work
    summary = T.summarize(rows, reference="adam").set_index("optimizer")
    assert summary.loc["adam", "target"] == target
    assert summary.loc["adam", "reached"] == "1/2"  # seed 0 is at 1.0 at step 2
    assert summary.loc["adam", "steps_to_target"] == 2
    assert summary.loc["kfac", "reached"] == "1/2"  # seed 1 never goes below 1.0
    assert summary.loc["kfac", "steps_to_target"] == 1
    assert summary.loc["kfac", "seconds_to_target"] == 10.0
    assert summary.loc["kfac", "final_loss"] == pytest.approx((0.8 + 2.0) / 2)
    assert summary.loc["kfac", "ms_per_step"] == pytest.approx(1e4)
    assert summary.loc["adam", "ms_per_step"] == pytest.approx(1e3)
    assert summary.loc["sgd", "reached"] == "0/3"
    assert summary.loc["sgd", "ms_per_step"] == pytest.approx(500.0)  # median, not mean
    assert math.isnan(summary.loc["sgd", "steps_to_target"])


def test_cli_train_quick_writes_curves_summary_and_figure(tmp_path, capsys):
    out = tmp_path / "train"
    args = ["train", "--problem", "tiny_mlp", "--quick", "--quiet", "--out", str(out)]
    code, stdout, err = run_cli([*args, "--optimizers", "sgd,adam,kfac", "--tune"], capsys)
    assert code == 0, err
    curves = pd.read_csv(out / "curves.csv")
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["optimizer"]) == ["sgd", "adam", "kfac"]
    # --quick: 5 steps of K-FAC, 15 of the first-order methods, one seed
    assert curves.groupby("optimizer")["step"].max().to_dict() == {"sgd": 15, "adam": 15, "kfac": 5}
    # same model for every optimiser: identical loss before the first step
    assert curves[curves["step"] == 0]["train_loss"].nunique() == 1
    tuning = pd.read_csv(out / "tuning.csv")
    assert set(tuning["optimizer"]) == {"sgd", "adam"}  # K-FAC (auto) has nothing to tune
    for name in ("sgd", "adam"):
        finals = tuning[tuning["optimizer"] == name].groupby("lr")["train_loss"].last()
        assert summary.set_index("optimizer").loc[name, "lr"] == finals.idxmin()
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| optimizer |" in (out / "summary.md").read_text()
    assert "kfac" in stdout and "wrote" in stdout


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(["--optimizers", "sgd,lbfgs"], "lbfgs", id="unknown-optimizer"),
        pytest.param(["--lr", "sgd:0.1"], "NAME=VALUE", id="malformed-lr"),
        pytest.param(["--lr", "adam=fast"], "not a number", id="lr-not-a-number"),
        pytest.param(["--steps", "0"], "--steps", id="zero-steps"),
        pytest.param(["--problem", "imagenet"], "imagenet", id="unknown-problem"),
        pytest.param(["--lr", "sgd=-1"], "sgd=-1 must be a finite number > 0", id="negative-lr"),
        pytest.param(["--lr", "adam=0"], "adam=0 must be", id="zero-lr"),
        pytest.param(["--lr", "sgd=nan"], "sgd=nan must be", id="nan-lr"),
        pytest.param(
            ["--nproc", "2", "--optimizers", "sgd,ngd"], "ngd runs on one process", id="nproc-ngd"
        ),
    ],
)
def test_cli_train_rejects_bad_arguments(args, message, capsys, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("bad arguments must be rejected before any work")

    monkeypatch.setattr(ck.problems, "get_problem", no_work)
    monkeypatch.setattr("curvkit.distributed.launch.launch", no_work)
    code, _, err = run_cli(["train", "--quiet", "--out", str(tmp_path), *args], capsys)
    assert code == 1
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_cli_train_unwritable_out_is_reported_before_training(tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the output folder must be checked before any work")

    monkeypatch.setattr(ck.problems, "get_problem", no_work)
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "train"  # below a regular file: cannot be created
    args = ["train", "--problem", "tiny_mlp", "--quick", "--quiet", "--out", str(out)]
    code, _, err = run_cli(args, capsys)
    assert code == 1 and "--out" in err and "not a writable folder" in err
    assert len(err.strip().splitlines()) == 1, err


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"analysis_{name}", ANALYSIS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "losses, threshold, region",
    [
        pytest.param([3.0, 1.2, 1.0, 1.4, 9.0], 1.5, (1e-2, 1.0, 2.0, "3/5"), id="middle"),
        pytest.param([1.0, 1.1, math.inf, 1.0, 1.2], 1.5, (1e-3, 1e-2, 1.0, "2/5"), id="gap"),
        pytest.param([9.0, 9.0, 9.0, 9.0, 1.0], 1.5, (10.0, 10.0, 0.0, "1/5"), id="edge"),
        pytest.param([9.0, 3.0, 9.0, 9.0, 9.0], 2.0, (math.nan,) * 3 + ("0/5",), id="none"),
    ],
)
def test_stability_good_region(losses, threshold, region):
    script = load("stability")
    values = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    got = script.good_region(values, losses, threshold)
    lo, hi, width, good = region
    assert got["good"] == good
    assert [got["lo"], got["hi"], got["width"]] == pytest.approx([lo, hi, width], nan_ok=True)


def test_stability_regions_table_uses_the_reference_bar():
    script = load("stability")
    runs = pd.DataFrame(
        [
            dict(method=m, value=v, seed=s, final_loss=loss)
            for m, losses in {"sgd": [4.0, 1.0, 4.0], "kfac": [0.1, 0.5, 1.9]}.items()
            for v, loss in zip([0.01, 0.1, 1.0], losses)
            for s in (0, 1)
        ]
    )
    table = {"sgd": ("SGD", "lr", (), None), "kfac": ("K-FAC", "damping", (), None)}
    regions = script.regions_table(runs, table, tolerance=2.0, bar=2.0, reference="sgd")
    regions = regions.set_index("method")
    assert regions.loc["kfac", "bar"] == 2.0  # 2 x SGD's best
    assert (regions.loc["kfac", "abs_lo"], regions.loc["kfac", "abs_hi"]) == (0.01, 1.0)
    assert (regions.loc["kfac", "rel_lo"], regions.loc["kfac", "rel_hi"]) == (0.01, 0.01)
    assert regions.loc["sgd", "abs_width"] == 0.0


def test_stability_and_sgd_ngd_kfac_quick(tmp_path):
    stability = load("stability")
    res = stability.main(
        ["--quick", "--problem", "tiny_mlp", "--batch-size", "32", "--out", str(tmp_path / "s")]
    )
    assert set(res["regions"]["method"]) == {"sgd", "adam", "kfac", "kfac-lr", "kfac-kl"}
    assert (tmp_path / "s" / "stability.png").is_file()
    exp2 = load("sgd_ngd_kfac")
    res = exp2.main(["--quick", "--problem", "tiny_mlp", "--out", str(tmp_path / "n")])
    assert list(res["summary"]["optimizer"]) == ["sgd", "ngd", "kfac", "kfac-lr"]
    # the tuned seed-0 run is the tuning run of the chosen learning rate, reused as is
    curves = res["curves"]
    assert curves[(curves["optimizer"] == "sgd")]["lr"].nunique() == 1


def test_initial_damping_quick(tmp_path):
    script = load("initial_damping")
    frame = script.main(
        ["--problems", "tiny_mlp", "--steps", "12", "--batch-size", "16", "--ae-steps", "0"]
        + ["--damping", "1e-2", "1.0", "--out", str(tmp_path)]
    )
    assert list(frame.columns) == ["problem", "λ₀ = 0.01", "λ₀ = 1"]
    assert len(frame) == 1 and frame["problem"][0].startswith("tiny_mlp (12 steps of 16)")
    losses = frame.iloc[0, 1:].astype(float)
    assert (losses > 0).all() and (losses < 10).all()
    assert (tmp_path / "initial_damping.md").read_text().startswith("| problem |")


def test_cli_train_nproc_2_reproduces_one_process_sgd(tmp_path, capsys):
    """Data parallel over 2 processes (torchrun, gloo): SGD gives the 1-process curve."""
    curves = {}
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}"
        args = ["train", "--problem", "tiny_mlp", "--quick", "--quiet", "--optimizers", "sgd"]
        code, _, err = run_cli([*args, "--nproc", str(nproc), "--out", str(out)], capsys)
        assert code == 0, err
        curves[nproc] = pd.read_csv(out / "curves.csv")["train_loss"].to_numpy()
    assert len(curves[1]) == len(curves[2]) > 1
    assert abs(curves[1] - curves[2]).max() <= 1e-6 * abs(curves[1]).max()
