"""torch.distributed support, in real 2-rank runs on CPU with the gloo backend (loopback only).

The cases of each topic (FSDP2 parity, distribute_tensor placements, bad grads, clipping, DCP
checkpoints, DDP/ZeroRedundancyOptimizer, bfloat16) run in one spawned run of two ranks
(``_distributed_workers.py``; see ``RUNS``); each case is reported here as its own test, with the
traceback of every rank where it failed. Nothing is marked: the ``distributed`` marker is not
registered (tests/conftest.py, pyproject.toml). A run is bounded: ranks that have
not finished after ``RUN_TIMEOUT`` seconds (or ``DEAD_PEER_GRACE`` seconds after the other rank
died) are killed, and the cases not yet done fail, naming the case in progress and showing the
rank's log (with its Python stacks, dumped shortly before the deadline).
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torch.distributed as dist

if not dist.is_available():
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)
if not dist.is_gloo_available():
    pytest.skip("torch.distributed has no gloo backend in this torch build", allow_module_level=True)
for _module in ("torch.distributed.tensor", "torch.distributed.fsdp", "torch.distributed.checkpoint"):
    try:
        importlib.import_module(_module)
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"this torch has no {_module}: {e}", allow_module_level=True)

import rsoptim  # noqa: E402

import _distributed_workers as workers  # noqa: E402

WORLD_SIZE = 2
RUN_TIMEOUT = 120.0  # seconds, per run (gloo's own timeout is 60 s per collective)
DEAD_PEER_GRACE = 10.0  # seconds a rank may go on after the other died
WORKER = Path(workers.__file__).resolve()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # A rank still running shortly before the run's deadline prints its Python stacks to its log.
    env["RSOPTIM_TEST_DUMP_STACKS_AFTER"] = str(max(1.0, RUN_TIMEOUT - 5.0))
    # Keep gloo on the loopback interface (it otherwise resolves the host name).
    if "GLOO_SOCKET_IFNAME" not in env and sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    env["RSOPTIM_TEST_RSOPTIM_FILE"] = rsoptim.__file__  # the ranks check they test this rsoptim
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(WORKER.parent), env.get("PYTHONPATH")]))
    return env


def _tail(path: Path, chars: int = 4000) -> str:
    if not path.exists():
        return ""
    text = path.read_text(errors="replace")
    return text if len(text) <= chars else "...\n" + text[-chars:]


def _launch(topic: str, out_dir: Path) -> dict:
    """Runs TOPIC on two ranks once; returns what they reported."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs, logs = [], []
    for rank in range(WORLD_SIZE):
        log = open(out_dir / f"rank{rank}.log", "wb")
        logs.append(log)
        cmd = [sys.executable, str(WORKER), str(rank), str(WORLD_SIZE), str(port), topic, str(out_dir)]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True))
    deadline = time.monotonic() + RUN_TIMEOUT
    timed_out = dead_peer = False
    try:
        # A rank that dies (a crash, or a failure outside the cases) leaves the other waiting in
        # a collective until gloo's timeout: it gets a few seconds to finish, then is killed.
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if not dead_peer and any(p.returncode not in (None, 0) for p in procs):
                dead_peer = True
                deadline = min(deadline, now + DEAD_PEER_GRACE)
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    report = {"timed_out": timed_out and not dead_peer, "returncodes": [p.returncode for p in procs], "ranks": []}
    for rank in range(WORLD_SIZE):
        result_file = out_dir / f"rank{rank}.json"
        running = out_dir / f"rank{rank}.running"
        report["ranks"].append(
            {
                "results": json.loads(result_file.read_text()) if result_file.exists() else {},
                "running": running.read_text() if running.exists() else None,
                "fatal": _tail(out_dir / f"rank{rank}.fatal", 8000),
                "log": _tail(out_dir / f"rank{rank}.log", 12000),
            }
        )
    return report


def _address_in_use(report: dict) -> bool:
    return any(
        not r["results"] and ("EADDRINUSE" in r["fatal"] + r["log"] or "Address already in use" in r["fatal"] + r["log"])
        for r in report["ranks"]
    )


# The runs: topics that share one are run one after the other by the same two ranks (a run
# costs a few seconds of start-up on slow CPUs).
RUNS = (("fsdp",), ("dtensor", "errors", "ddp"), ("clip",), ("checkpoint", "eightbit"), ("bf16",))
_REPORTS: dict[tuple[str, ...], dict] = {}


