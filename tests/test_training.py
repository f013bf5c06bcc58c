"""The seed example, end to end: an MLP trained on scikit-learn's bundled digits data set.

Trained once with rsoptim.Adam + rsoptim.clip_grad_norm_ and once with torch.optim.Adam +
torch.nn.utils.clip_grad_norm_, from the same initial weights and the same batch order; the
per-batch loss curves (and the grad norms clip_grad_norm_ returns) must match.

Tolerances:

* float32, rtol 1e-4 on every batch's loss over 8 epochs (232 steps). Both runs compute the
  same maths, but not in the same order: rsoptim's SIMD kernels and its more precise norm
  reduction round differently from torch's float32 for-loop and float32 norm sums, so the two
  weight trajectories drift apart by a few float32 ulps per step and feed slightly different
  weights into the next forward pass. Measured on this data: at most ~3e-7 relative on any loss
  and ~2e-7 absolute on any weight after 8 epochs; float32 torch itself differs from a float64
  run of the same training by ~1e-6. rtol 1e-4 leaves room for that drift on other CPUs/SIMD
  levels while still catching any real mistake (a wrong bias correction, a clip that never
  applies, a stale hyperparameter all move the loss by far more than 1e-4 within an epoch).
* float64, rtol 1e-10: the same drift, in float64 ulps (measured ~1e-15).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import rsoptim

sklearn_datasets = pytest.importorskip("sklearn.datasets")

EPOCHS = 8
BATCH = 64


@pytest.fixture(scope="module")
def digits():
    X, y = sklearn_datasets.load_digits(return_X_y=True)  # bundled with scikit-learn: no download
    assert X.shape == (1797, 64)
    return torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def train(model, X, y, optimizer_cls, clip, epochs, dtype, lr=1e-3):
    model = copy.deepcopy(model).to(dtype)
    X = X.to(dtype)
    opt = optimizer_cls(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    order = torch.Generator().manual_seed(1)
    losses, norms = [], []
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=order)
        for start in range(0, len(X), BATCH):
            idx = perm[start : start + BATCH]
            opt.zero_grad()
            loss = loss_fn(model(X[idx]), y[idx])
            loss.backward()
            norms.append(clip(model.parameters(), max_norm=1.0).item())
            opt.step()
            losses.append(loss.item())
    return np.array(losses), np.array(norms), model


def accuracy(model, X, y):
    with torch.no_grad():
        return (model(X.to(next(model.parameters()).dtype)).argmax(1) == y).double().mean().item()


def test_mlp_on_digits_float32_matches_torch(digits):
    X, y = digits
    model = make_model()
    lt, nt, mt = train(model, X, y, torch.optim.Adam, torch.nn.utils.clip_grad_norm_, EPOCHS, torch.float32)
    lr, nr, mr = train(model, X, y, rsoptim.Adam, rsoptim.clip_grad_norm_, EPOCHS, torch.float32)
    steps_per_epoch = -(-len(X) // BATCH)
    assert len(lr) == len(lt) == EPOCHS * steps_per_epoch

    np.testing.assert_allclose(lr, lt, rtol=1e-4, atol=0)
    np.testing.assert_allclose(nr, nt, rtol=1e-4, atol=0)
    for a, b in zip(mr.parameters(), mt.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    # The clip really clipped sometimes (so rsoptim.clip_grad_norm_ is exercised for real).
    assert (nr > 1.0).any()
    # And the model really learned.
    first, last = lr[:steps_per_epoch].mean(), lr[-steps_per_epoch:].mean()
    assert last < 0.25 * first, (first, last)
    assert lr[0] > 2.0 and last < 0.5
    assert accuracy(mr, X, y) > 0.9
    assert accuracy(mr, X, y) == pytest.approx(accuracy(mt, X, y), abs=2 / len(X))


def test_mlp_on_digits_float64_matches_torch(digits):
    X, y = digits
    model = make_model(seed=1)
    epochs = 3
    lt, nt, mt = train(model, X, y, torch.optim.Adam, torch.nn.utils.clip_grad_norm_, epochs, torch.float64, lr=3e-3)
    lr, nr, mr = train(model, X, y, rsoptim.Adam, rsoptim.clip_grad_norm_, epochs, torch.float64, lr=3e-3)
    np.testing.assert_allclose(lr, lt, rtol=1e-10, atol=0)
    np.testing.assert_allclose(nr, nt, rtol=1e-10, atol=0)
    for a, b in zip(mr.parameters(), mt.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert (nr > 1.0).any()
    assert lr[-20:].mean() < 0.5 * lr[:20].mean()


def test_the_digits_example_trains_bfloat16_params_every_way(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "train_digits.py"
    if not script.exists():
        pytest.skip("the examples are not next to the tests")
    plot = tmp_path / "curves.png"
    command = [sys.executable, str(script), "--dtype", "bfloat16", "--epochs", "2", "--plot", str(plot)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    header, *rows = out.stdout.strip().splitlines()[:-1]
    assert header.split()[1:] == [
        "float32", "bfloat16", "state", "float32", "state", "stochastic", "rnd", "master", "weights", "torch", "fused"
    ]
    losses = [[float(v) for v in row.split()[1:]] for row in rows]
    assert len(losses) == 2 and all(later < first for first, later in zip(losses[0], losses[1]))
    assert losses[1][1] == losses[1][5], "bfloat16 state: torch fused's numbers"
    assert plot.stat().st_size > 0
