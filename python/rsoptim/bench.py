"""Side-by-side benchmark of rsoptim against torch.optim on this machine.

    python -m rsoptim.bench                      # the default table
    python -m rsoptim.bench --json               # the same, as JSON on stdout
    python -m rsoptim.bench --plot adam.png      # also GB/s against size, with the roofline
    python -m rsoptim.bench --quick              # fewer repeats, no GPT-2 workload

Every row times one optimizer step (or one ``clip_grad_norm_``) of rsoptim and of each torch
implementation on the same tensors, in one process, interleaved (A B C A B C ...) after a warm-up,
and reports medians. "GB/s" is the bytes a step must move (params, grads and state read and
written once) over its time; "roofline" is a plain streaming loop moving the same bytes per
element on the same tensors and threads, measured in the same run, so "% roofline" is a
measured fraction of what this machine's memory system delivers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

import rsoptim
from rsoptim import _rsoptim
from rsoptim._columns import pack

# ---------------------------------------------------------------------------------------------
# Workloads: named lists of parameter shapes.


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """The parameter list of GPT-2 small: 148 tensors, 124,439,808 elements."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,)]  # ln_1
        shapes += [(d, 3 * d), (3 * d,), (d, d), (d,)]  # attention: c_attn, c_proj
        shapes += [(d,), (d,)]  # ln_2
        shapes += [(d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # MLP: c_fc, c_proj
    shapes += [(d,), (d,)]  # ln_f
    return shapes


WORKLOADS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "gpt2-small": gpt2_small_shapes,
    "seed-mlp": lambda: [(128, 784), (128,), (10, 128), (10,)],
    "400x1000": lambda: [(1000,)] * 400,
    "flat-64m": lambda: [(64 * 2**20,)],
}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_params(shapes: list[tuple[int, ...]], seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = (torch.randn(shape, generator=gen) * 0.02).to(dtype).requires_grad_()
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(dtype)
        params.append(p)
    return params


# ---------------------------------------------------------------------------------------------
# Cases: what one row runs.


@dataclass
class Case:
    name: str
    #: rsoptim's implementation and torch's, by label; each builds a step function.
    impls: dict[str, Callable[[list[torch.Tensor]], Callable[[], object]]]
    #: Elements moved per param element (reads + writes), and written buffers for the roofline.
    elements_moved: int
    roofline_written: int | None


def _optimizer_step(cls, **kwargs) -> Callable[[list[torch.Tensor]], Callable[[], object]]:
    def build(params: list[torch.Tensor]) -> Callable[[], object]:
        return cls(params, **kwargs).step

    return build


def _clip_step(fn, max_norm: float, **kwargs) -> Callable[[list[torch.Tensor]], Callable[[], object]]:
    def build(params: list[torch.Tensor]) -> Callable[[], object]:
        return lambda: fn(params, max_norm, **kwargs)

    return build


def _torch_variants(cls, fused: bool, **kwargs) -> dict[str, Callable]:
    variants = {
        "torch for-loop": _optimizer_step(cls, foreach=False, **kwargs),
        "torch foreach": _optimizer_step(cls, foreach=True, **kwargs),
    }
    if fused:
        variants["torch fused"] = _optimizer_step(cls, fused=True, **kwargs)
    return variants


def cases() -> list[Case]:
    clip_torch = torch.nn.utils.clip_grad_norm_
    return [
        Case("Adam", {"rsoptim": _optimizer_step(rsoptim.Adam), **_torch_variants(torch.optim.Adam, True)}, 7, 3),
        Case(
            "AdamW",
            {"rsoptim": _optimizer_step(rsoptim.AdamW), **_torch_variants(torch.optim.AdamW, True)},
            7,
            3,
        ),
        Case(
            "SGD momentum",
            {
                "rsoptim": _optimizer_step(rsoptim.SGD, lr=0.01, momentum=0.9),
                **_torch_variants(torch.optim.SGD, True, lr=0.01, momentum=0.9),
            },
            5,
            2,
        ),
        Case(
            "RMSprop",
            {"rsoptim": _optimizer_step(rsoptim.RMSprop), **_torch_variants(torch.optim.RMSprop, False)},
            5,
            2,
        ),
        Case(
            "RMSprop centered+momentum",
            {
                "rsoptim": _optimizer_step(rsoptim.RMSprop, centered=True, momentum=0.9),
                **_torch_variants(torch.optim.RMSprop, False, centered=True, momentum=0.9),
            },
            9,
            4,
        ),
        Case(
            "clip_grad_norm_ (no clip)",
            {
                "rsoptim": _clip_step(rsoptim.clip_grad_norm_, 1e9),
                "torch foreach": _clip_step(clip_torch, 1e9, foreach=True),
                "torch for-loop": _clip_step(clip_torch, 1e9, foreach=False),
            },
            1,
            None,
        ),
        Case(
            "clip_grad_norm_ (clips)",
            {
                "rsoptim": _clip_step(rsoptim.clip_grad_norm_, 1e-2),
                "torch foreach": _clip_step(clip_torch, 1e-2, foreach=True),
                "torch for-loop": _clip_step(clip_torch, 1e-2, foreach=False),
            },
            3,
            # No roofline: the probe's streams (read r, read and write w) are not the clip's (read
            # g, then read and write g), and reads alone run faster than mixed streams.
            None,
        ),
    ]


# Which cases run on which workload by default (every row of the performance issue's table).
DEFAULT_PLAN: dict[str, list[str]] = {
    "gpt2-small": [c.name for c in cases()],
    "seed-mlp": ["Adam"],
    "400x1000": ["Adam"],
    "flat-64m": ["Adam"],
}


# ---------------------------------------------------------------------------------------------
# Timing.


class Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled
        self.start = time.perf_counter()

    def update(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        line = f"[{self.done}/{self.total}] {elapsed:6.1f}s  {label}"
        end = "\r" if sys.stderr.isatty() else "\n"
        print(f"{line:<100}", end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and sys.stderr.isatty():
            print(" " * 100, end="\r", file=sys.stderr, flush=True)


def _batch_size(fn: Callable[[], object], target_s: float) -> int:
    """How many calls make one sample of at least ``target_s`` seconds."""
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(10_000, math.ceil(target_s / once)))


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, target_s: float) -> dict[str, float]:
    """Median seconds per call of each function, timed in turn (A B C A B C ...)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    batches = {label: _batch_size(fn, target_s) for label, fn in fns.items()}
    samples: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            n = batches[label]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[label].append((time.perf_counter() - t0) / n)
    return {label: statistics.median(s) for label, s in samples.items()}


def roofline_probe(params: list[torch.Tensor], written: int) -> Callable[[], object]:
    """A streaming loop over buffers shaped like ``params``: ``written`` buffers read and written
    and one more read, per element (see ``rsoptim_core::roofline``). Half-precision params get
    float32 buffers of the same byte counts (the probe moves bytes; their type does not matter)."""
    if params[0].dtype in (torch.bfloat16, torch.float16):
        params = [torch.empty((p.numel() + 1) // 2) for p in params]
    read = [torch.zeros_like(p) for p in params]
    outs = [[torch.zeros_like(p) for p in params] for _ in range(written)]
    dtype = {torch.float32: "float32", torch.float64: "float64"}[params[0].dtype]
    numels = pack(p.numel() for p in params)
    read_addrs = pack(t.data_ptr() for t in read)
    out_addrs = [pack(t.data_ptr() for t in col) for col in outs]

    def run() -> None:
        _rsoptim.stream_probe(dtype, numels, read_addrs, out_addrs)

    run.buffers = (read, outs)  # type: ignore[attr-defined]  # keep the buffers alive
    return run


@dataclass
class Row:
    case: str
    workload: str
    threads: int
    tensors: int
    elements: int
    bytes_per_step: int
    seconds: dict[str, float]
    roofline_seconds: float | None = None
    ratios: dict[str, float] = field(default_factory=dict)

    def gbps(self, label: str) -> float:
        return self.bytes_per_step / self.seconds[label] / 1e9


def run_row(case: Case, workload: str, threads: int, repeats: int, warmup: int, dtype: torch.dtype = torch.float32) -> Row:
    torch.set_num_threads(threads)
    rsoptim.set_num_threads(threads)
    shapes = WORKLOADS[workload]()
    params = make_params(shapes, dtype=dtype)
    fns = {label: build(params) for label, build in case.impls.items()}
    if case.roofline_written is not None:
        fns["roofline"] = roofline_probe(params, case.roofline_written)
    elements = sum(p.numel() for p in params)
    seconds = time_interleaved(fns, repeats, warmup, target_s=0.02)
    roofline = seconds.pop("roofline", None)
    row = Row(
        case=case.name,
        workload=workload,
        threads=threads,
        tensors=len(params),
        elements=elements,
        bytes_per_step=elements * case.elements_moved * params[0].element_size(),
        seconds=seconds,
        roofline_seconds=roofline,
    )
    row.ratios = {label: s / seconds["rsoptim"] for label, s in seconds.items() if label != "rsoptim"}
    del fns, params
    return row


# ---------------------------------------------------------------------------------------------
# Memory a step allocates.


def step_allocations(build: Callable[[list[torch.Tensor]], Callable[[], object]], workload: str) -> dict[str, int]:
    """Bytes allocated during one (steady-state) step: by torch ops (profiler) and by rsoptim's
    Rust code (its allocation counters)."""
    from torch.profiler import ProfilerActivity, profile

    params = make_params(WORKLOADS[workload]())
    step = build(params)
    step()  # creates the state
    rust_before = _rsoptim.allocation_counters()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    rust_after = _rsoptim.allocation_counters()
    torch_bytes = sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
    return {
        "torch_bytes": int(torch_bytes),
        "rust_bytes": rust_after[0] - rust_before[0],
        "rust_allocations": rust_after[1] - rust_before[1],
        "tensors": len(params),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
    }


# ---------------------------------------------------------------------------------------------
# Plot: GB/s against size.


PLOT_SIZES = [2**k for k in range(10, 28, 2)] + [2**27]


def size_sweep(repeats: int, threads: int, progress: Progress) -> list[dict[str, float]]:
    torch.set_num_threads(threads)
    rsoptim.set_num_threads(threads)
    adam = cases()[0]
    points = []
    for n in PLOT_SIZES:
        progress.update(f"size sweep: Adam on {n} elements")
        params = make_params([(n,)])
        fns = {label: build(params) for label, build in adam.impls.items()}
        fns["roofline"] = roofline_probe(params, 3)
        seconds = time_interleaved(fns, repeats, 1, target_s=0.01)
        bytes_moved = n * adam.elements_moved * 4
        points.append({"elements": n, **{label: bytes_moved / s / 1e9 for label, s in seconds.items()}})
        del fns, params
    return points


def plot(points: list[dict[str, float]], path: str, machine: dict[str, object], threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    sizes = [p["elements"] for p in points]
    styles = {"rsoptim": "o-", "torch fused": "s--", "torch foreach": "^--", "torch for-loop": "v--"}
    for label, style in styles.items():
        ax.plot(sizes, [p[label] for p in points], style, label=label)
    ax.plot(sizes, [p["roofline"] for p in points], "k:", linewidth=2, label="roofline probe (measured)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("elements in one float32 tensor")
    ax.set_ylabel("GB/s moved (28 bytes per element)")
    ax.set_title(f"Adam step throughput, {threads} threads, {machine['simd']} path\n{machine['cpu']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------
# Output.


def machine_info(threads: list[int]) -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": ",".join(map(str, threads)),
        "simd": rsoptim.simd_level(),
        "backend": rsoptim.parallel_backend().split("/")[-1],
        "torch": torch.__version__,
        "rsoptim": rsoptim.__version__,
        "python": platform.python_version(),
    }


def format_table(rows: list[Row]) -> str:
    labels = ["rsoptim", "torch fused", "torch foreach", "torch for-loop"]
    head = f"{'case':<27} {'workload':<11} {'thr':>3} {'rsoptim ms':>10} {'GB/s':>6} {'%roof':>6}"
    head += "".join(f" {'x ' + label.replace('torch ', ''):>10}" for label in labels[1:])
    lines = [head, "-" * len(head)]
    for r in rows:
        roof = f"{100 * r.roofline_seconds / r.seconds['rsoptim']:5.0f}%" if r.roofline_seconds else "     -"
        line = f"{r.case:<27} {r.workload:<11} {r.threads:>3} {1e3 * r.seconds['rsoptim']:>10.3f} {r.gbps('rsoptim'):>6.1f} {roof:>6}"
        for label in labels[1:]:
            line += f" {r.ratios[label]:>9.2f}x" if label in r.ratios else f" {'-':>10}"
        lines.append(line)
    lines.append("")
    lines.append("x fused / x foreach / x for-loop: torch's time over rsoptim's (higher is better for rsoptim).")
    lines.append("%roof: rsoptim's speed as a share of the roofline probe's (same bytes, tensors and threads).")
    return "\n".join(lines)


def format_torch_times(rows: list[Row]) -> str:
    lines = ["Medians in ms (and GB/s):"]
    for r in rows:
        parts = [f"{label} {1e3 * s:.3f} ({r.gbps(label):.1f})" for label, s in r.seconds.items()]
        if r.roofline_seconds:
            parts.append(f"roofline {1e3 * r.roofline_seconds:.3f} ({r.bytes_per_step / r.roofline_seconds / 1e9:.1f})")
        lines.append(f"  {r.case} / {r.workload} / {r.threads} thr: " + ", ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rsoptim.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(DEFAULT_PLAN), help="comma-separated: " + ", ".join(WORKLOADS))
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: the issue's table)")
    parser.add_argument(
        "--threads",
        default=None,
        help="comma-separated thread counts (default: 1 and torch's count for Adam on gpt2-small and flat-64m, torch's count elsewhere)",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed samples per implementation (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 repeats, no gpt2-small")
    parser.add_argument("--json", action="store_true", help="print JSON on stdout instead of the table")
    parser.add_argument("--plot", metavar="FILE.png", help="also sweep Adam over sizes 1K..128M and plot GB/s")
    parser.add_argument("--no-memory", action="store_true", help="skip the allocation measurement")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=list(DTYPES),
        help="the params' (and grads' and state's) dtype; half types are stepped with torch's fused-kernel numerics "
        "(note: torch 2.13's fused SGD does not update half-precision params, so its times are not a comparison)",
    )
    args = parser.parse_args(argv)

    max_threads = torch.get_num_threads()
    workloads = [w for w in args.workloads.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS:
            parser.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    if args.quick:
        args.repeats = min(args.repeats, 3)
        workloads = [w for w in workloads if w != "gpt2-small"]
    all_cases = {c.name: c for c in cases()}
    chosen = None if args.cases is None else [c.strip() for c in args.cases.split(",")]
    for name in chosen or []:
        if name not in all_cases:
            parser.error(f"unknown case {name!r}; choose from {', '.join(all_cases)}")

    plan: list[tuple[Case, str, int]] = []
    for w in workloads:
        for name in chosen or DEFAULT_PLAN.get(w, ["Adam"]):
            if args.threads is not None:
                thread_counts = [int(t) for t in args.threads.split(",")]
            elif name == "Adam" and w in ("gpt2-small", "flat-64m") and max_threads > 1:
                thread_counts = [1, max_threads]
            else:
                thread_counts = [max_threads]
            plan += [(all_cases[name], w, t) for t in thread_counts]
    used_threads = sorted({t for _, _, t in plan})
    machine = machine_info(used_threads)
    progress = Progress(len(plan) + (len(PLOT_SIZES) if args.plot else 0), enabled=True)
    print(
        f"rsoptim {machine['rsoptim']} vs torch {machine['torch']} | {machine['cpu']} | "
        f"{machine['cores']} cores | threads {machine['threads']} | SIMD {machine['simd']}",
        file=sys.stderr,
    )
    rows = []
    for case, workload, threads in plan:
        progress.update(f"{case.name} / {workload} / {threads} threads")
        rows.append(run_row(case, workload, threads, args.repeats, args.warmup, DTYPES[args.dtype]))

    memory = None
    if not args.no_memory and "gpt2-small" in workloads:
        torch.set_num_threads(max_threads)
        rsoptim.set_num_threads(max_threads)
        memory = {
            "rsoptim Adam": step_allocations(_optimizer_step(rsoptim.Adam), "gpt2-small"),
            "torch Adam for-loop": step_allocations(_optimizer_step(torch.optim.Adam, foreach=False), "gpt2-small"),
        }

    points = None
    if args.plot:
        points = size_sweep(max(3, args.repeats // 2), max_threads, progress)
        plot(points, args.plot, machine, max_threads)
    progress.close()

    if args.json:
        out = {
            "machine": machine,
            "dtype": args.dtype,
            "rows": [{**asdict(r), "gbps": {k: r.gbps(k) for k in r.seconds}} for r in rows],
            "memory": memory,
            "size_sweep": points,
        }
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"rsoptim {machine['rsoptim']} vs torch {machine['torch']} on {machine['cpu']} "
        f"({machine['cores']} cores), threads {machine['threads']}, SIMD path {machine['simd']}, "
        f"parallel regions on {machine['backend']}, Python {machine['python']}, params {args.dtype}\n"
    )
    print(format_table(rows))
    print()
    print(format_torch_times(rows))
    if memory is not None:
        print("\nMemory allocated by one steady-state Adam step on gpt2-small:")
        for label, m in memory.items():
            print(
                f"  {label:<20} torch ops {m['torch_bytes'] / 2**20:10.2f} MiB, rsoptim Rust "
                f"{m['rust_bytes'] / 2**10:8.1f} KiB in {m['rust_allocations']} allocations "
                f"({m['tensors']} tensors, params {m['param_bytes'] / 2**20:.0f} MiB)"
            )
    if points is not None:
        print(f"\nSize sweep (Adam, one float32 tensor, GB/s), plotted to {args.plot}:")
        labels = [k for k in points[0] if k != "elements"]
        print(f"  {'elements':>10} " + " ".join(f"{label:>15}" for label in labels))
        for p in points:
            print(f"  {int(p['elements']):>10} " + " ".join(f"{p[label]:>15.1f}" for label in labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
