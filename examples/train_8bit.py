"""8-bit Adam against float32 Adam on two small trainings: rsoptim.AdamW8bit beside
torch.optim.AdamW (and rsoptim.Adam8bit beside torch.optim.Adam), from the same initial weights,
on the same batches in the same order, with the same hyperparameters; both loss curves printed,
then the final train and held-out losses and each optimizer's state memory per param.

    python examples/train_8bit.py [--model digits|transformer|both] [--seed 0] [--plot FILE.png]

The two trainings (nothing is downloaded):

- ``digits``: the seed's MLP (64-128-10) on scikit-learn's bundled digits, 80/20 split, 30
  epochs of batches of 64 at lr 3e-3 (the seed example's 1e-3 is still descending after 30
  epochs, where any change in the effective step size moves the final loss; at 3e-3 it is
  flattening out). Its first weight (8192 elements) gets 8-bit state;
  the rest is smaller than ``min_8bit_size`` (4096) and keeps float32 state, as in bitsandbytes
  (``--min-8bit-size 0`` quantizes every param).
- ``transformer``: a 2-layer, 4-head, d_model 128 character-level transformer (context 64) on a
  text generated from a small seeded grammar (sentences and sums, see :func:`make_corpus`);
  the last tenth of the text is held out. 500 steps of 16 windows, lr 2e-3 warmed up over 40
  steps, then cosine-decayed to a tenth. Every embedding and linear weight has >= 4096
  elements, so all of them get 8-bit state (checked: the script counts the params whose state is
  uint8).

``--plot FILE.png`` draws the curves, one panel per training side by side. The digits run both
pairs by default (~10 s), the transformer AdamW only (~2 minutes on 2 busy cores; ``--pairs
both`` adds Adam). tests/test_adam8bit_quality.py runs the same trainings at a smaller budget
and states the tolerances.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import rsoptim

#: The optimizers compared, by name: float32 torch.optim ones and rsoptim's 8-bit twins.
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "AdamW": torch.optim.AdamW,
    "AdamW8bit": rsoptim.AdamW8bit,
    "Adam": torch.optim.Adam,
    "Adam8bit": rsoptim.Adam8bit,
}
PAIRS = {"adamw": ("AdamW", "AdamW8bit"), "adam": ("Adam", "Adam8bit")}


@dataclass
class Run:
    """One training: its loss curves (``steps[i]``: the step count where ``train[i]``, the mean
    train loss since the previous point, and ``heldout[i]`` were read) and its state's size."""

    optimizer: str
    steps: list[int] = field(default_factory=list)
    train: list[float] = field(default_factory=list)
    heldout: list[float] = field(default_factory=list)
    state_bytes_per_param: float = 0.0
    eight_bit_params: int = 0  # elements of params whose moments are uint8 codes
    params: int = 0
    seconds: float = 0.0


#: An optimizer: a name in OPTIMIZERS, or a class called as ``cls(params, lr=lr)``.
OptimizerSpec = str | Callable[..., torch.optim.Optimizer]


def optimizer_name(spec: OptimizerSpec) -> str:
    return spec if isinstance(spec, str) else spec.__name__


def make_optimizer(spec: OptimizerSpec, params, lr: float, min_8bit_size: int) -> torch.optim.Optimizer:
    """The optimizer with torch's default weight decay (AdamW 1e-2 decoupled, Adam none) and
    betas: the same hyperparameters for both optimizers of a pair."""
    cls = OPTIMIZERS[spec] if isinstance(spec, str) else spec
    if isinstance(cls, type) and issubclass(cls, rsoptim.Adam8bit):
        return cls(params, lr=lr, min_8bit_size=min_8bit_size)
    return cls(params, lr=lr)


