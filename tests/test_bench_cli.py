"""The bench CLI runs (a smoke test: one tiny row, no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_cli_runs_one_row():
    out = subprocess.run(
        [sys.executable, "-m", "rsoptim.bench", "--workloads", "seed-mlp", "--cases", "Adam", "--repeats", "1", "--warmup", "0", "--no-memory", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows = json.loads(out.stdout)["rows"]
    assert [(r["case"], r["workload"]) for r in rows] == [("Adam", "seed-mlp")]
    assert rows[0]["seconds"]["rsoptim"] > 0
