"""The ``curvkit`` command.

One function adds a sub-command's arguments, one runs it; :data:`COMMANDS`
joins them. Bad arguments and curvkit errors end the command with a one-line
message and a non-zero exit status (2 for usage, 1 for a failed computation).

Example:
    $ curvkit problems
    $ curvkit extract --problem mnist_autoencoder --quantities kfac,kflr --out results/
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from curvkit.app import report, train
from curvkit.app.common import cell, format_table, parse_device, progress
from curvkit.errors import ConfigError, CurvkitError
from curvkit.extraction import QUANTITIES
from curvkit.timing import median_time

_DIAGONALS = ("diag_ggn", "diag_ggn_mc", "diag_hessian")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _add_problems(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_problems(args: argparse.Namespace) -> int:
    from curvkit.problems import get_problem, list_problems

    rows = []
    for name in progress(list_problems(), args, desc="loading problems"):
        p = get_problem(name)
        rows.append(
            {
                "problem": name,
                "params": p.num_params,
                "train": p.n_train,
                "test": p.n_test,
                "input": tuple(p.train[0].shape[1:]),
                "loss": type(p.loss_func).__name__,
                "description": p.description,
            }
        )
    print(format_table(rows))
    return 0


# -- curvkit extract -----------------------------------------------------------------------
def _add_extract(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--problem", default="mnist_autoencoder", help="built-in problem name")
    parser.add_argument("--batch-size", type=int, default=128, help="examples in the batch")
    parser.add_argument(
        "--quantities",
        default="kfac",
        help=f"comma-separated, from: {','.join(QUANTITIES)} (default: kfac)",
    )
    parser.add_argument("--mc-samples", type=int, default=1, help="MC samples of kfac/diag_ggn_mc")
    parser.add_argument(
        "--kfac-approx", choices=("expand", "reduce"), default="expand", help="conv layers"
    )
    parser.add_argument(
        "--separate-bias", action="store_true", help="bias blocks apart from the weights"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0, help="model, split and MC seed")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions (median)")
    parser.add_argument("--out", type=Path, help="also write extract.json and extract.csv here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _layer_rows(records) -> list[dict]:
    """``Records.summary()`` plus per-example gradients, diagonals and missing cross factors."""
    rows = records.summary()
    for row, rec in zip(rows, records):
        if rec.batch_grad is not None:
            row["batch_grad"] = (records.batch_size, rec.numel)
        for field in _DIAGONALS:
            diag = getattr(rec, field)
            if diag is not None:
                row[f"tr {field}"] = float(sum(d.sum() for d in diag))
        if rec.cross_reason is not None:
            row["cross"] = "none"
    return rows


def _run_extract(args: argparse.Namespace) -> int:
    import curvkit
    from curvkit.problems import get_problem

    quantities = tuple(q.strip() for q in args.quantities.split(",") if q.strip())
    if not quantities:
        raise ConfigError(f"--quantities: give at least one of {', '.join(QUANTITIES)}.")
    for flag, value in (("--batch-size", args.batch_size), ("--repeat", args.repeat)):
        if value < 1:
            raise ConfigError(f"{flag} must be positive, got {value}.")
    device = parse_device(args.device)
    if args.out is not None:
        train.check_out_dir(args.out)  # before the computation, not after it
    problem = get_problem(args.problem, seed=args.seed, dtype=_DTYPES[args.dtype], device=device)
    X, y = problem.batch(args.batch_size)
    model, loss_func = problem.model, problem.loss_func

    def plain():
        model.zero_grad(set_to_none=True)
        loss_func(model(X), y).backward()

    def extract():
        generator = torch.Generator(device).manual_seed(args.seed)
        return curvkit.extract(
            model, loss_func, X, y,
            quantities=quantities, mc_samples=args.mc_samples,
            separate_bias=args.separate_bias, kfac_approx=args.kfac_approx,
            generator=generator,
        )  # fmt: skip

    with progress(None, args, total=2 * (args.repeat + 1), desc="timing") as bar:
        t_plain, _ = median_time(plain, args.repeat, device, bar.update)
        t_extract, records = median_time(extract, args.repeat, device, bar.update)
    rows = _layer_rows(records)
    ratio = t_extract / t_plain
    print(f"problem  {problem.name}: {problem.description}")
    print(f"         {problem.num_params:,} parameters, {len(records)} layers")
    print(
        f"batch    {X.shape[0]} of {problem.n_train} training examples, {device}, {args.dtype}, "
        f"loss {float(records.loss):.6g}"
    )
    print(f"extract  {','.join(quantities)} (mc_samples={args.mc_samples})")
    print(
        f"time     forward+backward {1e3 * t_plain:.1f} ms, extraction {1e3 * t_extract:.1f} ms "
        f"({ratio:.1f}x), median of {args.repeat}"
    )
    print()
    print(format_table(rows))
    if args.out is not None:
        _write_extract(args, problem, device, quantities, records, rows, t_plain, t_extract)
    return 0


def _write_extract(args, problem, device, quantities, records, rows, t_plain, t_extract) -> None:
    """``extract.json`` (settings, timings, rows) and ``extract.csv`` (rows) in ``--out``."""
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "problem": problem.name,
        "description": problem.description,
        "num_params": problem.num_params,
        "batch_size": records.batch_size,
        "quantities": list(quantities),
        "mc_samples": args.mc_samples,
        "kfac_approx": args.kfac_approx,
        "separate_bias": args.separate_bias,
        "device": str(device),
        "dtype": args.dtype,
        "seed": args.seed,
        "loss": float(records.loss),
        "repeat": args.repeat,
        "time_plain_s": t_plain,
        "time_extract_s": t_extract,
        "ratio": t_extract / t_plain,
        "layers": rows,
        "cross_reasons": {r.name: r.cross_reason for r in records if r.cross_reason},
    }
    (args.out / "extract.json").write_text(json.dumps(summary, indent=2) + "\n")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(args.out / "extract.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: cell(v) if isinstance(v, tuple) else v for k, v in row.items()})
    print(f"\nwrote {args.out / 'extract.json'} and {args.out / 'extract.csv'}")


# -- the command table ---------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    """A sub-command: its one-line help, its arguments and what it runs."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: Sub-commands by name, in the order ``curvkit --help`` lists them.
COMMANDS = {
    "problems": Command(
        "list the built-in problems with their sizes", _add_problems, _run_problems
    ),
    "extract": Command(
        "one extraction pass on a built-in problem: per-layer factors, traces, time",
        _add_extract,
        _run_extract,
    ),
    "report": Command(report.HELP, report.add_arguments, report.run),
    "train": Command(train.HELP, train.add_arguments, train.run),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``curvkit`` argument parser with one sub-parser per entry of :data:`COMMANDS`."""
    parser = _Parser(
        prog="curvkit",
        description="Curvature analysis for PyTorch: Kronecker factors, curvature operators, "
        "spectra and K-FAC optimisation.",
    )
    from curvkit import __version__

    parser.add_argument("--version", action="version", version=f"curvkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``curvkit`` command.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 when a computation fails with a curvkit
        error, 2 on bad usage (argparse exits with it directly).
    """
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # e.g. to re-launch (--nproc)
    try:
        return COMMANDS[args.command].run(args)
    except CurvkitError as e:
        print(f"curvkit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"curvkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
