r"""The ``curvkit train`` job: optimisers side by side on a built-in problem.

Every optimiser starts from the same initialisation and sees the same sequence
of mini-batches for a given seed; the loss on the whole training set is
evaluated every few steps (outside the timed region). Learning rates of the
methods that have one can be tuned on a grid (best final training loss of a
short run on the first seed). The job writes ``curves.csv`` (one row per step
and seed), ``summary.csv`` and ``summary.md`` (final loss, time per step, steps
and seconds to reach the reference optimiser's final loss) and
``curves.png`` (loss against steps and against seconds, mean and range over
seeds).

:data:`METHODS` lists the optimisers by name: first-order baselines (``sgd``:
Nesterov momentum 0.9, ``adam``), K-FAC (Martens & Grosse 2015) with the
automatic step and Levenberg–Marquardt damping (``kfac``, ``kfac-tridiag``,
``ekfac`` with the empirical eigenvalue correction, ``ekfac-fisher`` with that of
the Monte Carlo Fisher), K-FAC with a fixed learning rate and momentum (``kfac-lr``) and
exact natural gradient with conjugate gradients (``ngd``, small models only).

Example:
    $ curvkit train --quick
    $ curvkit train --optimizers sgd,adam,kfac --steps 200 --seeds 3 --tune --out results/train
"""

from __future__ import annotations

import argparse
import copy
import inspect
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from curvkit.errors import ConfigError
from curvkit.timing import sync

#: Stop a run whose training loss exceeds this multiple of its initial loss.
DIVERGED = 1e3


@dataclass(frozen=True)
class Method:
    """One optimiser of the comparison.

    Attributes:
        label: Legend label.
        build: ``build(model, loss_func, lr) -> optimiser``; every optimiser is
            stepped as ``opt.step(closure)``.
        first_order: ``True``: the closure computes the gradient (``backward``);
            ``False``: the closure runs the forward pass only (K-FAC, NGD).
        lr: Default learning rate (``None`` where the method has none to set).
        lr_grid: Grid that ``--tune`` searches (empty: not tuned).
    """

    label: str
    build: Callable[[nn.Module, nn.Module, float | None], torch.optim.Optimizer]
    first_order: bool
    lr: float | None = None
    lr_grid: tuple[float, ...] = field(default=())


def _kfac(**kwargs):
    def build(model, loss_func, lr):
        from curvkit.distributed.kfac import make_kfac

        # a plain KFAC in one process; with the communicator under torchrun
        return make_kfac(model, loss_func, **({"lr": lr} if lr is not None else {}), **kwargs)

    build.options = kwargs  # for variants of a method (see analysis/train_autoencoder.py)
    return build


def _ngd(model, loss_func, lr):
    from curvkit.optim import NaturalGradient

    return NaturalGradient(
        model, loss_func, lr=lr, damping=0.1, momentum=0.9, cg_tol=1e-4, cg_maxiter=100
    )


#: The optimisers by name. Default learning rates are those tuned for the half-width
#: MNIST autoencoder at batch 250 (docs/experiments.md); ``--tune`` re-tunes on any problem.
METHODS: dict[str, Method] = {
    "sgd": Method(
        "SGD (Nesterov 0.9)",
        lambda m, lf, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True),
        True,
        lr=0.3,
        lr_grid=(0.1, 0.3, 1.0, 3.0, 10.0),
    ),
    "adam": Method(
        "Adam",
        lambda m, lf, lr: torch.optim.Adam(m.parameters(), lr=lr),
        True,
        lr=3e-3,
        lr_grid=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    ),
    "kfac": Method("K-FAC block-diag (auto)", _kfac(damping=1e-3), False),
    "kfac-tridiag": Method(
        "K-FAC tri-diag (auto)", _kfac(structure="tridiagonal", damping=1e-3), False
    ),
    "ekfac": Method("EKFAC, empirical (auto)", _kfac(ekfac=True, damping=1e-3), False),
    "ekfac-fisher": Method(
        "EKFAC, Fisher (auto)", _kfac(ekfac=True, ekfac_correction="kind", damping=1e-3), False
    ),
    "kfac-lr": Method(
        "K-FAC block-diag (lr + momentum)",
        _kfac(momentum=0.9, damping=1e-2),
        False,
        lr=0.1,
        lr_grid=(0.03, 0.1, 0.3),
    ),
    "ngd": Method("exact NGD (CG, momentum)", _ngd, False, lr=0.1, lr_grid=(0.01, 0.03, 0.1)),
}


