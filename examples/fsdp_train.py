"""Trains a small character-level transformer with FSDP2 and rsoptim.

    torchrun --nproc_per_node 2 examples/fsdp_train.py                      # CPU, gloo, rsoptim.AdamW
    torchrun --nproc_per_node 2 examples/fsdp_train.py --optimizer torch    # torch.optim.AdamW, torch's clip
    torchrun --nproc_per_node 2 examples/fsdp_train.py --checkpoint ckpt --stop-after 100   # stops at step 100, saves ckpt/step-000100
    torchrun --nproc_per_node 2 examples/fsdp_train.py --checkpoint ckpt    # resumes there, trains to step 200
    torchrun --nproc_per_node 2 examples/fsdp_train.py --device cuda --cpu-offload     # GPUs (NCCL), step on CPU

The model (GPT-style: token and position embeddings, pre-LayerNorm blocks of causal attention and
an MLP, a linear head) is sharded with FSDP2: ``fully_shard`` on each block, then on the root, over
a 1-D device mesh of all ranks. Every param is then a DTensor holding this rank's shard;
``rsoptim.AdamW`` steps the local shards with its Rust kernels and keeps its state as DTensors
(as torch.optim does), and ``rsoptim.clip_grad_norm_`` returns the total norm over all ranks as a
replicated DTensor. The data is generated: sentences of a small grammar ("the cat chases a red
apple at night."), one character per token; each rank samples its own batches.

``--device cuda --cpu-offload``: NCCL for the GPUs' collectives (gloo for CPU tensors: the grad
norm's all-reduce), forward and backward on the GPUs, and ``CPUOffloadPolicy``: the sharded params,
their grads and the optimizer state stay in CPU memory, where rsoptim steps them.

``--checkpoint DIR``: at the end (and every ``--save-every`` steps), the model and optimizer state
(sharded, from ``get_state_dict``) and the step are saved with ``torch.distributed.checkpoint`` in
DIR/step-N; when DIR already holds one, training resumes from the newest (``set_state_dict``) up
to ``--steps`` steps in all. Batches and the learning rate are functions of the step (and of
``--steps``), so a resumed run continues as the uninterrupted run would have: ``--stop-after N``
stops a run early, as an interruption would. A checkpoint saved with ``--optimizer rsoptim``
loads with ``--optimizer torch`` and back: the state dicts have the same layout.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

import rsoptim

# ---------------------------------------------------------------------------------------------
# Data: sentences of a small grammar, one character per token.

SUBJECTS = ["the cat", "the dog", "a bird", "my friend", "the old man", "a small child", "her sister"]
VERBS = ["sees", "likes", "chases", "finds", "paints", "follows", "forgets"]
OBJECTS = ["the ball", "a red apple", "the moon", "a green tree", "the river", "his kite", "an owl"]
ENDINGS = [".", " today.", " again.", " at night.", " in the rain."]


def make_text(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences, length = [], 0
    while length < n_chars:
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)} "
        sentences.append(s)
        length += len(s)
    return "".join(sentences)


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int, seed: int, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the text: a function of (seed, rank, step), so a resumed run sees the
    batches the uninterrupted run would have seen."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + step)
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
    x = torch.stack([data[s : s + seq_len] for s in starts.tolist()])
    y = torch.stack([data[s + 1 : s + seq_len + 1] for s in starts.tolist()])
    return x, y


# ---------------------------------------------------------------------------------------------
# Model.


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, seq_len: int, dim: int, heads: int, layers: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """The logits, or with ``targets`` the mean cross-entropy loss."""
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return logits if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# ---------------------------------------------------------------------------------------------


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to a tenth: a function of the step alone."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def latest_checkpoint(root: str | None) -> str | None:
    """The newest complete checkpoint under ``root`` (``root/step-000060``, ...), or None."""
    if root is None or not os.path.isdir(root):
        return None
    done = [d for d in os.listdir(root) if d.startswith("step-") and os.path.exists(os.path.join(root, d, ".metadata"))]
    return os.path.join(root, max(done)) if done else None


def save_checkpoint(root: str, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> str:
    """Saves into ``root/step-{step}``: every rank writes its shards (DCP), rank 0 the metadata."""
    path = os.path.join(root, f"step-{step:06d}")
    model_state, optim_state = get_state_dict(model, optimizer)  # sharded: DTensors, each rank its shard
    dcp.save({"model": model_state, "optim": optim_state, "trainer": {"step": step}}, checkpoint_id=path)
    return path


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "trainer": {"step": 0}}
    dcp.load(state, checkpoint_id=path)  # in place, into this rank's shards
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(state["trainer"]["step"])


@torch.no_grad()
def sample(model: nn.Module, prompt: str, n: int, stoi: dict[str, int], itos: list[str], seq_len: int, device: torch.device) -> str:
    """Greedy completion; every rank runs it (FSDP's forward all-gathers the params)."""
    idx = torch.tensor([[stoi[c] for c in prompt]], device=device)
    for _ in range(n):
        logits = model(idx[:, -seq_len:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return "".join(itos[i] for i in idx[0].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=["rsoptim", "torch"], default="rsoptim", help="rsoptim.AdamW + rsoptim.clip_grad_norm_, or torch's")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cpu-offload", action="store_true", help="with --device cuda: params, grads and the optimizer step on the CPU")
    parser.add_argument("--steps", type=int, default=200, help="total steps (a resumed run continues up to this)")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per rank and step")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--max-norm", type=float, default=1.0, help="clip_grad_norm_'s max_norm")
    parser.add_argument("--threads", type=int, default=1, help="torch (and so rsoptim) threads per rank on the CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", metavar="DIR", help="save DCP checkpoints in DIR/step-N at the end; resume from the newest if any")
    parser.add_argument("--save-every", type=int, default=0, help="with --checkpoint: also save every N steps")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N", help="stop after N steps of this run (an interruption: --steps still sets the schedule)")
    args = parser.parse_args()
    if args.cpu_offload and args.device != "cuda":
        parser.error("--cpu-offload needs --device cuda (on --device cpu everything is on the CPU already)")

    # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # With CPU offload the grads are CPU tensors: the grad norm's all-reduce needs gloo.
        backend = "cpu:gloo,cuda:nccl" if args.cpu_offload else "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    torch.set_num_threads(args.threads)  # rsoptim follows torch's thread count
    dist.init_process_group(backend)
    train(args, device, backend)  # (on an error, the traceback ends this rank and torchrun stops the others)
    # The model, optimizer and FSDP state (and any collective's work they hold) are freed by now,
    # while the interpreter is fully alive; then the ranks tear down the group together.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def train(args: argparse.Namespace, device: torch.device, backend: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))

    text = make_text(200_000, seed=1234)  # the same text on every rank
    itos = sorted(set(text))
    stoi = {c: i for i, c in enumerate(itos)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)

    torch.manual_seed(args.seed)  # the same initial weights on every rank (and for both optimizers)
    model = TinyGPT(len(itos), args.seq_len, args.dim, args.heads, args.layers)
    offload = CPUOffloadPolicy() if args.cpu_offload else OffloadPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, offload_policy=offload)
    fully_shard(model, mesh=mesh, offload_policy=offload)  # moves the shards to the mesh's device (or the CPU with offload)

    if args.optimizer == "rsoptim":
        optimizer = rsoptim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        clip_grad_norm_ = rsoptim.clip_grad_norm_
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        clip_grad_norm_ = torch.nn.utils.clip_grad_norm_

    start_step, resumed_from = 0, latest_checkpoint(args.checkpoint)
    if resumed_from is not None:
        start_step = load_checkpoint(resumed_from, model, optimizer)
    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        p = next(model.parameters())
        print(
            f"{world} ranks ({backend}), {args.optimizer} AdamW, {n_params:,} params, each a {type(p).__name__} "
            f"{tuple(p.placements) if hasattr(p, 'placements') else ''} with local shards on {p.to_local().device if hasattr(p, 'to_local') else p.device}"
            + (f"; resumed from {resumed_from} at step {start_step}" if resumed_from else ""),
            flush=True,
        )

    end_step = args.steps if args.stop_after is None else min(args.steps, start_step + args.stop_after)
    model.train()
    t0, logged_loss, logged_steps = time.perf_counter(), torch.zeros((), device=device), 0
    for step in range(start_step, end_step):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        x, y = get_batch(data, args.batch_size, args.seq_len, args.seed, rank, step)
        x, y = x.to(device), y.to(device)
        loss = model(x, y)
        loss.backward()  # FSDP2 reduce-scatters the grads: each rank gets its shard's (averaged)
        grad_norm = clip_grad_norm_(model.parameters(), args.max_norm)  # a Replicate DTensor: the norm over all ranks
        optimizer.step()
        optimizer.zero_grad()
        logged_loss += loss.detach()
        logged_steps += 1
        if (step + 1) % args.log_every == 0 or step + 1 == end_step:
            dist.all_reduce(logged_loss)  # the mean over ranks, for the log
            mean_loss = logged_loss.item() / world / logged_steps
            norm = grad_norm.full_tensor().item() if hasattr(grad_norm, "full_tensor") else float(grad_norm)
            if rank == 0:
                ms = 1e3 * (time.perf_counter() - t0) / logged_steps
                print(f"step {step + 1:5d} | loss {mean_loss:.4f} | grad norm {norm:.3f} | lr {lr_at(step, args):.2e} | {ms:.1f} ms/step", flush=True)
            t0, logged_loss, logged_steps = time.perf_counter(), torch.zeros((), device=device), 0
        if args.checkpoint and args.save_every and (step + 1) % args.save_every == 0 and step + 1 < end_step:
            save_checkpoint(args.checkpoint, model, optimizer, step + 1)

    model.eval()
    completion = sample(model, "the ", 60, stoi, itos, args.seq_len, device)
    if rank == 0:
        print(f"sample: {completion!r}", flush=True)
    if args.checkpoint and end_step > start_step:
        path = save_checkpoint(args.checkpoint, model, optimizer, end_step)
        if rank == 0:
            print(f"saved checkpoint of step {end_step} to {path}", flush=True)


if __name__ == "__main__":
    main()
