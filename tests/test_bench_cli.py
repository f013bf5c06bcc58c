"""The bench CLI runs (smoke tests on tiny rows; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time

import pytest
import torch

import rsoptim
from rsoptim import bench


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


# ---------------------------------------------------------------------------------------------
# The DeepSpeedCPUAdam column: optional. The suite never needs deepspeed; where it is installed
# the column's logic is exercised too.

# Runs the CLI in a fresh interpreter where `import deepspeed` fails as if it were not installed.
WITHOUT_DEEPSPEED = "import sys; sys.modules['deepspeed'] = None; from rsoptim.bench import main; sys.exit(main(sys.argv[1:]))"
TINY = ["--workloads", "seed-mlp", "--repeats", "1", "--warmup", "0", "--no-memory"]


def run_bench(args: list[str], code: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "rsoptim.bench", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=check)


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def test_without_deepspeed_the_table_has_its_rows_and_one_note():
    out = run_bench([*TINY, "--cases", "Adam,AdamW"], code=WITHOUT_DEEPSPEED)
    assert "Traceback" not in out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines if line.startswith(("Adam ", "AdamW "))] == ["Adam", "AdamW"]
    assert "x DeepSpeed" not in out.stdout
    notes = [line for line in lines if "DeepSpeedCPUAdam" in line]
    assert notes == ["Note: DeepSpeedCPUAdam column left out: deepspeed is not installed (scripts/bench.sh installs it)"]


def test_without_deepspeed_json_has_the_rows_and_the_note():
    out = run_bench([*TINY, "--cases", "Adam", "--json"], code=WITHOUT_DEEPSPEED)
    result = json.loads(out.stdout)
    assert [set(r["seconds"]) for r in result["rows"]] == [{"rsoptim", "torch fused", "torch foreach", "torch for-loop"}]
    notes = [n for n in result["notes"] if "is a measurement error" not in n]  # seed-mlp's share of the roofline is noise
    assert notes == ["DeepSpeedCPUAdam column left out: deepspeed is not installed (scripts/bench.sh installs it)"]
    assert result["machine"]["deepspeed"] is None


def test_the_fp32_state_case_needs_half_params():
    out = run_bench([*TINY, "--cases", "AdamW fp32 state"], check=False)
    assert out.returncode == 2
    assert "runs on half-precision params: add --dtype bfloat16" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_fp32_state_case_moves_22_bytes_per_bfloat16_element():
    out = run_bench([*TINY, "--cases", "AdamW fp32 state", "--dtype", "bfloat16", "--json", "--no-deepspeed"])
    row = json.loads(out.stdout)["rows"][0]
    assert row["case"] == "AdamW fp32 state"
    assert row["bytes_per_step"] == row["elements"] * (3 * 2 + 2 * 2 * 4)  # grad, param r+w; two float32 moments r+w
    assert row["roofline_seconds"] > 0


@pytest.mark.parametrize(
    ("bytes_moved", "bytes_written", "layouts"),
    [
        (28, 12, [(4, 3)]),  # float32 Adam: exactly its streams
        (14, 6, [(2, 3)]),  # bfloat16 Adam
        (20, 8, [(4, 2)]),  # float32 SGD momentum / RMSprop
        (22, 10, [(22 / 9, 4)]),  # bfloat16 params, float32 moments: same bytes, at most 4 written buffers
        # 8-bit Adam, float32 params (16 B and two moments' scales, 0.0625 B): between 1 and 2 written
        # buffers per read one; both calls, moving together the same bytes with the same written.
        (16.0625, 6.03125, [(1.96875, 1), (2.03125, 2)]),
        (10.0625, 4.03125, [(1.96875, 2), (0.03125, 3)]),  # bfloat16 params: 2 written per read one, and the scales
    ],
)
def test_the_roofline_probe_moves_the_same_bytes(bytes_moved, bytes_written, layouts):
    got = bench.probe_layouts(bytes_moved, bytes_written)
    assert got == [pytest.approx(layout) for layout in layouts]
    assert sum(b * (1 + 2 * w) for b, w in got) == pytest.approx(bytes_moved)
    if len(got) > 1 or bytes_written / (bytes_moved - 2 * bytes_written) == got[0][1]:
        assert sum(b * w for b, w in got) == pytest.approx(bytes_written)  # the same split, where a call can make it
    assert all(1 <= w <= bench.STREAM_PROBE_MAX_WRITTEN for _, w in got)
    params = bench.make_params([(1000,), (7,)], dtype=torch.bfloat16)
    bench.roofline_probe(params, bytes_moved, bytes_written)()  # runs (no timing is asserted); per element, as bench_distributed calls it
    bench.roofline_probe(params, [1000 * bytes_moved, 7 * bytes_moved], [1000 * bytes_written, 7 * bytes_written])()  # per tensor


def test_the_roofline_probe_buffers_move_each_tensors_bytes():
    params = bench.make_params([(8192,), (768,)])
    case = next(c for c in bench.cases() if c.name == "AdamW8bit")
    traffic = case.traffic(params)
    assert traffic == [(8192 * 16 + 2 * 2 * 4 * 32, 8192 * 6 + 2 * 4 * 32), (768 * 28, 768 * 12)]  # 8-bit; float32 moments
    probe = bench.roofline_probe(params, [m for m, _ in traffic], [w for _, w in traffic])
    moved = {w: sum(4 * t.numel() for buffers in calls for t in buffers) for w, calls in probe.buffers.items()}
    written = {w: sum(4 * t.numel() for buffers in calls for t in buffers[1:]) for w, calls in probe.buffers.items()}
    assert sorted(moved) == [1, 2, 3]  # the 8-bit tensor's two calls, the small tensor's Adam streams
    total_moved = sum(moved[w] + written[w] for w in moved)  # written buffers are read and written
    assert total_moved == pytest.approx(sum(m for m, _ in traffic), abs=4 * 8)  # within a float per buffer
    assert sum(written.values()) == pytest.approx(sum(w for _, w in traffic), abs=4 * 8)
    probe()


def test_the_plot_has_a_bfloat16_curve(tmp_path):
    png = tmp_path / "adam.png"
    out = run_bench([*TINY, "--cases", "Adam", "--json", "--no-deepspeed", "--plot", str(png), "--plot-max-elements", "4096"])
    result = json.loads(out.stdout)
    curves = {(p["dtype"], p["elements"]): p for p in result["size_sweep"]}
    assert set(curves) == {(d, n) for d in ("float32", "bfloat16") for n in (1024, 4096)}
    assert curves["bfloat16", 1024]["bytes_per_element"] == 14 and curves["float32", 1024]["bytes_per_element"] == 28
    assert {"rsoptim", "torch fused", "roofline"} <= set(curves["bfloat16", 4096])
    assert png.stat().st_size > 0
    # seed-mlp is cache-resident and timed once here: its share of the roofline is noise, and may
    # be flagged (a note) as above 105%.
    notes = [n for n in result["notes"] if "is a measurement error" not in n]
    assert notes == ["DeepSpeedCPUAdam column left out: --no-deepspeed"]


@pytest.fixture(scope="module")
def deepspeed_adam():
    if not deepspeed_installed():
        pytest.skip("deepspeed is not installed (scripts/bench.sh installs it)")
    column = bench.load_deepspeed()
    if column.optimizer is None:
        pytest.skip(column.note)
    return column.optimizer


def test_the_deepspeed_column_is_in_the_adam_rows(deepspeed_adam):
    out = run_bench([*TINY, "--cases", "Adam,AdamW,AdamW fp32 state", "--dtype", "bfloat16", "--json"])
    result = json.loads(out.stdout)
    assert result["machine"]["deepspeed"]
    # Where this CPU's DeepSpeed refuses bfloat16 (no AVX-512) a row says so instead.
    for row in result["rows"]:
        assert "DeepSpeedCPUAdam" in row["seconds"] or any("DeepSpeedCPUAdam left out of " + row["case"] in n for n in row["notes"])


@pytest.mark.parametrize(
    ("case_name", "dtype"),
    [("Adam", torch.float32), ("AdamW", torch.float32), ("Adam", torch.bfloat16), ("AdamW", torch.bfloat16), ("AdamW fp32 state", torch.bfloat16)],
)
def test_deepspeed_steps_the_same_update_as_rsoptim(deepspeed_adam, case_name, dtype):
    """The column compares the same update: same hyperparameters, same state dtype."""
    case = next(c for c in bench.cases(deepspeed_adam) if c.name == case_name)
    shapes = [(64, 33), (5,)]
    results = {}
    for label in ("rsoptim", "DeepSpeedCPUAdam"):
        params = bench.make_params(shapes, dtype=dtype)
        step = case.impls[label](params)
        for _ in range(3):
            step()
        bench.check_state_dtypes(label, step, torch.float32 if case.float32_state_buffers else dtype)
        results[label] = [p.detach().float() for p in params]
    # float32: the same arithmetic in another order; bfloat16: each value rounded once per step.
    tolerance = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-6}
    for ours, theirs in zip(results["rsoptim"], results["DeepSpeedCPUAdam"]):
        torch.testing.assert_close(ours, theirs, **tolerance)


def test_a_failing_optional_column_becomes_a_note_and_a_failing_rsoptim_raises():
    def refuses(params):
        raise RuntimeError("Adam optimizer with param type BFloat16 and state type BFloat16 is not supported on current hardware")

    working = bench._optimizer_step(torch.optim.SGD, lr=0.1)
    case = bench.Case("SGD", {"rsoptim": working, bench.DEEPSPEED: refuses}, 3, 1)
    fns, notes = bench.build_steps(case, dict.fromkeys(case.impls, bench.make_params([(10,)])), "tiny / float32")
    assert list(fns) == ["rsoptim"]
    assert notes == [
        "DeepSpeedCPUAdam left out of SGD / tiny / float32: RuntimeError: Adam optimizer with param type BFloat16 "
        "and state type BFloat16 is not supported on current hardware"
    ]
    with pytest.raises(RuntimeError, match="not supported"):
        bench.build_steps(bench.Case("SGD", {"rsoptim": refuses}, 3, 1), {"rsoptim": bench.make_params([(10,)])}, "tiny")


def test_a_failed_build_reads_as_one_line_that_names_the_cause():
    error = RuntimeError("Error building extension 'cpu_adam': [1/3] c++ -c a.cpp -o a.o\nFAILED: a.o\nc++ -c a.cpp -o a.o\na.cpp:1:10: fatal error: x.h: No such file or directory\nninja: build stopped")
    line = bench._one_line(error)
    assert "\n" not in line
    assert line == "RuntimeError: Error building extension 'cpu_adam': [1/3] c++ -c a.cpp -o a.o ... a.cpp:1:10: fatal error: x.h: No such file or directory"


def test_a_state_buffer_in_another_dtype_is_caught():
    params = bench.make_params([(10,)], dtype=torch.bfloat16)
    step = bench._optimizer_step(rsoptim.AdamW, state_dtype=torch.float32)(params)
    step()
    bench.check_state_dtypes("rsoptim", step, torch.float32)
    with pytest.raises(RuntimeError, match="keeps exp_avg in torch.float32, not torch.bfloat16"):
        bench.check_state_dtypes("rsoptim", step, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# The clipping rows clip at every timed call; a row faster than the roofline is flagged.


def clip_case(name: str) -> bench.Case:
    return next(c for c in bench.cases() if c.name == name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_clips_row_scales_the_grads_at_every_call(dtype):
    case = clip_case("clip_grad_norm_ (clips)")
    params = bench.make_params([(64, 33), (5,), (300,)], dtype=dtype)
    original = [p.grad.clone() for p in params]
    prepare = case.prepare(params)
    fns, notes = bench.build_steps(case, dict.fromkeys(case.impls, params), "tiny", dict.fromkeys(case.impls, prepare))
    assert list(fns) == ["rsoptim", "torch foreach", "torch for-loop"] and notes == []
    expected_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in original]))
    factor = bench.CLIP_MAX_NORM / (float(expected_norm) + 1e-6)
    assert factor < 0.5
    rtol = 1e-5 if dtype == torch.float32 else 2**-7  # bfloat16: the norm and the scaled grads are rounded to it
    for _ in range(3):  # repeated calls: without the restore the factor would converge to 1
        for label, fn in fns.items():
            prepare()
            assert all(torch.equal(g, o) for g, o in zip((p.grad for p in params), original))
            total = fn()
            case.check(total)
            assert float(total) == pytest.approx(float(expected_norm), rel=rtol)
            for p, o in zip(params, original):
                tolerance = {"rtol": rtol, "atol": 0}
                torch.testing.assert_close(p.grad.float(), o.float() * factor, **tolerance)
                assert p.grad.float().abs().max() < o.float().abs().max()
    # Without the restore the next calls have nothing left to clip, and the check says so.
    fns["rsoptim"]()
    with pytest.raises(AssertionError, match="did not clip"):
        case.check(fns["torch foreach"]())
    with pytest.raises(AssertionError, match="did not clip"):
        case.check(fns["rsoptim"]())


def test_time_interleaved_prepares_and_checks_every_call_untimed():
    calls: list[str] = []
    fns = {"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}
    prepare = {label: (lambda label=label: calls.append("prep " + label)) for label in fns}
    checked: list[object] = []
    bench.time_interleaved(fns, repeats=2, warmup=1, target_s=0.0, prepare=prepare, check={"a": checked.append, "b": checked.append})
    for i, call in enumerate(calls):
        if call in ("a", "b"):
            assert calls[i - 1] == "prep " + call  # every call right after its preparation
    assert calls.count("a") == calls.count("prep a") == len([c for c in checked if c == 1]) >= 4  # warm-up, batch size, 2 samples


@pytest.mark.parametrize("same_calls", [False, True])
def test_with_same_calls_every_sample_is_as_many_calls_for_every_function(monkeypatch, same_calls):
    # A stateful step's speed can change with its step count (first moments decaying into
    # subnormal numbers): with same_calls the k-th samples of all are taken at the same counts.
    # A fake clock: each call advances it by its function's cost.
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    calls = dict.fromkeys(["fast", "slow", "roofline", "limited"], 0)

    def call(label, seconds):
        def fn():
            calls[label] += 1
            clock[0] += seconds

        return fn

    costs = {"fast": 2.0**-13, "slow": 2.0**-10, "roofline": 2.0**-10, "limited": 2.0**-10}  # (exact sums)
    fns = {label: call(label, cost) for label, cost in costs.items()}
    bench.time_interleaved(fns, repeats=3, warmup=0, target_s=2.0**-8, limits={"limited": 3}, same_calls=same_calls)
    # The probe's and the limited column's samples are sized on their own: 4 calls each.
    assert calls["roofline"] == calls["limited"] == 1 + 3 * 4
    if same_calls:
        assert calls["fast"] == calls["slow"] == 1 + 3 * 32  # (one call sizes the samples)
    else:
        assert (calls["fast"], calls["slow"]) == (1 + 3 * 32, 1 + 3 * 4)


def test_the_no_clip_row_checks_that_nothing_is_clipped():
    case = clip_case("clip_grad_norm_ (no clip)")
    case.check(torch.tensor(10.0))
    with pytest.raises(AssertionError, match="clipped in the no-clip row"):
        case.check(torch.tensor(1e10))


def fake_row(roofline_seconds: float | None) -> bench.Row:
    return bench.Row(
        case="Adam",
        workload="gpt2-small",
        dtype="float32",
        threads=2,
        tensors=1,
        elements=1000,
        bytes_per_step=28_000,
        seconds={"rsoptim": 1.0, "torch fused": 2.0},
        roofline_seconds=roofline_seconds,
        ratios={"torch fused": 2.0},
    )


@pytest.mark.parametrize(
    ("roofline_seconds", "cell", "error"),
    [(0.97, "   97% ", False), (1.05, "  105% ", False), (1.063, "  106%!", True), (1.63, "  163%!", True), (None, "     - ", False)],
)
def test_a_share_of_the_roofline_above_105_percent_is_flagged(roofline_seconds, cell, error):
    row = fake_row(roofline_seconds)
    assert bench.roofline_cell(row) == cell
    assert row.measurement_error is error
    table = bench.format_table([row])
    line = next(line for line in table.splitlines() if line.startswith("Adam "))
    assert cell in line
    assert ("MEASUREMENT ERROR" in table) is error
    out = json.loads(json.dumps(bench.row_json(row)))
    assert out["measurement_error"] is error
    assert out["roofline_share"] == (None if roofline_seconds is None else pytest.approx(roofline_seconds))
    if error:
        assert "measurement error" in bench.roofline_error_note(row)


# ---------------------------------------------------------------------------------------------
# Training-loop mode: an untimed forward/backward before every timed step; the end-to-end row.


@pytest.mark.parametrize("workload", list(bench.TRAINING_LOOP_WORK))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_training_loop_work_leaves_new_finite_grads_of_every_param(workload, dtype):
    params = bench.make_params(bench.WORKLOADS[workload](), dtype=dtype)
    before = [p.grad for p in params]
    bench.TRAINING_LOOP_WORK[workload](params)()
    for p, old in zip(params, before):
        assert p.grad is not None and p.grad is not old  # set to None, then made by the backward
        assert p.grad.shape == p.shape and p.grad.dtype == dtype
        assert bool(torch.isfinite(p.grad).all())
    assert any(bool(p.grad.ne(0).any()) for p in params)


def test_a_training_loop_row_runs_the_work_before_every_call(monkeypatch):
    calls: list[str] = []
    real = bench.TRAINING_LOOP_WORK["seed-mlp"]

    def counting(params):
        work = real(params)
        return lambda: calls.append("work") or work()

    monkeypatch.setitem(bench.TRAINING_LOOP_WORK, "seed-mlp", counting)
    case = bench.Case("SGD", {"rsoptim": bench._optimizer_step(rsoptim.SGD, lr=0.01), "torch fused": bench._optimizer_step(torch.optim.SGD, lr=0.01, fused=True)}, 3, 1)
    row = bench.run_row(case, "seed-mlp", 1, repeats=1, warmup=0, training_loop=True)
    assert row.training_loop and row.label == "SGD (training loop)"
    assert set(row.seconds) == {"rsoptim", "torch fused"} and row.roofline_seconds > 0
    # First steps, batch sizes, one sample: each implementation and the probe at least once.
    assert len(calls) >= 2 * 3 + 2
    assert "SGD (training loop)" in bench.format_table([row])


def test_each_implementation_of_a_training_loop_row_steps_params_of_its_own(monkeypatch):
    # On shared params, an implementation built after the first steps would start its state
    # after some ReLUs died (first moments of exactly 0 for their weights), the first one before
    # (first moments decaying into subnormal numbers): not the same conditions.
    built: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}  # (their values then, the params)
    worked_on: list[list[torch.Tensor]] = []
    real = bench.TRAINING_LOOP_WORK["seed-mlp"]

    def recording(params):
        work = real(params)
        return lambda: worked_on.append(params) or work()

    def recorded(label, make):
        def build(params):
            built[label] = ([p.detach().clone() for p in params], params)
            return make(params)

        return build

    monkeypatch.setitem(bench.TRAINING_LOOP_WORK, "seed-mlp", recording)
    impls = {
        "rsoptim": recorded("rsoptim", bench._optimizer_step(rsoptim.Adam, lr=0.01)),
        "torch fused": recorded("torch fused", bench._optimizer_step(torch.optim.Adam, lr=0.01, fused=True)),
    }
    row = bench.run_row(bench.Case("Adam", impls, 3, 1), "seed-mlp", 1, repeats=1, warmup=0, training_loop=True)
    assert set(row.seconds) == {"rsoptim", "torch fused"}
    # Each one's state is counted on its own params (Adam: 8 bytes per element).
    assert row.state_memory is not None
    assert all(row.state_memory[label]["bytes_per_param"] >= 8 for label in ("rsoptim", "torch fused"))
    (our_values, ours), (their_values, theirs) = built["rsoptim"], built["torch fused"]
    # Equal params when each was built (before its first step), but not the same tensors.
    assert all(torch.equal(a, b) for a, b in zip(our_values, their_values))
    assert not any(a is b for a in ours for b in theirs)
    # Each one's forward/backward ran on its own params.
    assert any(all(p is q for p, q in zip(ps, ours)) for ps in worked_on)
    assert any(all(p is q for p, q in zip(ps, theirs)) for ps in worked_on)


def test_a_clipping_row_clips_in_training_loop_mode():
    # The grads are new after each backward: the clipping rows copy their over-norm grads into them.
    case = clip_case("Adam max_grad_norm (clips)")
    row = bench.run_row(case, "seed-mlp", 1, repeats=1, warmup=0, training_loop=True)
    assert {"rsoptim", "rsoptim clip_grad_norm_ + step", "torch fused", bench.UNCLIPPED} <= set(row.seconds)
    assert "seed-mlp / 1 thr (training loop) " in bench.format_table([row])


def test_the_clipping_step_row_measures_the_step_without_clipping_beside_it():
    # The "<= 1.15x rsoptim's Adam without clipping" is a ratio in one row: the column
    # steps the same restored grads, moves Adam's bytes (no norm pass), and is not held to the
    # row's check (it does not clip).
    case = clip_case("Adam max_grad_norm (clips)")
    assert bench.UNCLIPPED in case.impls and case.unchecked == {bench.UNCLIPPED}
    row = bench.run_row(case, "seed-mlp", 1, repeats=1, warmup=0)
    assert {"rsoptim", bench.UNCLIPPED} <= set(row.seconds)
    n = sum(p.numel() for p in bench.make_params(bench.WORKLOADS["seed-mlp"]()))
    assert row.column_bytes[bench.UNCLIPPED] == 28 * n and row.bytes_per_step == 32 * n
    ratio = row.seconds["rsoptim"] / row.seconds[bench.UNCLIPPED]
    assert f"The clipping step's time over that one's: seed-mlp / 1 thr {ratio:.2f}x." in bench.format_table([row])
    # (Checked, the column would fail: its step returns no norm.) The other columns are still
    # checked: without the restore, the second clipping column finds nothing to clip.
    with pytest.raises(AssertionError, match="did not clip"):
        bench.build_steps(case, dict.fromkeys(case.impls, bench.make_params([(64, 33)])), "tiny", None)


def test_the_end_to_end_row_times_each_training_loop():
    result = bench.end_to_end(threads=1, repeats=1, warmup=1)
    assert {"rsoptim", "rsoptim max_grad_norm", "torch fused", "torch foreach", "torch for-loop"} <= set(result.seconds)
    assert all(s > 0 for s in result.seconds.values())
    assert result.ratios["torch fused"] == pytest.approx(result.seconds["torch fused"] / result.seconds["rsoptim"])
    assert "scikit-learn digits" in result.data or "random data" in result.data
    table = bench.format_end_to_end([result])
    assert "rsoptim.Adam(max_grad_norm=1)" in table and "it/s" in table


def test_the_training_loop_iteration_clips_and_steps():
    # rsoptim with max_grad_norm ends where rsoptim's clip_grad_norm_ then step does (bit for bit).
    x, y, _ = bench.digits_data()
    batches = list(torch.arange(len(x)).split(bench.E2E_BATCH))[:3]
    finals = {}
    for label in ("rsoptim", "rsoptim max_grad_norm"):
        make_optimizer, clip = bench.end_to_end_impls()[label]
        model = bench.digits_model()
        optimizer = make_optimizer(list(model.parameters()))
        run = bench.training_iteration(model, optimizer, clip, (x, y), batches)
        for _ in range(4):  # wraps around the batches
            run()
        finals[label] = [p.detach().clone() for p in model.parameters()]
    assert finals["rsoptim"][0].ne(bench.digits_model()[0].weight).any()
    for a, b in zip(finals["rsoptim"], finals["rsoptim max_grad_norm"]):
        assert torch.equal(a, b)


def test_bench_cli_training_loop_json():
    out = run_bench([*TINY, "--cases", "Adam", "--json", "--no-deepspeed", "--quick", "--training-loop", "--threads", "1"])
    result = json.loads(out.stdout)
    assert [(r["case"], r["workload"], r["training_loop"]) for r in result["rows"]] == [("Adam", "seed-mlp", False), ("Adam", "seed-mlp", True)]
    (e2e,) = result["end_to_end"]
    assert e2e["threads"] == 1
    assert set(e2e["iterations_per_second"]) == {"rsoptim", "rsoptim max_grad_norm", "torch fused", "torch foreach", "torch for-loop"}
    assert e2e["ratios"]["torch fused"] > 0


# ---------------------------------------------------------------------------------------------
# The 8-bit rows: rsoptim.Adam8bit/AdamW8bit against torch, rsoptim with float32 state and, where
# it is installed, bitsandbytes (optional, as DeepSpeed's column).

EIGHT_BIT_ROWS = ["--cases", "Adam8bit,AdamW8bit", "--threads", "1"]
TORCH_COLUMNS = {"torch fused", "torch foreach", "torch for-loop"}


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture(scope="module")
def bitsandbytes_optim():
    if not bitsandbytes_installed():
        pytest.skip("bitsandbytes is not installed (scripts/bench.sh installs it)")
    column = bench.load_bitsandbytes()
    if column.optim is None:
        pytest.skip(column.note)
    return column.optim


def seed_mlp_bytes(itemsize: int, state: str) -> int:
    """Bytes a step of seed-mlp moves (784x128 weight: 8-bit state; the rest float32 moments)."""
    shapes = bench.WORKLOADS["seed-mlp"]()
    numels = [math.prod(shape) for shape in shapes]
    if state == "param":
        return sum(numels) * 7 * itemsize
    if state == "float32":
        return sum(numels) * (3 * itemsize + 4 * 4)
    big = [n for n in numels if n >= 4096]
    assert big == [128 * 784]
    blocks = [-(-n // 256) for n in big]
    return sum(big) * (3 * itemsize + 4) + 2 * 2 * 4 * sum(blocks) + sum(n for n in numels if n < 4096) * (3 * itemsize + 4 * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_8bit_rows_count_each_columns_bytes_and_state(dtype):
    itemsize = 4 if dtype == torch.float32 else 2
    # (No bitsandbytes column here: it moves rsoptim's bytes, see below.)
    for case in [c for c in bench.cases() if c.name in ("Adam8bit", "AdamW8bit")]:
        # As the JSON output has it.
        row = json.loads(json.dumps(bench.row_json(bench.run_row(case, "seed-mlp", 1, repeats=1, warmup=0, dtype=dtype))))
        assert set(row["seconds"]) == {"rsoptim", *TORCH_COLUMNS, "rsoptim fp32 state"}
        assert row["bytes_per_step"] == seed_mlp_bytes(itemsize, "8bit")  # 16.06 (float32) / 10.06 (bf16) B per 8-bit element
        assert row["column_bytes"] == {**{label: seed_mlp_bytes(itemsize, "param") for label in TORCH_COLUMNS}, "rsoptim fp32 state": seed_mlp_bytes(itemsize, "float32")}
        for label, bytes_per_step in row["column_bytes"].items():
            assert row["gbps"][label] == pytest.approx(bytes_per_step / row["seconds"][label] / 1e9)
        assert row["roofline_seconds"] > 0
        memory = row["state_memory"]
        # 2 code bytes, 2 scales per 256 elements (0.03), the code tables (2 KiB, shared: 0.02 here) and a step count.
        assert memory["rsoptim"]["bytes_per_param_8bit_size"] == pytest.approx(2 + 8 / 256 + (2 * 1024 + 4) / (128 * 784))
        assert memory["rsoptim"]["bytes_per_param_8bit_size"] <= 2.1
        for label in TORCH_COLUMNS:
            assert memory[label]["bytes_per_param"] == pytest.approx(2 * itemsize, abs=1e-3)  # moments in the param's dtype
        assert memory["rsoptim fp32 state"]["bytes_per_param"] == pytest.approx(8, abs=1e-3)


def run_main(args: list[str], capfd) -> str:
    """The CLI in this process (importing bitsandbytes takes seconds; here it is imported once):
    its stdout."""
    assert bench.main(args) == 0
    return capfd.readouterr().out


def test_without_bitsandbytes_the_8bit_rows_run_and_say_why_the_column_is_missing(monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails as if it were not installed
    out = run_main([*TINY, *EIGHT_BIT_ROWS], capfd)
    lines = out.splitlines()
    assert [line.split()[0] for line in lines if line.startswith(("Adam8bit ", "AdamW8bit "))] == ["Adam8bit", "AdamW8bit"]
    assert "x rs fp32" in out and "x bnb" not in out
    assert [line for line in lines if "bitsandbytes" in line and line.startswith("Note:")] == [
        "Note: bitsandbytes column left out: bitsandbytes is not installed (scripts/bench.sh installs it)"
    ]
    state = lines[next(i for i, line in enumerate(lines) if line.startswith("Optimizer state, bytes per param element")) :]
    assert [line.split()[:3] for line in state[2:4]] == [["Adam8bit", "seed-mlp", "float32"], ["AdamW8bit", "seed-mlp", "float32"]]
    assert "bitsandbytes" not in state[1] and "rs fp32" in state[1]


def test_the_bitsandbytes_column_is_in_the_8bit_rows(bitsandbytes_optim, capfd):
    result = json.loads(run_main([*TINY, *EIGHT_BIT_ROWS, "--json"], capfd))
    assert result["machine"]["bitsandbytes"]
    for row in result["rows"]:
        assert "bitsandbytes" in row["seconds"] and "bitsandbytes" not in row["column_bytes"]  # rsoptim's bytes
        memory = row["state_memory"]["bitsandbytes"]
        assert memory["bytes_per_param_8bit_size"] == pytest.approx(2 + 8 / 256 + 2 * 1024 / (128 * 784))  # its step count: an int
    assert not any("bitsandbytes" in n for n in result["notes"])
    table = run_main([*TINY, *EIGHT_BIT_ROWS, "--repeats", "1"], capfd)
    assert "x bnb" in table and ", bitsandbytes " in table.splitlines()[0]


@pytest.mark.parametrize("case_name", ["Adam8bit", "AdamW8bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_column_of_the_8bit_rows_steps_the_same_update(bitsandbytes_optim, case_name, dtype):
    """Same hyperparameters, the same update up to the 8-bit moments' rounding: each column's
    change of the params against rsoptim's float32-state one, over a few steps."""
    case = next(c for c in bench.cases(None, bitsandbytes_optim) if c.name == case_name)
    shapes = [(64, 80), (5,)]  # 8-bit state, float32 moments
    deltas = {}
    for label in case.impls:
        params = bench.make_params(shapes, dtype=dtype)
        before = [p.detach().float().clone() for p in params]
        step = case.impls[label](params)
        for _ in range(4):
            step()
        bench.check_state_dtypes(label, step, case.column(label).state_dtype)
        deltas[label] = [p.detach().float() - b for p, b in zip(params, before)]
    reference = deltas["rsoptim fp32 state"]
    for label, delta in deltas.items():
        for ours, theirs in zip(delta, reference):
            # 8-bit moments: a few % of the update (bitsandbytes' dynamic map ~5%, rsoptim's ~2%).
            assert float((ours - theirs).norm() / theirs.norm()) < 0.1, label


