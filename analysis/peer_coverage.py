"""Coverage of the peers' own test settings: how much of their tables curvkit runs, and how well.

Question: BackPACK and curvlinops test themselves on tables of small settings
(models, input shapes, losses, reductions). On those settings, which quantities
does ``curvkit.extract`` compute, do they agree with independent references, and
where it refuses, why?

Method: every setting of ``tests/extraction/peer_cases.py`` (ported from the peers'
test files, each group naming its source) is run with ``backend="auto"`` and, where
``auto`` takes the sweep, also with ``backend="graph"``, for ``batch_grad``,
``diag_ggn``, ``diag_ggn_mc``, ``kfac``, ``kflr``/``empirical`` (expand and reduce) and
``cross``. Each result is compared with dense float64 autograd, BackPACK's
extensions (on a deep copy) and curvlinops' ``KFACLinearOperator``
(``tests/extraction/peer_compare.py``); Monte Carlo quantities get shape checks.
``tests/extraction/test_peer_settings.py`` asserts the same table.

Output: counts per status (settings, rows: ok / refused / mismatch / crash /
peer_failed / unchecked), refusals and peer failures grouped by reason, and every
mismatch or crash; ``--csv FILE`` writes all rows.

Usage::

    python analysis/peer_coverage.py [--quick] [--only SUBSTRING] [--csv FILE] [--threads 1]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.extraction.peer_cases import NOT_PORTED, SETTINGS  # noqa: E402
from tests.extraction.peer_compare import (  # noqa: E402
    References,
    backends,
    run_setting,
)

STATUSES = ("ok", "refused", "mismatch", "crash", "peer_failed", "unchecked", "differs")
#: Refused quantity groups (as ``Row.quantity``) that make a setting "refused as a whole".
WHOLE = {"batch_grad", "diag_ggn", "diag_ggn_mc", "kfac", "kflr+empirical/expand", "cross"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="leave out the settings marked slow")
    p.add_argument("--only", default="", help="run the settings whose id contains this")
    p.add_argument("--csv", type=Path, default=None, help="write every row to this CSV file")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    return p.parse_args(argv)


def _reason(detail: str) -> str:
    """A refusal/failure message without its instance-specific parts (names, shapes)."""
    if detail.rstrip().endswith(":"):
        detail += " [no message]"
    head = re.sub(r" object at 0x[0-9a-f]+", "", detail.split(". ")[0])
    head = re.sub(r"'[^']*'", "'…'", head)
    return re.sub(r"\([^)]*\)|\{[^}]*\}|\d+", "…", head)[:140]


def collect(settings) -> list:
    """All rows of ``settings`` on their backends."""
    rows = []
    for s in settings:
        refs = References(s)
        for b in backends(s):
            rows += run_setting(s, b, refs)
    return rows


def summary(rows, settings) -> str:
    """The counts as plain text."""
    n_runs = len({(r.setting, r.backend) for r in rows})
    counts = Counter(r.status for r in rows)
    lines = [
        f"settings: {len(settings)} ported ({len(NOT_PORTED)} groups not ported), "
        f"{n_runs} setting x backend runs, {len(rows)} rows",
        "rows: " + ", ".join(f"{s} {counts.get(s, 0)}" for s in STATUSES),
    ]
    quantities, refused = {}, {}
    for r in rows:
        quantities.setdefault(r.setting, set()).add(r.quantity)
        if r.status == "refused":
            refused.setdefault(r.setting, set()).add(r.quantity)
    whole = sum(1 for k, q in refused.items() if q >= WHOLE)
    lines.append(
        f"settings: {len(quantities) - len(refused)} with no refusal, "
        f"{len(refused) - whole} with some quantity refused, {whole} refused as a whole"
    )
    lines.append(
        "ok rows by reference: "
        + ", ".join(
            f"{ref} {n}"
            for ref, n in Counter(r.reference for r in rows if r.status == "ok").most_common()
        )
    )
    lines.append(
        "refused settings by reason: "
        + "; ".join(
            f"{n} x {why}"
            for why, n in Counter(
                _reason(r.detail)
                for r in {(r.setting, r.backend): r for r in rows if r.status == "refused"}.values()
            ).most_common()
        )
    )
    lines.append("peer failures (reference, reason):")
    for (ref, why), n in Counter(
        (r.reference, _reason(r.detail)) for r in rows if r.status == "peer_failed"
    ).most_common():
        lines.append(f"  {n:4d}  {ref}: {why}")
    for status in ("mismatch", "crash", "differs"):
        for r in rows:
            if r.status == status:
                lines.append(f"{status}: {r.setting} [{r.backend}] {r.quantity} vs {r.reference}: "
                             f"{r.detail}")  # fmt: skip
    unchecked = sorted({r.setting for r in rows if r.status == "unchecked"})
    lines.append(
        f"settings with an unchecked K-FAC layer ({len(unchecked)}): {', '.join(unchecked)}"
    )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = [s for s in SETTINGS if args.only in s.id and not (args.quick and s.slow)]
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = collect(settings)
    text = summary(rows, settings)
    print(text)
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.csv is not None:
        import pandas as pd

        args.csv.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([asdict(r) for r in rows]).to_csv(args.csv, index=False)
    return {"rows": rows, "summary": text}


if __name__ == "__main__":
    main()
