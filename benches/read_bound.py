"""Is a pass's time set by the bytes it reads, or by all the bytes it moves? Times, alternated in
one process, over float32 buffers of GPT-2 small's size (124M elements by default): the norm pass
(reads 4 bytes per element), torch.sum (reads 4), clip_grad_norm_ while clipping (norm pass, then
the scale pass: reads 8, writes 4), SGD without momentum (reads 8, writes 4) and Adam (reads 16,
writes 12), on rsoptim's NumPy functional API.

    .venv/bin/python benches/read_bound.py [elements] [rounds] [threads]

If reads set the time, Adam takes 4x the norm pass (its reads' ratio), not 7x (its bytes').
"""

import statistics
import sys
import time

import numpy as np
import torch

import rsoptim
from rsoptim import functional as F

n = int(sys.argv[1]) if len(sys.argv) > 1 else 124_000_000
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 9
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
torch.set_num_threads(threads)
rsoptim.set_num_threads(threads)
rng = np.random.default_rng(0)
grads = rng.standard_normal(n, dtype=np.float32)
original = grads.copy()
param = rng.standard_normal(n, dtype=np.float32)
exp_avg, exp_avg_sq = np.zeros(n, np.float32), np.zeros(n, np.float32)
steps = np.zeros(1, np.float32)

# name: (pass, bytes read, bytes written) per element
passes = {
    "norm pass": (lambda: F.grad_norms([grads]), 4, 0),
    "torch.sum": (lambda: torch.from_numpy(grads).sum(), 4, 0),
    "clip_grad_norm_": (lambda: F.clip_grad_norm_([grads], max_norm=1.0), 8, 4),  # (the grads clip)
    "SGD": (lambda: F.sgd_([param], [grads], lr=1e-9), 8, 4),
    "Adam": (lambda: F.adam_([param], [grads], [exp_avg], [exp_avg_sq], steps, lr=1e-6), 16, 12),
}
times: dict[str, list[float]] = {name: [] for name in passes}
for _ in range(rounds):
    for name, (run, _, _) in passes.items():
        np.copyto(grads, original)  # (untimed: every pass sees the same grads, and clipping clips)
        start = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - start)
print(f"{n} elements, {threads} threads, medians of {rounds} alternated rounds")
for name, (_, read, written) in passes.items():
    t = statistics.median(times[name])
    print(f"{name:16s} {t * 1e3:7.1f} ms  {(read + written) * n / t / 1e9:6.1f} GB/s moved  {read * n / t / 1e9:6.1f} GB/s read")
norm, adam = statistics.median(times["norm pass"]), statistics.median(times["Adam"])
print(f"Adam / norm pass: {adam / norm:.2f} (reads' ratio 4.00, bytes' 7.00); norm pass + Adam over Adam: {(norm + adam) / adam:.3f}")
