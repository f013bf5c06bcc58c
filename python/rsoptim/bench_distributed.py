"""Distributed benchmark: rsoptim against torch.optim on FSDP2 DTensors, one process per rank.

    python -m rsoptim.bench --distributed                # 2 ranks x 1 thread, GPT-2 small
    python -m rsoptim.bench --distributed --json         # the same, as JSON on stdout
    python -m rsoptim.bench --distributed --quick        # a smaller GPT-2-shaped model, 3 repeats

Each rank is a spawned process (gloo on loopback, a free port) with ``torch.set_num_threads``
set to ``--threads`` (rsoptim follows torch's count). The params are those of a module with the
workload's parameter shapes, sharded by FSDP2's ``fully_shard`` (one call per transformer block,
then the root) on a 1-D CPU device mesh, so each param is a DTensor sharded on dim 0 and each rank
holds its half; each grad is a DTensor laid out like its param (random values, as bench.py's).

Every row times one optimizer step (or one ``clip_grad_norm_``) of each implementation on the same
DTensors: rsoptim, torch's for-loop, foreach and fused implementations (where torch has one that
runs on DTensors), and rsoptim on plain tensors holding the same local shards ("rsoptim plain",
for the DTensor overhead). As in bench.py: interleaved (A B C A B C ...) after a warm-up, medians,
the clipping row putting back the same over-norm grads, untimed, before every call and checking
that each call clips. Both ranks run the same implementation at the same time (a barrier, untimed,
before each sample, and in the clipping rows before each call, after the grads are put back; one
batch size agreed by the ranks), as data-parallel ranks step at once and share the memory
bandwidth. Each rank reports its own medians; a row's time is the slower
rank's median (a synchronous step waits for the slowest rank), and the JSON has both. "roofline"
is bench.py's streaming probe over buffers sized from each rank's local shards, run on every rank
at once.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

import rsoptim
from rsoptim import bench

# ---------------------------------------------------------------------------------------------
# Workloads: parameter shapes and how they group into FSDP2 units.


def gpt2_shapes(d: int, vocab: int, ctx: int, layers: int) -> list[tuple[int, ...]]:
    """GPT-2's parameter list at other sizes (bench.gpt2_small_shapes' layout: wte, wpe, 12 tensors
    per block, ln_f)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


#: Tensors per transformer block in a GPT-2-shaped list (each block is one fully_shard unit).
GPT2_BLOCK = 12


@dataclass(frozen=True)
class Workload:
    shapes: Callable[[], list[tuple[int, ...]]]
    #: Tensors per block after the first ``head`` tensors (None: every tensor in the root unit).
    block: int | None = None
    head: int = 0
    description: str = ""


WORKLOADS: dict[str, Workload] = {
    "gpt2-small": Workload(bench.gpt2_small_shapes, GPT2_BLOCK, 2, "GPT-2 small, 148 tensors, 124M elements"),
    # --quick: the same layout at a size where each step takes milliseconds.
    "gpt2-mini": Workload(lambda: gpt2_shapes(256, 8192, 256, 4), GPT2_BLOCK, 2, "GPT-2 layout, d=256, 4 blocks, 5.3M elements"),
    # The smoke tests: a few thousand elements.
    "gpt2-tiny": Workload(lambda: gpt2_shapes(16, 64, 16, 2), GPT2_BLOCK, 2, "GPT-2 layout, d=16, 2 blocks"),
    **{name: Workload(fn, None, 0, "bench.py's workload, one FSDP2 unit") for name, fn in bench.WORKLOADS.items() if name != "gpt2-small"},
}