@pytest.fixture(scope="module")
def run_topic(tmp_path_factory):
    def run(topic: str) -> dict:
        topics = next(r for r in RUNS if topic in r)
        if topics not in _REPORTS:
            for _ in range(3):
                report = _launch(",".join(topics), tmp_path_factory.mktemp("-".join(topics)))
                if not _address_in_use(report):
                    break
            _REPORTS[topics] = report
        return _REPORTS[topics]

    return run


def _check(report: dict, topic: str, name: str) -> None:
    problems = []
    key = f"{topic}/{name}"
    for rank, r in enumerate(report["ranks"]):
        if key in r["results"]:
            if r["results"][key] is not None:
                problems.append(f"----- rank {rank} -----\n{r['results'][key]}")
            continue
        code = report["returncodes"][rank]
        if report["timed_out"]:
            why = f"was killed at the run's deadline ({RUN_TIMEOUT:.0f} s)"
        elif code == -9:
            why = "was killed (the other rank had died)"
        else:
            why = f"exited with {code}"
        where = f" while in {r['running']}" if r["running"] else ""
        problems.append(
            f"----- rank {rank}: the run of '{topic}' {why}{where} before this case finished -----\n"
            f"{r['fatal'] or '(no traceback)'}\n--- log tail ---\n{r['log']}"
        )
    if problems:
        pytest.fail(f"case {topic}/{name} failed:\n" + "\n".join(problems), pytrace=False)


def _cases(topic: str) -> list[str]:
    return list(workers.TOPICS[topic])


@pytest.mark.parametrize("name", _cases("fsdp"))
def test_fsdp2_training_matches_torch_optim(run_topic, name):
    """FSDP2 (fully_shard on a (2,) CPU mesh) training of a tiny transformer-ish net with
    rsoptim equals the same with torch.optim: local shards after every step, state layouts
    (DTensors with the param's placements, plain ``step``) and values; the Rust kernels step
    every element of the local shards; max_grad_norm clipping in the step equals torch's
    clip_grad_norm_ then step."""
    _check(run_topic("fsdp"), "fsdp", name)


@pytest.mark.parametrize("name", _cases("dtensor"))
def test_distribute_tensor_params_match_torch_optim(run_topic, name):
    """distribute_tensor params in Shard(0)/Shard(1)/Replicate (uneven and empty shards, a 2-D
    mesh), grads redistributed from other placements, and DTensor params mixed with plain ones,
    against torch.optim."""
    _check(run_topic("dtensor"), "dtensor", name)


@pytest.mark.parametrize("name", _cases("errors"))
def test_bad_grads_raise_before_any_step(run_topic, name):
    """A Partial grad, or a grad on another device mesh: RuntimeError naming the problem,
    raised before any param is stepped (params and state unchanged)."""
    _check(run_topic("errors"), "errors", name)


@pytest.mark.parametrize("name", _cases("clip"))
def test_clip_grad_norm_over_dtensor_grads_matches_torch(run_topic, name):
    """clip_grad_norm_, get_total_norm, clip_grads_with_norm_ over DTensor grads (norm types 1,
    2, inf, 3; clipping and not; error_if_nonfinite with a bad value on one rank) against
    torch.nn.utils."""
    _check(run_topic("clip"), "clip", name)


@pytest.mark.parametrize("name", _cases("checkpoint"))
def test_dcp_checkpoints_resume_and_interchange(run_topic, name):
    """A DCP checkpoint taken mid-run resumes to the same params as the uninterrupted run, and
    loads into torch.optim; torch.optim's loads into rsoptim; get/set_optimizer_state_dict give
    torch's layout."""
    _check(run_topic("checkpoint"), "checkpoint", name)


@pytest.mark.parametrize("name", _cases("eightbit"))
def test_adam8bit_on_fsdp2_shards(run_topic, name):
    _check(run_topic("eightbit"), "eightbit", name)


@pytest.mark.parametrize("name", _cases("ddp"))
def test_ddp_and_zero_match_torch_optim(run_topic, name):
    """DistributedDataParallel with rsoptim, and ZeroRedundancyOptimizer(optimizer_class=
    rsoptim.AdamW), against torch.optim."""
    _check(run_topic("ddp"), "ddp", name)


@pytest.mark.parametrize("name", _cases("bf16"))
def test_bf16_dtensor_params(run_topic, name):
    """bfloat16 DTensor params with the half-precision extensions: FSDP2 equals one process bit
    for bit; stochastic rounding keeps replicated params identical across ranks."""
    _check(run_topic("bf16"), "bf16", name)
