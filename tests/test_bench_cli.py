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


def test_bench_cli_runs_a_bfloat16_row():
    out = subprocess.run(
        [sys.executable, "-m", "rsoptim.bench", "--workloads", "seed-mlp", "--cases", "Adam", "--repeats", "1", "--warmup", "0", "--no-memory", "--json", "--dtype", "bfloat16"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(out.stdout)
    assert result["dtype"] == "bfloat16"
    row = result["rows"][0]
    assert row["bytes_per_step"] == row["elements"] * 7 * 2  # 7 streams of 2-byte elements
    assert row["roofline_seconds"] > 0
