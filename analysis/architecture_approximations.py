"""K-FAC (expand/reduce), EKFAC and the diagonal GGN against the exact GGN: ResNet, transformer.

Question (Eschenhagen et al. 2023, arXiv:2311.00636, for expand/reduce;
George et al. 2018 for EKFAC): on models that are not chains — residual
blocks with BatchNorm, causal self-attention with LayerNorm and embeddings —
how far is each curvature approximation from the exact GGN, as a whole matrix
and per layer block?

Problems (float64, small enough that the GGN is a dense matrix):

- ``resnet``: ``digits_resnet(width=2)`` (three BasicBlock stages with
  BatchNorm, 1,384 parameters) on ``--n`` training digits. BatchNorm in
  training mode normalises with the batch's statistics, so examples interact and
  per-example quantities (EKFAC's second moments, the GGN diagonal from
  per-example rows) are undefined there; the comparison is therefore made
  twice: ``mode="train"`` (K-FAC only) and ``mode="eval"`` (BatchNorm with its
  running statistics, a fixed affine map; every approximation).
- ``transformer``: ``char_transformer`` with context 8, d = 4, one block, two
  heads on ``pydoc_data.topics`` (``--n`` sequences; logits ``[N, V, T]``,
  targets ``[N, T]``, one cross-entropy term per position). The position
  embedding of ``CharTransformer`` is looked up with positions ``[T]`` shared by
  all examples, which leaves its per-example gradients undefined (EKFAC, the
  diagonal GGN); :class:`BatchedPositions` computes the same function with the
  positions expanded to ``[N, T]``, and is the model compared here.

Checkpoints: initialisation and after ``--steps`` Adam steps (lr 3e-3, batch
64). Every approximation that can be built is compared with
:func:`curvkit.compare` (dense: Frobenius and spectral relative errors, cosine,
top-k eigenspace overlap, curvature along the reference's top eigenvectors and
the gradient, preconditioned-gradient quality for damping 1e-3..1). An
approximation that raises a curvkit error is listed in ``missing.csv`` with
the reason.

Outputs (in ``--out``): ``metrics.csv`` (every compare row) and
``metrics_<problem>.csv`` (written as soon as that problem is done),
``missing.csv``, figures ``arch_cmp_<problem>_<mode>_<metric>_<all|blocks>.png``
/ ``.pdf``; ``--docs DIR`` copies ``metrics_<problem>.csv`` (as
``arch_cmp_<problem>_metrics.csv``), ``missing.csv`` (as
``arch_cmp_<problems>_missing.csv``) and the figures.

Usage::

    python analysis/architecture_approximations.py [--quick] [--problems resnet transformer]
        [--n 128] [--steps 200] [--threads 1] [--out DIR] [--docs docs/figures]
"""

from __future__ import annotations

import argparse
import copy
import shutil
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

import curvkit as ck
from curvkit import plotting
from curvkit.app import train as T
from curvkit.errors import CurvkitError
from curvkit.problems.architectures import CharTransformer

NAME = "architecture_approximations"
METRICS = ("frobenius", "cosine", "spectral", "overlap", "directional", "preconditioning")
#: Name -> builder ``(model, loss_func, data, params) -> CurvatureOperator`` (``params``:
#: the parameters covered, ``None`` for all).
APPROXIMATIONS = {
    "K-FAC-expand (MC)": lambda m, lf, d, p: ck.kfac(
        m, lf, d, kind="kfac", kfac_approx="expand", params=p
    ),
    "K-FAC-reduce (MC)": lambda m, lf, d, p: ck.kfac(
        m, lf, d, kind="kfac", kfac_approx="reduce", params=p
    ),
    "KFLR-expand": lambda m, lf, d, p: ck.kfac(
        m, lf, d, kind="kflr", kfac_approx="expand", params=p
    ),
    "KFLR-reduce": lambda m, lf, d, p: ck.kfac(
        m, lf, d, kind="kflr", kfac_approx="reduce", params=p
    ),
    "EKFAC (empirical)": lambda m, lf, d, p: ck.ekfac(m, lf, d, params=p),
    "diag GGN": lambda m, lf, d, p: diag_ggn(m, lf, d, p),
}