def build_module(workload: Workload) -> torch.nn.Module:
    """A module (on the meta device) whose parameters have the workload's shapes, in its order:
    the head tensors and the tail (past the last whole block) in the root, each block of
    ``workload.block`` tensors in a child module."""
    shapes = workload.shapes()
    root = torch.nn.Module()
    with torch.device("meta"):
        head = shapes[: workload.head]
        rest = shapes[workload.head :]
        blocks: list[list[tuple[int, ...]]] = []
        for _ in range(len(rest) // workload.block if workload.block else 0):
            blocks.append(rest[: workload.block])
            rest = rest[workload.block :]
        for i, shape in enumerate(head):
            root.register_parameter(f"head{i}", torch.nn.Parameter(torch.empty(shape)))
        root.blocks = torch.nn.ModuleList()
        for shapes_of_block in blocks:
            block = torch.nn.Module()
            for i, shape in enumerate(shapes_of_block):
                block.register_parameter(f"p{i}", torch.nn.Parameter(torch.empty(shape)))
            root.blocks.append(block)
        for i, shape in enumerate(rest):
            root.register_parameter(f"tail{i}", torch.nn.Parameter(torch.empty(shape)))
    return root


def ordered_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The params in the workload's order (head, blocks, tail), as an optimizer would list a model's."""
    named = dict(module.named_parameters())
    head = sorted((n for n in named if n.startswith("head")), key=lambda n: int(n[4:]))
    tail = sorted((n for n in named if n.startswith("tail")), key=lambda n: int(n[4:]))
    blocks = [n for n in named if n.startswith("blocks.")]  # registration order: block by block
    return [named[n] for n in head + blocks + tail]


def sharded_params(workload: Workload, mesh, seed: int) -> list[torch.Tensor]:
    """FSDP2-sharded params of the workload, with grads: ``fully_shard`` on each block, then on
    the root (on the meta device, then ``to_empty`` on the CPU, as FSDP2 recommends), the local
    shards filled with this rank's random values; each grad a DTensor laid out like its param."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    module = build_module(workload)
    for block in module.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    module.to_empty(device="cpu")
    params = ordered_params(module)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            assert isinstance(p, DTensor), f"fully_shard left a {type(p).__name__} param"
            local = p.to_local()
            local.copy_(torch.randn(local.shape, generator=gen) * 0.02)
            grad = torch.randn(local.shape, generator=gen) * 1e-3
            p.grad = DTensor.from_local(grad, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    params[0]._bench_module = module  # type: ignore[attr-defined]  # keeps the FSDP module alive with its params
    return params


def local_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Plain leaf tensors on the same memory as each DTensor param's local shard, with the local
    shard of its grad as grad (stepping them steps the DTensors' shards)."""
    out = []
    for p in params:
        local = p.to_local().detach()
        local.requires_grad_(True)
        local.grad = p.grad.to_local()
        assert local.data_ptr() == p.to_local().data_ptr() and local.grad.data_ptr() == p.grad.to_local().data_ptr()
        out.append(local)
    return out


# ---------------------------------------------------------------------------------------------
# Cases.

RSOPTIM, PLAIN = "rsoptim", "rsoptim plain"
TORCH_LABELS = ("torch fused", "torch foreach", "torch for-loop")


@dataclass
class DistCase:
    name: str
    #: label -> builder of the step function from the DTensor params (``PLAIN``: from the plain
    #: local shards). Interleaved in this order.
    impls: dict[str, Callable[[list[torch.Tensor]], Callable[[], object]]]
    elements_moved: int
    roofline_written: int | None
    prepare: Callable[[list[torch.Tensor]], Callable[[], object]] | None = None
    check: Callable[[object], None] | None = None
    #: One line for the output when a torch implementation is missing on purpose.
    missing: dict[str, str] = field(default_factory=dict)


def _as_float(total_norm: object) -> float:
    from torch.distributed.tensor import DTensor

    if isinstance(total_norm, DTensor):
        # A Replicate DTensor (torch's and rsoptim's result) reads locally; a Partial one would
        # all-reduce here, on every rank alike (checks run on every rank after every call).
        total_norm = total_norm.full_tensor()
    return float(total_norm)  # type: ignore[arg-type]


def dist_clips_check(max_norm: float) -> Callable[[object], None]:
    inner = bench.clips_check(max_norm)
    return lambda total_norm: inner(_as_float(total_norm))


def dist_no_clip_check(max_norm: float) -> Callable[[object], None]:
    inner = bench.no_clip_check(max_norm)
    return lambda total_norm: inner(_as_float(total_norm))


def clip_impls(max_norm: float) -> dict[str, Callable[[list[torch.Tensor]], Callable[[], object]]]:
    clip_torch = torch.nn.utils.clip_grad_norm_
    return {
        RSOPTIM: bench._clip_step(rsoptim.clip_grad_norm_, max_norm),
        "torch foreach": bench._clip_step(clip_torch, max_norm, foreach=True),
        "torch for-loop": bench._clip_step(clip_torch, max_norm, foreach=False),
        # The local shards' grads alone: no all-reduce (the norm is the shard's, so the factor
        # differs, but the bytes are the same): the DTensor overhead includes the all-reduce.
        PLAIN: bench._clip_step(rsoptim.clip_grad_norm_, max_norm),
    }


def cases() -> list[DistCase]:
    step = bench._optimizer_step
    adam, adamw = bench.ADAM_HYPERPARAMETERS, bench.ADAMW_HYPERPARAMETERS
    sgd = {"lr": 0.01, "momentum": 0.9}

    def optimizer_impls(rs_cls, torch_cls, fused: bool, **kwargs) -> dict[str, Callable]:
        impls: dict[str, Callable] = {RSOPTIM: step(rs_cls, **kwargs)}
        if fused:
            impls["torch fused"] = step(torch_cls, fused=True, **kwargs)
        impls["torch foreach"] = step(torch_cls, foreach=True, **kwargs)
        impls["torch for-loop"] = step(torch_cls, foreach=False, **kwargs)
        impls[PLAIN] = step(rs_cls, **kwargs)
        return impls

    return [
        DistCase("Adam", optimizer_impls(rsoptim.Adam, torch.optim.Adam, True, **adam), 7, 3),
        DistCase("AdamW", optimizer_impls(rsoptim.AdamW, torch.optim.AdamW, True, **adamw), 7, 3),
        DistCase(
            "SGD momentum",
            optimizer_impls(rsoptim.SGD, torch.optim.SGD, False, **sgd),
            5,
            2,
            missing={"torch fused": f"torch {torch.__version__}'s fused SGD has no DTensor sharding strategy (aten._fused_sgd_)"},
        ),
        DistCase("RMSprop", optimizer_impls(rsoptim.RMSprop, torch.optim.RMSprop, False), 5, 2),
        DistCase(
            "clip_grad_norm_ (clips)",
            clip_impls(bench.CLIP_MAX_NORM),
            3,
            None,
            prepare=bench.restore_grads,
            check=dist_clips_check(bench.CLIP_MAX_NORM),
        ),
        DistCase(
            # Not in the default plan (--cases): with nothing to clip, rsoptim skips the scale pass.
            "clip_grad_norm_ (no clip)",
            clip_impls(bench.NO_CLIP_MAX_NORM),
            1,
            None,
            check=dist_no_clip_check(bench.NO_CLIP_MAX_NORM),
        ),
    ]


CASE_NAMES = [c.name for c in cases()]
#: The rows run by default (the issue's).
DEFAULT_CASES = [name for name in CASE_NAMES if name != "clip_grad_norm_ (no clip)"]

# ---------------------------------------------------------------------------------------------
# One rank.


@dataclass
class Config:
    workload: str
    case_names: list[str]
    world_size: int
    threads: int
    repeats: int
    warmup: int
    roofline: bool
    port: int
    out_path: str
    seed: int = 0


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _agree_max(n: int) -> int:
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def time_interleaved_ranks(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    target_s: float,
    prepare: dict[str, Callable[[], object]],
    check: dict[str, Callable[[object], None]],
) -> dict[str, list[float]]:
    """bench.time_interleaved on every rank at once: a barrier (untimed) before each sample, so
    that every rank runs the same implementation at the same time, and one batch size per
    implementation agreed by the ranks (the largest). Returns this rank's samples (seconds per call)."""
    for _ in range(warmup):
        for label, fn in fns.items():
            _barrier()
            bench.timed_calls(fn, 1, prepare.get(label), check.get(label))
    batches = {}
    for label, fn in fns.items():
        _barrier()
        batches[label] = _agree_max(bench._batch_size(fn, target_s, prepare.get(label), check.get(label)))
    samples: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            n = batches[label]
            _barrier()
            samples[label].append(bench.timed_calls(fn, n, prepare.get(label), check.get(label)) / n)
    return samples


def run_case(case: DistCase, config: Config, mesh, rank: int) -> dict[str, object]:
    workload = WORKLOADS[config.workload]
    params = sharded_params(workload, mesh, seed=config.seed + 1000 * rank)
    plain = local_params(params)
    prepare: Callable[[], None] | None = None
    if case.prepare is not None:
        restore = case.prepare(params)  # restores the plain shards' grads too (the same memory)

        def restore_then_meet() -> None:
            restore()
            _barrier()  # every rank starts the timed call at once, whatever its restore took

        prepare = restore_then_meet

    fns: dict[str, Callable[[], object]] = {}
    notes = [f"{label} left out: {why}" for label, why in case.missing.items()]
    for label, build in case.impls.items():
        fn = build(plain if label == PLAIN else params)
        bench.timed_calls(fn, 1, prepare, case.check)  # the first step creates the state
        fns[label] = fn
    impls = list(fns)
    local_elements = sum(p.numel() for p in plain)
    bytes_per_element = case.elements_moved * 4
    if config.roofline and case.roofline_written is not None:
        fns["roofline"] = bench.roofline_probe(plain, bytes_per_element, case.roofline_written * 4)
    samples = time_interleaved_ranks(
        fns,
        config.repeats,
        config.warmup,
        target_s=0.02,
        prepare={label: prepare for label in impls} if prepare is not None else {},
        check={label: case.check for label in impls} if case.check is not None else {},
    )
    result = {
        "case": case.name,
        "rank": rank,
        "tensors": len(params),
        "elements": sum(p.numel() for p in params),
        "local_elements": local_elements,
        "bytes_per_element": bytes_per_element,
        "medians": {label: statistics.median(s) for label, s in samples.items()},
        "samples": samples,
        "notes": notes,
        "rsoptim_threads": rsoptim.get_num_threads(),
        "torch_threads": torch.get_num_threads(),
    }
    del fns, prepare, plain, params
    gc.collect()
    return result


def rank_main(rank: int, config: Config) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(config.threads)
    rsoptim.set_num_threads(None)  # rsoptim follows torch's count
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{config.port}",
        rank=rank,
        world_size=config.world_size,
        timeout=datetime.timedelta(minutes=10),
    )
    # (On an error the traceback ends this rank and the parent stops the others: no teardown here,
    # which would wait for ranks that are inside a collective.)
    mesh = init_device_mesh("cpu", (config.world_size,))
    by_name = {c.name: c for c in cases()}
    results = []
    start = time.perf_counter()
    for i, name in enumerate(config.case_names):
        if rank == 0:
            print(f"[{i + 1}/{len(config.case_names)}] {time.perf_counter() - start:6.1f}s  {name} / {config.workload}", file=sys.stderr, flush=True)
        results.append(run_case(by_name[name], config, mesh, rank))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    gathered: list[object] = [None] * config.world_size
    dist.all_gather_object(gathered, {"rank": rank, "rows": results, "max_rss_bytes": rss})
    if rank == 0:
        with open(config.out_path, "w") as f:
            json.dump(gathered, f)
    gc.collect()
    _barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The parent: spawns the ranks, merges their results.


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


def run_ranks(config: Config) -> list[dict]:
    import torch.multiprocessing as mp

    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo on loopback, whatever the hostname resolves to
    mp.start_processes(rank_main, args=(config,), nprocs=config.world_size, start_method="spawn", join=True)
    with open(config.out_path) as f:
        return json.load(f)


def merge(per_rank: list[dict], config: Config) -> list[dict[str, object]]:
    """One row per case: each rank's medians, and the row's time per label (the slower rank's)."""
    rows = []
    for i, name in enumerate(config.case_names):
        parts = [r["rows"][i] for r in sorted(per_rank, key=lambda r: r["rank"])]
        assert all(p["case"] == name for p in parts)
        labels = list(parts[0]["medians"])
        rank_seconds = {label: [p["medians"][label] for p in parts] for label in labels}
        seconds = {label: max(v) for label, v in rank_seconds.items()}
        roofline = seconds.pop("roofline", None)
        rank_seconds.pop("roofline", None)
        bytes_per_step = parts[0]["elements"] * parts[0]["bytes_per_element"]  # all ranks' shards together
        rs = seconds[RSOPTIM]
        ratios = {label: s / rs for label, s in seconds.items() if label not in (RSOPTIM, PLAIN)}
        torch_labels = [label for label in TORCH_LABELS if label in seconds]
        fastest = min(torch_labels, key=lambda label: seconds[label])
        rows.append(
            {
                "case": name,
                "workload": config.workload,
                "world_size": config.world_size,
                "threads_per_rank": config.threads,
                "tensors": parts[0]["tensors"],
                "elements": parts[0]["elements"],
                "local_elements": [p["local_elements"] for p in parts],
                "bytes_per_step": bytes_per_step,
                "seconds": seconds,
                "rank_seconds": rank_seconds,
                "rank_samples": {label: [p["samples"][label] for p in parts] for label in labels},
                "ratios": ratios,
                "rank_ratios": {
                    label: [t / r for t, r in zip(rank_seconds[label], rank_seconds[RSOPTIM])] for label in rank_seconds if label not in (RSOPTIM, PLAIN)
                },
                "fastest_torch": fastest,
                "vs_fastest_torch": seconds[fastest] / rs,
                "vs_fused": seconds["torch fused"] / rs if "torch fused" in seconds else None,
                "dtensor_overhead": rs / seconds[PLAIN],
                "rank_dtensor_overhead": [a / b for a, b in zip(rank_seconds[RSOPTIM], rank_seconds[PLAIN])],
                "gbps": {label: bytes_per_step / s / 1e9 for label, s in seconds.items()},
                "roofline_seconds": roofline,
                "roofline_share": roofline / rs if roofline else None,
                "rsoptim_threads": [p["rsoptim_threads"] for p in parts],
                "notes": parts[0]["notes"],
            }
        )
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    head = (
        f"{'case':<24} {'rsoptim ms':>10} {'GB/s':>6} {'%roof':>6} {'x fastest':>10} {'x fused':>8} {'x foreach':>9} "
        f"{'x for-loop':>10} {'DT ovh':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        ratios = r["ratios"]
        share = r["roofline_share"]

        def cell(label: str, width: int) -> str:
            return f"{ratios[label]:>{width - 1}.2f}x" if label in ratios else f"{'-':>{width}}"

        lines.append(
            f"{r['case']:<24} {1e3 * r['seconds'][RSOPTIM]:>10.3f} {r['gbps'][RSOPTIM]:>6.1f} "
            + (f"{100 * share:>5.0f}%" if share else f"{'-':>6}")
            + f" {r['vs_fastest_torch']:>9.2f}x {cell('torch fused', 8)} {cell('torch foreach', 9)} {cell('torch for-loop', 10)}"
            + f" {r['dtensor_overhead']:>6.2f}x"
        )
    lines += [
        "",
        "rsoptim ms: the slower rank's median step time (each rank steps its own shards; both step at once).",
        "x fastest / x fused / x foreach / x for-loop: torch's time over rsoptim's on the same DTensors (higher is better for "
        "rsoptim); x fastest uses torch's fastest implementation in that row.",
        "DT ovh: rsoptim on the DTensors over rsoptim on plain tensors holding the same local shards (1.00x: no overhead; "
        "for clip_grad_norm_ the plain call norms the local shard alone, with no all-reduce).",
        "GB/s: the bytes all ranks' shards move (params, grads and state, read and written once) over that time; "
        "%roof: rsoptim's speed as a share of the roofline probe's, run on every rank at once.",
    ]
    return "\n".join(lines)


def format_rank_times(rows: list[dict[str, object]]) -> str:
    lines = ["Per-rank medians in ms (rank 0 / rank 1 ...):"]
    for r in rows:
        parts = [f"{label} " + " / ".join(f"{1e3 * s:.3f}" for s in v) for label, v in r["rank_seconds"].items()]
        if r["roofline_seconds"]:
            parts.append(f"roofline (slower rank) {1e3 * r['roofline_seconds']:.3f}")
        lines.append(f"  {r['case']}: " + ", ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rsoptim.bench --distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", "--workloads", dest="workload", default=None, help="one of: " + ", ".join(WORKLOADS) + " (default: gpt2-small; --quick: gpt2-mini)")
    parser.add_argument("--cases", default=None, help="comma-separated: " + ", ".join(CASE_NAMES) + " (default: all but the last)")
    parser.add_argument("--world-size", type=int, default=2, help="ranks (processes), default %(default)s")
    parser.add_argument("--threads", type=int, default=1, help="torch (and so rsoptim) threads per rank, default %(default)s")
    parser.add_argument("--repeats", type=int, default=7, help="timed samples per implementation (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 repeats, the gpt2-mini workload")
    parser.add_argument("--no-roofline", action="store_true", help="skip the roofline probe (saves its buffers' memory)")
    parser.add_argument("--json", action="store_true", help="print JSON on stdout instead of the table")
    args = parser.parse_args(argv)

    if not gloo_available():
        print("rsoptim.bench --distributed needs torch.distributed with the gloo backend", file=sys.stderr)
        return 2
    if args.quick:
        args.repeats = min(args.repeats, 3)
    workload = args.workload or ("gpt2-mini" if args.quick else "gpt2-small")
    if workload not in WORKLOADS:
        parser.error(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    chosen = DEFAULT_CASES if args.cases is None else [c.strip() for c in args.cases.split(",") if c.strip()]
    for name in chosen:
        if name not in CASE_NAMES:
            parser.error(f"unknown case {name!r}; choose from {', '.join(CASE_NAMES)}")
    if args.world_size < 1 or args.threads < 1:
        parser.error("--world-size and --threads must be at least 1")

    machine = bench.machine_info([args.threads])
    print(
        f"rsoptim {machine['rsoptim']} vs torch {machine['torch']} | {machine['cpu']} | {machine['cores']} cores | "
        f"{args.world_size} ranks x {args.threads} threads (gloo, FSDP2) | {workload} | SIMD {machine['simd']}",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(prefix="rsoptim-bench-") as tmp:
        config = Config(
            workload=workload,
            case_names=chosen,
            world_size=args.world_size,
            threads=args.threads,
            repeats=args.repeats,
            warmup=args.warmup,
            roofline=not args.no_roofline,
            port=free_port(),
            out_path=os.path.join(tmp, "ranks.json"),
        )
        per_rank = run_ranks(config)
    rows = merge(per_rank, config)
    notes = list(dict.fromkeys(n for r in rows for n in r["notes"]))
    max_rss = [r["max_rss_bytes"] for r in sorted(per_rank, key=lambda r: r["rank"])]
    machine.update({"world_size": args.world_size, "threads_per_rank": args.threads, "backend_distributed": "gloo"})

    if args.json:
        out = {
            "machine": machine,
            "workload": workload,
            "workload_description": WORKLOADS[workload].description,
            "repeats": args.repeats,
            "rows": rows,
            "max_rss_bytes": max_rss,
            "notes": notes,
        }
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"rsoptim {machine['rsoptim']} vs torch {machine['torch']} on {machine['cpu']} ({machine['cores']} cores): "
        f"{args.world_size} ranks x {args.threads} thread(s), gloo, FSDP2 fully_shard, {workload} "
        f"({WORKLOADS[workload].description}), float32, SIMD path {machine['simd']}, {args.repeats} repeats\n"
    )
    print(format_table(rows))
    for note in notes:
        print(f"Note: {note}")
    print()
    print(format_rank_times(rows))
    print("\nPeak RSS per rank: " + ", ".join(f"{b / 2**30:.2f} GiB" for b in max_rss))
    return 0


if __name__ == "__main__":
    sys.exit(main())
