"""Phase timings of ``curvkit report`` runs, optionally alternating with another checkout.

Runs ``python -m curvkit report --problem PROBLEM --quiet --no-figures`` ``--runs``
times in fresh processes (one torch thread by default) and prints the phase
timings each run writes to its ``results.json``. With ``--baseline DIR`` (another
checkout of curvkit, e.g. ``git worktree add /tmp/base <commit>``) its code runs
alternately with this one's, so both see the same load on a shared machine.

"compute" is the sum of the phases up to and including the traces, the landscape
and the damped inverses (every phase but ``figures`` and ``write``; a checkout that
computes the landscape and inverses inside its figures skips them with
``--no-figures``). With ``--figures`` the figures are drawn too and their phase is
printed separately.

Example:
    OMP_NUM_THREADS=1 python analysis/bench_report.py --runs 3 --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_COMPUTE = ("figures", "write", "total")


def run_once(checkout: Path, problem: str, figures: bool, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "curvkit", "report", "--problem", problem, "--quiet",
               "--out", out] + ([] if figures else ["--no-figures"])  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(threads)}
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=out, env=env, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        results = json.loads(Path(out, "results.json").read_text())
    if results["failures"]:
        raise SystemExit(f"{checkout}: the report recorded failures: {results['failures']}")
    t = results["timings_s"]
    row = {k: v for k, v in t.items() if k not in NOT_COMPUTE}
    row["compute"] = sum(row.values())
    row["figures"] = t.get("figures", 0.0)
    row["wall"] = wall
    row["load"] = os.getloadavg()[0]
    return row


def main(argv=None) -> list[tuple[str, int, dict]]:
    """Run the reports and print their timings; returns ``(checkout label, run, row)`` rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="digits_cnn")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout")
    parser.add_argument("--figures", action="store_true", help="draw the figures too")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    checkouts = [("this", ROOT)] + ([("baseline", args.baseline)] if args.baseline else [])
    rows = []
    for i in range(args.runs):
        for label, path in checkouts:
            row = run_once(path, args.problem, args.figures, args.threads)
            rows.append((label, i + 1, row))
            phases = " ".join(
                f"{k} {v:.2f}" for k, v in row.items() if k not in ("compute", "wall", "load")
            )
            print(f"{label} run {i + 1} (load {row['load']:.1f}): compute {row['compute']:.2f} s, "
                  f"wall {row['wall']:.1f} s | {phases}", flush=True)  # fmt: skip
    for label, _ in checkouts:
        compute = sorted(r["compute"] for lab, _, r in rows if lab == label)
        print(f"{label}: compute median {compute[len(compute) // 2]:.2f} s, "
              f"min {compute[0]:.2f} s, max {compute[-1]:.2f} s")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