def test_bitsandbytes_adam8bit_decays_weights_decoupled(bitsandbytes_optim):
    """Why bitsandbytes is a column of the Adam8bit row only without weight decay."""
    assert bench.ADAM_HYPERPARAMETERS["weight_decay"] == 0
    deltas = {}
    for label, cls in (("bnb", bitsandbytes_optim.Adam8bit), ("Adam8bit", rsoptim.Adam8bit), ("AdamW8bit", rsoptim.AdamW8bit)):
        params = bench.make_params([(64, 80)])
        before = params[0].detach().clone()
        optimizer = cls(params, lr=1e-2, weight_decay=10.0)
        for _ in range(3):
            optimizer.step()
        deltas[label] = params[0].detach() - before
    def distance(a, b):
        return float((deltas[a] - deltas[b]).norm() / deltas[b].norm())

    assert distance("bnb", "AdamW8bit") < 0.1 < distance("bnb", "Adam8bit")


def test_state_memory_counts_a_shared_tensor_once():
    params = bench.make_params([(64, 80), (64, 80), (5,)])
    step = bench._optimizer_step(rsoptim.Adam8bit)(params)
    step()
    memory = bench.state_memory(step, params)
    codes_and_scales = 2 * (64 * 80) + 2 * 4 * 20  # two moments: 1 byte per element, a float32 per 256
    step_count = 4
    tables = 2 * 256 * 4  # qmap1, qmap2: one pair for every param
    assert memory["bytes"] == 2 * (codes_and_scales + step_count) + tables + (2 * 5 * 4 + step_count)
    assert memory["bytes_per_param_8bit_size"] == pytest.approx((2 * (codes_and_scales + step_count) + tables) / (2 * 64 * 80))
    assert bench.state_memory(bench._clip_step(rsoptim.clip_grad_norm_, 1.0)(params), params) is None  # no optimizer


def test_a_slow_column_is_sampled_fewer_times_without_warm_up():
    calls = {"fast": 0, "slow": 0}
    fns = {label: (lambda label=label: calls.__setitem__(label, calls[label] + 1)) for label in calls}
    bench.time_interleaved(fns, repeats=5, warmup=2, target_s=0.0, limits={"slow": 2})
    assert calls == {"fast": 2 + 1 + 5, "slow": 1 + 2}  # warm-up, sizing call, samples


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_8bit_rows_are_in_the_default_plan(dtype):
    cases = {c.name: c for c in bench.cases()}
    for name in ("Adam8bit", "AdamW8bit"):
        assert name in bench.DEFAULT_PLAN["gpt2-small"] and not cases[name].half_only