def state_stats(optimizer: torch.optim.Optimizer, model: nn.Module) -> tuple[float, int]:
    """The bytes of the optimizer's state tensors per param element (a tensor shared by several
    params' state, like Adam8bit's ``qmap1``/``qmap2``, counted once) and the number of param
    elements whose state is 8-bit."""
    storages: dict[int, int] = {}
    eight_bit = 0
    for p, state in optimizer.state.items():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        if any(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in state.values()):
            eight_bit += p.numel()
    params = sum(p.numel() for p in model.parameters())
    return sum(storages.values()) / params, eight_bit


# ------------------------------------------------------------------------------------------
# (a) The seed's digits MLP
# ------------------------------------------------------------------------------------------


def digits_data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's bundled digits (no download), pixels scaled to [0, 1], split 80/20 by a
    fixed permutation (the same split for every run): ((x_train, y_train), (x_heldout, y_heldout))."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = len(x) * 4 // 5
    train, heldout = perm[:cut], perm[cut:]
    return (x[train], y[train]), (x[heldout], y[heldout])


def make_mlp(seed: int) -> nn.Module:
    """The seed's MLP (examples/train_digits.py), its initial weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def train_digits(
    optimizer: OptimizerSpec,
    seed: int = 0,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 3e-3,
    min_8bit_size: int = 4096,
) -> Run:
    """Trains the MLP from ``make_mlp(seed)``; one curve point per epoch (mean train loss over
    the epoch, held-out loss after it). The batch order depends on ``seed`` only."""
    (x, y), (x_held, y_held) = digits_data()
    model = make_mlp(seed)
    opt = make_optimizer(optimizer, model.parameters(), lr, min_8bit_size)
    order = torch.Generator().manual_seed(seed + 1)
    run = Run(optimizer_name(optimizer))
    start = time.perf_counter()
    step = 0
    for _ in range(epochs):
        total = 0.0
        for idx in torch.randperm(len(x), generator=order).split(batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            step += 1
        with torch.no_grad():
            heldout = F.cross_entropy(model(x_held), y_held).item()
        run.steps.append(step)
        run.train.append(total / len(x))
        run.heldout.append(heldout)
    run.seconds = time.perf_counter() - start
    run.state_bytes_per_param, run.eight_bit_params = state_stats(opt, model)
    run.params = sum(p.numel() for p in model.parameters())
    return run


# ------------------------------------------------------------------------------------------
# (b) A small character-level transformer on a generated text
# ------------------------------------------------------------------------------------------

_WORDS = {
    "adj": "small quick lazy bright quiet heavy green clever old round".split(),
    "noun": "fox dog cat bird kernel tensor model river stone robot".split(),
    "verb": ["sees", "follows", "jumps over", "chases", "finds", "pushes", "likes", "carries", "watches"],
    "adv": "slowly quickly gladly rarely often never".split(),
}


def make_corpus(chars: int, seed: int) -> str:
    """A deterministic text of about ``chars`` characters: lines drawn from a small grammar
    (``the quick fox sees the old stone slowly.``) and sums (``37+58=95.``), so that a model has
    short-range spelling, word order and, for the sums, digits to attend to. The same
    ``seed`` always gives the same text (Python's ``random.Random`` is stable across versions)."""
    rng = random.Random(seed)
    lines = []
    length = 0
    while length < chars:
        if rng.random() < 0.3:
            a, b = rng.randrange(100), rng.randrange(100)
            line = f"{a}+{b}={a + b}."
        else:
            pick = lambda kind: rng.choice(_WORDS[kind])  # noqa: E731
            line = f"the {pick('adj')} {pick('noun')} {pick('verb')} the {pick('adj')} {pick('noun')}"
            line += f" {pick('adv')}." if rng.random() < 0.5 else "."
            if rng.random() < 0.2:
                line = line.capitalize().replace(".", "!")
        lines.append(line)
        length += len(line) + 1
    return "\n".join(lines) + "\n"


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention, then a 4x MLP."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    def __init__(self, vocab: int, context: int = 64, d_model: int = 128, heads: int = 4, layers: int = 2):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Embedding(context, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tokens(idx) + self.positions(positions))))


@dataclass
class TextData:
    train: torch.Tensor  # token ids
    heldout: torch.Tensor
    vocab: int


def text_data(chars: int = 200_000) -> TextData:
    """The generated text as token ids (one per distinct character), its last tenth held out."""
    text = make_corpus(chars, seed=1234)
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    cut = len(ids) * 9 // 10
    return TextData(ids[:cut], ids[cut:], len(alphabet))


def windows(ids: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-character targets of the windows beginning at ``starts``."""
    rows = starts.view(-1, 1) + torch.arange(context + 1)
    chunk = ids[rows]
    return chunk[:, :-1], chunk[:, 1:]


def transformer_loss(model: nn.Module, ids: torch.Tensor, starts: torch.Tensor, context: int) -> torch.Tensor:
    x, y = windows(ids, starts, context)
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def train_transformer(
    optimizer: OptimizerSpec,
    seed: int = 0,
    steps: int = 500,
    batch_size: int = 16,
    context: int = 64,
    lr: float = 2e-3,
    warmup: int = 40,
    every: int = 25,
    heldout_windows: int = 128,
    min_8bit_size: int = 4096,
) -> Run:
    """Trains a CharTransformer initialised from ``seed`` on random windows of the train text
    (drawn from ``seed`` only: the same batches for every optimizer), lr warmed up linearly and
    then cosine-decayed to a tenth; every ``every`` steps a curve point: the mean train loss
    since the last point and the loss on ``heldout_windows`` fixed held-out windows."""
    data = text_data()
    torch.manual_seed(seed)
    model = CharTransformer(data.vocab, context)
    opt = make_optimizer(optimizer, model.parameters(), lr, min_8bit_size)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    batches = torch.Generator().manual_seed(seed + 1)
    spaced = torch.linspace(0, len(data.heldout) - context - 1, heldout_windows).long()
    run = Run(optimizer_name(optimizer))
    start = time.perf_counter()
    recent: list[float] = []
    for step in range(1, steps + 1):
        starts = torch.randint(len(data.train) - context - 1, (batch_size,), generator=batches)
        loss = transformer_loss(model, data.train, starts, context)
        opt.zero_grad()
        loss.backward()
        opt.step()
        scheduler.step()
        recent.append(loss.item())
        if step % every == 0 or step == steps:
            with torch.no_grad():
                heldout = transformer_loss(model, data.heldout, spaced, context).item()
            run.steps.append(step)
            run.train.append(sum(recent) / len(recent))
            run.heldout.append(heldout)
            recent.clear()
    run.seconds = time.perf_counter() - start
    run.state_bytes_per_param, run.eight_bit_params = state_stats(opt, model)
    run.params = sum(p.numel() for p in model.parameters())
    return run


# ------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------


def report(title: str, runs: list[Run]) -> None:
    print(f"\n== {title} ==")
    names = [r.optimizer for r in runs]
    print("loss curves (train: mean since the previous row; held-out: after the step)")
    print(f"{'step':>6} " + " ".join(f"{n + ' train':>16} {n + ' held':>15}" for n in names))
    for i, step in enumerate(runs[0].steps):
        print(f"{step:>6} " + " ".join(f"{r.train[i]:>16.4f} {r.heldout[i]:>15.4f}" for r in runs))
    columns = ("final train", "final held-out", "state B/param", "8-bit params", "time")
    print(f"\n{'optimizer':>10} " + " ".join(f"{c:>15}" for c in columns))
    for r in runs:
        share = f"{r.eight_bit_params}/{r.params}"
        print(
            f"{r.optimizer:>10} {r.train[-1]:>15.4f} {r.heldout[-1]:>15.4f} {r.state_bytes_per_param:>15.3f}"
            f" {share:>15} {r.seconds:>14.1f}s"
        )
    by_name = {r.optimizer: r for r in runs}
    for float32, eight_bit in PAIRS.values():
        if float32 in by_name and eight_bit in by_name:
            a, b = by_name[float32].heldout[-1], by_name[eight_bit].heldout[-1]
            print(f"{eight_bit} - {float32} final held-out loss: {b - a:+.4f} ({(b - a) / a:+.2%})")


def plot(panels: dict[str, list[Run]], path: str) -> None:
    """One column per training: the loss curves above, each 8-bit run's relative gap to its
    float32 twin below (the curves themselves lie on top of each other)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2, len(panels), figsize=(6.5 * len(panels), 7), squeeze=False, sharex="col", height_ratios=[2, 1]
    )
    for column, (title, runs) in enumerate(panels.items()):
        top, bottom = axes[0][column], axes[1][column]
        for i, r in enumerate(runs):
            top.plot(r.steps, r.train, color=f"C{i}", label=f"{r.optimizer} train")
            top.plot(r.steps, r.heldout, color=f"C{i}", linestyle="--", label=f"{r.optimizer} held-out")
        top.set(ylabel="cross-entropy loss", yscale="log", title=title)
        top.legend(fontsize=8)
        by_name = {r.optimizer: r for r in runs}
        for i, (float32, eight_bit) in enumerate(PAIRS.values()):
            if float32 in by_name and eight_bit in by_name:
                a, b = by_name[float32], by_name[eight_bit]
                for label, style, x, y in (("train", "-", a.train, b.train), ("held-out", "--", a.heldout, b.heldout)):
                    gap = [100 * (after / before - 1) for before, after in zip(x, y)]
                    bottom.plot(b.steps, gap, color=f"C{2 * i + 1}", linestyle=style, label=f"{eight_bit} {label}")
        bottom.axhline(0, color="grey", linewidth=0.8)
        bottom.set(xlabel="step", ylabel="8-bit vs float32 (%)")
        bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nplot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["digits", "transformer", "both"], default="both")
    parser.add_argument(
        "--pairs",
        choices=["adamw", "adam", "both"],
        help="which pairs to compare (default: both on the digits MLP, adamw on the transformer)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30, help="digits MLP epochs")
    parser.add_argument("--steps", type=int, default=500, help="transformer steps")
    parser.add_argument("--min-8bit-size", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=16, help="transformer windows per step")
    # One thread: on a small, shared CPU, torch's second OpenMP thread mostly waits for a core.
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (rsoptim follows it)")
    parser.add_argument("--plot", metavar="FILE.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def names(default: str) -> list[str]:
        pairs = args.pairs or default
        return [n for key in (["adamw", "adam"] if pairs == "both" else [pairs]) for n in PAIRS[key]]

    panels = {}
    if args.model in ("digits", "both"):
        runs = [train_digits(n, args.seed, epochs=args.epochs, min_8bit_size=args.min_8bit_size) for n in names("both")]
        title = f"digits MLP 64-128-10, {args.epochs} epochs, batch 64, lr 3e-3, seed {args.seed}"
        report(title, runs)
        panels["digits MLP"] = runs
    if args.model in ("transformer", "both"):
        # The Adam pair doubles the time: only with --pairs adam/both.
        options = {"steps": args.steps, "batch_size": args.batch_size, "min_8bit_size": args.min_8bit_size}
        runs = [train_transformer(n, args.seed, **options) for n in names("adamw")]
        for r in runs:
            # Every embedding and linear weight really has 8-bit state: only the biases and
            # LayerNorm params (< 4096 elements each, ~1% of the model) keep float32 moments.
            if r.optimizer.endswith("8bit") and args.min_8bit_size <= 4096 and r.eight_bit_params < 0.98 * r.params:
                raise SystemExit(f"{r.optimizer}: only {r.eight_bit_params} of {r.params} params have 8-bit state")
        title = f"char transformer 2x128, {args.steps} steps, batch {args.batch_size}x64, lr 2e-3, seed {args.seed}"
        report(title, runs)
        panels["character-level transformer"] = runs
    if args.plot:
        plot(panels, args.plot)


if __name__ == "__main__":
    main()
