"""Smoke tests of the distributed bench CLI (``python -m rsoptim.bench --distributed``) and of
examples/fsdp_train.py under torchrun: 2 ranks on gloo, tiny workloads, bounded in time. No
timing is asserted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from rsoptim import bench, bench_distributed

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with the gloo backend"
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "fsdp_train.py"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


# ---------------------------------------------------------------------------------------------
# The bench's pieces, in process (no ranks).


def test_the_sharded_module_has_gpt2_smalls_parameter_list():
    module = bench_distributed.build_module(bench_distributed.WORKLOADS["gpt2-small"])  # on the meta device
    params = bench_distributed.ordered_params(module)
    assert [tuple(p.shape) for p in params] == bench.gpt2_small_shapes()
    assert len(module.blocks) == 12 and all(len(list(b.parameters())) == 12 for b in module.blocks)


def test_a_workload_without_blocks_is_one_unit():
    module = bench_distributed.build_module(bench_distributed.WORKLOADS["seed-mlp"])
    assert len(module.blocks) == 0
    assert [tuple(p.shape) for p in bench_distributed.ordered_params(module)] == bench.WORKLOADS["seed-mlp"]()


# ---------------------------------------------------------------------------------------------
# The CLI: 2 spawned ranks, the tiny GPT-2-shaped workload, every row.


def _run_bench(*args: str) -> subprocess.CompletedProcess:
    """``python -m rsoptim.bench --distributed ARGS`` on 2 ranks, bounded in time; must succeed."""
    out = subprocess.run(
        [sys.executable, "-m", "rsoptim.bench", "--distributed", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def test_distributed_bench_cli_json():
    out = _run_bench("--quick", "--workload", "gpt2-tiny", "--repeats", "1", "--warmup", "0", "--json")
    result = json.loads(out.stdout)
    assert result["workload"] == "gpt2-tiny"
    assert result["machine"]["world_size"] == 2 and result["machine"]["threads_per_rank"] == 1
    rows = {r["case"]: r for r in result["rows"]}
    assert list(rows) == ["Adam", "AdamW", "SGD momentum", "RMSprop", "clip_grad_norm_ (clips)"]
    for name, row in rows.items():
        expected = {"rsoptim", "torch foreach", "torch for-loop", "rsoptim plain"}
        if name in ("Adam", "AdamW"):
            expected.add("torch fused")
        assert set(row["seconds"]) == expected, name
        assert set(row["rank_seconds"]) == expected and all(len(v) == 2 for v in row["rank_seconds"].values())
        assert all(s > 0 for s in row["seconds"].values())
        assert row["seconds"]["rsoptim"] == max(row["rank_seconds"]["rsoptim"])  # the slower rank's median
        assert set(row["ratios"]) == expected - {"rsoptim", "rsoptim plain"}
        assert row["fastest_torch"] in row["ratios"] and row["vs_fastest_torch"] == min(row["ratios"].values())
        assert (row["vs_fused"] is not None) == ("torch fused" in expected)
        assert row["dtensor_overhead"] == pytest.approx(row["seconds"]["rsoptim"] / row["seconds"]["rsoptim plain"])
        assert row["rsoptim_threads"] == [1, 1]  # rsoptim follows torch.set_num_threads(1) in each rank
        assert sum(row["local_elements"]) == row["elements"]
        assert (row["roofline_seconds"] is None) == name.startswith("clip")
    assert any("fused SGD" in n for n in result["notes"])
    assert len(result["max_rss_bytes"]) == 2


def test_distributed_bench_cli_table():
    out = _run_bench("--workload", "gpt2-tiny", "--cases", "AdamW,clip_grad_norm_ (no clip)", "--repeats", "1", "--warmup", "0", "--no-roofline")
    assert "x fastest" in out.stdout and "DT ovh" in out.stdout
    assert [line.split()[0] for line in out.stdout.splitlines() if line.startswith(("AdamW ", "clip_grad_norm_ "))] == ["AdamW", "clip_grad_norm_"]
    assert "clip_grad_norm_ (no clip)" in out.stdout


# ---------------------------------------------------------------------------------------------
# examples/fsdp_train.py under torchrun.

LOSS = re.compile(r"^step\s+(\d+) \| loss (\d+\.\d+) \| grad norm (\d+\.\d+)", re.MULTILINE)


def run_example(*args: str) -> dict[int, tuple[float, float]]:
    """Runs the example on 2 ranks; returns {step: (loss, grad norm)} from rank 0's log."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE), "--log-every", "1", *args]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return {int(m[1]): (float(m[2]), float(m[3])) for m in LOSS.finditer(out.stdout)}


@pytest.fixture(scope="module")
def straight() -> dict[int, tuple[float, float]]:
    """4 uninterrupted steps with rsoptim (the example's default)."""
    return run_example("--steps", "4")


def test_fsdp_example_trains_and_resumes_from_its_checkpoint(tmp_path, straight):
    assert sorted(straight) == [1, 2, 3, 4]
    assert all(0 < loss < 10 for loss, _ in straight.values())
    first = run_example("--steps", "4", "--stop-after", "2", "--checkpoint", str(tmp_path))
    assert sorted(first) == [1, 2] and first == {s: straight[s] for s in (1, 2)}
    assert (tmp_path / "step-000002" / ".metadata").exists()
    resumed = run_example("--steps", "4", "--checkpoint", str(tmp_path))
    # Batches and the LR are functions of the step: the resumed run repeats the uninterrupted one.
    assert resumed == {s: straight[s] for s in (3, 4)}
    assert (tmp_path / "step-000004" / ".metadata").exists()


def test_fsdp_example_with_torch_optim(straight):
    ours = straight
    theirs = run_example("--steps", "4", "--stop-after", "2", "--optimizer", "torch")  # the same LR schedule
    assert sorted(theirs) == [1, 2]
    assert theirs[1][0] == ours[1][0]  # same weights and batch: the same loss before any step
    assert theirs[1][1] == pytest.approx(ours[1][1], abs=1.5e-3)  # the grad norm, to print precision (3 decimals)
    assert theirs[2][0] == pytest.approx(ours[2][0], abs=2e-4)  # one AdamW step later, to print precision