#: Methods without a data-parallel version (``--nproc`` above 1 rejects them).
SINGLE_PROCESS = ("ngd",)


def check_out_dir(path: Path, flag: str = "--out") -> Path:
    """Create the output folder ``path`` and check that a file can be written in it.

    Called before any computation, so that an unwritable folder is reported at
    once rather than after the work it was meant to keep.

    Args:
        path: The folder (created with its parents when missing).
        flag: The argument's name in the error message.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ConfigError: If the folder cannot be created or written to.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(f"{flag} {str(path)!r} is not a writable folder: {reason}.") from None
    return path


@torch.no_grad()
def full_loss(model: nn.Module, loss_func: nn.Module, X, y, chunk: int = 2000) -> float:
    """Loss on all of ``(X, y)`` (mean-reduced losses are averaged chunk by chunk)."""
    total, n = 0.0, X.shape[0]
    for i in range(0, n, chunk):
        part = float(loss_func(model(X[i : i + chunk]), y[i : i + chunk]))
        total += part * (min(i + chunk, n) - i if loss_func.reduction == "mean" else 1)
    return total / n if loss_func.reduction == "mean" else total


def train_run(
    problem,
    name: str,
    lr: float | None,
    steps: int,
    batch_size: int,
    seed: int,
    eval_every: int = 10,
    progress: Callable[[], None] | None = None,
    method: Method | None = None,
) -> list[dict]:
    """Train a copy of ``problem.model`` with one optimiser and record its curve.

    Args:
        problem: A :class:`curvkit.problems.Problem` (its model is copied, not changed).
        name: A key of :data:`METHODS`, or the name the rows carry when ``method``
            is given.
        lr: Learning rate (``None`` for methods without one).
        steps: Optimiser steps.
        batch_size: Examples per step; batches come from ``problem.loader`` seeded
            with ``seed``, so every method sees the same batches.
        seed: Seed of the batch order.
        eval_every: Steps between evaluations of the training loss on the whole split.
        progress: Called after every step (e.g. a progress bar's ``update``).
        method: An optimiser not in :data:`METHODS` (default: ``METHODS[name]``).

    Returns:
        One row per step (step 0 is the initial state): ``optimizer``, ``seed``,
        ``lr``, ``step``, ``seconds`` (cumulative time inside ``opt.step``),
        ``batch_loss`` and, at evaluated steps, ``train_loss`` (``nan`` elsewhere);
        ``damping`` for K-FAC. A run whose batch or training loss is not finite
        (``nan`` included) or exceeds :data:`DIVERGED` times its initial value
        stops with a last row whose ``train_loss`` is ``inf`` (diverged).
    """
    from curvkit.distributed.launch import init_from_env

    method = METHODS[name] if method is None else method
    net = model = copy.deepcopy(problem.model)
    loss_func = problem.loss_func
    device = next(model.parameters()).device
    rank, world = init_from_env(device)  # (0, 1) outside torchrun
    if world > 1 and method.first_order:  # DDP averages the gradients in backward
        model = nn.parallel.DistributedDataParallel(net)
    elif world > 1 and name in SINGLE_PROCESS:
        raise ConfigError(f"--nproc: {name!r} runs on one process only.")
    opt = method.build(model, loss_func, lr)
    X_train, y_train = problem.train
    base = dict(optimizer=name, seed=seed, lr=math.nan if lr is None else lr)
    first = full_loss(net, loss_func, X_train, y_train)
    rows = [dict(base, step=0, seconds=0.0, batch_loss=math.nan, train_loss=first)]
    loader = problem.loader(min(batch_size, len(X_train)), seed=seed, drop_last=True)
    elapsed, step = 0.0, 0
    while step < steps:
        for X, y in loader:
            if step >= steps:
                break
            X, y = X.chunk(world)[rank], y.chunk(world)[rank]  # this process's shard
            if method.first_order:

                def closure(X=X, y=y):
                    opt.zero_grad(set_to_none=True)
                    loss = loss_func(model(X), y)
                    loss.backward()
                    return loss

            else:

                def closure(X=X, y=y):
                    return loss_func(model(X), y)

            sync(device)
            start = time.perf_counter()
            loss = float(opt.step(closure).detach())
            sync(device)
            elapsed += time.perf_counter() - start
            step += 1
            evaluate = step % eval_every == 0 or step == steps
            train_loss = full_loss(net, loss_func, X_train, y_train) if evaluate else math.nan
            row = dict(base, step=step, seconds=elapsed, batch_loss=loss, train_loss=train_loss)
            if hasattr(opt, "damping"):
                row["damping"] = opt.damping
            rows.append(row)
            if progress is not None:
                progress()
            # the batch loss always exists; the training loss only when evaluated
            if diverged(loss, first) or (evaluate and diverged(train_loss, first)):
                rows[-1]["train_loss"] = math.inf
                return rows
    return rows


def diverged(loss: float, initial: float) -> bool:
    """Whether ``loss`` marks a diverged run: not finite or above ``DIVERGED * initial``."""
    return not math.isfinite(loss) or loss > DIVERGED * abs(initial)


def final_loss(rows: Sequence[dict]) -> float:
    """Last evaluated training loss of a run (``inf`` for a diverged run)."""
    return [r["train_loss"] for r in rows if not math.isnan(r["train_loss"])][-1]


def tune_lr(problem, name, grid, steps, batch_size, eval_every=10, progress=None, method=None):
    """The learning rate of ``grid`` with the lowest final training loss after ``steps``.

    Runs :func:`train_run` on ``problem`` (seed ``problem.seed``) for every value;
    ties go to the smaller learning rate.

    Returns:
        ``(best_lr, rows)``: the chosen value and the curves of every grid point.
    """
    rows, finals = [], {}
    for lr in grid:
        run = train_run(
            problem, name, lr, steps, batch_size, problem.seed, eval_every, progress, method
        )
        finals[lr] = final_loss(run)
        rows += run
    best = min(grid, key=lambda lr: (finals[lr], lr))
    return best, rows


def summarize(curves, reference: str | None = "adam"):
    """Per optimiser: final loss over seeds, time per step, steps and seconds to a target.

    The target is the mean final training loss of the runs of ``reference``
    (the first optimiser when ``reference`` did not run) that did not diverge.
    A diverged run (last ``train_loss`` ``inf``, see :func:`train_run`) never
    counts as reaching the target; ``diverged`` counts them, and ``final_loss``
    is ``nan`` when any seed diverged (no mean of a diverged run is meaningful).
    "Steps to target" is the first evaluated step whose training loss is at
    most the target, the median over the seeds that reach it (``reached``
    counts them); "seconds to target" is the time in ``opt.step`` until then,
    and ``ms_per_step`` the time per step, both medians over seeds, so that one
    run slowed down by other work on the machine does not move them.

    Args:
        curves: The rows of :func:`train_run` (a list of dicts or a DataFrame).
        reference: Name of the optimiser whose final loss is the target.

    Returns:
        A :class:`pandas.DataFrame`, one row per optimiser in order of appearance.
    """
    import pandas as pd

    df = pd.DataFrame(curves)
    evals = df[df["train_loss"].notna()]
    finals = evals.groupby(["optimizer", "seed"], sort=False).last()
    names = list(dict.fromkeys(df["optimizer"]))
    ref = reference if reference in names else names[0]
    ref_finals = finals.loc[ref, "train_loss"]
    ref_finals = ref_finals[ref_finals < math.inf]  # diverged reference runs set no target
    target = float(ref_finals.mean()) if len(ref_finals) else math.nan
    out = []
    for name in names:
        runs = evals[evals["optimizer"] == name]
        final = finals.loc[name, "train_loss"]
        bad = final.index[~(final < math.inf)]  # diverged seeds (inf, or nan if ever recorded)
        steps = df[(df["optimizer"] == name) & (df["step"] > 0)]
        ok = runs[~runs["seed"].isin(bad)]
        hits = ok[ok["train_loss"] <= target].groupby("seed").first()
        per_seed = steps.groupby("seed").agg(seconds=("seconds", "max"), n=("step", "max"))
        out.append(
            {
                "optimizer": name,
                "lr": float(runs["lr"].iloc[0]),
                "seeds": int(final.shape[0]),
                "steps": int(steps["step"].max()),
                "final_loss": math.nan if len(bad) else float(final.mean()),
                "final_loss_std": math.nan if len(bad) else float(final.std(ddof=0)),
                "diverged": f"{len(bad)}/{final.shape[0]}",
                "ms_per_step": 1e3 * float((per_seed["seconds"] / per_seed["n"]).median()),
                "target": target,
                "reached": f"{hits.shape[0]}/{final.shape[0]}",
                "steps_to_target": float(hits["step"].median()) if len(hits) else math.nan,
                "seconds_to_target": float(hits["seconds"].median()) if len(hits) else math.nan,
            }
        )
    return pd.DataFrame(out)


def plot_curves(curves, path=None, title: str | None = None, labels: dict | None = None):
    """Training loss against steps and against seconds: mean line, min–max band over seeds.

    The time of a step is the median over seeds of the cumulative time in
    ``opt.step``; the time axis is logarithmic (step 0 is left out there), since
    the optimisers' costs per step differ by orders of magnitude. The loss axis
    starts from the largest loss at the optimisers' first evaluations after step
    0, so that a large initial loss does not flatten the rest.

    Args:
        curves: The rows of :func:`train_run` (a list of dicts or a DataFrame).
        path: Where to write ``.png`` (no suffix needed); ``None`` writes nothing.
        title: Figure title.
        labels: Optimiser name -> legend label (default: :data:`METHODS` labels).

    Returns:
        The matplotlib figure.
    """
    import matplotlib as mpl
    import pandas as pd
    from matplotlib.figure import Figure

    from curvkit import plotting

    df = pd.DataFrame(curves)
    df = df[df["train_loss"].notna() & (df["train_loss"] < math.inf)]
    firsts = []  # mean loss at each optimiser's first evaluation after step 0
    with mpl.rc_context(plotting.STYLE):
        fig = Figure(figsize=(9.0, 3.4), layout="constrained")
        ax_steps, ax_time = fig.subplots(1, 2, sharey=True)
        for name, runs in df.groupby("optimizer", sort=False):
            stats = runs.groupby("step")
            loss = stats["train_loss"]
            lo, mean, hi = loss.min(), loss.mean(), loss.max()
            seconds = stats["seconds"].median()
            label = (labels or {}).get(name) or (METHODS[name].label if name in METHODS else name)
            (line,) = ax_steps.plot(mean.index, mean.values, label=label)
            ax_steps.fill_between(mean.index, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
            later = mean.index > 0
            if later.any():
                firsts.append(float(mean.values[later][0]))
            x = seconds.values[later]
            ax_time.plot(x, mean.values[later], color=line.get_color())
            ax_time.fill_between(x, lo[later], hi[later], color=line.get_color(), alpha=0.2, lw=0)
        ax_steps.set(xlabel="iteration", ylabel="training loss", yscale="log")
        positive = df.loc[df["train_loss"] > 0, "train_loss"]
        if len(firsts) and len(positive):
            top = min(1.2 * max(firsts), 1.2 * float(positive.max()))
            ax_steps.set_ylim(0.8 * float(positive.min()), top)
        ax_time.set(xlabel="seconds in optimiser steps (log scale)", xscale="log", yscale="log")
        ax_steps.legend(loc="upper right")
        if title:
            fig.suptitle(title, fontweight="bold")
        if path is not None:
            plotting.save(fig, path, formats=("png",))
    return fig


# -- the command ---------------------------------------------------------------------------
HELP = "train a built-in problem with several optimisers; curves, figure and summary"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``curvkit train``."""
    parser.add_argument("--problem", default="mnist_autoencoder_half", help="built-in problem")
    parser.add_argument(
        "--optimizers",
        default="sgd,adam,kfac",
        help=f"comma-separated, from: {','.join(METHODS)}",
    )
    parser.add_argument("--steps", type=int, default=60, help="steps of the second-order methods")
    parser.add_argument(
        "--first-order-steps", type=int, help="steps of sgd/adam (default: 3x --steps)"
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..n-1 (model, split, batches)")
    parser.add_argument("--batch-size", type=int, default=250, help="examples per step")
    parser.add_argument(
        "--init",
        choices=("sparse", "default"),
        default="sparse",
        help="initialisation of problems that take one (autoencoders; sparse: M&G)",
    )
    parser.add_argument("--lr", default="", help="learning rates, e.g. sgd=1,adam=3e-3")
    parser.add_argument("--tune", action="store_true", help="tune learning rates on each grid")
    parser.add_argument(
        "--tune-steps", type=int, help="steps of a tuning run (default: the method's steps)"
    )
    parser.add_argument("--eval-every", type=int, help="steps between full training-loss checks")
    parser.add_argument("--reference", default="adam", help="its final loss is the target")
    parser.add_argument("--out", type=Path, default=Path("results/train"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="5 steps (15 first-order), batch 100")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--nproc", type=int, default=1, help="data-parallel processes (torchrun); split each batch"
    )


def _parse_lrs(text: str, names: Sequence[str]) -> dict[str, float]:
    lrs = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in names:
            raise ConfigError(
                f"--lr: expected NAME=VALUE with NAME in {list(names)}, got {item!r}."
            )
        try:
            lrs[name] = float(value)
        except ValueError:
            raise ConfigError(f"--lr: {value!r} is not a number (in {item!r}).") from None
        if not (math.isfinite(lrs[name]) and lrs[name] > 0):
            raise ConfigError(f"--lr: {name}={value} must be a finite number > 0.")
    return lrs


def _settings(args: argparse.Namespace) -> dict:
    """Validated settings from the arguments (``--quick`` overrides sizes)."""
    names = [s.strip() for s in args.optimizers.split(",") if s.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ConfigError(f"--optimizers: unknown {unknown}; choose from {', '.join(METHODS)}.")
    steps, seeds, batch = (5, 1, 100) if args.quick else (args.steps, args.seeds, args.batch_size)
    first = 3 * steps if args.first_order_steps is None or args.quick else args.first_order_steps
    tune_steps = None if args.quick else args.tune_steps
    checks = [("--steps", steps), ("--first-order-steps", first), ("--seeds", seeds)]
    checks += [("--batch-size", batch), ("--tune-steps", 1 if tune_steps is None else tune_steps)]
    for flag, value in checks:
        if value < 1:
            raise ConfigError(f"{flag} must be positive, got {value}.")
    nproc = getattr(args, "nproc", 1)
    if nproc < 1 or batch % nproc:
        raise ConfigError(f"--nproc={nproc}: must be positive and divide --batch-size={batch}.")
    single = [n for n in names if n in SINGLE_PROCESS]
    if nproc > 1 and single:
        raise ConfigError(
            f"--nproc={nproc}: {', '.join(single)} runs on one process only; "
            "leave it out or use --nproc 1."
        )
    eval_every = args.eval_every or max(1, steps // 20)
    if eval_every < 1:
        raise ConfigError(f"--eval-every must be positive, got {eval_every}.")
    return dict(
        names=names,
        steps={n: first if METHODS[n].first_order else steps for n in names},
        seeds=seeds,
        batch_size=batch,
        tune_steps=tune_steps,
        eval_every=eval_every,
        lrs=_parse_lrs(args.lr, names),
    )


def run(args: argparse.Namespace) -> int:
    """Run ``curvkit train``: tune (optionally), train, write CSV, markdown and figure."""
    from tqdm import tqdm

    from curvkit.app.common import format_table, parse_device
    from curvkit.distributed.launch import init_from_env, launch, launched, shutdown, strip_option
    from curvkit.problems import PROBLEMS, get_problem

    cfg = _settings(args)
    check_out_dir(args.out)  # before any computation (and before starting processes)
    if args.nproc > 1 and not launched():  # re-run this command on nproc processes
        return launch(args.nproc, strip_option(getattr(args, "argv", sys.argv[1:])))
    device = parse_device(args.device)
    rank, world = init_from_env(device)
    if cfg["batch_size"] % world:
        raise ConfigError(
            f"--batch-size={cfg['batch_size']} is not divisible by {world} processes."
        )
    if args.problem not in PROBLEMS:
        raise ConfigError(
            f"--problem {args.problem!r}: built-in problems are {', '.join(PROBLEMS)}."
        )
    options = {"device": device}
    if "init" in inspect.signature(PROBLEMS[args.problem]).parameters:
        options["init"] = args.init
    problems = [get_problem(args.problem, seed=s, **options) for s in range(cfg["seeds"])]
    if problems[0].loss_func.reduction not in ("mean", "sum"):
        raise ConfigError(f"problem {args.problem!r}: its loss must be mean- or sum-reduced.")
    lrs = {n: cfg["lrs"].get(n, METHODS[n].lr) for n in cfg["names"]}
    tuned = [n for n in cfg["names"] if args.tune and METHODS[n].lr_grid and n not in cfg["lrs"]]
    tune_steps = {n: cfg["tune_steps"] or cfg["steps"][n] for n in tuned}
    total = sum(len(METHODS[n].lr_grid) * tune_steps[n] for n in tuned)
    total += sum(cfg["steps"].values()) * cfg["seeds"]
    disable = args.quiet or not sys.stderr.isatty() or rank > 0
    tuning = []
    with tqdm(total=total, disable=disable, desc="train", unit="step", leave=False) as bar:
        for name in tuned:
            bar.set_postfix_str(f"tuning {name}")
            lrs[name], rows = tune_lr(
                problems[0], name, METHODS[name].lr_grid, tune_steps[name],
                cfg["batch_size"], cfg["eval_every"], bar.update,
            )  # fmt: skip
            tuning += rows
        curves = []
        for name in cfg["names"]:
            for problem in problems:
                bar.set_postfix_str(f"{name} seed {problem.seed}")
                curves += train_run(
                    problem, name, lrs[name], cfg["steps"][name], cfg["batch_size"],
                    problem.seed, cfg["eval_every"], bar.update,
                )  # fmt: skip
    shutdown()
    if rank > 0:  # every process has the same curves; process 0 reports them
        return 0
    summary = summarize(curves, args.reference)
    write_outputs(args.out, curves, summary, tuning, title=problems[0].description)
    print(f"problem  {args.problem}: {problems[0].description}, {problems[0].num_params:,} params")
    steps = ", ".join(f"{n} {k}" for n, k in cfg["steps"].items())
    print(
        f"runs     steps: {steps}; {cfg['seeds']} seed(s), batch {cfg['batch_size']}, "
        f"{device}{f' x {world} processes' if world > 1 else ''}"
        f"{', learning rates tuned' if tuned else ''}"
    )
    print()
    print(format_table(summary.to_dict("records")))
    print(f"\nwrote {args.out}/curves.csv, summary.csv, summary.md, curves.png")
    return 0


def markdown_table(rows: Sequence[dict]) -> str:
    """Rows of dicts as a GitHub markdown table (floats with 4 significant digits)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(
    out: Path, curves, summary, tuning=(), title: str | None = None, labels: dict | None = None
) -> None:
    """``curves.csv``, ``summary.csv``, ``summary.md``, ``curves.png`` (and ``tuning.csv``)."""
    import pandas as pd

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(curves).to_csv(out / "curves.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(markdown_table(summary.to_dict("records")) + "\n")
    if len(tuning):
        pd.DataFrame(tuning).to_csv(out / "tuning.csv", index=False)
    plot_curves(curves, out / "curves", title=title, labels=labels)
