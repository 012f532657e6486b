"""``analysis/bench_distributed.py --quick`` runs end to end and its rows are consistent."""

import importlib.util
import warnings
from pathlib import Path

import pandas as pd

from tests.distributed.harness import warm_imports

SCRIPT = Path(__file__).resolve().parents[2] / "analysis" / "bench_distributed.py"


def test_bench_distributed_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_distributed", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "bench.csv"
    warm_imports()  # the script forks its workers here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = script.main(
            ["--quick", "--structures", "tridiagonal", "--start-method", "fork", "--out", str(out)]
        )
    table = pd.read_csv(out)
    assert len(table) == len(rows) == 2
    single, double = table[table["processes"] == 1], table[table["processes"] == 2]
    assert (single["comm_s_per_step"] == 0).all()  # one process: no collective at all
    assert (double["comm_s_per_step"] > 0).all() and (double["comm_share"] < 1).all()
    assert (table["step_s"] > 0).all() and (table["inverse_everywhere_s"] > 0).all()