def diag_ggn(model, loss_func, data, params):
    """``ck.diag_ggn``, which covers every parameter.

    Raises:
        TypeError: For a subset of the parameters.
    """
    if params is not None:
        raise TypeError("ck.diag_ggn has no params argument (it covers every parameter).")
    return ck.diag_ggn(model, loss_func, data)


FIGURE_METRICS = ("frobenius", "overlap")


class BatchedPositions(CharTransformer):
    """``CharTransformer`` with the position ids expanded over the batch (``[N, T]``).

    The same function and parameters; the position embedding's rows then belong to
    single examples, so per-example quantities are defined for it.
    """

    def forward(self, tokens):
        """Logits ``[N, V, T]`` of token ids ``[N, T]``."""
        N, T = tokens.shape
        positions = torch.arange(T, device=tokens.device).expand(N, T)
        h = self.tok(tokens) + self.pos(positions)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h)).transpose(1, 2)


def build_problem(key: str, quick: bool, n: int):
    """The float64 problem of ``key``."""
    f64 = torch.float64
    if key == "resnet":
        return ck.problems.digits_resnet(width=1 if quick else 2, n_train=n, n_test=64, dtype=f64)
    problem = ck.problems.char_transformer(
        context=4 if quick else 8,
        d_model=4,
        n_layers=1,
        n_heads=2,
        n_train=n,
        n_test=32,
        dtype=f64,
    )
    old = problem.model
    model = BatchedPositions(
        old.head.out_features, old.pos.num_embeddings, old.ln.normalized_shape[0], 1, 2
    )
    model.load_state_dict(old.state_dict())
    problem.model = model.to(f64)
    return problem


def train(problem, steps: int) -> None:
    """Adam (lr 3e-3, batch 64) on the problem's model, in place."""
    if steps == 0:
        return
    opt = torch.optim.Adam(problem.model.parameters(), lr=3e-3)
    done = 0
    while done < steps:
        for X, y in problem.loader(64, seed=problem.seed):
            opt.zero_grad(set_to_none=True)
            problem.loss_func(problem.model(X), y).backward()
            opt.step()
            done += 1
            if done == steps:
                return


def compare_at(problem, checkpoint: str, mode: str, metrics, missing: list) -> pd.DataFrame:
    """Every buildable approximation against the dense GGN, in ``mode``.

    ``mode``: ``"train"`` or ``"eval"`` (the model's mode).
    """
    model = copy.deepcopy(problem.model).train(mode == "train")
    params = None
    loss_func, data = problem.loss_func, problem.train
    batch_statistics = mode == "train" and any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()
    )
    t0 = time.perf_counter()
    reference = ck.ggn(model, loss_func, data, params=params)
    _, grad = reference.loss_and_gradient()
    approxes = {}
    for name, build in APPROXIMATIONS.items():
        if batch_statistics and not name.startswith(("K-FAC", "KFLR")):
            continue  # per-example quantities are undefined under batch statistics
        try:
            A = build(model, loss_func, data, params)
        except (CurvkitError, TypeError) as err:
            why = f"{type(err).__name__}: {err}"
            missing.append(dict(checkpoint=checkpoint, mode=mode, approx=name, reason=why))
            print(f"  [{checkpoint}/{mode}] {name} left out: {why[:200]}")
            continue
        if A.shape != reference.shape:
            why = f"covers {A.shape[0]} of the GGN's {reference.shape[0]} parameters"
            missing.append(dict(checkpoint=checkpoint, mode=mode, approx=name, reason=why))
            print(f"  [{checkpoint}/{mode}] {name} left out: {why}")
            continue
        approxes[name] = A
    if not approxes:
        return pd.DataFrame()
    df = ck.compare(approxes, reference, metrics=metrics, gradient=grad, reference_name="GGN")
    print(f"  [{checkpoint}/{mode}] D={reference.shape[0]}: {time.perf_counter() - t0:.1f} s")
    return df.assign(checkpoint=checkpoint, mode=mode)


