"""The seed training loop: an MLP on scikit-learn's bundled digits data set, trained with
rsoptim.Adam + rsoptim.clip_grad_norm_ and with torch.optim.Adam + torch.nn.utils.clip_grad_norm_
from the same initial weights and batch order, printing both loss curves side by side.

    python examples/train_digits.py [--epochs 10]

With ``--dtype bfloat16`` (or ``float16``) the same loop trains the MLP with half-precision
params: rsoptim with the state in the param's dtype (torch's fused numerics), with float32 state
(``state_dtype=torch.float32``), with stochastic rounding (``stochastic_rounding=True``), with
float32 master weights (``master_weights=True``), and torch's fused Adam, beside float32
rsoptim; ``--plot FILE.png`` also draws the curves.

    python examples/train_digits.py --dtype bfloat16 --plot bf16.png
"""

from __future__ import annotations

import argparse
import copy

import torch
from sklearn.datasets import load_digits
from torch import nn

import rsoptim


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, clip, data, epochs: int, batch_size: int) -> list[float]:
    x, y = data
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    order = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=order)
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = perm[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            clip(model.parameters(), max_norm=1.0)
            optimizer.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--plot", metavar="FILE.png", help="with --dtype bfloat16/float16: also plot the curves")
    args = parser.parse_args()

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    if args.dtype != "float32":
        half_precision(getattr(torch, args.dtype), (x, y), args)
        return

    model_rs = make_model(seed=0)
    model_torch = copy.deepcopy(model_rs)
    rs = train(model_rs, rsoptim.Adam(model_rs.parameters(), lr=args.lr), rsoptim.clip_grad_norm_, (x, y), args.epochs, args.batch_size)
    ref = train(
        model_torch,
        torch.optim.Adam(model_torch.parameters(), lr=args.lr),
        torch.nn.utils.clip_grad_norm_,
        (x, y),
        args.epochs,
        args.batch_size,
    )
    print(f"{'epoch':>5} {'rsoptim.Adam':>14} {'torch.optim.Adam':>17} {'difference':>11}")
    for epoch, (a, b) in enumerate(zip(rs, ref), 1):
        print(f"{epoch:>5} {a:>14.6f} {b:>17.6f} {a - b:>11.2e}")


def half_precision(dtype: torch.dtype, data, args) -> None:
    """Loss curves of half-precision training, beside float32."""
    x, y = data
    runs = {
        "float32": (torch.float32, lambda ps: rsoptim.Adam(ps, lr=args.lr)),
        f"{str(dtype).split('.')[-1]} state": (dtype, lambda ps: rsoptim.Adam(ps, lr=args.lr)),
        "float32 state": (dtype, lambda ps: rsoptim.Adam(ps, lr=args.lr, state_dtype=torch.float32)),
        "stochastic rnd": (dtype, lambda ps: rsoptim.Adam(ps, lr=args.lr, stochastic_rounding=True, stochastic_rounding_seed=0)),
        "master weights": (dtype, lambda ps: rsoptim.Adam(ps, lr=args.lr, master_weights=True)),
        "torch fused": (dtype, lambda ps: torch.optim.Adam(ps, lr=args.lr, fused=True)),
    }
    curves = {}
    for label, (run_dtype, make_optimizer) in runs.items():
        model = make_model(seed=0).to(run_dtype)
        clip = torch.nn.utils.clip_grad_norm_ if label == "torch fused" else rsoptim.clip_grad_norm_
        curves[label] = train(model, make_optimizer(model.parameters()), clip, (x.to(run_dtype), y), args.epochs, args.batch_size)
    print(f"{'epoch':>5} " + " ".join(f"{label:>16}" for label in curves))
    for epoch in range(args.epochs):
        print(f"{epoch + 1:>5} " + " ".join(f"{curve[epoch]:>16.6f}" for curve in curves.values()))
    if args.plot:
        plot(curves, args.plot, f"digits MLP, Adam lr={args.lr}, {str(dtype).split('.')[-1]} params")


def plot(curves: dict[str, list[float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=label)
    ax.set(xlabel="epoch", ylabel="mean training loss", yscale="log", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