def figures(df: pd.DataFrame, key: str, out: Path) -> list[Path]:
    """Bars of each metric in :data:`FIGURE_METRICS`, whole matrix and per block."""
    paths = []
    for (checkpoint, mode), part in df.groupby(["checkpoint", "mode"], sort=False):
        if checkpoint != "trained":
            continue
        for metric in FIGURE_METRICS:
            for block, tag in (("all", "all"), (None, "blocks")):
                path = out / f"arch_cmp_{key}_{mode}_{metric}_{tag}.png"
                where = "whole matrix" if block == "all" else "per block"
                plotting.metric_bars(
                    part, metric=metric, block=block, path=path,
                    title=f"{key} ({mode} mode, trained): {metric}, {where}",
                )  # fmt: skip
                paths.append(path)
    return paths


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["resnet", "transformer"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--n", type=int, default=None, help="examples the curvature is on")
    parser.add_argument("--steps", type=int, default=None, help="Adam steps before 'trained'")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=f"results/{NAME}")
    parser.add_argument("--docs", default=None)
    args = parser.parse_args(argv)
    bad = set(args.problems) - {"resnet", "transformer"}
    if bad:
        parser.error(f"unknown problems {sorted(bad)}; choose from resnet, transformer")
    args.n = args.n or (32 if args.quick else 128)
    args.steps = args.steps if args.steps is not None else (3 if args.quick else 200)
    return args


def main(argv=None) -> dict:
    """Run the comparison; returns ``{"metrics": df, "missing": df, "figures": [...]}``."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    out = T.check_out_dir(Path(args.out))
    metrics = ("frobenius", "cosine", "overlap") if args.quick else METRICS
    frames, missing, paths = [], [], []
    for key in args.problems:
        problem = build_problem(key, args.quick, args.n)
        print(f"{key}: {problem.description} (D = {problem.num_params})")
        rows = []
        for checkpoint, steps in (("init", 0), ("trained", args.steps)):
            train(problem, steps)
            for mode in ("train", "eval") if key == "resnet" else ("train",):
                miss = []
                df = compare_at(problem, checkpoint, mode, metrics, miss)
                rows.append(df.assign(problem=key))
                missing += [dict(m, problem=key) for m in miss]
        df = pd.concat(rows, ignore_index=True)
        frames.append(df)
        df.to_csv(out / f"metrics_{key}.csv", index=False)  # per problem, as soon as it is done
        if len(df):
            paths += figures(df, key, out)
        if args.docs:
            docs = T.check_out_dir(Path(args.docs), "--docs")
            shutil.copy(out / f"metrics_{key}.csv", docs / f"arch_cmp_{key}_metrics.csv")
    metrics_df = pd.concat(frames, ignore_index=True)
    missing_df = pd.DataFrame(
        missing, columns=["problem", "checkpoint", "mode", "approx", "reason"]
    )
    metrics_df.to_csv(out / "metrics.csv", index=False)
    missing_df.to_csv(out / "missing.csv", index=False)
    if len(metrics_df):
        whole = metrics_df[(metrics_df["block"] == "all") & metrics_df["k"].isna()]
        cols = ["problem", "checkpoint", "mode", "approx", "metric"]
        print(whole[whole["damping"].isna()].pivot_table("value", cols[:4], "metric").round(4))
    if args.docs:
        docs = T.check_out_dir(Path(args.docs), "--docs")
        name = "_".join(args.problems)
        shutil.copy(out / "missing.csv", docs / f"arch_cmp_{name}_missing.csv")
        for p in paths:
            for ext in (".png", ".pdf"):
                shutil.copy(p.with_suffix(ext), docs / p.with_suffix(ext).name)
    return {"metrics": metrics_df, "missing": missing_df, "figures": paths}


if __name__ == "__main__":
    main()
